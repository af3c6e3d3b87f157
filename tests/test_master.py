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
from proxy.routes import routes_for
from proxy.server import Master, WorkerProc, bind_listener
from proxy.settings import Address, load_settings

from .conftest import Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env


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
