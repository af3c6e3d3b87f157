"""Interop with real TLS peers: openssl s_client, curl, and stunnel in both directions."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env
from .pki import pem

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_app() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield int(srv.server_address[1])
    srv.shutdown()


@pytest.fixture(scope="module")
def inbound(
    pki: Pki, http_app: int, echo: TcpApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Sidecar, int, int]]:
    http_port, echo_port = free_port(), free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": (
                f"http=127.0.0.1:{http_port}=127.0.0.1:{http_app},"
                f"echo=127.0.0.1:{echo_port}=127.0.0.1:{echo.port}"
            ),
        },
        tmp_path_factory.mktemp("interop") / "inbound.log",
    )
    sc.wait_ready()
    yield sc, http_port, echo_port
    assert sc.stop() == 0


def test_curl_with_client_cert(pki: Pki, inbound: tuple[Sidecar, int, int]) -> None:
    _sc, http_port, _ = inbound
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(pki.server.bundle),
            "--cert",
            str(pki.client.cert),
            "--key",
            str(pki.client.key),
            f"https://localhost:{http_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from the app\n"


def test_curl_without_client_cert_is_refused(pki: Pki, inbound: tuple[Sidecar, int, int]) -> None:
    sc, http_port, _ = inbound
    before = sc.metric("mtls_connections_rejected_total", reason="no_client_cert")
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(pki.server.bundle),
            f"https://localhost:{http_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.returncode != 0
    assert "hello" not in r.stdout
    assert sc.wait_metric(
        "mtls_connections_rejected_total", before + 1, reason="no_client_cert"
    ) == (before + 1)


def _s_client(
    port: int, pki: Pki, *extra: str, data: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(pki.server.bundle),
            "-verify_return_error",
            "-quiet",
            "-ign_eof",
            *extra,
        ],
        input=data,
        capture_output=True,
        timeout=20,
    )


def test_openssl_s_client_echo(pki: Pki, inbound: tuple[Sidecar, int, int]) -> None:
    _sc, _, echo_port = inbound
    # s_client -cert sends only the leaf; -cert_chain adds the intermediate.
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{echo_port}",
            "-CAfile",
            str(pki.server.bundle),
            "-cert",
            str(pki.client.cert),
            "-key",
            str(pki.client.key),
            "-cert_chain",
            str(pki.client.cert),
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"hello over s_client\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert line == b"hello over s_client\n"


def test_classical_only_peer_gets_x25519(pki: Pki, inbound: tuple[Sidecar, int, int]) -> None:
    """The distro's OpenSSL (3.0: no ML-KEM) still connects; it gets X25519, and we say so."""
    sc, _, echo_port = inbound
    before = sc.metric("mtls_handshakes_total", direction="inbound", group="X25519")
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{echo_port}",
            "-CAfile",
            str(pki.server.bundle),
            "-cert",
            str(pki.client.cert),
            "-key",
            str(pki.client.key),
            "-cert_chain",
            str(pki.client.cert),
            "-verify_return_error",
            "-quiet",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"classical\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"classical\n"
    port = _client_port(proc.pid, echo_port)
    proc.kill()
    proc.wait()
    assert sc.wait_metric(
        "mtls_handshakes_total", before + 1, direction="inbound", group="X25519"
    ) == (before + 1)

    def closed() -> dict[str, object] | None:
        for e in sc.log_events():
            if e.get("event") == "conn_closed" and e.get("peer") == f"127.0.0.1:{port}":
                return e
        return None

    deadline = time.monotonic() + 10
    while closed() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    line = closed()
    assert line is not None
    assert line["tls_group"] == "X25519" and line["tls_version"] == "TLSv1.3"


