"""Hostile and broken peers against real sidecars: slowloris, malformed and truncated TLS,
old protocol versions, renegotiation, resets, and a peer that never reads.

Each case checks three things: what the bad peer gets (a clean close or an alert, never
relayed data), what the sidecar logs and counts, and that everyone else is still served.
"""

from __future__ import annotations

import os
import random
import resource
import select
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, recv_all, wait_for
from .pki import Identity

HANDSHAKE_TIMEOUT = 2.0


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def client_ctx(ident: Identity, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ident.bundle)
    ctx.load_cert_chain(ident.cert, ident.key)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def client_hello(ident: Identity) -> bytes:
    """The bytes of a real TLS 1.3 ClientHello (with its record header)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx(ident).wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def mark(sc: Sidecar) -> int:
    """Where the log is now: ephemeral ports get reused, so look only at what comes after."""
    return len(sc.log_events())


def events_for(sc: Sidecar, local_port: int, since: int) -> list[dict[str, Any]]:
    """Log lines (after `since`) about the connection whose client side used `local_port`."""
    peer = f"127.0.0.1:{local_port}"
    return [
        e for e in sc.log_events()[since:] if e.get("peer") == peer or peer in str(e.get("msg"))
    ]


def closed_line(sc: Sidecar, local_port: int, since: int) -> dict[str, Any] | None:
    for e in events_for(sc, local_port, since):
        if e.get("event") == "conn_closed":
            return e
    return None


def rejected(sc: Sidecar, reason: str) -> float:
    return sc.metric("mtls_connections_rejected_total", reason=reason)


def worker_pids(sc: Sidecar) -> list[int]:
    import json

    code, body = sc.get("/status")
    assert code == 200
    return [int(w["pid"]) for w in json.loads(body)["workers"]]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Target:
    inbound: Sidecar
    outbound: Sidecar
    in_port: int
    out_port: int
    app: TcpApp
    client: Identity
    figures: dict[str, str] = field(default_factory=dict)

    def still_serves(self) -> None:
        payload = os.urandom(50_000)
        assert exchange(self.out_port, payload) == payload


@pytest.fixture(scope="module")
def target(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    raise_nofile()
    d = tmp_path_factory.mktemp("hostile")
    app = TcpApp("echo")
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"echo=127.0.0.1:{in_port}=127.0.0.1:{app.port}",
            "MTLS_HANDSHAKE_TIMEOUT": f"{HANDSHAKE_TIMEOUT:g}s",
            "MTLS_WORKERS": "2",
            "MTLS_DRAIN_TIMEOUT": "5s",
        },
        d / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"echo=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
        },
        d / "outbound.log",
    )
    t = Target(inbound, outbound, in_port, out_port, app, pki.client)
    try:
        inbound.wait_ready()
        outbound.wait_ready()
        yield t
    finally:
        assert [inbound.stop(), outbound.stop()] == [0, 0]
        app.close()
        for sc in (inbound, outbound):
            assert "Traceback" not in sc.logs()
        for k, v in t.figures.items():
            print(f"[figure] {k}: {v}")


# --- slowloris -------------------------------------------------------------------------------


class LatencyProbe(threading.Thread):
    """A good client: one new proxied connection after another, each timed."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def one(self) -> None:
        payload = os.urandom(200)
        t0 = time.monotonic()
        try:
            got = exchange(self.port, payload, timeout=10)
        except OSError as exc:
            self.errors.append(repr(exc))
            return
        self.latencies.append(time.monotonic() - t0)
        if got != payload:
            self.errors.append(f"wrong reply ({len(got)} bytes)")

    def run(self) -> None:
        while not self.stop.is_set():
            self.one()


