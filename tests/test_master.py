"""The master's lifecycle: stop signals in every state, workers that refuse material, port 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from proxy import metrics
from proxy.config import Address, load_settings
from proxy.listen import bind_listener
from proxy.routes import routes_for
from proxy.server import Master, WorkerProc

from .conftest import Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, wait_for
from .pki import copy_identity, replace_identity, write_identity


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"


def test_sigterm_while_enrolling_exits_at_once(tmp_path: Path) -> None:
    """A sidecar that cannot enrol (the CA does not answer) still stops on SIGTERM."""
    dead_ca = free_port()
    sc = Sidecar(
        {
            "MTLS_IDENTITY_SOURCE": "ca",
            "MTLS_CA_URL": f"https://127.0.0.1:{dead_ca}",
            "MTLS_CA_TOKEN": "not-a-valid-token",
            "MTLS_CA_FINGERPRINT": "ab" * 32,
            "MTLS_IDENTITY": "spiffe://test.example/web",
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{free_port()}",
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    deadline = time.monotonic() + 20
    while "enrolment with" not in sc.logs():
        assert time.monotonic() < deadline, sc.logs()
        assert sc.proc.poll() is None, sc.logs()
        time.sleep(0.05)
    assert sc.get("/ready")[0] == 503
    started = time.monotonic()
    sc.signal(signal.SIGTERM)
    code = sc.proc.wait(10)
    took = time.monotonic() - started
    sc.stop()
    assert code == 0, sc.logs()
    assert took < 2.0, f"SIGTERM during enrolment took {took:.1f}s"
    assert "stopped during start-up" in sc.logs()


def test_sigterm_when_idle_exits_within_a_second(pki: Pki, tmp_path: Path) -> None:
    app = TcpApp()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{app.port}",
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        workers = _children(sc.proc.pid)
        assert len(workers) == 2
        started = time.monotonic()
        sc.signal(signal.SIGTERM)
        assert sc.proc.wait(10) == 0
        assert time.monotonic() - started < 1.5
        assert not [w for w in workers if _alive(w)]
    finally:
        sc.stop()
        app.close()


def test_workers_follow_a_killed_master(pki: Pki, tmp_path: Path) -> None:
    """kill -9 of the master: no worker outlives it (holding the ports)."""
    app = TcpApp()
    listen = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{listen}=127.0.0.1:{app.port}",
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        workers = _children(sc.proc.pid)
        sc.proc.kill()
        sc.proc.wait()
        deadline = time.monotonic() + 10
        while [w for w in workers if _alive(w)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], sc.logs()
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", listen))
    finally:
        sc.stop()
        app.close()


def test_port_zero_is_one_port_for_all_workers(pki: Pki, tmp_path: Path) -> None:
    app = TcpApp()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:0=127.0.0.1:{app.port}",
            "MTLS_OUTBOUND": "out=127.0.0.1:0=127.0.0.1:1",
            "MTLS_WORKERS": "2",
            "MTLS_INBOUND_MODE": "permissive",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        status = json.loads(sc.get("/status")[1])
        ports = {r["name"]: int(r["listen"].rsplit(":", 1)[1]) for r in status["routes"]}
        assert all(ports.values()), status["routes"]
        assert len(set(ports.values())) == 2
        inbound = next(p for name, p in ports.items() if name != "out")
        # Permissive: plaintext through whichever worker accepts; every connection works.
        for _ in range(20):
            assert exchange(inbound, b"hello") == b"hello"
        listening = [e for e in sc.log_events() if e.get("event") == "listening"]
        assert {int(e["listen"].rsplit(":", 1)[1]) for e in listening} == set(ports.values())
    finally:
        sc.stop()
        app.close()


def test_bind_listener_port_zero_shares_the_picked_port() -> None:
    socks = bind_listener(Address("127.0.0.1", 0), 3)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and 0 not in ports
    finally:
        for s in socks:
            s.close()


class _FakeProc:
    def __init__(self, lines: list[bytes]) -> None:
        self.stdout = asyncio.StreamReader()
        for line in lines:
            self.stdout.feed_data(line)
        self.stdout.feed_eof()
        self.pid = 4242
        self.returncode = None


def test_a_worker_refusing_material_makes_ready_fail_and_is_counted(pki: Pki) -> None:
    settings = load_settings(
        {**identity_env(pki.server), "MTLS_INBOUND": "127.0.0.1:1=127.0.0.1:2"}
    )

    async def scenario() -> None:
        master = Master(settings)
        master.files = None
        master.serving = True
        from proxy.material import load_material_files

        master.material = load_material_files(pki.server.cert, pki.server.key, pki.server.bundle)
        w = WorkerProc(slot=0, socks=[])
        master.workers = [w]
        before = metrics.CERT_RELOADS.labels("error")._value.get()
        await master._read_worker(
            w,
            _FakeProc([b'{"op": "ready", "pid": 1}\n']),  # type: ignore[arg-type]
        )
        assert master.readiness() == (True, "ready")
        await master._read_worker(
            w,
            _FakeProc([b'{"op": "material_error", "error": "bad key"}\n']),  # type: ignore[arg-type]
        )
        ok, why = master.readiness()
        assert not ok and why == "worker 0 refused the current certificate: bad key"
        assert metrics.CERT_RELOADS.labels("error")._value.get() == before + 1
        await master._read_worker(
            w,
            _FakeProc([b'{"op": "material_ok", "serial": "1"}\n']),  # type: ignore[arg-type]
        )
        assert master.readiness() == (True, "ready")

    asyncio.run(scenario())


def test_routes_keep_the_settings_order(pki: Pki) -> None:
    settings = load_settings(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": "a=127.0.0.1:1=127.0.0.1:2",
            "MTLS_OUTBOUND": "b=127.0.0.1:3=127.0.0.1:4",
        }
    )
    assert [r.name for r in routes_for(settings)] == ["a", "b"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_before_workers_serve(pki: Pki, tmp_path: Path, sig: signal.Signals) -> None:
    """A stop signal that arrives while the workers start stops everything."""
    app = TcpApp()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{app.port}",
            "MTLS_WORKERS": "4",
        },
        tmp_path / "sc.log",
    )
    try:
        deadline = time.monotonic() + 20
        while '"event": "listening"' not in sc.logs():
            assert time.monotonic() < deadline, sc.logs()
            time.sleep(0.01)
        workers = _children(sc.proc.pid)
        sc.signal(sig)
        assert sc.proc.wait(10) == 0, sc.logs()
        deadline = time.monotonic() + 5
        while [w for w in workers if _alive(w)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)]
    finally:
        sc.stop()
        app.close()


def test_expiry_series_follows_the_identity_held(pki: Pki, tmp_path: Path) -> None:
    """After a reload to another identity the old identity's expiry series is gone, so an
    expiry alert cannot fire for a certificate no longer in use."""
    ident = copy_identity(pki.server, tmp_path / "files")
    app = TcpApp()
    sc = Sidecar(
        {
            **identity_env(ident),
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{app.port}",
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        name = "mtls_cert_expiry_timestamp_seconds"
        assert sc.metric(name, identity=str(pki.server.spiffe_id)) > time.time()
        replace_identity(pki.stranger, ident)
        sc.signal(signal.SIGHUP)
        assert sc.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        series = [labels for (n, labels) in sc.metrics() if n == name]
        assert series == [(("identity", pki.stranger.spiffe_id),)]
        assert sc.metric("mtls_trust_bundle_roots") == 1
    finally:
        sc.stop()
        app.close()


def test_bad_requests_to_the_admin_port_are_one_warning_line(pki: Pki, tmp_path: Path) -> None:
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{free_port()}",
            "MTLS_ADMIN_LISTEN": "[::]:0",
        },
        tmp_path / "sc.log",
    )
    try:
        deadline = time.monotonic() + 20
        while not [e for e in sc.log_events() if e.get("event") == "admin_listening"]:
            assert time.monotonic() < deadline and sc.proc.poll() is None, sc.logs()
            time.sleep(0.05)
        (event,) = [e for e in sc.log_events() if e.get("event") == "admin_listening"]
        port = int(event["listen"].rsplit(":", 1)[1])
        sc.admin_port = port
        sc.wait_ready()
        # '[::]' is dual-stack like the routes: IPv4 and IPv6 clients both reach it.
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"GET /live HTTP/1.0\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.0 200")
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /live HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.0 400")
        assert sc.get("/live")[0] == 200
        logs = sc.logs()
        assert "Traceback" not in logs
        bad = [e for e in sc.log_events() if "bad HTTP request" in e.get("msg", "")]
        assert 1 <= len(bad) <= 3, bad  # rate-limited: ~one per second
        assert bad[0]["level"] == "warning"
    finally:
        sc.stop()


def test_max_connections_is_a_total_across_workers(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    listen = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{listen}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_WORKERS": "2",
            "MTLS_MAX_CONNECTIONS": "2",
        },
        tmp_path / "sc.log",
    )
    held: list[socket.socket] = []
    try:
        sc.wait_ready()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", listen), timeout=5)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            held.append(s)
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 2)
        refused = 0
        for _ in range(12):  # whichever worker the kernel hands them to
            with socket.create_connection(("127.0.0.1", listen), timeout=5) as s:
                s.sendall(b"ping")
                s.settimeout(5)
                try:
                    refused += s.recv(4) == b""
                except ConnectionResetError:  # closed with our ping unread
                    refused += 1
        assert refused == 12
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, 12, reason="too_many_connections") == 12
        pids = {e["pid"] for e in sc.log_events() if e.get("reason") == "too_many_connections"}
        assert len(pids) == 2, "expected both workers to refuse (SO_REUSEPORT spreads them)"
        held.pop().close()
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 1)
        assert exchange(listen, b"again") == b"again"
    finally:
        for s in held:
            s.close()
        sc.stop()


def test_at_the_open_file_limit_connections_are_refused_counted_and_logged(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """With `ulimit -n 256`, 300 connections: the ones beyond what the descriptors allow are
    refused with a counter and a rate-limited log line, never dropped silently."""
    listen = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{listen}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
        },
        tmp_path / "sc.log",
        prefix=["prlimit", "--nofile=256:256", "--"],
    )
    held: list[socket.socket] = []
    try:
        sc.wait_ready()
        served = refused = 0
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", listen), timeout=10)
            held.append(s)
            s.sendall(b"ping")
            try:
                got = s.recv(4)
            except ConnectionResetError:
                got = b""
            if got == b"ping":
                served += 1
            else:
                refused += 1
        assert served + refused == 300
        assert 50 < served < 128, served  # two descriptors per connection, under 256
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, refused, reason="too_many_connections") == refused
        lines = [e for e in sc.log_events() if e.get("reason") == "too_many_connections"]
        assert 1 <= len(lines) <= 5, len(lines)  # one a second, not one per connection
        assert "open-file limit" in lines[0]["msg"]
        assert "Traceback" not in sc.logs()
        for s in held:
            s.close()
        held.clear()
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 0)
        assert exchange(listen, b"after") == b"after"
    finally:
        for s in held:
            s.close()
        sc.stop()


def test_a_killed_worker_cuts_its_streams_with_reset(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """kill -9 of a worker mid-stream: the client sees a reset, not a clean end."""
    listen = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{listen}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        conns = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", listen), timeout=10)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            conns.append(s)
        (worker,) = _children(sc.proc.pid)
        os.kill(worker, signal.SIGKILL)
        for s in conns:
            with s, pytest.raises(ConnectionResetError):
                s.settimeout(10)
                s.recv(4)
        sc.wait_ready()  # the master restarts the worker
        assert exchange(listen, b"after") == b"after"
    finally:
        sc.stop()


def test_metrics_dir_of_a_killed_master_is_removed_by_the_next_start(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{echo.port}",
    }
    first = Sidecar(env, tmp_path / "first.log", prefix=["env", f"TMPDIR={tmpdir}"])
    try:
        first.wait_ready()
        (left,) = list(tmpdir.iterdir())
        assert left.name.startswith(f"mtls-metrics-{first.proc.pid}-")
        workers = _children(first.proc.pid)
        first.proc.kill()
        first.proc.wait()
        assert wait_for(lambda: not [w for w in workers if _alive(w)])
        assert left.exists()  # kill -9: nobody cleaned up
    finally:
        first.stop()
    env["MTLS_INBOUND"] = f"127.0.0.1:{free_port()}=127.0.0.1:{echo.port}"
    second = Sidecar(env, tmp_path / "second.log", prefix=["env", f"TMPDIR={tmpdir}"])
    try:
        second.wait_ready()
        assert not left.exists()
        assert [p.name.split("-")[2] for p in tmpdir.iterdir()] == [str(second.proc.pid)]
    finally:
        second.stop()
    assert list(tmpdir.iterdir()) == []


def test_sighup_to_a_bad_spiffe_id_keeps_serving_the_old_certificate(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """A reload to a certificate whose URI breaks the SPIFFE grammar (a trailing slash) is
    refused by the master before any worker sees it: counted, logged, the old certificate
    still served, /ready 200; a later good reload works; SIGTERM is prompt."""
    from .test_lifecycle import serial_of, served_serial

    ident = copy_identity(pki.server, tmp_path / "files")
    bad = write_identity(
        tmp_path, "bad", pki.inter, [pki.root.cert], "spiffe://test.example/ns/api/sa/api/"
    )
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(ident),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        replace_identity(bad, ident)
        sc.signal(signal.SIGHUP)
        assert sc.wait_metric("mtls_cert_reloads_total", 1, result="error") >= 1
        assert sc.get("/ready")[0] == 200
        status = json.loads(sc.get("/status")[1])
        assert status["certificate"]["serial"] == format(serial_of(pki.server), "x")
        assert served_serial(pki, port) == serial_of(pki.server)
        failed = [e for e in sc.log_events() if e.get("event") == "reload_failed"]
        assert "trailing slash" in failed[0]["msg"], failed
        replace_identity(pki.server2, ident)
        sc.signal(signal.SIGHUP)
        assert sc.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        assert wait_for(lambda: served_serial(pki, port) == serial_of(pki.server2))
        started = time.monotonic()
        sc.signal(signal.SIGTERM)
        assert sc.proc.wait(10) == 0
        assert time.monotonic() - started < 2.0
        assert "Traceback" not in sc.logs()
    finally:
        sc.stop()
