"""Connection reuse as an authenticated but hostile peer (a leaf of our trust domain) uses it:
a stream that ignores its flow-control window, carriers beyond the connection limits, a
silent (frozen) peer, streams opened after GOAWAY or to excluded ports, and frames that break
the stream rules. Each one is refused, counted, and leaves everyone else served."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TD, Pki, start_pair
from .harness import ScriptedApp, Sidecar, TcpApp, free_port, identity_env, wait_for
from .netns import MuxClient
from .pki import copy_identity, pem, replace_identity, write_identity

OPEN, ACCEPT, DATA, EOF, RESET, WINDOW, GOAWAY = range(1, 8)


def _frame(kind: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack("!II", kind << 24 | len(payload), sid) + payload


def _client(pki: Pki, port: int) -> MuxClient:
    ident = pki.client
    c = MuxClient("127.0.0.1", port, str(ident.cert), str(ident.key), str(ident.bundle))
    assert c.alpn == "mtls-sidecar/1"
    return c


@contextlib.contextmanager
def _inbound(
    pki: Pki, tmp: Path, app_port: int, env: dict[str, str] | None = None, **kw: object
) -> Iterator[tuple[Sidecar, int]]:
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"app=127.0.0.1:{port}=127.0.0.1:{app_port}",
            "MTLS_DRAIN_TIMEOUT": "3s",
            **(env or {}),
        },
        tmp / "inbound.log",
        **kw,  # type: ignore[arg-type]
    )
    try:
        sc.wait_ready()
        yield sc, port
    finally:
        assert sc.stop() == 0
        assert "Traceback" not in sc.logs()


class _Sink:
    """An app that accepts and never reads, until the test ends."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.app = ScriptedApp(self._hold)

    def _hold(self, conn: socket.socket) -> None:
        self.done.wait(60)

    def close(self) -> None:
        self.done.set()
        self.app.close()


def test_a_stream_that_overruns_its_window_closes_the_pooled_connection(
    pki: Pki, tmp_path: Path
) -> None:
    """The peer pushes DATA at an app that does not read, ignoring the 4 MiB stream window:
    the sidecar closes the pooled connection (protocol error, counted) instead of buffering
    whatever comes."""
    sink = _Sink()
    try:
        with _inbound(pki, tmp_path, sink.app.port) as (sc, port):
            c = _client(pki, port)
            c.open(1, "127.0.0.1", sink.app.port)
            chunk = _frame(DATA, 1, b"w" * 65536)
            sent = 0
            with pytest.raises(OSError):  # reset (or closed) long before 64 MiB went
                c.sock.settimeout(20)
                while sent < 64 << 20:
                    c.sock.sendall(chunk)
                    sent += 65536
            assert sent < 32 << 20, sent
            name = "mtls_pool_retired_total"
            assert sc.wait_metric(name, 1, direction="inbound", reason="flow_control") == 1
            lines = [e for e in sc.log_events() if e.get("event") == "pool_protocol_error"]
            assert len(lines) == 1 and "window" in lines[0]["msg"], lines
    finally:
        sink.close()


class _HostileInbound:
    """A TLS server that selects `mtls-sidecar/1` and answers each OPEN with ACCEPT and then
    DATA without end, ignoring the window our outbound side credits."""

    def __init__(self, pki: Pki) -> None:
        import ssl

        ident = pki.server
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(ident.cert), str(ident.key))
        ctx.load_verify_locations(str(ident.bundle))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["mtls-sidecar/1"])
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.pushed = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
            conn = self.ctx.wrap_socket(raw, server_side=True)
            head = b""
            while len(head) < 8:
                head += conn.recv(8 - len(head))
            sid = struct.unpack("!II", head)[1]
            conn.sendall(_frame(ACCEPT, sid))
            chunk = _frame(DATA, sid, b"h" * 65536)
            conn.settimeout(20)
            while self.pushed < 64 << 20:
                conn.sendall(chunk)
                self.pushed += 65536
        except OSError:
            pass
        finally:
            self.stopped.set()

    def close(self) -> None:
        self.sock.close()


def test_a_hostile_inbound_that_overruns_the_window_loses_its_pooled_connection(
    pki: Pki, tmp_path: Path
) -> None:
    server = _HostileInbound(pki)
    out_port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{server.port}@{TD}/server",
        },
        tmp_path / "outbound.log",
    )
    try:
        sc.wait_ready()
        with socket.create_connection(("127.0.0.1", out_port)) as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            app.sendall(b"request")  # and never read the answer
            assert server.stopped.wait(30)
            assert server.pushed < 32 << 20, server.pushed
            name = "mtls_pool_retired_total"
            assert sc.wait_metric(name, 1, direction="outbound", reason="flow_control") == 1
    finally:
        server.close()
        assert sc.stop() == 0
    assert "Traceback" not in sc.logs()