def test_slowloris_closed_at_handshake_timeout(target: Target) -> None:
    """2000 connections that never finish a handshake: each closed at the handshake timeout and
    counted as handshake_timeout, while a good client's requests keep completing."""
    n = 2000
    hello = client_hello(target.client)
    sc = target.inbound

    baseline = LatencyProbe(target.out_port)
    for _ in range(150):
        baseline.one()
    assert not baseline.errors

    before = rejected(sc, "handshake_timeout")
    probe = LatencyProbe(target.out_port)
    probe.start()
    socks: dict[int, tuple[socket.socket, float]] = {}
    poller = select.poll()
    t_start = time.monotonic()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", target.in_port), timeout=10)
        if i % 4 == 0:
            s.sendall(hello[: random.randrange(6, len(hello) - 1)])  # a partial ClientHello
        elif i % 4 == 1:
            s.sendall(hello[:3])  # not even enough to tell it is TLS
        s.setblocking(False)
        socks[s.fileno()] = (s, time.monotonic())
        poller.register(s.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    opened_in = time.monotonic() - t_start

    lifetimes: list[float] = []
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 20
    while socks and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            s, t_open = socks.pop(fd)
            poller.unregister(fd)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            assert data == b"", f"a slowloris connection was sent {data!r}"
            lifetimes.append(time.monotonic() - t_open)
            s.close()
    probe.stop.set()
    probe.join(30)
    for s, _ in socks.values():
        s.close()
    assert not socks, f"{len(socks)} slowloris connections still open"
    assert min(lifetimes) > HANDSHAKE_TIMEOUT - 0.3
    assert max(lifetimes) < HANDSHAKE_TIMEOUT + 8
    assert wait_for(lambda: rejected(sc, "handshake_timeout") == before + n, 15), (
        rejected(sc, "handshake_timeout") - before
    )
    # The good client: every request completed, none took more than a few seconds.
    assert not probe.errors, probe.errors[:5]
    assert len(probe.latencies) >= 20
    assert max(probe.latencies) < 3.0
    target.still_serves()
    target.figures["slowloris"] = (
        f"{n} conns opened in {opened_in:.2f}s, closed after "
        f"{min(lifetimes):.2f}-{max(lifetimes):.2f}s (p50 {statistics.median(lifetimes):.2f}s); "
        f"good client p50/p99 ms baseline "
        f"{percentile(baseline.latencies, 0.5) * 1000:.1f}/"
        f"{percentile(baseline.latencies, 0.99) * 1000:.1f}, under attack "
        f"{percentile(probe.latencies, 0.5) * 1000:.1f}/"
        f"{percentile(probe.latencies, 0.99) * 1000:.1f} "
        f"(max {max(probe.latencies) * 1000:.0f}, {len(probe.latencies)} requests)"
    )


# --- malformed first bytes -----------------------------------------------------------------


def _hello_cut(hello: bytes) -> bytes:
    return hello[:40]


def _hello_short_length(hello: bytes) -> bytes:
    # A record that holds a 1-byte ClientHello body claiming to be complete.
    return b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"


CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated_hello_then_fin", _hello_cut, "other"),
    ("record_header_only", lambda h: h[:5], "not_tls"),
    ("oversized_hello_record", lambda h: b"\x16\x03\x01\xff\xff" + h[5:], "not_tls"),
    ("hello_length_too_short", _hello_short_length, "other"),
    ("server_hello_type", lambda h: h[:5] + b"\x02" + h[6:], "not_tls"),
    ("alert_first", lambda h: b"\x15\x03\x03\x00\x02\x02\x28", "not_tls"),
    (
        "sslv2_hello",
        lambda h: b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37,
        "not_tls",
    ),
    (
        "random_bytes",
        lambda h: bytes(random.Random(7).randrange(256) for _ in range(300)),
        "not_tls",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_malformed_first_flight(
    target: Target, name: str, make: Callable[[bytes], bytes], reason: str
) -> None:
    sc = target.inbound
    before = rejected(sc, reason)
    since = mark(sc)
    data = make(client_hello(target.client))
    with socket.create_connection(("127.0.0.1", target.in_port), timeout=10) as s:
        port = s.getsockname()[1]
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s)
    # Nothing but (at most) a TLS alert comes back.
    assert reply == b"" or reply[:1] == b"\x15", reply[:20]
    assert wait_for(lambda: rejected(sc, reason) == before + 1), f"{name}: not counted as {reason}"
    ev = wait_for(lambda: [e for e in events_for(sc, port, since) if e.get("event") == "rejected"])
    assert ev and ev[0]["reason"] == reason and ev[0]["level"] == "warning", ev
    target.still_serves()


def test_plaintext_http_from_curl(target: Target) -> None:
    sc = target.inbound
    before = rejected(sc, "not_tls")
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{target.in_port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0  # empty reply from server
    assert wait_for(lambda: rejected(sc, "not_tls") == before + 1)
    assert any(
        "GET / HTTP/1.1" in str(e.get("msg")) and e.get("reason") == "not_tls"
        for e in sc.log_events()
    )


# --- old versions, renegotiation -----------------------------------------------------------


def s_client(
    port: int, ident: Identity, args: list[str], stdin: str = "", timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-cert",
            str(ident.cert),
            "-cert_chain",
            str(ident.cert),
            "-key",
            str(ident.key),
            "-CAfile",
            str(ident.bundle),
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_old_tls_versions_refused(target: Target, version: str) -> None:
    sc = target.inbound
    before = rejected(sc, "tls_version")
    # SECLEVEL=0: let our OpenSSL client offer TLS 1.0/1.1 at all.
    r = s_client(target.in_port, target.client, [version, "-cipher", "DEFAULT@SECLEVEL=0"])
    out = r.stdout + r.stderr
    assert "alert protocol version" in out, out
    assert "Cipher is (NONE)" in out
    assert wait_for(lambda: rejected(sc, "tls_version") == before + 1)
    target.still_serves()


@pytest.fixture(scope="module")
def tls12(pki: Pki, target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An inbound sidecar with MTLS_MIN_TLS_VERSION=1.2."""
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"echo=127.0.0.1:{port}=127.0.0.1:{target.app.port}",
            "MTLS_MIN_TLS_VERSION": "1.2",
        },
        tmp_path_factory.mktemp("tls12") / "sc.log",
    )
    try:
        sc.wait_ready()
        target.figures["tls12_log"] = str(sc.log_path)
        yield port
    finally:
        assert sc.stop() == 0
        assert "Traceback" not in sc.logs()


def test_old_versions_refused_with_tls12_enabled(target: Target, tls12: int) -> None:
    for version in ("-tls1", "-tls1_1"):
        r = s_client(tls12, target.client, [version, "-cipher", "DEFAULT@SECLEVEL=0"])
        assert "alert protocol version" in r.stdout + r.stderr


def test_renegotiation_refused(target: Target, tls12: int) -> None:
    """TLS 1.2 client asks to renegotiate ('R' in s_client): refused with a no_renegotiation
    alert; the connection ends without anything after it relayed; the sidecar serves on."""
    script = "before\n"
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{tls12}",
            "-tls1_2",
            "-cert",
            str(target.client.cert),
            "-cert_chain",
            str(target.client.cert),
            "-key",
            str(target.client.key),
            "-CAfile",
            str(target.client.bundle),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(script)
    proc.stdin.flush()
    time.sleep(1.0)
    proc.stdin.write("R\n")
    proc.stdin.flush()
    time.sleep(1.0)
    with_after = True
    try:
        proc.stdin.write("after\n")
        proc.stdin.flush()
    except BrokenPipeError:
        with_after = False
    time.sleep(0.5)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert "Protocol  : TLSv1.2" in out
    assert "before" in out.split("Verify return code")[-1]  # echoed before the attempt
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out, out[-2000:]
    if with_after:
        assert "\nafter" not in out.split("RENEGOTIATING")[-1]
    log = Path(target.figures["tls12_log"]).read_text()
    assert '"outcome": "tls_error:' in log
    assert "TLS error on an open connection with peer" in log
    ctx = client_ctx(target.client, maximum_version=ssl.TLSVersion.TLSv1_2)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls12), timeout=10)) as s:
        assert s.version() == "TLSv1.2"
        s.sendall(b"again")
        assert s.recv(100) == b"again"


# --- trouble on an open TLS connection ------------------------------------------------------


MID_STREAM: list[tuple[str, bytes, str, str]] = [
    # name, raw bytes written under the TLS layer, alert the client gets, outcome
    (
        "oversized_record",
        b"\x17\x03\x03\x48\x01" + b"\x00" * 0x4801,  # 18433 > 2^14 + 256
        "RECORD_OVERFLOW",
        "tls_error:not_tls",
    ),
    ("forged_record", b"\x17\x03\x03\x00\x40" + b"\x5a" * 64, "BAD_RECORD_MAC", "tls_error:other"),
    ("garbage", bytes(range(256)) + b"\x00" * 44, "UNEXPECTED_MESSAGE", "tls_error:not_tls"),
]


@pytest.mark.parametrize(
    ("name", "raw", "alert", "outcome"), MID_STREAM, ids=[m[0] for m in MID_STREAM]
)
def test_bad_records_on_open_connection(
    target: Target, name: str, raw: bytes, alert: str, outcome: str
) -> None:
    sc = target.inbound
    since = mark(sc)
    ctx = client_ctx(target.client)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", target.in_port), timeout=10)) as s:
        port = s.getsockname()[1]
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
        os.write(s.fileno(), raw)  # under the TLS layer, on the same socket
        with pytest.raises(ssl.SSLError) as info:
            while s.recv(100):
                pass
        assert alert in str(info.value)
    line = wait_for(lambda: closed_line(sc, port, since))
    assert line is not None and line["outcome"] == outcome, line
    assert line["bytes_in"] == 5 and line["bytes_out"] == 5
    warn = [e for e in events_for(sc, port, since) if "open connection" in str(e.get("msg"))]
    assert warn and warn[0]["level"] == "warning"
    target.still_serves()


# --- resets ------------------------------------------------------------------------------------


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def test_tls_peer_resets_mid_stream(target: Target) -> None:
    sc = target.inbound
    since = mark(sc)
    ctx = client_ctx(target.client)
    raw = socket.create_connection(("127.0.0.1", target.in_port), timeout=10)
    s = ctx.wrap_socket(raw)
    port = s.getsockname()[1]
    s.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        got += s.recv(1000)
    s.sendall(b"y" * 300_000)  # in flight when the RST arrives
    rst_close(s)
    line = wait_for(lambda: closed_line(sc, port, since))
    assert line is not None and line["outcome"] == "peer_reset", line
    assert sc.metric("mtls_connections_active") == 0 or wait_for(
        lambda: sc.metric("mtls_connections_active") == 0
    )
    target.still_serves()


def test_app_client_resets_mid_stream(target: Target) -> None:
    """The local app resets its connection to the outbound sidecar: the outbound logs app_reset
    and cuts its mTLS leg, which the inbound sees as peer_reset."""
    since_out, since_in = mark(target.outbound), mark(target.inbound)
    s = socket.create_connection(("127.0.0.1", target.out_port), timeout=10)
    port = s.getsockname()[1]
    s.sendall(b"z" * 1000)
    got = b""
    while len(got) < 1000:
        got += s.recv(1000)
    rst_close(s)
    line = wait_for(lambda: closed_line(target.outbound, port, since_out))
    assert line is not None and line["outcome"] == "app_reset", line
    assert line["bytes_in"] == 1000 and line["bytes_out"] == 1000
    assert wait_for(lambda: target.inbound.metric("mtls_connections_active") == 0)
    assert any(
        e.get("event") == "conn_closed"
        and e.get("outcome") == "peer_reset"
        and e.get("peer_identity") == f"{TD}/client"
        for e in target.inbound.log_events()[since_in:]
    )
    target.still_serves()


# --- a peer that never reads ------------------------------------------------------------------


def test_peer_that_never_reads_is_held_by_backpressure(target: Target) -> None:
    """A client sends as fast as it can and never reads the echo: the pipeline fills, backpressure
    reaches the client (its sends stop), and the sidecars' memory stays bounded. When it finally
    reads, every byte arrives, in order."""
    pids = worker_pids(target.inbound) + worker_pids(target.outbound)
    rss0 = {p: rss_kib(p) for p in pids}
    chunk = bytes(range(256)) * 4096  # 1 MiB
    offered = 0
    s = socket.create_connection(("127.0.0.1", target.out_port), timeout=10)
    s.setblocking(False)
    stalled_since: float | None = None
    limit = 512 * 1024 * 1024
    while offered < limit:
        try:
            n = s.send(chunk[offered % len(chunk) :] if offered % len(chunk) else chunk)
            offered += n
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 2.0:
                break
            select.select([], [s], [], 0.2)
    peak = {p: rss_kib(p) for p in pids}
    assert offered < limit, "the client was never stopped: no backpressure"
    growth_mib = max(peak[p] - rss0[p] for p in pids) / 1024
    assert growth_mib < 24, (rss0, peak)
    # Others are still served while this one is stuck.
    target.still_serves()
    # Now read everything back: nothing lost, nothing reordered.
    s.setblocking(True)
    s.settimeout(30)
    s.shutdown(socket.SHUT_WR)
    received = 0
    view = chunk * 2
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        start = received % len(chunk)
        assert data == view[start : start + len(data)]
        received += len(data)
    s.close()
    assert received == offered
    target.figures["never_reads"] = (
        f"client stalled after {offered / 2**20:.1f} MiB in flight; worker RSS growth "
        f"max {growth_mib:.1f} MiB (per pid KiB: "
        + ", ".join(f"{p}: {rss0[p]}->{peak[p]}" for p in pids)
        + ")"
    )
