"""Our PROXY v2 headers read by real apps: haproxy (`accept-proxy`) and nginx (`proxy_protocol`)
on loopback log the caller's address from our header, not the connecting socket's."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import proxyproto as pp

from .harness import ROOT, TcpApp, free_port, recv_all

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
