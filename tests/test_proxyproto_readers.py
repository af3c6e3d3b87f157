"""PROXY v2 with real peers: haproxy (`accept-proxy`) and nginx (`proxy_protocol`) read our
headers and log the caller from them, not the connecting socket; and our parser reads what
haproxy sends as a load balancer (`send-proxy-v2` with its SSL TLVs and CRC32C)."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import proxyproto as pp

from .harness import ROOT, TcpApp, free_port, recv_all
from .pki import key_pem, make_leaf, make_root, pem

DEADLINE = 15.0

VERIFIED = pp.CallerInfo(
    verified=True,
    tls_version="TLSv1.3",
    cipher="TLS_AES_128_GCM_SHA256",
    cn="web",
    spiffe_id="spiffe://corp.example/ns/shop/sa/web",
    sig_alg="ecdsa-with-SHA256",
    key_alg="EC256",
)

# (caller, called address) pairs as the sidecar would write them; documentation ranges.
CASES = {
    "ipv4": (("192.0.2.10", 40001), ("198.51.100.20", 8443)),
    "ipv6": (("2001:db8::10", 40002), ("2001:db8::20", 8443)),
    "ipv6-caller-ipv4-listener": (("2001:db8::11", 40003), ("198.51.100.21", 8443)),
}


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path:
        return path
    if os.geteuid() == 0:
        pytest.fail(f"{name} is not installed but we run as root: `make apt` installs it")
    pytest.skip(f"{name} is not installed (and not root, so `make apt` cannot install it)")


def _expected(case: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """How haproxy and nginx print the header's addresses: a mixed pair comes v4-mapped."""
    src, dst = CASES[case]
    if ":" in src[0] and ":" not in dst[0]:
        return src, ("::ffff:" + dst[0], dst[1])
    return src, dst


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"port {port} never answered: {log.read_text()}")


def _wait_line(path: Path, pattern: str) -> str:
    """The first line of `path` matching `pattern`, waiting for it to be written."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if regex.search(line):
                    return line
        time.sleep(0.05)
    text = path.read_text() if path.exists() else "(no file)"
    raise AssertionError(f"no line matching {pattern!r} in {path}:\n{text}")


@contextlib.contextmanager
def _foreground(cmd: list[str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send(port: int, data: bytes) -> bytes:
    """Send, half-close, read to EOF; b"" when the reader refused the connection (reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s, DEADLINE)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:  # reset before our shutdown
                return b""
            raise


# --- haproxy ----------------------------------------------------------------------------

HAPROXY_CONF = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend app
    bind 127.0.0.1:{port} accept-proxy
    log-format "pp client=%ci:%cp frontend=%fi:%fp bytes=%B"
    default_backend echo
backend echo
    server echo 127.0.0.1:{echo}
"""


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, TcpApp]]:
    binary = _binary("haproxy")
    tmp = tmp_path_factory.mktemp("haproxy")
    echo = TcpApp("echo")
    port = free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, echo=echo.port))
    log = tmp / "haproxy.log"
    try:
        with _foreground([binary, "-db", "-f", str(conf)], log, port):
            yield port, log, echo
    finally:
        echo.close()


@pytest.mark.parametrize("case", list(CASES))
def test_haproxy_logs_the_caller_from_our_header(
    haproxy: tuple[int, Path, TcpApp], case: str
) -> None:
    port, log, _ = haproxy
    src, dst = CASES[case]
    header = pp.caller_header(src, dst, VERIFIED, crc=True)
    payload = f"hello from {case}".encode() * 100
    assert _send(port, header + payload) == payload  # header consumed, payload intact
    want_src, want_dst = _expected(case)
    line = _wait_line(log, rf"client={re.escape(want_src[0])}:{want_src[1]} ")
    assert f"frontend={want_dst[0]}:{want_dst[1]} " in line


def test_haproxy_uses_the_real_endpoints_for_local(haproxy: tuple[int, Path, TcpApp]) -> None:
    port, log, _ = haproxy
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        me = s.getsockname()
        s.sendall(pp.encode_v2(command="LOCAL", src=None, dst=None) + b"local")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, DEADLINE) == b"local"
    _wait_line(log, rf"client=127\.0\.0\.1:{me[1]} frontend=127\.0\.0\.1:{port} ")


def test_haproxy_checks_our_crc(haproxy: tuple[int, Path, TcpApp]) -> None:
    """haproxy verifies PP2_TYPE_CRC32C: a changed address byte is caught only with it."""
    port, log, echo = haproxy
    src, dst = ("192.0.2.30", 40030), ("198.51.100.30", 8443)
    for crc in (True, False):
        bad = bytearray(pp.caller_header(src, dst, VERIFIED, crc=crc))
        bad[19] ^= 0x01  # 192.0.2.30 -> 192.0.2.31
        reply = _send(port, bytes(bad) + b"tampered")
        if crc:
            assert reply == b""
        else:
            assert reply == b"tampered"
            _wait_line(log, r"client=192\.0\.2\.31:40030 ")
    assert "client=192.0.2.30:" not in log.read_text()
    assert echo.connections >= 1


# --- nginx ------------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    log_format pp 'pp proxy=$proxy_protocol_addr:$proxy_protocol_port '
                  'server=$proxy_protocol_server_addr:$proxy_protocol_server_port '
                  'remote=$remote_addr{tlv_log}';
    access_log {tmp}/access.log pp;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        set_real_ip_from 127.0.0.1;
        real_ip_header proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "app sees $remote_addr port $proxy_protocol_port\\n";
        }}
    }}
}}
"""


