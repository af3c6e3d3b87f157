"""Reload (SIGHUP, watched files), drain on SIGTERM, and `check`: real processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import TD, Pki, start_pair
from .harness import ROOT, Sidecar, TcpApp, base_env, free_port, identity_env, recv_all, wait_for
from .pki import Identity, copy_identity, replace_identity


def _ctx(pki: Pki, ident: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.server.bundle)
    ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def served_serial(pki: Pki, port: int) -> int:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with _ctx(pki, pki.client).wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def serial_of(ident: Identity) -> int:
    return x509.load_pem_x509_certificates(ident.cert.read_bytes())[0].serial_number


class SlowSender(threading.Thread):
    """Streams `total` bytes through an echo route over a few seconds and checks every byte."""

    def __init__(self, port: int, total: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.total, self.seconds = port, total, seconds
        self.ok = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            pattern = bytes(range(256)) * 256  # 64 KiB
            chunks = self.total // len(pattern)
            with socket.create_connection(("127.0.0.1", self.port), timeout=20) as s:
                received = bytearray()

                def reader() -> None:
                    received.extend(recv_all(s, timeout=30))

                t = threading.Thread(target=reader, daemon=True)
                t.start()
                for _ in range(chunks):
                    s.sendall(pattern)
                    time.sleep(self.seconds / chunks)
                s.shutdown(socket.SHUT_WR)
                t.join(40)
                self.ok = bytes(received) == pattern * chunks
                if not self.ok:
                    self.error = AssertionError(f"got {len(received)} of {len(pattern) * chunks}")
        except BaseException as exc:
            self.error = exc


def test_sighup_rotation_during_long_transfer(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    ident = copy_identity(pki.server, tmp_path / "server-files")
    inbound, outbound, in_port, out_port = start_pair(pki, tmp_path, echo.port, server=ident)
    try:
        assert served_serial(pki, in_port) == serial_of(pki.server)
        sender = SlowSender(out_port, 16 * 1024 * 1024, 3.0)
        sender.start()
        time.sleep(0.8)
        replace_identity(pki.server2, ident)
        inbound.signal(signal.SIGHUP)
        assert inbound.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        assert served_serial(pki, in_port) == serial_of(pki.server2)
        sender.join(60)
        assert sender.error is None, sender.error
        assert sender.ok
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0


def test_bad_files_keep_the_old_certificate(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    ident = copy_identity(pki.server, tmp_path / "server-files")
    inbound, outbound, in_port, _ = start_pair(pki, tmp_path, echo.port, server=ident)
    try:
        # Half-written: the key no longer matches the certificate.
        shutil.copyfile(pki.server2.key, ident.key)
        inbound.signal(signal.SIGHUP)
        assert inbound.wait_metric("mtls_cert_reloads_total", 1, result="error") >= 1
        assert served_serial(pki, in_port) == serial_of(pki.server)
        ident.cert.write_text("garbage")
        assert inbound.wait_metric("mtls_cert_reloads_total", 2, result="error") >= 2
        assert served_serial(pki, in_port) == serial_of(pki.server)
        assert inbound.get("/ready")[0] == 200
        assert any(e.get("event") == "reload_failed" for e in inbound.log_events())
        # The writer finishes: the watcher picks the new set up by itself, no SIGHUP.
        replace_identity(pki.server2, ident)
        deadline = time.monotonic() + 10
        while served_serial(pki, in_port) != serial_of(pki.server2):
            assert time.monotonic() < deadline, "watched files were not reloaded"
            time.sleep(0.2)
    finally:
        assert inbound.stop() == 0
        outbound.stop()


def test_sigterm_drains_open_connections(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    inbound, outbound, in_port, out_port = start_pair(
        pki, tmp_path, echo.port, inbound_env={"MTLS_DRAIN_TIMEOUT": "20s"}
    )
    try:
        sender = SlowSender(out_port, 8 * 1024 * 1024, 2.5)
        sender.start()
        time.sleep(0.5)
        inbound.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert inbound.get("/ready")[0] == 503
        # New connections are no longer accepted (refused: the listener is shut down)...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", in_port), timeout=2).close()
        # ...while the open one finishes intact, and then the sidecar exits 0.
        sender.join(60)
        assert sender.error is None, sender.error
        assert sender.ok
        assert inbound.proc.wait(20) == 0
    finally:
        inbound.stop()
        outbound.stop()


def test_drain_timeout_cuts_idle_connections(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    inbound, outbound, _, out_port = start_pair(
        pki, tmp_path, echo.port, inbound_env={"MTLS_DRAIN_TIMEOUT": "1s"}
    )
    try:
        s = socket.create_connection(("127.0.0.1", out_port))
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        t0 = time.monotonic()
        inbound.signal(signal.SIGTERM)
        assert inbound.proc.wait(15) == 0
        assert time.monotonic() - t0 < 8
        assert any("drain timeout" in str(e.get("msg")) for e in inbound.log_events())
        s.close()
    finally:
        inbound.stop()
        outbound.stop()


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = base_env()
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_prints_effective_config(pki: Pki) -> None:
    r = _run_cli(
        ["check"],
        {**identity_env(pki.server), "MTLS_INBOUND": "0.0.0.0:8443=127.0.0.1:8080"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["certificate"]["identity"] == f"{TD}/server"
    assert "BEGIN" not in r.stdout  # no key, no PEM


def test_check_lists_every_error(tmp_path: Path) -> None:
    r = _run_cli(
        ["check"],
        {
            "MTLS_INBOUND": "0.0.0.0:99999=127.0.0.1:8080",
            "MTLS_WORKERS": "many",
            "MTLS_HANDSHAKE_TIMEOUT": "soon",
            "MTLS_INBUOND": "x",
            "MTLS_CERT_FILE": str(tmp_path / "missing.crt"),
        },
    )
    assert r.returncode == 2
    for var in (
        "MTLS_INBOUND",
        "MTLS_WORKERS",
        "MTLS_HANDSHAKE_TIMEOUT",
        "MTLS_INBUOND",
        "MTLS_CERT_FILE",
        "MTLS_KEY_FILE",
    ):
        assert var in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_check_rejects_mismatched_key(pki: Pki, tmp_path: Path) -> None:
    env = identity_env(pki.server)
    env["MTLS_KEY_FILE"] = str(pki.client.key)
    env["MTLS_INBOUND"] = ":8443=127.0.0.1:8080"
    r = _run_cli(["check"], env)
    assert r.returncode == 2
    assert "does not match" in r.stderr


def test_run_refuses_bad_config_before_listening(pki: Pki) -> None:
    port = free_port()
    r = _run_cli(
        ["run"],
        {**identity_env(pki.server), "MTLS_INBOUND": f"127.0.0.1:{port}=x:0"},
    )
    assert r.returncode == 2
    assert "MTLS_INBOUND" in r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_run_reports_port_in_use(pki: Pki) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _run_cli(
            ["run"],
            {
                **identity_env(pki.server),
                "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:8080",
                "MTLS_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            },
        )
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_check_validates_tls_groups(pki: Pki) -> None:
    base = {**identity_env(pki.server), "MTLS_INBOUND": "0.0.0.0:8443=127.0.0.1:8080"}
    r = _run_cli(["check"], {**base, "MTLS_TLS_GROUPS": "X25519MLKEM768,X25591"})
    assert r.returncode == 2
    assert "MTLS_TLS_GROUPS: unknown key-exchange group 'X25591' (supported: X25519MLKEM768" in (
        r.stderr
    ), r.stderr
    assert "Traceback" not in r.stderr
    r = _run_cli(["check"], {**base, "MTLS_TLS_GROUPS": "x25519,p-256"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["MTLS_TLS_GROUPS"] == ["X25519", "P-256"]


def _client_after_sigterm(port: int, outcomes: list[str]) -> None:
    """One client: refused, or a full exchange; anything else (accepted, then reset or closed
    with nothing) is the failure this test is about."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
    except ConnectionRefusedError:
        outcomes.append("refused")
        return
    except OSError as exc:
        outcomes.append(f"connect:{type(exc).__name__}")
        return
    try:
        s.settimeout(30)
        s.sendall(b"ping")
        got = b""
        while len(got) < 4 and (chunk := s.recv(4 - len(got))):
            got += chunk
        outcomes.append("served" if got == b"ping" else f"dropped:{got!r}")
    except OSError as exc:
        outcomes.append(f"dropped:{type(exc).__name__}")
    finally:
        s.close()