def _refused(pki: Pki, port: int) -> bool:
    """Is a new pooled connection to `port` refused (closed before or in its handshake)?"""
    try:
        c = _client(pki, port)
    except (OSError, EOFError):
        return True
    c.sock.settimeout(5)
    try:  # TLS 1.3: our handshake may complete before the server's verdict arrives
        c.open(1, "127.0.0.1", 1)
        c.until(RESET, 1)
    except (OSError, EOFError):
        return True
    finally:
        c.sock.close()
    return False


def test_pooled_connections_and_their_streams_count_in_max_connections(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """With MTLS_MAX_CONNECTIONS=4: three idle pooled connections and one stream fill it;
    a stream on another of them is refused with `too_many_connections` (RESET code 6), and so
    is a fourth pooled connection."""
    env = {"MTLS_MAX_CONNECTIONS": "4"}
    with _inbound(pki, tmp_path, echo.port, env) as (sc, port):
        carriers = [_client(pki, port) for _ in range(3)]
        first = carriers[0]
        first.open(1, "127.0.0.1", echo.port)
        first.send(DATA, 1, b"ping")
        assert first.until(ACCEPT, 1) == b""
        assert first.until(DATA, 1) == b"ping"
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 4)
        second = carriers[1]
        second.open(1, "127.0.0.1", echo.port)
        assert second.until(RESET, 1) == bytes([6])
        assert _refused(pki, port)
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, 2, reason="too_many_connections") == 2
        carriers.pop().sock.close()  # one pooled connection less: room for one stream
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 3)
        second.open(3, "127.0.0.1", echo.port)
        second.send(DATA, 3, b"pong")
        assert second.until(DATA, 3) == b"pong"
        for c in carriers:
            c.sock.close()


def test_pooled_connections_count_against_the_open_file_limit(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """Under `ulimit -n 96`, 100 idle pooled connections: those beyond what the descriptors
    allow are refused, counted and logged, never reset silently; once they are gone a good
    client is served."""
    prefix = ["prlimit", "--nofile=96:96", "--"]
    with _inbound(pki, tmp_path, echo.port, prefix=prefix) as (sc, port):
        held: list[MuxClient] = []
        refused = 0
        for _ in range(100):
            try:
                c = _client(pki, port)
            except (OSError, EOFError):
                refused += 1
                continue
            held.append(c)
        assert len(held) > 20 and refused > 0, (len(held), refused)
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, refused, reason="too_many_connections") == refused
        lines = [e for e in sc.log_events() if e.get("reason") == "too_many_connections"]
        assert lines and "open-file limit" in lines[0]["msg"]
        for c in held:
            c.sock.close()
        assert wait_for(lambda: json.loads(sc.get("/status")[1])["counts"]["open"] == 0)
        assert exchange_pooled(pki, port, echo.port, b"after") == b"after"


def exchange_pooled(pki: Pki, port: int, app_port: int, payload: bytes) -> bytes:
    c = _client(pki, port)
    try:
        c.sock.settimeout(10)
        c.open(1, "127.0.0.1", app_port)
        c.send(DATA, 1, payload)
        return c.until(DATA, 1)
    finally:
        c.sock.close()


def _process_tree(pid: int) -> list[int]:
    """`pid` and its children (the sidecar's master and workers)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _app_result(port: int, payload: bytes, timeout: float) -> bytes | str:
    """What an app connection through `port` got back: the reply, or the error's name."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while data := s.recv(65536):
                got += data
            return got
    except OSError as exc:
        return type(exc).__name__


