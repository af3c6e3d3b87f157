"""Faults around real sidecars: bad identity files, a slow or resetting app, the remote sidecar
killed mid-stream, no writable temporary directory, SIGHUP storms and SIGTERM under load.

For each: what the user sees, what is logged and counted, and that no byte is lost or
duplicated on connections that were not deliberately cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import Pki, start_pair
from .harness import (
    ROOT,
    ScriptedApp,
    Sidecar,
    TcpApp,
    base_env,
    exchange,
    free_port,
    identity_env,
    wait_for,
)
from .pki import Identity

SYSTEM_PY = "/usr/bin/python3"


class Transfer(threading.Thread):
    """Streams `total` seeded-random bytes through an echo route, paced over `seconds`, reading
    the echo at the same time; `ok` when the echo is byte-for-byte what was sent."""

    def __init__(self, port: int, total: int, seconds: float, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.port, self.total, self.seconds, self.seed = port, total, seconds, seed
        self.ok = False
        self.error: BaseException | None = None
        self.received = 0

    def run(self) -> None:
        try:
            rng = random.Random(self.seed)
            block = rng.randbytes(64 * 1024)
            chunks = self.total // len(block)
            sent_hash = hashlib.sha256()
            got_hash = hashlib.sha256()
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:

                def reader() -> None:
                    while data := s.recv(1 << 20):
                        got_hash.update(data)
                        self.received += len(data)

                t = threading.Thread(target=reader, daemon=True)
                t.start()
                for i in range(chunks):
                    # Vary each chunk so a duplicated or dropped chunk changes the hash.
                    chunk = i.to_bytes(4, "big") + block[4:]
                    s.sendall(chunk)
                    sent_hash.update(chunk)
                    time.sleep(self.seconds / chunks)
                s.shutdown(socket.SHUT_WR)
                t.join(60)
            self.ok = self.received == chunks * len(block) and (
                got_hash.digest() == sent_hash.digest()
            )
            if not self.ok:
                self.error = AssertionError(f"echo differs: {self.received} bytes back")
        except BaseException as exc:
            self.error = exc


def no_tracebacks(*scs: Sidecar) -> None:
    for sc in scs:
        assert "Traceback" not in sc.logs(), sc.logs()[-3000:]


# --- bad identity files: exit 2 with a clear message, before anything listens ----------------


def _cli(
    cmd: str, env: dict[str, str], prefix: list[str] | None = None, py: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    full = base_env()
    full.update(env)
    return subprocess.run(
        [*(prefix or []), py, "-m", "proxy", cmd],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _world_readable_copy(ident: Identity, d: Path) -> Identity:
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    d.chmod(0o755)
    out = Identity(d / "tls.crt", d / "tls.key", d / "ca.pem", ident.spiffe_id)
    for a, b in ((ident.cert, out.cert), (ident.key, out.key), (ident.bundle, out.bundle)):
        shutil.copyfile(a, b)
        b.chmod(0o644)
    return out


def _bad_files(pki: Pki, d: Path) -> dict[str, tuple[dict[str, str], str]]:
    """name -> (identity env, text the error must contain)."""
    d.mkdir(parents=True, exist_ok=True)
    leaf_only = d / "leaf-as-bundle.pem"
    leaf_only.write_bytes(pki.client.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0])
    leaf_only.write_bytes(leaf_only.read_bytes() + b"-----END CERTIFICATE-----\n")
    empty = d / "empty.pem"
    empty.write_bytes(b"")
    garbage = d / "garbage.pem"
    garbage.write_bytes(
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    base = identity_env(pki.server)
    return {
        "bundle_without_ca": (
            {**base, "MTLS_TRUST_BUNDLE_FILE": str(leaf_only)},
            "trust bundle holds no CA certificate",
        ),
        "empty_bundle": (
            {**base, "MTLS_TRUST_BUNDLE_FILE": str(empty)},
            f"trust bundle file {empty} is empty",
        ),
        "garbage_cert": ({**base, "MTLS_CERT_FILE": str(garbage)}, "not a PEM certificate"),
        "mismatched_key": (
            {**base, "MTLS_KEY_FILE": str(pki.client.key)},
            "key does not match the certificate",
        ),
        "missing_cert": (
            {**base, "MTLS_CERT_FILE": str(d / "nope.crt")},
            f"{d / 'nope.crt'} does not exist",
        ),
        "missing_key": (
            {**base, "MTLS_KEY_FILE": str(d / "nope.key")},
            f"{d / 'nope.key'} does not exist",
        ),
        "key_is_a_directory": ({**base, "MTLS_KEY_FILE": str(d)}, str(d)),
        "cert_as_key": (
            {**base, "MTLS_KEY_FILE": str(pki.server.cert)},
            "not an unencrypted PEM private key",
        ),
    }


BAD = [
    "bundle_without_ca",
    "empty_bundle",
    "garbage_cert",
    "mismatched_key",
    "missing_cert",
    "missing_key",
    "key_is_a_directory",
    "cert_as_key",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_identity_files_exit_2_before_listening(pki: Pki, tmp_path: Path, case: str) -> None:
    env, expected = _bad_files(pki, tmp_path / "bad")[case]
    port, admin = free_port(), free_port()
    env = {
        **env,
        "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:8080",
        "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
    }
    for cmd in ("check", "run"):
        r = _cli(cmd, env)
        assert r.returncode == 2, (cmd, r.returncode, r.stderr)
        assert expected in r.stderr, (cmd, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.count("\n") <= 3, r.stderr  # one clear message, not a dump
        assert '"event": "listening"' not in r.stdout + r.stderr
    for p in (port, admin):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p), timeout=1).close()


def _as_1337() -> tuple[list[str], str, dict[str, str]]:
    """argv prefix, interpreter and extra env to run as uid 1337 without any capability.

    The venv's interpreter may live under a 0700 /root; the system python3 of the same minor
    version with the venv's packages on PYTHONPATH works for any uid."""
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another uid")
    r = subprocess.run(
        [SYSTEM_PY, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if r.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("needs a system python3 of our version")
    site = next((ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    prefix = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"]
    return prefix, SYSTEM_PY, {"PYTHONPATH": f"{ROOT}:{site}", "HOME": "/tmp"}


def test_unreadable_key_file(pki: Pki) -> None:
    """chmod 000 key, sidecar run as uid 1337: exit 2 naming the file and the uid."""
    prefix, py, extra = _as_1337()
    d = Path(tempfile.mkdtemp(prefix="mtls-faults-"))
    try:
        d.chmod(0o755)
        ident = _world_readable_copy(pki.server, d / "id")
        ident.key.chmod(0o000)
        port = free_port()
        env = {
            **identity_env(ident),
            **extra,
            "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:8080",
            "MTLS_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        }
        for cmd in ("check", "run"):
            r = _cli(cmd, env, prefix, py)
            assert r.returncode == 2, (cmd, r.stderr)
            assert f"{ident.key} is not readable" in r.stderr, r.stderr
            assert "uid 1337" in r.stderr
            assert "Traceback" not in r.stderr
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        # The same files, readable: the same command works (so it was the mode, nothing else).
        ident.key.chmod(0o644)
        assert _cli("check", env, prefix, py).returncode == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- the app: slow, resetting ------------------------------------------------------------------


def test_slow_app_is_proxied_within_idle_timeout(pki: Pki, tmp_path: Path) -> None:
    """The app thinks for 2.5 s before each reply: well within MTLS_IDLE_TIMEOUT=5s, so the
    client gets every reply and the connection ends `ok`."""

    def slow_echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            time.sleep(2.5)
            conn.sendall(data.upper())

    app = ScriptedApp(slow_echo)
    inbound, outbound, _, out_port = start_pair(
        pki, tmp_path, app.port, inbound_env={"MTLS_IDLE_TIMEOUT": "5s"}
    )
    try:
        with socket.create_connection(("127.0.0.1", out_port), timeout=15) as s:
            for word in (b"first", b"second"):
                t0 = time.monotonic()
                s.sendall(word)
                assert s.recv(100) == word.upper()
                assert 2.0 < time.monotonic() - t0 < 6
        assert wait_for(
            lambda: any(
                e.get("event") == "conn_closed" and e.get("outcome") == "ok"
                for e in inbound.log_events()
            )
        )
        assert inbound.metric("mtls_bytes_total", route="app", flow="in") == 11
    finally:
        assert [inbound.stop(), outbound.stop()] == [0, 0]
        app.close()
    no_tracebacks(inbound, outbound)


def test_app_resets_mid_stream(pki: Pki, tmp_path: Path) -> None:
    """The app reads 10000 bytes, answers 1000, then resets (RST). The client sees its
    connection end (reset, carried through both sidecars); the inbound logs app_reset and
    counts exactly the bytes that were relayed."""

    def reset_after_some(conn: socket.socket) -> None:
        got = 0
        while got < 10_000:
            data = conn.recv(65536)
            if not data:
                return
            got += len(data)
        conn.sendall(b"r" * 1000)
        time.sleep(0.3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    app = ScriptedApp(reset_after_some)
    inbound, outbound, _, out_port = start_pair(pki, tmp_path, app.port)
    try:
        with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
            s.sendall(b"q" * 10_000)
            got = b""
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):
                while data := s.recv(65536):
                    got += data
                raise AssertionError(f"clean EOF after {len(got)} bytes: the reset was lost")
            assert got == b"r" * 1000
            assert time.monotonic() - t0 < 5
        line = wait_for(
            lambda: next((e for e in inbound.log_events() if e.get("event") == "conn_closed"), None)
        )
        assert line is not None and line["outcome"] == "app_reset", line
        assert (line["bytes_in"], line["bytes_out"]) == (10_000, 1000)
        out_line = wait_for(
            lambda: next(
                (e for e in outbound.log_events() if e.get("event") == "conn_closed"), None
            )
        )
        assert out_line is not None and out_line["outcome"] == "peer_reset", out_line
        assert inbound.wait_metric("mtls_bytes_total", 10_000, route="app", flow="in") == 10_000
        assert inbound.wait_metric("mtls_bytes_total", 1000, route="app", flow="out") == 1000
        assert inbound.metric("mtls_connections_active") == 0
    finally:
        assert [inbound.stop(), outbound.stop()] == [0, 0]
        app.close()
    no_tracebacks(inbound, outbound)


# --- the remote sidecar dies mid-stream ----------------------------------------------------------


def _all_pids(sc: Sidecar) -> list[int]:
    code, body = sc.get("/status")
    assert code == 200
    return [sc.proc.pid] + [int(w["pid"]) for w in json.loads(body)["workers"]]


def test_remote_sidecar_killed_and_restarted_mid_stream(pki: Pki, tmp_path: Path) -> None:
    echo = TcpApp("echo")
    inbound, outbound, in_port, out_port = start_pair(pki, tmp_path, echo.port)
    restarted: Sidecar | None = None
    try:
        s = socket.create_connection(("127.0.0.1", out_port), timeout=10)
        port = s.getsockname()[1]
        s.sendall(b"a" * 5000)
        got = 0
        while got < 5000:
            got += len(s.recv(65536))
        for pid in _all_pids(inbound):
            os.kill(pid, signal.SIGKILL)
        inbound.proc.wait(10)
        # The client's connection ends (EOF or reset) promptly; it does not hang.
        s.settimeout(10)
        t0 = time.monotonic()
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 5
        s.close()
        line = wait_for(
            lambda: next(
                (
                    e
                    for e in outbound.log_events()
                    if e.get("event") == "conn_closed" and e.get("peer") == f"127.0.0.1:{port}"
                ),
                None,
            )
        )
        assert line is not None and line["bytes_in"] == 5000, line
        # While the remote is down: refused, logged and counted, the outbound stays up.
        before = outbound.metric("mtls_upstream_connect_failures_total", reason="connect_refused")
        with socket.create_connection(("127.0.0.1", out_port), timeout=10) as c:
            c.sendall(b"hello?")
            c.settimeout(10)
            assert c.recv(100) == b""
        assert (
            outbound.wait_metric(
                "mtls_upstream_connect_failures_total", before + 1, reason="connect_refused"
            )
            == before + 1
        )
        assert outbound.get("/ready")[0] == 200
        # The remote comes back on the same port: new connections work at once.
        restarted = Sidecar(
            {
                **identity_env(pki.server),
                "MTLS_INBOUND": f"app=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            },
            tmp_path / "inbound-2.log",
        )
        restarted.wait_ready()
        payload = os.urandom(200_000)
        assert exchange(out_port, payload) == payload
        assert outbound.proc.poll() is None
    finally:
        inbound.stop()
        if restarted is not None:
            restarted.stop()
        assert outbound.stop() == 0
        echo.close()
    no_tracebacks(outbound)


# --- no writable temporary directory --------------------------------------------------


def _mount_ns_or_skip() -> None:
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, text=True, timeout=10
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.strip()}")


def _ro_env(pki: Pki, keep: Path, port: int, admin: int, app_port: int = 8080) -> dict[str, str]:
    # The identity files live under /tmp, which the read-only mounts hide: copy them first.
    for src, name in ((pki.server.cert, "tls.crt"), (pki.server.key, "tls.key")):
        shutil.copyfile(src, keep / name)
    shutil.copyfile(pki.server.bundle, keep / "ca.pem")
    env = base_env()
    env.update(
        {
            "MTLS_CERT_FILE": str(keep / "tls.crt"),
            "MTLS_KEY_FILE": str(keep / "tls.key"),
            "MTLS_TRUST_BUNDLE_FILE": str(keep / "ca.pem"),
            "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{app_port}",
            "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "MTLS_WORKERS": "1",
        }
    )
    return env


def test_no_writable_tmpdir_fails_clearly(pki: Pki) -> None:
    """The sidecar writes one thing to disk: its metrics directory under TMPDIR. On a read-only
    root filesystem with no writable /tmp it exits 1 saying so, before anything listens."""
    _mount_ns_or_skip()
    keep = Path(tempfile.mkdtemp(prefix=".mtls-ro-test-", dir=str(ROOT)))
    try:
        port, admin = free_port(), free_port()
        env = _ro_env(pki, keep, port, admin)
        env["TMPDIR"] = "/tmp"
        # Read-only tmpfs over every temp dir. The checkout itself may live under one of them
        # (CI clones anywhere): keep it visible by binding it back on top, through /mnt.
        script = (
            f'set -e; root="{ROOT}"; mount --bind "$root" /mnt; '
            "for d in /tmp /var/tmp /usr/tmp; do "
            '[ -d "$d" ] || continue; mount -t tmpfs tmpfs "$d"; '
            'case "$root/" in "$d"/*) mkdir -p "$root"; mount --bind /mnt "$root";; esac; '
            'mount -o remount,ro "$d"; done; '
            f'cd /proc && exec "{sys.executable}" -m proxy run'
        )
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
        assert "no writable temporary directory" in r.stderr, r.stderr[-3000:]
        assert "TMPDIR" in r.stderr
        assert "Traceback" not in r.stderr
        for p in (port, admin):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", p), timeout=1).close()
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def test_read_only_tmpdir_falls_back_to_tmp(pki: Pki) -> None:
    """TMPDIR on a read-only mount while /tmp is writable: Python's tempfile falls back to /tmp
    and the sidecar serves; nothing is written under TMPDIR."""
    _mount_ns_or_skip()
    keep = Path(tempfile.mkdtemp(prefix=".mtls-ro-test-", dir=str(ROOT)))
    echo = TcpApp("echo")
    try:
        (keep / "ro").mkdir()
        port, admin = free_port(), free_port()
        env = _ro_env(pki, keep, port, admin, echo.port)
        env["TMPDIR"] = str(keep / "ro")
        script = (
            f'mount -t tmpfs -o ro tmpfs "{keep / "ro"}" && exec "{sys.executable}" -m proxy run'
        )
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def ready() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                        return int(r.status) == 200
                except OSError:
                    return proc.poll() is not None

            assert wait_for(ready, 20) and proc.poll() is None
            payload = os.urandom(1000)
            ctx = ssl.create_default_context(cafile=str(pki.client.bundle))
            ctx.check_hostname = False
            ctx.load_cert_chain(pki.client.cert, pki.client.key)
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += s.recv(65536)
            assert got == payload
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        assert list((keep / "ro").iterdir()) == []
    finally:
        echo.close()
        shutil.rmtree(keep, ignore_errors=True)


# --- signals under load ------------------------------------------------------------


def _swap(src: Identity, dst: Identity) -> None:
    """Replace the three files at once, as kubelet and cert-manager's CSI driver do: write a new
    directory, then atomically repoint the `..data` symlink the file paths go through."""
    d = dst.cert.parent
    gen = d / f"..gen-{time.monotonic_ns()}"
    gen.mkdir()
    for a, b in ((src.cert, dst.cert), (src.key, dst.key), (src.bundle, dst.bundle)):
        shutil.copyfile(a, gen / b.name)
        if not b.is_symlink():
            b.symlink_to(Path("..data") / b.name)
    tmp = d / "..data_tmp"
    tmp.symlink_to(gen.name)
    os.replace(tmp, d / "..data")


def test_sighup_storm_under_load(pki: Pki, tmp_path: Path) -> None:
    """50 SIGHUPs, each after swapping the certificate files, while 6 transfers run both ways:
    every transfer is byte-exact, every reload applied, the sidecar ready throughout."""
    echo = TcpApp("echo")
    d = tmp_path / "files"
    d.mkdir()
    ident = Identity(d / "tls.crt", d / "tls.key", d / "ca.pem", pki.server.spiffe_id)
    _swap(pki.server, ident)
    inbound, outbound, _, out_port = start_pair(
        pki, tmp_path, echo.port, server=ident, inbound_env={"MTLS_WORKERS": "2"}
    )
    try:
        transfers = [Transfer(out_port, 12 * 1024 * 1024, 4.0, seed=i) for i in range(6)]
        for t in transfers:
            t.start()
        time.sleep(0.3)
        for i in range(50):
            _swap(pki.server2 if i % 2 == 0 else pki.server, ident)
            inbound.signal(signal.SIGHUP)
            time.sleep(0.06)
        for t in transfers:
            t.join(60)
            assert t.error is None, t.error
            assert t.ok
        assert inbound.get("/ready")[0] == 200
        # Each swap changed the files; SIGHUPs that raced the file watcher may find nothing
        # new, so count at least half, and never an error.
        ok = inbound.metric("mtls_cert_reloads_total", result="ok")
        assert ok >= 25, ok
        assert inbound.metric("mtls_cert_reloads_total", result="error") == 0
        payload = os.urandom(100_000)
        assert exchange(out_port, payload) == payload
    finally:
        assert [inbound.stop(), outbound.stop()] == [0, 0]
        echo.close()
    no_tracebacks(inbound, outbound)


def test_sigterm_under_load_loses_nothing(pki: Pki, tmp_path: Path) -> None:
    """SIGTERM to the inbound while 8 paced transfers run: all finish byte-exact, then exit 0."""
    echo = TcpApp("echo")
    inbound, outbound, _, out_port = start_pair(
        pki,
        tmp_path,
        echo.port,
        inbound_env={"MTLS_WORKERS": "2", "MTLS_DRAIN_TIMEOUT": "30s"},
    )
    try:
        transfers = [Transfer(out_port, 8 * 1024 * 1024, 3.0, seed=i) for i in range(8)]
        for t in transfers:
            t.start()
        time.sleep(0.7)
        inbound.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert inbound.get("/ready")[0] == 503
        for t in transfers:
            t.join(60)
            assert t.error is None, t.error
            assert t.ok
        assert inbound.proc.wait(30) == 0
        closed = [e for e in inbound.log_events() if e.get("event") == "conn_closed"]
        assert len(closed) == 8 and all(e["outcome"] == "ok" for e in closed), closed
        assert sum(e["bytes_in"] for e in closed) == 8 * 8 * 1024 * 1024
    finally:
        inbound.stop()
        assert outbound.stop() == 0
        echo.close()
    no_tracebacks(inbound, outbound)