def _nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(x) for x in match.groups())


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, bool]]:
    binary = _binary("nginx")
    # $proxy_protocol_tlv_* arrived in nginx 1.23.2; older ones (Debian 12 has 1.22) lack it.
    has_tlv = _nginx_version(binary) >= (1, 23, 2)
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = tmp / "nginx.conf"
    tlv_log = " id=$proxy_protocol_tlv_0xe0" if has_tlv else ""
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, tlv_log=tlv_log))
    cmd = [binary, "-p", str(tmp), "-c", str(conf), "-e", "stderr"]
    with _foreground(cmd, tmp / "nginx.log", port):
        yield port, tmp / "access.log", has_tlv


def _http(port: int, prefix: bytes) -> bytes:
    reply = _send(port, prefix + b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    return reply.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("case", list(CASES))
def test_nginx_logs_the_caller_from_our_header(nginx: tuple[int, Path, bool], case: str) -> None:
    port, access, has_tlv = nginx
    src, dst = CASES[case]
    body = _http(port, pp.caller_header(src, dst, VERIFIED, crc=True))
    want_src, want_dst = _expected(case)
    # real_ip_header proxy_protocol: the app's own $remote_addr is the caller.
    assert body == f"app sees {want_src[0]} port {want_src[1]}\n".encode()
    line = _wait_line(access, rf"proxy={re.escape(want_src[0])}:{want_src[1]} ")
    assert f"server={want_dst[0]}:{want_dst[1]} remote={want_src[0]}" in line
    if has_tlv:
        assert line.endswith(f" id={VERIFIED.spiffe_id}")


def test_nginx_uses_the_real_endpoints_for_local(nginx: tuple[int, Path, bool]) -> None:
    port, _, _ = nginx
    body = _http(port, pp.encode_v2(command="LOCAL", src=None, dst=None))
    assert body.startswith(b"app sees 127.0.0.1 port")


def test_nginx_reads_a_plaintext_callers_header(nginx: tuple[int, Path, bool]) -> None:
    port, access, _ = nginx
    src, dst = ("203.0.113.5", 40050), ("198.51.100.50", 8080)
    body = _http(port, pp.caller_header(src, dst, pp.CallerInfo(verified=None)))
    assert body == b"app sees 203.0.113.5 port 40050\n"
    _wait_line(access, r"proxy=203\.0\.113\.5:40050 server=198\.51\.100\.50:8080 ")


# --- the README's snippets -------------------------------------------------------------


def _readme_block(lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tell the app who called (PROXY protocol v2)", 1)[1].split("\n## ")[0]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"the README section has no {lang} snippet"
    return match.group(1)


def test_readme_python_snippet_reads_our_header() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_readme_block("python"), "README.md", "exec"), namespace)
    read_caller = namespace["read_caller"]
    assert callable(read_caller)
    a, b = socket.socketpair()
    with a, b:
        header = pp.caller_header(("2001:db8::99", 40099), ("127.0.0.1", 8080), VERIFIED, crc=True)
        a.sendall(header + b"GET / HTTP/1.1\r\n")
        assert read_caller(b) == {
            "address": ("2001:db8::99", 40099),
            "spiffe_id": VERIFIED.spiffe_id,
            "verified": True,
            "cn": "web",
        }
        assert b.recv(100) == b"GET / HTTP/1.1\r\n"  # the app's bytes follow, untouched
        a.sendall(pp.caller_header(("192.0.2.1", 1), ("127.0.0.1", 2), pp.CallerInfo(None)))
        assert read_caller(b) == {
            "address": ("192.0.2.1", 1),
            "spiffe_id": None,
            "verified": False,
            "cn": None,
        }