@pytest.mark.parametrize("dead_worker", [False, True])
def test_a_connection_after_sigterm_is_refused_or_served(
    pki: Pki, tmp_path: Path, echo: TcpApp, dead_worker: bool
) -> None:
    """After SIGTERM no listener copy (the master's, a worker's) may keep completing
    handshakes nobody accepts: a client is refused, or served to its end (issue 22,
    defect 14: 6 of 7 clients were reset with 0 bytes when the sidecar exited). Also when
    a worker was just killed: the master ends the listener it leaves behind."""
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_WORKERS": "2",
            "MTLS_DRAIN_TIMEOUT": "20s",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"held")
        assert recv_all_n(held, 4) == b"held"  # an open connection keeps the drain going
        outcomes: list[str] = []
        clients = []
        if dead_worker:
            pids = [
                int(str(e["msg"]).split("pid ")[1].split(")")[0])
                for e in sc.log_events()
                if "serving" in str(e.get("msg"))
            ]
            holder = _pid_holding(port, held.getsockname()[1])
            os.kill(next(p for p in pids if p != holder), signal.SIGKILL)
            assert wait_for(lambda: "exited with" in sc.logs())
        sc.signal(signal.SIGTERM)
        if dead_worker:
            # Clients queued on the dead worker's listener before the master began draining
            # have no worker to serve them: their wait ends in a reset, as when a worker dies.
            assert wait_for(lambda: sc.get("/ready")[0] == 503)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            t = threading.Thread(target=_client_after_sigterm, args=(port, outcomes))
            t.start()
            clients.append(t)
            time.sleep(0.02)
        assert wait_for(lambda: sc.get("/ready")[0] == 503)
        # The held connection ends, the sidecar exits: a client accepted by the kernel but
        # never by the sidecar would be reset now.
        held.close()
        assert sc.proc.wait(30) == 0
        for t in clients:
            t.join(30)
        assert len(outcomes) == len(clients)
        bad = [o for o in outcomes if o not in ("refused", "served")]
        assert not bad, outcomes
        assert "refused" in outcomes
    finally:
        sc.stop()