def test_a_frozen_inbound_sidecar_fails_new_streams_in_time_and_uncounted(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """The inbound sidecar is stopped (SIGSTOP): its kernel still ACKs, so only an answer
    proves it alive. A new app connection on the pooled connection fails within the handshake
    timeout (counted as `handshake_timeout`, never as relayed), the pooled connection is
    closed (`unresponsive`), the next one fails the same way on a fresh dial, and after
    SIGCONT app connections work again on a new pooled connection."""
    one = {"MTLS_WORKERS": "1"}
    out_env = {**one, "MTLS_HANDSHAKE_TIMEOUT": "2s"}
    inbound, outbound, in_port, out_port = start_pair(
        pki, tmp_path, echo.port, inbound_env=one, outbound_env=out_env
    )
    frozen = _process_tree(inbound.proc.pid)
    try:
        assert _app_result(out_port, b"warm", 10) == b"warm"
        assert outbound.wait_metric("mtls_connections_total", 1, direction="outbound") == 1

        # both ends of the pooled connection run TCP keepalive (the kernel's liveness check;
        # ss shows the retransmit timer instead while data is unacknowledged)
        def keepalive_timers() -> list[str]:
            where = f"( sport = :{in_port} or dport = :{in_port} )"
            return subprocess.run(
                ["ss", "-tnoH", "state", "established", where],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()

        lines = wait_for(
            lambda: (t := keepalive_timers()) and all("timer:(keepalive" in x for x in t) and t
        )
        assert lines and len(lines) == 2, keepalive_timers()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        for _ in range(2):
            t0 = time.monotonic()
            got = _app_result(out_port, b"hello", 15)
            assert got in (b"", "ConnectionResetError"), got
            assert time.monotonic() - t0 < 10  # the 2 s handshake timeout, not minutes
        name = "mtls_connections_rejected_total"
        assert outbound.wait_metric(name, 2, reason="handshake_timeout") == 2
        assert outbound.metric("mtls_pool_retired_total", reason="unresponsive") == 1
        # two sweeps later still nothing relayed was counted for them
        assert outbound.wait_metric("mtls_pool_connections", 0, state="open") == 0
        assert outbound.metric("mtls_connections_total", direction="outbound") == 1
        line = [e for e in outbound.log_events() if e.get("event") == "pool_unresponsive"]
        assert len(line) == 1, line
    finally:
        for pid in frozen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
    try:
        assert wait_for(lambda: _app_result(out_port, b"back", 10) == b"back", timeout=20)
        assert outbound.metric("mtls_connections_total", direction="outbound") == 2
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0


def _stream_answer(c: MuxClient, sid: int, port: int) -> tuple[int, bytes]:
    """Open stream `sid` and return its answer: (ACCEPT, b"") or (RESET, code)."""
    c.open(sid, "127.0.0.1", port)
    while True:
        kind, got_sid, payload = c.frame()
        if got_sid == sid and kind in (ACCEPT, RESET):
            return kind, payload


def test_after_our_goaway_new_streams_are_refused(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    """A rotation sends GOAWAY; a peer that goes on opening streams on the old pooled
    connection is refused (RESET code 8, `going_away`) once the GOAWAY has had time to
    arrive (1 s for one that crossed it on the wire); the stream open across it finishes."""
    ident = copy_identity(pki.server, tmp_path / "server-files")
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(ident),
            "MTLS_INBOUND": f"app=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_DRAIN_TIMEOUT": "3s",
        },
        tmp_path / "inbound.log",
    )
    try:
        sc.wait_ready()
        c = _client(pki, port)
        c.sock.settimeout(10)
        assert _stream_answer(c, 1, echo.port) == (ACCEPT, b"")
        replace_identity(pki.server2, ident)
        sc.signal(signal.SIGHUP)
        c.until(GOAWAY, 0)
        sid, deadline = 3, time.monotonic() + 5
        answer = _stream_answer(c, sid, echo.port)
        while answer[0] == ACCEPT and time.monotonic() < deadline:
            sid += 2
            answer = _stream_answer(c, sid, echo.port)
        assert answer == (RESET, bytes([8])), answer
        assert _stream_answer(c, sid + 2, echo.port) == (RESET, bytes([8]))
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, 2, reason="going_away") == 2
        c.send(DATA, 1, b"still here")  # the stream open across the GOAWAY goes on
        assert c.until(DATA, 1) == b"still here"
        c.sock.close()
    finally:
        assert sc.stop() == 0
    assert "Traceback" not in sc.logs()


