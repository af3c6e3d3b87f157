"""Metrics under a real Prometheus: exact byte totals, coverage 1.0, every rejection reason."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, recv_all
from .pki import Identity
from .promserver import PROMETHEUS, PROMTOOL, Prometheus

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules" / "mtls-recording.yml"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="prometheus/promtool not installed"
)


def _ctx(pki: Pki, ident: Identity | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.server.bundle)
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def _bad_client(port: int, ctx: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"x")
            s.recv(10)
    except (ssl.SSLError, OSError):
        pass


class Setup:
    def __init__(
        self, inbound: Sidecar, outbound: Sidecar, prom: Prometheus, in_port: int, out_port: int
    ) -> None:
        self.inbound, self.outbound, self.prom = inbound, outbound, prom
        self.in_port, self.out_port = in_port, out_port


@pytest.fixture(scope="module")
def setup(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    d = tmp_path_factory.mktemp("prom")
    echo = TcpApp("echo")
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"api=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            "MTLS_WORKERS": "2",
        },
        d / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"api=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
            "MTLS_WORKERS": "2",
        },
        d / "outbound.log",
    )
    inbound.wait_ready()
    outbound.wait_ready()
    # The shipped rules evaluate every 30s; the same rules every second keep the test short.
    rules = d / "mtls-recording.yml"
    rules.write_text(RULES.read_text().replace("interval: 30s", "interval: 1s"))
    prom = Prometheus(
        [f"127.0.0.1:{inbound.admin_port}", f"127.0.0.1:{outbound.admin_port}"],
        d / "prometheus",
        (rules,),
    )
    try:
        prom.wait_targets_up(2)
        yield Setup(inbound, outbound, prom, in_port, out_port)
    finally:
        prom.stop()
        assert inbound.stop() == 0
        assert outbound.stop() == 0
        echo.close()


def test_promtool_check_metrics_on_a_real_scrape(setup: Setup) -> None:
    exchange(setup.out_port, b"warm up")
    for sc in (setup.inbound, setup.outbound):
        status, body = sc.get("/metrics")
        assert status == 200
        r = subprocess.run(
            [str(PROMTOOL), "check", "metrics"], input=body, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_exact_byte_totals_and_coverage(setup: Setup) -> None:
    """Many connections over two workers per sidecar: one scrape sees the exact sum."""
    prom = setup.prom
    q = 'sum(mtls_bytes_total{job="mtls-sidecar",direction="outbound",flow="out"})'
    before = prom.wait_value(q, setup.outbound.metric("mtls_bytes_total", flow="out"))
    assert before is not None
    sizes = [1000 * (i + 1) for i in range(40)] + [3_000_000]
    sent = 0
    for n in sizes:
        payload = bytes([n % 251]) * n
        assert exchange(setup.out_port, payload) == payload
        sent += n
    want = before + sent
    assert prom.wait_value(q, want) == want
    # the same bytes arrived at the inbound sidecar, from the network, inside mTLS
    q_in = 'sum(mtls_bytes_total{direction="inbound",flow="in",security="mtls"})'
    assert prom.wait_value(q_in, want) == want
    coverage = (
        'sum(rate(mtls_bytes_total{security="mtls"}[30s])) / sum(rate(mtls_bytes_total[30s]))'
    )
    assert prom.wait_value(coverage, 1.0) == 1.0
    # the recording rule says the same, per direction and route
    deadline = time.monotonic() + 20
    rec = prom.query("mtls:encryption_coverage:ratio_rate5m")
    while not rec and time.monotonic() < deadline:
        time.sleep(0.5)
        rec = prom.query("mtls:encryption_coverage:ratio_rate5m")
    assert rec and all(float(r["value"][1]) == 1.0 for r in rec), rec
    # both workers of the outbound sidecar carried some of them: the total really is a sum
    # (the inbound side may get both workers' pooled connections on one of its own workers)
    pids = {e["pid"] for e in setup.outbound.log_events() if e.get("event") == "conn_closed"}
    assert len(pids) == 2, pids


def test_rejections_by_reason_in_prometheus(setup: Setup, pki: Pki) -> None:
    port = setup.in_port
    _bad_client(port, _ctx(pki, pki.other_ca))  # wrong CA
    _bad_client(port, _ctx(pki, None))  # no client certificate
    _bad_client(port, _ctx(pki, pki.expired))  # expired
    with socket.create_connection(("127.0.0.1", port)) as s:  # plaintext
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        recv_all(s)
    for reason in ("unknown_ca", "no_client_cert", "expired_cert", "not_tls"):
        expr = (
            f'sum(mtls_connections_rejected_total{{direction="inbound",route="api",'
            f'reason="{reason}"}})'
        )
        assert setup.prom.wait_value(expr, 1.0) == 1.0, reason


def test_active_connections_gauge_sums_workers(setup: Setup) -> None:
    socks = [socket.create_connection(("127.0.0.1", setup.out_port)) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"a")
            s.settimeout(5)
            assert s.recv(1) == b"a"
        expr = 'sum(mtls_connections_active{direction="outbound"})'
        assert setup.prom.wait_value(expr, 20.0) == 20.0
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert setup.prom.wait_value('sum(mtls_connections_active{direction="outbound"})', 0.0) == 0.0
