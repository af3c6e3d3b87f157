"""`mtls-sidecar coverage` against a real Prometheus scraping two real sidecar pairs: the
report's numbers equal the traffic the test sent, in every format, and the exit statuses."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import TD, Pki
from .harness import ROOT, Sidecar, TcpApp, exchange, free_port, identity_env
from .pki import Identity, write_identity
from .promserver import PROMETHEUS, Prometheus

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed")
CHROMIUM = shutil.which("chromium")

# What the test sends: payload sizes per connection (the echo app sends each back).
PAIR1_MTLS = [1_000, 20_000, 300_000]
PAIR2_MTLS = [5_000, 7_000]
PAIR1_PLAIN = [111, 2_222]  # straight to pair 1's permissive inbound, no sidecar in front


@dataclass
class World:
    prom: Prometheus
    url: str
    web: Identity
    workdir: Path
    t0: float  # when the traffic started (unix time)


def _pair(
    d: Path,
    name: str,
    client: Identity,
    server: Identity,
    echo: TcpApp,
    inbound_env: dict[str, str],
    outbound_env: dict[str, str],
) -> tuple[Sidecar, Sidecar, int, int]:
    in_port, out_port = free_port(), free_port()
    server_id = server.spiffe_id
    inbound = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"api=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            **inbound_env,
        },
        d / f"{name}-in.log",
    )
    outbound = Sidecar(
        {
            **identity_env(client),
            "MTLS_OUTBOUND": f"api=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{server_id}",
            # one TLS connection per app connection, so both ends count the same connections
            "MTLS_CONNECTION_REUSE": "false",
            **outbound_env,
        },
        d / f"{name}-out.log",
    )
    return inbound, outbound, in_port, out_port


def _no_client_cert(port: int, bundle: Path, cert: Identity | None = None) -> None:
    """A TLS client straight to an inbound port: without a certificate, or with `cert`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(bundle)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"x")
            s.recv(10)
    except (ssl.SSLError, OSError):
        pass


