"""HBONE inbound on a real sidecar, with a Python HBONE client (our protocol object over a
real TLS socket): status codes, PROXY v2 from `forwarded`, and a peer that breaks a limit."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.settings
import pytest

from proxy.hbone import Data, HboneConnection, Response, StreamEnded, StreamReset
from proxy.proxyproto import HeaderReader
from tests.conftest import Pki
from tests.harness import ScriptedApp, Sidecar, TcpApp, free_port, identity_env, running
from tests.pki import Identity


class HboneClient:
    """A blocking HBONE client: mTLS (ALPN h2) to `port`, CONNECT streams on one connection."""

    def __init__(self, port: int, ident: Identity) -> None:
        ctx = ssl.create_default_context(cafile=str(ident.bundle))
        ctx.check_hostname = False
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(ident.cert), str(ident.key))
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.h = HboneConnection(client=True)
        self.events: list[Any] = []
        self.flush()

    def flush(self) -> None:
        data = self.h.data_to_send()
        if data:
            self.sock.sendall(data)

    def read(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            return False
        if not data:
            return False
        for ev in self.h.receive(data):
            if isinstance(ev, Data):
                self.h.consumed(ev.sid, ev.flow)
            self.events.append(ev)
        self.flush()
        return True

    def wait(self, cond: Any, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if not self.read():
                return cond()
        return cond()

    def connect(self, authority: str, forwarded: tuple[str, int] | None = None) -> tuple[int, int]:
        """CONNECT to `authority` (given raw); (stream id, status)."""
        raw = self.h._h2
        sid = raw.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        if forwarded is not None:
            headers.append((b"forwarded", f'for="{forwarded[0]}:{forwarded[1]}"'.encode()))
        raw.send_headers(sid, headers)
        self.flush()

        def answer() -> int:
            return next(
                (e.status for e in self.events if isinstance(e, Response) and e.sid == sid), 0
            )

        return sid, self.wait(answer)

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        assert self.h.send(sid, data) == len(data)
        if end:
            self.h.end(sid)
        self.flush()

    def received(self, sid: int) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, Data) and e.sid == sid)

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, StreamEnded) and e.sid == sid for e in self.events)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


POLICY = """\
default: deny
inbound:
  web:
    allow: [spiffe://test.example/client]
  secret:
    allow: [spiffe://test.example/nobody]
  down:
    allow: [spiffe://test.example/client]
"""


@pytest.fixture
def sidecar(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> Iterator[tuple[Sidecar, int, dict[str, int]]]:
    hbone = free_port()
    secret = TcpApp("echo")
    down = free_port()  # nothing listens there
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    routes = {"web": echo.port, "secret": secret.port, "down": down}
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": ",".join(
            f"{name}=127.0.0.1:{free_port()}=127.0.0.1:{port}" for name, port in routes.items()
        ),
        "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        "MTLS_POLICY_FILE": str(policy),
    }
    side = Sidecar(env, tmp_path / "sidecar.log")
    try:
        with running(side):
            side.wait_ready()
            yield side, hbone, routes
    finally:
        secret.close()


def test_status_codes(sidecar: tuple[Sidecar, int, dict[str, int]], pki: Pki) -> None:
    side, hbone, routes = sidecar
    client = HboneClient(hbone, pki.client)
    try:
        sid, status = client.connect(f"127.0.0.1:{routes['web']}")
        assert status == 200
        client.send(sid, b"ping over hbone", end=True)
        assert client.wait(lambda: client.ended(sid))
        assert client.received(sid) == b"ping over hbone"
        # The policy of the route the authority names refuses this peer: 401.
        assert client.connect(f"127.0.0.1:{routes['secret']}")[1] == 401
        # The app behind the route is down: 503, only after trying it.
        assert client.connect(f"127.0.0.1:{routes['down']}")[1] == 503
        # No route forwards to that port / not an address of ours / not an ip:port: 400.
        assert client.connect(f"127.0.0.1:{free_port()}")[1] == 400
        assert client.connect(f"192.0.2.1:{routes['web']}")[1] == 400
        assert client.connect(f"web.example:{routes['web']}")[1] == 400
        # The connection itself is unharmed by its refused streams.
        sid, status = client.connect(f"127.0.0.1:{routes['web']}")
        assert status == 200
    finally:
        client.close()
    assert (
        side.metric("mtls_connections_rejected_total", route="secret", reason="peer_not_allowed")
        == 1
    )
    assert side.metric("mtls_upstream_connect_failures_total", route="down") == 1
    assert side.metric("mtls_connections_rejected_total", reason="bad_destination") == 3
    assert side.metric("mtls_policy_decisions_total", route="web", decision="allow") == 2


def test_no_h2_no_hbone(sidecar: tuple[Sidecar, int, dict[str, int]], pki: Pki) -> None:
    """A client that does not offer ALPN h2 is refused in the handshake."""
    _, hbone, _ = sidecar
    ctx = ssl.create_default_context(cafile=str(pki.client.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ctx.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", hbone), timeout=10) as raw,
        pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"),
    ):
        ctx.wrap_socket(raw)


def test_proxy_v2_source_is_the_forwarded_caller(pki: Pki, tmp_path: Path) -> None:
    got: list[Any] = []
    done = threading.Event()

    def app(conn: socket.socket) -> None:
        reader = HeaderReader()
        while (parsed := reader.feed(conn.recv(4096))) is None:
            pass
        got.append(parsed[0])
        conn.sendall(b"ok")
        done.set()

    backend = ScriptedApp(app)
    hbone = free_port()
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": f"web=127.0.0.1:{free_port()}=127.0.0.1:{backend.port}",
        "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        "MTLS_PROXY_PROTOCOL": "all",
    }
    side = Sidecar(env, tmp_path / "sidecar.log")
    with running(side):
        side.wait_ready()
        client = HboneClient(hbone, pki.client)
        try:
            sid, status = client.connect(f"127.0.0.1:{backend.port}", forwarded=("10.7.7.7", 4711))
            assert status == 200
            client.send(sid, b"hi")
            assert done.wait(10)
            assert client.wait(lambda: client.received(sid) == b"ok")
        finally:
            client.close()
        backend.close()
    parsed = got[0]
    assert parsed.src == ("10.7.7.7", 4711)
    assert parsed.dst == ("127.0.0.1", backend.port)


def closed_by_peer(c: HboneClient) -> bool:
    """Read until the sidecar closes the connection (True), or 15 s pass (False)."""
    c.sock.settimeout(15)
    try:
        while c.sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


def _breach_and_survive(side: Sidecar, hbone: int, pki: Pki, target: int, breach: Any) -> None:
    """`breach` breaks a rule on one HBONE connection: that connection is closed, the other
    one goes on."""
    good = HboneClient(hbone, pki.client)
    bad = HboneClient(hbone, pki.client)
    try:
        sid, status = good.connect(f"127.0.0.1:{target}")
        assert status == 200
        breach(bad)
        assert closed_by_peer(bad)
        good.send(sid, b"still here", end=True)
        assert good.wait(lambda: good.ended(sid))
        assert good.received(sid) == b"still here"
    finally:
        good.close()
        bad.close()


def test_limits_close_the_breaking_connection_only(
    sidecar: tuple[Sidecar, int, dict[str, int]], pki: Pki
) -> None:
    side, hbone, routes = sidecar
    web = routes["web"]

    def too_large_frame(c: HboneClient) -> None:
        sid, _ = c.connect(f"127.0.0.1:{web}")
        length = 2 * 1024 * 1024  # our SETTINGS say 1 MiB at most
        header = length.to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
        with contextlib.suppress(OSError):
            c.sock.sendall(header + b"x" * length)

    def too_many_streams(c: HboneClient) -> None:
        raw = c.h._h2
        raw.remote_settings = h2.settings.Settings(  # pretend the sidecar allowed more
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000}
        )
        for _ in range(101):
            sid = raw.get_next_available_stream_id()
            raw.send_headers(
                sid, [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{web}".encode())]
            )
        c.flush()

    def beyond_the_window(c: HboneClient) -> None:
        # The echo app's answers are never read, so it stops reading too: what the sidecar
        # credits is bounded by the kernel's buffers, far below 40 MiB.
        sid, _ = c.connect(f"127.0.0.1:{web}")
        frame = (1024 * 1024).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big")
        with contextlib.suppress(OSError):
            for _ in range(40):
                c.sock.sendall(frame + b"y" * (1024 * 1024))

    for breach, reason in (
        (too_large_frame, "frame_size"),
        (too_many_streams, "stream_limit"),
        (beyond_the_window, "flow_control"),
    ):
        _breach_and_survive(side, hbone, pki, web, breach)
        got = side.wait_metric("mtls_pool_retired_total", 1, direction="inbound", reason=reason)
        assert got == 1
    # Each was logged with its reason.
    errors = [e["reason"] for e in side.log_events() if e.get("event") == "pool_protocol_error"]
    assert errors == ["frame_size", "stream_limit", "flow_control"]
    assert side.proc.poll() is None


def test_hbone_is_tls_13_only_even_where_12_is_allowed(pki: Pki, tmp_path: Path) -> None:
    """MTLS_MIN_TLS_VERSION=1.2 opens the routes' own ports to TLS 1.2, never HBONE's:
    `openssl s_client -tls1_2 -alpn h2` is refused there, while TLS 1.3 gets `h2`."""
    hbone = free_port()
    listen = free_port()
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": f"web=127.0.0.1:{listen}=127.0.0.1:{free_port()}",
        "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        "MTLS_MIN_TLS_VERSION": "1.2",
    }
    side = Sidecar(env, tmp_path / "sidecar.log")
    ident = pki.client

    def s_client(port: int, version: str) -> str:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-alpn", "h2"]
        argv += ["-cert", str(ident.cert), "-key", str(ident.key), "-CAfile", str(ident.bundle)]
        proc = subprocess.run(argv, input=b"", capture_output=True, timeout=20, check=False)
        return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")

    with running(side):
        side.wait_ready()
        old = s_client(hbone, "-tls1_2")
        assert "Cipher    : 0000" in old, old  # no session was made
        got = side.wait_metric(
            "mtls_connections_rejected_total", 1, route=str(hbone), reason="tls_version"
        )
        assert got == 1
        new = s_client(hbone, "-tls1_3")
        assert "ALPN protocol: h2" in new and "TLSv1.3" in new, new
        assert "Protocol  : TLSv1.2" in s_client(listen, "-tls1_2")  # the route's own port


def test_a_large_answer_after_the_callers_eof_arrives_whole(pki: Pki, tmp_path: Path) -> None:
    """The caller half-closes at once; the app answers 20 MiB (five stream windows) and
    closes: all of it arrives, paced by the caller's window, then END_STREAM, not a reset."""
    answer = os.urandom(20 * 1024 * 1024)

    def app(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        conn.sendall(answer)

    backend = ScriptedApp(app)
    hbone = free_port()
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": f"web=127.0.0.1:{free_port()}=127.0.0.1:{backend.port}",
        "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
    }
    side = Sidecar(env, tmp_path / "sidecar.log")
    with running(side):
        side.wait_ready()
        client = HboneClient(hbone, pki.client)
        try:
            sid, status = client.connect(f"127.0.0.1:{backend.port}")
            assert status == 200
            client.send(sid, b"request", end=True)
            assert client.wait(lambda: client.ended(sid), timeout=60)
            assert client.received(sid) == answer
            assert not any(isinstance(e, StreamReset) for e in client.events)
        finally:
            client.close()
        backend.close()
        line = [e for e in side.log_events() if e.get("event") == "conn_closed"][-1]
        assert line["outcome"] == "ok" and line["bytes_out"] == len(answer)
