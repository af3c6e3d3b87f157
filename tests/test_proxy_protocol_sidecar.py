"""The sidecar tells the app who called (PROXY v2), read by real apps: our parser, haproxy
`accept-proxy` and nginx `proxy_protocol`; and reads a load balancer's header outbound."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import proxyproto as pp

from .conftest import TD, Pki
from .harness import (
    ROOT,
    Sidecar,
    TcpApp,
    base_env,
    exchange,
    free_port,
    identity_env,
    wait_for,
)
from .test_proxyproto_readers import HAPROXY_CONF, NGINX_CONF, HeaderSink, _binary, _foreground


@pytest.fixture
def sink() -> Iterator[HeaderSink]:
    s = HeaderSink()
    yield s
    s.close()


def _pair(
    pki: Pki, tmp: Path, app_port: int, inbound_env: dict[str, str], host: str = "127.0.0.1"
) -> tuple[Sidecar, Sidecar, int, int]:
    in_port, out_port = free_port(host), free_port()
    listen = f"[{host}]:{in_port}" if ":" in host else f"{host}:{in_port}"
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web={listen}=127.0.0.1:{app_port}",
            **inbound_env,
        },
        tmp / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"out=127.0.0.1:{out_port}={listen}@{TD}/server",
        },
        tmp / "outbound.log",
    )
    inbound.wait_ready()
    outbound.wait_ready()
    return inbound, outbound, in_port, out_port


def _closed(sc: Sidecar) -> list[dict[str, object]]:
    return [e for e in sc.log_events() if e.get("event") == "conn_closed"]


def test_the_app_learns_the_callers_address_and_spiffe_id(
    pki: Pki, tmp_path: Path, sink: HeaderSink
) -> None:
    inbound, outbound, in_port, out_port = _pair(
        pki, tmp_path, sink.port, {"MTLS_PROXY_PROTOCOL": "all"}
    )
    try:
        payload = b"hello through a PROXY header" * 100
        assert exchange(out_port, payload) == payload
        got = sink.next()
        assert isinstance(got, pp.Parsed), got
        assert wait_for(lambda: _closed(inbound))
        (line,) = _closed(inbound)
        peer_host, peer_port = str(line["peer"]).rsplit(":", 1)
        assert got.src == (peer_host, int(peer_port))  # the remote peer, not the sidecar
        assert got.dst == ("127.0.0.1", in_port)  # what the caller dialled
        ssl = got.ssl()
        assert ssl is not None and ssl.verified
        assert ssl.get(pp.PP2_SUBTYPE_SSL_VERSION) == b"TLSv1.3"
        assert ssl.get(pp.PP2_SUBTYPE_SSL_CIPHER)
        assert got.tlv(0xE0) == f"{TD}/client".encode()
        assert got.tlv(pp.PP2_TYPE_CRC32C) is None
        # One header per app connection: a second one gets its own (from the same remote
        # peer: with connection reuse, often over the same pooled connection).
        assert exchange(out_port, b"again") == b"again"
        second = sink.next()
        assert isinstance(second, pp.Parsed) and second.src is not None
        assert second.src[0] == peer_host
        assert second.tlv(0xE0) == f"{TD}/client".encode()
    finally:
        inbound.stop()
        outbound.stop()


def test_other_id_tlv_and_crc(pki: Pki, tmp_path: Path, sink: HeaderSink) -> None:
    env = {
        "MTLS_PROXY_PROTOCOL": "web",
        "MTLS_PROXY_PROTOCOL_ID_TLV": "0xD0",
        "MTLS_PROXY_PROTOCOL_CRC32C": "true",
    }
    inbound, outbound, _, out_port = _pair(pki, tmp_path, sink.port, env)
    try:
        assert exchange(out_port, b"x") == b"x"
        got = sink.next()
        assert isinstance(got, pp.Parsed), got
        assert got.tlv(0xD0) == f"{TD}/client".encode()
        assert got.tlv(0xE0) is None
        assert got.tlv(pp.PP2_TYPE_CRC32C) is not None  # checked by the parser
    finally:
        inbound.stop()
        outbound.stop()


def test_ipv6_caller(pki: Pki, tmp_path: Path, sink: HeaderSink) -> None:
    in_port = free_port("::1")
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=[::1]:{in_port}=127.0.0.1:{sink.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_PROXY_PROTOCOL": "all",
        },
        tmp_path / "inbound.log",
    )
    try:
        inbound.wait_ready()
        assert exchange(in_port, b"v6", host="::1") == b"v6"
        got = sink.next()
        assert isinstance(got, pp.Parsed), got
        assert got.src is not None and got.src[0] == "::1" and got.dst == ("::1", in_port)
        assert got.ssl() is None  # plaintext (permissive): no SSL TLV, so the app can tell
    finally:
        inbound.stop()


def test_permissive_plaintext_caller_gets_a_header_without_ssl(
    pki: Pki, tmp_path: Path, sink: HeaderSink
) -> None:
    in_port = free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{in_port}=127.0.0.1:{sink.port}",
            "MTLS_INBOUND_MODE": "audit",
            "MTLS_PROXY_PROTOCOL": "all",
        },
        tmp_path / "inbound.log",
    )
    try:
        inbound.wait_ready()
        with socket.create_connection(("127.0.0.1", in_port), timeout=10) as s:
            s.sendall(b"plain")
            assert s.recv(5) == b"plain"
            src_port = s.getsockname()[1]
        got = sink.next()
        assert isinstance(got, pp.Parsed), got
        assert got.src == ("127.0.0.1", src_port)
        assert got.ssl() is None and got.tlv(0xE0) is None
    finally:
        inbound.stop()


def test_haproxy_as_the_app_logs_the_caller(pki: Pki, tmp_path: Path) -> None:
    binary = _binary("haproxy")
    echo = TcpApp("echo")
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, echo=echo.port))
    log = tmp_path / "haproxy.log"
    with _foreground([binary, "-db", "-f", str(conf)], log, port):
        inbound, outbound, _, out_port = _pair(pki, tmp_path, port, {"MTLS_PROXY_PROTOCOL": "all"})
        try:
            assert exchange(out_port, b"via haproxy") == b"via haproxy"
            assert wait_for(lambda: _closed(inbound))
            peer = str(_closed(inbound)[0]["peer"])
            assert wait_for(lambda: f"client={peer}" in log.read_text()), log.read_text()
        finally:
            inbound.stop()
            outbound.stop()
            echo.close()


def test_nginx_as_the_app_logs_the_caller(pki: Pki, tmp_path: Path) -> None:
    binary = _binary("nginx")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, tlv_log=""))
    cmd = [binary, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"]
    with _foreground(cmd, tmp_path / "nginx.log", port):
        inbound, outbound, _, out_port = _pair(pki, tmp_path, port, {"MTLS_PROXY_PROTOCOL": "all"})
        try:
            with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
                reply = s.makefile("rb").read()
            assert reply.startswith(b"HTTP/1.1 200"), reply
            assert wait_for(lambda: _closed(inbound))
            peer_host, peer_port = str(_closed(inbound)[0]["peer"]).rsplit(":", 1)
            access = tmp_path / "access.log"
            assert wait_for(lambda: access.exists() and access.read_text().strip())
            text = access.read_text()
            assert f"proxy={peer_host}:{peer_port}" in text, text
        finally:
            inbound.stop()
            outbound.stop()


def test_outbound_behind_a_load_balancer_reads_the_callers_header(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
        },
        tmp_path / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"out=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
            "MTLS_OUTBOUND_ACCEPT_PROXY_PROTOCOL": "true",
            "MTLS_HANDSHAKE_TIMEOUT": "2s",
        },
        tmp_path / "outbound.log",
    )
    try:
        inbound.wait_ready()
        outbound.wait_ready()
        header = pp.caller_header(("192.0.2.10", 40001), ("198.51.100.1", 443), pp.CallerInfo(None))
        # The header may arrive in pieces; the payload right behind it.
        with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
            s.sendall(header[:5])
            time.sleep(0.05)  # a second segment, on purpose
            s.sendall(header[5:] + b"payload")
            s.shutdown(socket.SHUT_WR)
            assert s.makefile("rb").read() == b"payload"
        assert wait_for(lambda: _closed(outbound))
        line = _closed(outbound)[0]
        assert line["peer"] == "192.0.2.10:40001"
        assert str(line["proxied_by"]).startswith("127.0.0.1:")
        # No header, a v1 header, garbage, silence: refused and counted.
        for bad in (b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b""):
            with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
                if bad:
                    s.sendall(bad)
                s.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(10) == b""
        name = "mtls_connections_rejected_total"
        assert outbound.wait_metric(name, 3, reason="bad_proxy_header", timeout=10) == 3
        assert "Traceback" not in outbound.logs()
    finally:
        inbound.stop()
        outbound.stop()


def test_check_shows_which_routes_send_it(pki: Pki) -> None:
    env = base_env()
    env.update(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": (
                "web=127.0.0.1:18443=127.0.0.1:18080,api=127.0.0.1:18444=127.0.0.1:18081"
            ),
            "MTLS_OUTBOUND": "out=127.0.0.1:18445=127.0.0.1:18446",
            "MTLS_PROXY_PROTOCOL": "api",
            "MTLS_OUTBOUND_ACCEPT_PROXY_PROTOCOL": "true",
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "check"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["proxy_protocol_routes"] == ["api"]
    assert out["accept_proxy_protocol_routes"] == ["out"]
    assert out["config"]["MTLS_PROXY_PROTOCOL"] == "api"
    assert out["config"]["MTLS_PROXY_PROTOCOL_ID_TLV"] == "0xE0"
    env["MTLS_PROXY_PROTOCOL"] = "nope"
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "check"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2
    assert (
        "MTLS_PROXY_PROTOCOL: no inbound route named nope (inbound routes: web, api)" in bad.stderr
    )