@pytest.fixture(scope="module")
def world(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("coverage")
    bundle = [pki.root.cert]
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    web = write_identity(d, "web", pki.inter, bundle, f"{TD}/web", not_after=soon)
    db = write_identity(d, "db", pki.inter, bundle, f"{TD}/db")
    echo = TcpApp("echo")
    permissive = {"MTLS_INBOUND_MODE": "permissive"}
    in1, out1, in_port1, out_port1 = _pair(d, "p1", pki.client, pki.server, echo, permissive, {})
    # pair 2: web offers X25519 only (a classical edge next to pair 1's post-quantum one), and
    # db allows web only (the stranger is refused on an edge of its own)
    strict = {"MTLS_INBOUND_MODE": "strict", "MTLS_ALLOW_PEERS": f"{TD}/web"}
    classical = {"MTLS_TLS_GROUPS": "X25519"}
    in2, out2, in_port2, out_port2 = _pair(d, "p2", web, db, echo, strict, classical)
    sidecars = [in1, out1, in2, out2]
    prom: Prometheus | None = None
    try:
        for sc in sidecars:
            sc.wait_ready()
        prom = Prometheus([f"127.0.0.1:{sc.admin_port}" for sc in sidecars], d / "prometheus")
        prom.wait_targets_up(4)
        t0 = time.time()
        for n in PAIR1_MTLS:
            assert exchange(out_port1, b"a" * n) == b"a" * n
        for n in PAIR2_MTLS:
            assert exchange(out_port2, b"b" * n) == b"b" * n
        for n in PAIR1_PLAIN:
            assert exchange(in_port1, b"p" * n) == b"p" * n
        _no_client_cert(in_port2, web.bundle)
        _no_client_cert(in_port2, web.bundle, pki.stranger)
        # Each sidecar's own counts per peer identity and group, and per refused identity.
        groups = "mtls_peer_key_exchange_total"
        for sc, peer, group, n in (
            (out1, f"{TD}/server", "X25519MLKEM768", len(PAIR1_MTLS)),
            (in1, f"{TD}/client", "X25519MLKEM768", len(PAIR1_MTLS)),
            (out2, f"{TD}/db", "X25519", len(PAIR2_MTLS)),
            (in2, f"{TD}/web", "X25519", len(PAIR2_MTLS)),
        ):
            assert sc.wait_metric(groups, n, peer_identity=peer, group=group) == n
            assert sc.metric(groups) == n
        stranger = f"{TD}/ns/other/sa/stranger"
        by_peer = "mtls_peer_rejections_total"
        assert in2.wait_metric(by_peer, 1, peer_identity=stranger, reason="peer_not_allowed") == 1
        assert in2.metric(by_peer, direction="inbound") == 1
        assert in2.wait_metric("mtls_connections_rejected_total", 2) == 2
        # Prometheus has scraped the last of it once it shows the sidecars' own totals.
        for metric in (
            "mtls_bytes_total",
            "mtls_connections_total",
            "mtls_peer_connections_total",
            "mtls_peer_bytes_total",
            groups,
            "mtls_peer_rejections_total",
            "mtls_connections_rejected_total",
        ):
            want = sum(sc.metric(metric) for sc in sidecars)
            assert prom.wait_value(f"sum({metric})", want) == want, metric
        yield World(prom, f"http://127.0.0.1:{prom.port}", web, d, t0)
    finally:
        if prom is not None:
            prom.stop()
        for sc in sidecars:
            assert sc.stop() == 0
        echo.close()


def coverage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "coverage", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _json(world: World, *extra: str) -> dict[str, Any]:
    r = coverage("--prometheus", world.url, "--window", "1h", "--format", "json", *extra)
    assert r.returncode in (0, 1), r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_numbers_equal_what_was_sent(world: World) -> None:
    doc = _json(world)
    mtls_conns = len(PAIR1_MTLS) + len(PAIR2_MTLS)
    mtls_bytes = sum(PAIR1_MTLS) + sum(PAIR2_MTLS)
    plain_bytes = sum(PAIR1_PLAIN)
    assert doc["exact"] is True
    # each mTLS connection is counted by both sidecars; the plaintext ones by the inbound only
    assert doc["connections"] == {"mtls": 2 * mtls_conns, "plaintext": len(PAIR1_PLAIN)}
    # each byte crosses the network once each way (echo), counted by both ends / by one
    assert doc["bytes"] == {"mtls": 4 * mtls_bytes, "plaintext": 2 * plain_bytes}
    want = 100 * 4 * mtls_bytes / (4 * mtls_bytes + 2 * plain_bytes)
    assert doc["coverage_percent"] == pytest.approx(want, rel=1e-12)
    assert doc["refusals"] == {"no_client_cert": 1, "peer_not_allowed": 1}
    assert doc["handshakes"] == 2 * mtls_conns
    # pair 2's outbound offered X25519 only: both of its ends count its handshakes so
    assert doc["handshakes_by_group"] == {
        "X25519": 2 * len(PAIR2_MTLS),
        "X25519MLKEM768": 2 * len(PAIR1_MTLS),
    }
    assert sum(doc["handshakes_by_group"].values()) == 2 * mtls_conns
    pq = sum(v for g, v in doc["handshakes_by_group"].items() if "MLKEM" in g)
    assert doc["post_quantum_handshakes"] == pq
    edges = {(e["source"], e["destination"]): e for e in doc["edges"]}
    stranger = f"{TD}/ns/other/sa/stranger"
    assert set(edges) == {
        (f"{TD}/client", f"{TD}/server"),
        (f"{TD}/web", f"{TD}/db"),
        (stranger, f"{TD}/db"),
        ("unidentified", f"{TD}/db"),
    }
    e1 = edges[(f"{TD}/client", f"{TD}/server")]
    e2 = edges[(f"{TD}/web", f"{TD}/db")]
    assert (e1["seen_by_source"], e1["seen_by_destination"]) == (len(PAIR1_MTLS),) * 2
    assert (e2["seen_by_source"], e2["seen_by_destination"]) == (len(PAIR2_MTLS),) * 2
    # an edge's bytes: what went one way and came back, counted by each end
    assert (e1["bytes_seen_by_source"], e1["bytes_seen_by_destination"]) == (
        2 * sum(PAIR1_MTLS),
    ) * 2
    assert (e2["bytes_seen_by_source"], e2["bytes_seen_by_destination"]) == (
        2 * sum(PAIR2_MTLS),
    ) * 2
    # the post-quantum share per edge, from each end's count of its key-exchange groups
    assert e1["groups_seen_by_source"] == e1["groups_seen_by_destination"]
    assert e1["groups_seen_by_source"] == {"X25519MLKEM768": len(PAIR1_MTLS)}
    assert e2["groups_seen_by_source"] == e2["groups_seen_by_destination"]
    assert e2["groups_seen_by_source"] == {"X25519": len(PAIR2_MTLS)}
    assert (e1["post_quantum_percent"], e2["post_quantum_percent"]) == (100.0, 0.0)
    # refusals per edge: the identity db's allow list refused, and the client without a
    # certificate, which stays on db's route as unidentified
    refused = edges[(stranger, f"{TD}/db")]
    assert (refused["seen_by_source"], refused["seen_by_destination"]) == (0, 0)
    assert refused["refused_by_destination"] == {"peer_not_allowed": 1}
    assert refused["refused_by_source"] == {} and refused["post_quantum_percent"] is None
    unknown = edges[("unidentified", f"{TD}/db")]
    assert (unknown["route"], unknown["refused_by_destination"]) == ("api", {"no_client_cert": 1})
    assert e1["refused_by_destination"] == e2["refused_by_destination"] == {}
    assert all(e["wire"] is None for e in doc["edges"])  # no auditor here
    routes = {(r["identity"], r["direction"]): r for r in doc["routes"]}
    server_in = routes[(f"{TD}/server", "inbound")]
    assert server_in["bytes"] == {"mtls": 2 * sum(PAIR1_MTLS), "plaintext": 2 * plain_bytes}
    assert server_in["connections"] == {"mtls": len(PAIR1_MTLS), "plaintext": len(PAIR1_PLAIN)}
    assert routes[(f"{TD}/db", "inbound")]["refused"] == 2
    certs = {c["identity"]: c["expires_in_window"] for c in doc["certificates"]}
    assert certs == {
        f"{TD}/client": False,
        f"{TD}/server": False,
        f"{TD}/db": False,
        f"{TD}/web": True,  # 30 minutes left, inside the next hour
    }
    assert doc["wire"] is None


def test_exit_status_is_the_gate(world: World) -> None:
    measured = _json(world)["coverage_percent"]
    below, above = f"{measured - 0.01:.4f}", f"{measured + 0.01:.4f}"
    ok = coverage("--prometheus", world.url, "--window", "1h", "--min-coverage", below)
    assert ok.returncode == 0, ok.stderr
    fail = coverage("--prometheus", world.url, "--window", "1h", "--min-coverage", above)
    assert fail.returncode == 1, fail.stderr
    assert "FAIL" in fail.stdout and f"{measured:.3f}%" in fail.stdout
    assert f"{TD}/web" in fail.stdout and "no_client_cert: 1" in fail.stdout
    row = next(x for x in fail.stdout.splitlines() if x.startswith(f"{TD}/ns/other/sa/stranger"))
    assert row.split()[-5:] == ["-", "-", "peer_not_allowed", "1", "-"]
    row = next(x for x in fail.stdout.splitlines() if x.startswith(f"{TD}/client "))
    assert row.split()[-4:] == ["100.000%", "-", "-", "-"]


def test_text_to_a_file(world: World) -> None:
    out = world.workdir / "report.txt"
    r = coverage("--prometheus", world.url, "--window", "1h", "--out", str(out))
    assert r.returncode == 1 and r.stdout == ""  # 99.9 by default: the plaintext fails it
    text = out.read_text()
    assert text.startswith("mTLS coverage report")
    assert f"{TD}/client" in text and f"{TD}/server" in text


def test_unreachable_prometheus_is_exit_2_in_one_line() -> None:
    r = coverage("--prometheus", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is unreachable" in lines[0], r.stderr


def test_a_prometheus_without_sidecars_is_exit_2(tmp_path: Path) -> None:
    prom = Prometheus([], tmp_path / "empty")
    try:
        r = coverage("--prometheus", f"http://127.0.0.1:{prom.port}", "--window", "1h")
    finally:
        prom.stop()
    assert r.returncode == 2
    assert "no mtls-sidecar metrics" in r.stderr


def _screenshot(page: Path, png: Path, profile: Path, how: str = "--screenshot") -> None:
    """Headless Chromium, offline and with a fresh profile, screenshots the page (or, with
    how="--print-to-pdf", prints it)."""
    assert CHROMIUM is not None
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"{how}={png}",
            "--window-size=1200,1600",
            "--hide-scrollbars",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]


def _near(px: tuple[int, ...], rgb: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px[:3], rgb, strict=True))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_html_is_self_contained_and_its_charts_are_drawn(world: World) -> None:
    from PIL import Image  # matplotlib's own dependency

    page = world.workdir / "report.html"
    # a window twice as long as the time since the traffic began: the coverage line spans
    # its second half, whatever the time this test runs
    window = f"{max(6, 2 * math.ceil(time.time() - world.t0))}s"
    r = coverage(
        "--prometheus", world.url, "--window", window, "--format", "html", "--out", str(page)
    )
    assert r.returncode == 1, r.stderr
    html = page.read_text()
    # nothing to fetch when opened: no scripts, no external resources
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(http" not in html
    assert html.count("<svg") == 2
    assert f"{TD}/web" in html and "no_client_cert" in html
    png = world.workdir / "report.png"
    _screenshot(page, png, world.workdir / "chromium-profile")
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 1600)
    colors = {
        "line": (0x2F, 0x6F, 0xDB),
        "mtls bars": (0x2E, 0x9D, 0x4F),
        "plaintext": (0xD2, 0x46, 0x2F),
    }
    counts = dict.fromkeys(colors, 0)
    rows: dict[str, set[int]] = {k: set() for k in colors}
    for y in range(0, img.height, 2):
        for x in range(0, img.width, 2):
            px = img.getpixel((x, y))
            assert isinstance(px, tuple)
            for name, rgb in colors.items():
                if _near(px, rgb):
                    counts[name] += 1
                    rows[name].add(y)
    # the charts were drawn: each of their colours covers a real area of the page, and the
    # coverage line is above the bars (the page's order)
    assert all(n > 50 for n in counts.values()), counts
    assert min(rows["line"]) < min(rows["mtls bars"]), rows
    # printed to PDF: pages come out (the print CSS keeps charts and table rows whole)
    pdf = world.workdir / "report.pdf"
    _screenshot(page, pdf, world.workdir / "chromium-profile-pdf", "--print-to-pdf")
    head = pdf.read_bytes()
    assert head.startswith(b"%PDF-") and head.count(b"/Type /Page") >= 1
    keep = os.environ.get("COVERAGE_SCREENSHOT")
    if keep:
        shutil.copyfile(png, keep)