def _pid_holding(local_port: int, remote_port: int) -> int | None:
    """The process holding the accepted TCP socket 127.0.0.1:local_port <- :remote_port."""
    want = f":{local_port:04X} "
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1].endswith(want.strip()) and f[2].endswith(f":{remote_port:04X}"):
            inode = f[9]
    if inode is None:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(proc.name)
    return None


def recv_all_n(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n and (chunk := sock.recv(n - len(got))):
        got += chunk
    return got


def test_connections_queued_when_drain_starts_are_served(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """Connections the kernel completed but the worker had not accepted yet when the drain
    began (the worker held with SIGSTOP meanwhile) are served to their end, not reset."""
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_WORKERS": "1",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        serving = [e for e in sc.log_events() if "serving" in str(e.get("msg"))]
        worker = int(str(serving[0]["msg"]).split("pid ")[1].split(")")[0])
        os.kill(worker, signal.SIGSTOP)
        try:
            queued = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
            for s in queued:
                s.sendall(b"ping")
            sc.signal(signal.SIGTERM)
            assert wait_for(lambda: sc.get("/ready")[0] == 503)
        finally:
            os.kill(worker, signal.SIGCONT)
        for s in queued:
            s.settimeout(20)
            assert recv_all_n(s, 4) == b"ping"
            s.close()
        assert sc.proc.wait(30) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        sc.stop()


def test_a_worker_that_drained_on_its_own_is_restarted_listening(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """A worker ends its listeners when it drains; one sent SIGTERM by someone else (not
    the master) is restarted on fresh listeners, so the port keeps serving."""
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_WORKERS": "1",
        },
        tmp_path / "sc.log",
    )

    def serving() -> list[int]:
        return [
            int(str(e["msg"]).split("pid ")[1].split(")")[0])
            for e in sc.log_events()
            if "serving" in str(e.get("msg"))
        ]

    try:
        sc.wait_ready()
        os.kill(serving()[0], signal.SIGTERM)
        assert wait_for(lambda: len(serving()) == 2, 15)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"ping")
            assert recv_all_n(s, 4) == b"ping"
    finally:
        sc.stop()