def _resumed(first: MuxClient, port: int) -> MuxClient:
    """Another pooled connection of the same peer, resumed from `first`'s session ticket."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    c = object.__new__(MuxClient)
    c.sock = first.sock.context.wrap_socket(raw, session=first.sock.session)
    c.alpn = c.sock.selected_alpn_protocol()
    c.buf = b""
    assert c.sock.session_reused
    return c


def test_a_pooled_connection_whose_peer_is_no_longer_trusted_is_closed(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """The trust bundle loses a root (say, a compromised CA removed): the pooled connection of
    a peer authenticated under it is closed at once (`untrusted`), with its streams; one of a
    peer still trusted only gets GOAWAY and its stream goes on. The same for pooled
    connections resumed from a session ticket (they carry no certificate chain)."""
    ident = copy_identity(pki.server, tmp_path / "server-files")
    ident.bundle.write_bytes(pem(pki.root.cert) + pem(pki.other_root.cert))
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(ident),
            "MTLS_INBOUND": f"app=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_DRAIN_TIMEOUT": "3s",
        },
        tmp_path / "inbound.log",
    )
    try:
        sc.wait_ready()
        good = _client(pki, port)
        other = pki.other_ca
        bad = MuxClient("127.0.0.1", port, str(other.cert), str(other.key), str(other.bundle))
        for c in (good, bad):
            c.sock.settimeout(10)
            assert _stream_answer(c, 1, echo.port) == (ACCEPT, b"")
        good2, bad2 = _resumed(good, port), _resumed(bad, port)
        for c in (good2, bad2):
            c.sock.settimeout(10)
            assert _stream_answer(c, 1, echo.port) == (ACCEPT, b"")
        tmp = ident.bundle.with_suffix(".tmp")
        tmp.write_bytes(pem(pki.root.cert))
        os.replace(tmp, ident.bundle)
        sc.signal(signal.SIGHUP)
        assert sc.wait_metric("mtls_pool_retired_total", 2, reason="untrusted") == 2
        for c in (bad, bad2):
            with pytest.raises((OSError, EOFError)):
                while True:
                    c.frame()
        for c in (good, good2):
            c.until(GOAWAY, 0)
            c.send(DATA, 1, b"trusted still")
            assert c.until(DATA, 1) == b"trusted still"
            c.sock.close()
    finally:
        assert sc.stop() == 0
    assert "Traceback" not in sc.logs()


def test_stream_rule_breaches_are_counted_protocol_errors(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """DATA after the peer's own EOF resets that stream (RESET code 9, counted); a RESET with
    a code the format does not define is counted; both leave the pooled connection serving.
    A frame for a stream that was never opened closes the whole pooled connection."""
    with _inbound(pki, tmp_path, echo.port) as (sc, port):
        c = _client(pki, port)
        c.sock.settimeout(10)
        assert _stream_answer(c, 1, echo.port) == (ACCEPT, b"")
        c.sock.sendall(_frame(EOF, 1) + _frame(DATA, 1, b"after eof"))  # one TLS record
        assert c.until(RESET, 1) == bytes([9])
        name = "mtls_pool_stream_errors_total"
        assert sc.wait_metric(name, 1, direction="inbound", reason="data_after_eof") == 1
        assert _stream_answer(c, 3, echo.port) == (ACCEPT, b"")
        c.send(RESET, 3, bytes([200]))
        assert sc.wait_metric(name, 1, direction="inbound", reason="unknown_reset_code") == 1
        assert _stream_answer(c, 5, echo.port) == (ACCEPT, b"")
        c.send(DATA, 5, b"still served")
        assert c.until(DATA, 5) == b"still served"
        c.send(WINDOW, 99, (65536).to_bytes(4, "big"))  # stream 99 was never opened
        with pytest.raises((OSError, EOFError)):
            while True:
                c.frame()
        retired = "mtls_pool_retired_total"
        assert sc.wait_metric(retired, 1, direction="inbound", reason="protocol_error") == 1
        lines = [e for e in sc.log_events() if e.get("event") == "pool_protocol_error"]
        assert any("never opened" in str(e["msg"]) for e in lines), lines


def test_a_flood_of_refused_streams_is_counted_exactly_but_logged_once_a_second(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """The peer's certificate expires while its pooled connection is open; it goes on opening
    streams. Each is refused (RESET code 3) and counted as `expired_cert`, but the log gets
    about one line a second saying how many were held back, and the line does not call the
    pooled connection a resumed session."""
    with _inbound(pki, tmp_path, echo.port) as (sc, port):
        now = dt.datetime.now(dt.UTC)
        not_after = now + dt.timedelta(seconds=3)
        client = write_identity(
            tmp_path / "short",
            "short",
            pki.inter,
            [pki.root.cert],
            f"{TD}/client",
            not_before=now - dt.timedelta(minutes=1),
            not_after=not_after,
        )
        c = MuxClient("127.0.0.1", port, str(client.cert), str(client.key), str(client.bundle))
        c.sock.settimeout(10)
        assert _stream_answer(c, 1, echo.port) == (ACCEPT, b"")
        c.send(RESET, 1, bytes([0]))
        # Wait for the certificate to expire (a clock, not a state to poll).
        time.sleep(max(0.0, (not_after - dt.datetime.now(dt.UTC)).total_seconds() + 0.5))
        n = 2000
        addr = bytes([9]) + b"127.0.0.1" + echo.port.to_bytes(2, "big")
        open_frames = b"".join(_frame(OPEN, sid, addr + addr) for sid in range(3, 3 + 2 * n, 2))
        c.sock.sendall(open_frames)
        codes = [c.until(RESET, sid) for sid in range(3, 3 + 2 * n, 2)]
        assert set(codes) == {bytes([3])}
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, n, reason="expired_cert") == n
        lines = [e for e in sc.log_events() if e.get("reason") == "expired_cert"]
        assert 1 <= len(lines) <= 5, len(lines)
        assert all("resumed session" not in e["msg"] for e in lines), lines[0]
        assert "pooled connection" in lines[0]["msg"], lines[0]
        c.sock.close()