def _client_port(pid: int, server_port: int) -> int:
    """The local port of `pid`'s TCP connection to `server_port` (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == server_port:
            return int(local.split(":")[1], 16)
    raise AssertionError(f"no connection of pid {pid} to port {server_port}")


def test_openssl_s_client_tls12_refused(pki: Pki, inbound: tuple[Sidecar, int, int]) -> None:
    sc, _, echo_port = inbound
    before = sc.metric("mtls_connections_rejected_total", reason="tls_version")
    r = _s_client(
        echo_port,
        pki,
        "-tls1_2",
        "-cert",
        str(pki.client.cert),
        "-cert_chain",
        str(pki.client.cert),
        "-key",
        str(pki.client.key),
    )
    assert r.returncode != 0
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="tls_version") == (
        before + 1
    )


# --- stunnel ------------------------------------------------------------------------------


def _stunnel(conf: str, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    assert STUNNEL is not None
    path = tmp / f"{name}.conf"
    path.write_text("foreground = yes\npid =\ndebug = warning\n" + conf)
    return subprocess.Popen([STUNNEL, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


needs_stunnel = pytest.mark.skipif(STUNNEL is None, reason="stunnel is not installed")


@needs_stunnel
def test_stunnel_client_to_our_inbound(
    pki: Pki, inbound: tuple[Sidecar, int, int], tmp_path: Path
) -> None:
    sc, _, echo_port = inbound
    port = free_port()
    st = _stunnel(
        f"""
[to-sidecar]
client = yes
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{echo_port}
cert = {pki.client.cert}
key = {pki.client.key}
CAfile = {pki.server.bundle}
verifyChain = yes
sslVersionMin = TLSv1.3
""",
        tmp_path,
        "client",
    )
    try:
        _wait_port(port)
        payload = b"stunnel->sidecar " * 10_000
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                assert chunk, "closed early"
                got += chunk
        assert got == payload
        assert sc.metric("mtls_peer_connections_total", peer_identity=f"{TD}/client") >= 1
    finally:
        st.terminate()
        st.wait(10)


@contextlib.contextmanager
def _outbound_to_stunnel(
    pki: Pki, echo: TcpApp, tmp_path: Path, ca_file: Path
) -> Iterator[tuple[Sidecar, int]]:
    """A stunnel server (trusting `ca_file`, requiring client certificates) in front of the
    echo app, and our outbound sidecar dialling it; yields the sidecar and its listen port."""
    st_port, out_port = free_port(), free_port()
    st = _stunnel(
        f"""
[from-sidecar]
accept = 127.0.0.1:{st_port}
connect = 127.0.0.1:{echo.port}
cert = {pki.server.cert}
key = {pki.server.key}
CAfile = {ca_file}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
""",
        tmp_path,
        "server",
    )
    sc = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{st_port}@{TD}/server",
        },
        tmp_path / "outbound.log",
    )
    try:
        _wait_port(st_port)
        sc.wait_ready()
        yield sc, out_port
    finally:
        assert sc.stop() == 0
        st.terminate()
        st.wait(10)


@needs_stunnel
def test_our_outbound_to_stunnel_server(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    with _outbound_to_stunnel(pki, echo, tmp_path, pki.server.bundle) as (sc, out_port):
        payload = b"sidecar->stunnel " * 10_000
        assert exchange(out_port, payload) == payload
        assert sc.metric("mtls_connections_total", security="mtls") >= 1


@needs_stunnel
def test_stunnel_server_refuses_our_foreign_cert(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    """A stunnel that does not trust our CA: the connection fails and is counted, no crash."""
    other_bundle = tmp_path / "other-root.pem"
    other_bundle.write_bytes(pem(pki.other_root.cert))
    with _outbound_to_stunnel(pki, echo, tmp_path, other_bundle) as (sc, out_port):
        # The refusal comes after our handshake: the app sees the stream cut (RST).
        with contextlib.suppress(ConnectionResetError):
            assert exchange(out_port, b"hello") == b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if sc.metric("mtls_connections_rejected_total", direction="outbound") >= 1:
                break
            time.sleep(0.05)
        assert sc.metric("mtls_connections_rejected_total", direction="outbound") >= 1
        assert "Traceback" not in sc.logs()