def test_readme_nginx_snippet_is_valid_config(tmp_path: Path) -> None:
    binary = _binary("nginx")
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n"
        f"client_body_temp_path {tmp_path}/body;\nproxy_temp_path {tmp_path}/proxy;\n"
        f"fastcgi_temp_path {tmp_path}/fastcgi;\nuwsgi_temp_path {tmp_path}/uwsgi;\n"
        f"scgi_temp_path {tmp_path}/scgi;\naccess_log off;\n"
        f"{_readme_block('nginx')}}}\n"
    )
    cmd = [binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_readme_haproxy_snippet_is_valid_config(tmp_path: Path) -> None:
    binary = _binary("haproxy")
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(
        "defaults\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
        + _readme_block("haproxy")
        + "backend app\n    mode http\n    server app 127.0.0.1:8081\n"
    )
    done = subprocess.run(
        [binary, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the other way: haproxy as the load balancer, our parser as the reader ----------------


class HeaderSink:
    """A loopback server that reads each connection's PROXY header with our parser, records
    what it got (Parsed or the error), then echoes the payload (or closes on an error)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.results: queue.Queue[pp.Parsed | str] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        reader = pp.HeaderReader()
        with conn:
            conn.settimeout(DEADLINE)
            try:
                done = None
                while done is None:
                    data = conn.recv(4096)
                    if not data:
                        self.results.put("closed before the header was complete")
                        return
                    done = reader.feed(data)
            except pp.ProxyHeaderError as exc:
                self.results.put(str(exc))
                return
            except OSError as exc:
                self.results.put(f"socket error {exc}")
                return
            parsed, rest = done
            self.results.put(parsed)
            with contextlib.suppress(OSError):
                conn.sendall(rest)
                while data := conn.recv(65536):
                    conn.sendall(data)

    def next(self) -> pp.Parsed | str:
        return self.results.get(timeout=DEADLINE)

    def close(self) -> None:
        self.sock.close()


LB_CONF = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend lb_tls
    bind 127.0.0.1:{tls_port} ssl crt {tmp}/lb.pem ca-file {tmp}/ca.pem verify required
    default_backend sidecar_v2
backend sidecar_v2
    server s 127.0.0.1:{sink} send-proxy-v2 proxy-v2-options {options}
frontend lb_v1
    bind 127.0.0.1:{v1_port}
    default_backend sidecar_v1
backend sidecar_v1
    server s 127.0.0.1:{sink} send-proxy
"""
LB_OPTIONS = "ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c"


@pytest.fixture(scope="module")
def load_balancer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[HeaderSink, int, int, Path, bytes]]:
    """haproxy in front of HeaderSink: TLS with client certificates, sending PROXY v2 with
    every SSL detail and a CRC32C; and a plain frontend sending PROXY v1."""
    binary = _binary("haproxy")
    tmp = tmp_path_factory.mktemp("lb")
    root = make_root()
    server_cert, server_key = make_leaf(root, "spiffe://corp.example/lb")
    client_cert, client_key = make_leaf(root, "spiffe://corp.example/lb-client")
    (tmp / "lb.pem").write_bytes(pem(server_cert) + key_pem(server_key))
    (tmp / "ca.pem").write_bytes(pem(root.cert))
    (tmp / "client.pem").write_bytes(pem(client_cert) + key_pem(client_key))
    sink = HeaderSink()
    tls_port, v1_port = free_port(), free_port()
    conf = tmp / "lb.cfg"
    conf.write_text(
        LB_CONF.format(
            tls_port=tls_port, v1_port=v1_port, sink=sink.port, tmp=tmp, options=LB_OPTIONS
        )
    )
    try:
        # Probe the TLS port only: a probe of the plain one would reach the sink.
        with _foreground([binary, "-db", "-f", str(conf)], tmp / "lb.log", tls_port):
            yield sink, tls_port, v1_port, tmp, server_cert.public_bytes(Encoding.DER)
    finally:
        sink.close()


def test_our_parser_reads_haproxy_send_proxy_v2(
    load_balancer: tuple[HeaderSink, int, int, Path, bytes],
) -> None:
    sink, tls_port, _, tmp, lb_der = load_balancer
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
    ctx.load_cert_chain(str(tmp / "client.pem"))
    with (
        socket.create_connection(("127.0.0.1", tls_port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        me = tls.getsockname()
        tls.sendall(b"through the load balancer")
        assert tls.recv(100) == b"through the load balancer"
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
    parsed = sink.next()
    assert isinstance(parsed, pp.Parsed), parsed
    assert parsed.command == "PROXY" and parsed.family == "inet"
    assert parsed.src == ("127.0.0.1", me[1])  # the load balancer's client
    assert parsed.dst == ("127.0.0.1", tls_port)
    assert parsed.tlv(pp.PP2_TYPE_CRC32C) is not None  # and it matched, or parse_v2 raised
    assert parsed.tlv(pp.PP2_TYPE_AUTHORITY) == b"localhost"  # the SNI
    info = parsed.ssl()
    assert info is not None
    want = pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN | pp.PP2_CLIENT_CERT_SESS
    assert info.client == want and info.verified
    assert info.get(pp.PP2_SUBTYPE_SSL_VERSION) == version.encode()
    assert info.get(pp.PP2_SUBTYPE_SSL_CIPHER) == cipher[0].encode()
    assert info.get(pp.PP2_SUBTYPE_SSL_CN) == b"spiffe://corp.example/lb-client"
    # haproxy names its own certificate's algorithms the way cert_algorithms does.
    sig_alg, key_alg = pp.cert_algorithms(lb_der)
    assert info.get(pp.PP2_SUBTYPE_SSL_SIG_ALG) == (sig_alg or "").encode()
    assert info.get(pp.PP2_SUBTYPE_SSL_KEY_ALG) == (key_alg or "").encode()


def test_our_parser_refuses_haproxy_send_proxy_v1(
    load_balancer: tuple[HeaderSink, int, int, Path, bytes],
) -> None:
    sink, _, v1_port, _, _ = load_balancer
    assert _send(v1_port, b"hello") == b""
    error = sink.next()
    assert isinstance(error, str) and "PROXY protocol v1 (text) header" in error
