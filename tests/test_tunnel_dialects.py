"""The tunnel core (proxy/tunnel.py) under both of its dialects, in memory: ours
(`mtls-sidecar/2`, tunnel.MuxDialect) and HBONE (HTTP/2 CONNECT through h2,
hbone.HboneDialect). The same scenarios, the same events, whatever the wire format."""

from __future__ import annotations

from typing import Any

import h2.connection
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import hbone, mux
from proxy.hbone import HboneDialect
from proxy.mux import OpenInfo
from proxy.tunnel import (
    ConnectionFailed,
    DataReceived,
    Dialect,
    Event,
    GoawayReceived,
    MuxDialect,
    PingAcked,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    Tunnel,
    TunnelError,
    WindowOpened,
)
from tests.test_tunnel import _joined

pytestmark = pytest.mark.unit  # in-process only: part of `make unit`

INFO = OpenInfo(("10.0.0.5", 8080), ("10.0.0.9", 40000))
DIALECTS = ["mtls-sidecar/2", "hbone"]


def dialect(name: str, client: bool, **kw: Any) -> Dialect:
    if name == "hbone":
        return HboneDialect(client=client, **kw)
    return MuxDialect(2)


def tunnel(name: str, client: bool, now: float = 0.0, **kw: Any) -> Tunnel:
    return Tunnel(client=client, dialect=dialect(name, client, **kw), now=now, **kw)


def move(a: Tunnel, b: Tunnel) -> list[Event]:
    """Everything `a` has to send, received by `b`; the events, without the window news."""
    return [e for e in b.receive_data(a.data_to_send()) if not isinstance(e, WindowOpened)]


def settle(c: Tunnel, s: Tunnel) -> None:
    """Both ends send what they have until neither has anything (HTTP/2's prefaces)."""
    while c.out or s.out:
        move(c, s)
        move(s, c)


def pair(name: str, **kw: Any) -> tuple[Tunnel, Tunnel]:
    c, s = tunnel(name, True, **kw), tunnel(name, False, **kw)
    settle(c, s)
    return c, s


def relaying(name: str, **kw: Any) -> tuple[Tunnel, Tunnel, int]:
    c, s = pair(name, **kw)
    sid = c.open_stream(INFO)
    assert move(c, s) == [StreamOpened(sid, INFO, False)]
    s.accept(sid)
    assert move(s, c) == [StreamAccepted(sid)]
    return c, s, sid


@pytest.mark.parametrize("name", DIALECTS)
def test_open_data_both_ways_and_half_close(name: str) -> None:
    c, s, sid = relaying(name)
    c.send_data(sid, b"hello")
    assert _joined(move(c, s)) == [DataReceived(sid, b"hello")]
    s.send_data(sid, b"world!")
    assert _joined(move(s, c)) == [DataReceived(sid, b"world!")]
    c.send_eof(sid)
    assert move(c, s) == [StreamEnded(sid)]
    s.send_data(sid, b"after the client's EOF")  # a half-closed stream relays the other way
    assert _joined(move(s, c)) == [DataReceived(sid, b"after the client's EOF")]
    s.send_eof(sid)
    assert move(s, c) == [StreamEnded(sid)]
    assert c.streams == {} and s.streams == {}
    settle(c, s)
    assert c.failed is None and s.failed is None
    assert c.can_open()


@pytest.mark.parametrize("name", DIALECTS)
def test_a_stream_reset_either_way_and_a_refusal(name: str) -> None:
    c, s, sid = relaying(name)
    c.reset(sid)
    assert move(c, s) == [StreamReset(sid, mux.RESET_CANCEL, True)]
    assert c.streams == {} and s.streams == {}
    sid = c.open_stream(INFO)
    move(c, s)
    s.accept(sid)
    move(s, c)
    s.reset(sid)
    assert move(s, c) == [StreamReset(sid, mux.RESET_CANCEL, True)]
    # Refused before the answer (HBONE: 401), the reason arrives.
    sid = c.open_stream(INFO)
    move(c, s)
    s.reset(sid, mux.RESET_NOT_ALLOWED)
    assert move(s, c) == [StreamReset(sid, mux.RESET_NOT_ALLOWED, True)]
    settle(c, s)
    assert c.streams == {} and s.streams == {}
    assert c.failed is None and s.failed is None


@pytest.mark.parametrize("name", DIALECTS)
def test_windows_are_used_up_and_credited_back(name: str) -> None:
    c, s, one = relaying(name, stream_window=100_000, connection_window=150_000)
    assert c.sendable(one) == 100_000
    c.send_data(one, b"x" * 100_000)
    assert c.sendable(one) == 0
    with pytest.raises(TunnelError):
        c.send_data(one, b"x")
    assert sum(len(e.data) for e in move(c, s) if isinstance(e, DataReceived)) == 100_000
    two = c.open_stream(INFO)
    move(c, s)
    s.accept(two)
    move(s, c)
    assert c.sendable(two) == 50_000  # what the connection window has left
    s.credit(one, 100_000)
    events = c.receive_data(s.data_to_send())
    assert WindowOpened(one) in events
    assert c.sendable(one) == 100_000  # the stream's and the connection's windows back
    assert c.failed is None and s.failed is None


@pytest.mark.parametrize("name", DIALECTS)
def test_the_stream_limit(name: str) -> None:
    c = tunnel(name, True, max_streams=3)
    s = tunnel(name, False, max_streams=2)
    settle(c, s)
    for _ in range(2):
        sid = c.open_stream(INFO)
        assert move(c, s) == [StreamOpened(sid, INFO, False)]
    if name == "hbone":
        # HTTP/2 tells the client the server's limit (SETTINGS): it opens no more.
        assert not c.can_open()
        with pytest.raises(TunnelError):
            c.open_stream(INFO)
    else:
        # Ours cannot tell it: the server refuses the stream, the connection stays.
        sid = c.open_stream(INFO)
        assert move(c, s) == [StreamRefused(sid, INFO, mux.RESET_LIMIT)]
        assert move(s, c) == [StreamReset(sid, mux.RESET_LIMIT, True)]
    s.reset(1)
    move(s, c)
    assert c.can_open()
    assert c.failed is None and s.failed is None


@pytest.mark.parametrize("name", DIALECTS)
def test_goaway_stops_new_streams_while_open_ones_finish(name: str) -> None:
    c, s, sid = relaying(name)
    s.goaway()
    assert move(s, c) == [GoawayReceived()]
    assert not c.can_open()
    c.send_data(sid, b"still relayed")
    c.send_eof(sid)
    assert _joined(move(c, s)) == [DataReceived(sid, b"still relayed"), StreamEnded(sid)]
    s.send_eof(sid)
    assert move(s, c) == [StreamEnded(sid)]
    assert c.streams == {} and s.streams == {}
    assert c.failed is None and s.failed is None


@pytest.mark.parametrize("name", DIALECTS)
def test_a_silent_peer_is_pinged_then_given_up_and_an_answer_keeps_it(name: str) -> None:
    c, s = tunnel(name, True), tunnel(name, False)
    settle(c, s)
    assert c.tick(0.0) == []  # what was heard so far (HBONE: the prefaces) counts as now
    assert c.tick(5.0) == [] and not c.out
    assert c.tick(10.0) == []  # silent for 10 s: a PING
    assert c.out
    move(c, s)
    assert move(s, c) == [PingAcked((1).to_bytes(8, "big"))]
    assert c.tick(12.0) == [] and c.tick(25.0) == []  # heard at 12: not dead at 25
    c.data_to_send()  # that PING is lost
    assert not c.suspect(25.5)
    assert c.tick(27.0) == []
    assert c.suspect(27.0)  # unanswered for 2 s: no new streams should wait on it
    assert c.tick(32.0) == [ConnectionFailed("unresponsive", "nothing heard for 20.0s")]
    assert c.failed == "unresponsive"


def test_hbone_is_http2_connect_on_the_wire() -> None:
    """What the core's OPEN becomes for a plain HTTP/2 peer: a CONNECT as ztunnel sends it,
    answered 200; and the HBONE refusal statuses come back as the core's RESET codes."""
    c = Tunnel(client=True, dialect=HboneDialect(client=True))
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    c.receive_data(peer.data_to_send())
    sid = c.open_stream(INFO)
    events = peer.receive_data(bytes(c.data_to_send()))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert request.stream_id == 1 and sid == 1
    assert dict(request.headers or ()) == {
        b":method": b"CONNECT",
        b":authority": b"10.0.0.5:8080",
        b"forwarded": b'for="10.0.0.9:40000"',
    }
    two = c.open_stream(INFO)
    peer.receive_data(bytes(c.data_to_send()))
    peer.send_headers(1, [(b":status", b"200")])
    peer.send_headers(3, [(b":status", b"503")], end_stream=True)
    got = [e for e in c.receive_data(peer.data_to_send()) if not isinstance(e, WindowOpened)]
    assert got == [StreamAccepted(sid), StreamReset(two, mux.RESET_UPSTREAM, True)]


def test_hbone_the_server_sends_nothing_before_its_answer() -> None:
    c, s = pair("hbone")
    sid = c.open_stream(INFO)
    move(c, s)
    with pytest.raises(TunnelError):
        s.send_eof(sid)


def test_hbone_a_bad_authority_is_answered_400() -> None:
    s_dialect = HboneDialect(client=False)
    s = Tunnel(client=False, dialect=s_dialect)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"example.com:80")])
    events = s.receive_data(peer.data_to_send())
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert opened == [StreamOpened(1, OpenInfo(hbone.NO_AUTHORITY, hbone.NO_AUTHORITY), False)]
    assert "not an IP address" in s_dialect.problems[1]
    s.reset(1, mux.RESET_BAD_DESTINATION)
    answers = peer.receive_data(bytes(s.data_to_send()))
    response = next(e for e in answers if isinstance(e, h2.events.ResponseReceived))
    assert dict(response.headers or ())[b":status"] == b"400"
    assert s_dialect.problems == {}


def test_hbone_a_peer_beyond_the_stream_window_fails_the_connection() -> None:
    s = Tunnel(client=False, dialect=HboneDialect(client=False, stream_window=1000))
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.5:80")])
    s.receive_data(peer.data_to_send())
    # The peer ignores our SETTINGS (it never read them): 65,535 bytes are 64,535 too many.
    for _ in range(4):
        peer.send_data(1, b"x" * 15_000)
    events = s.receive_data(peer.data_to_send())
    assert isinstance(events[-1], ConnectionFailed) and events[-1].reason == "flow_control"


def _session() -> tuple[bytes, bytes]:
    """A client's bytes for a session (opens, data, EOF, reset, credit, PING, GOAWAY) and
    the server's preface it answered: what a server receives, to be split any way."""
    c, s = tunnel("hbone", True), tunnel("hbone", False)
    server_preface = bytes(s.data_to_send())
    wire = bytearray(c.data_to_send())
    c.receive_data(server_preface)
    ones = [c.open_stream(INFO) for _ in range(3)]
    c.send_data(ones[0], b"a" * 40_000)
    c.send_data(ones[1], b"b" * 70_000)
    c.send_data(ones[0], b"c" * 5)
    c.send_eof(ones[0])
    c.reset(ones[1])
    c.send_data(ones[2], b"d" * 17_000)
    c.ping()
    c.goaway()
    wire += c.data_to_send()
    return bytes(wire), server_preface


SESSION, SERVER_PREFACE = _session()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(SESSION)), max_size=12))
def test_hbone_any_split_of_the_received_bytes_gives_the_same_events(cuts: list[int]) -> None:
    whole = tunnel("hbone", False)
    expected = _joined(whole.receive_data(SESSION))
    assert expected and whole.failed is None
    assert [e.sid for e in expected if isinstance(e, DataReceived)] == [1, 2, 1, 3]
    split = tunnel("hbone", False)
    got: list[Event] = []
    pos = 0
    for cut in [*sorted(cuts), len(SESSION)]:
        got += split.receive_data(SESSION[pos:cut])
        pos = cut
    assert _joined(got) == expected
    assert split.streams.keys() == whole.streams.keys()
    assert split.receivable == whole.receivable


def _agree(t: Tunnel) -> None:
    """The core's windows are h2's, stream by stream and for the connection."""
    d = t.dialect
    assert isinstance(d, HboneDialect)
    conn = d._h2
    assert t.window == conn.outbound_flow_control_window
    assert t.receivable == conn._inbound_flow_control_window_manager.current_window_size
    for sid, stream in t.streams.items():
        h2stream = conn.streams.get(2 * sid - 1)
        if h2stream is None or h2stream.closed:
            continue
        assert stream.window == h2stream.outbound_flow_control_window
        assert stream.receivable == h2stream._inbound_window_manager.current_window_size


hbone_ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.just(0), st.just(0)),
        st.tuples(st.just("accept"), st.integers(0, 5), st.just(0)),
        st.tuples(st.sampled_from(["send", "back"]), st.integers(0, 5), st.integers(1, 200_000)),
        st.tuples(st.sampled_from(["take", "give"]), st.integers(0, 5), st.integers(1, 200_000)),
        st.tuples(st.sampled_from(["eof", "reset"]), st.integers(0, 5), st.integers(0, 1)),
        st.tuples(st.sampled_from(["to_server", "to_client"]), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(hbone_ops)
def test_hbone_the_cores_windows_agree_with_h2s_under_any_commands(
    ops: list[tuple[str, int, int]],
) -> None:
    """Small windows (a stream 100,000 bytes, the connection 150,000) used up, credited,
    streams ended and reset in any order: the core and h2 never disagree on a window, and
    neither end ever finds the other breaking a rule."""
    kw: dict[str, Any] = {"stream_window": 100_000, "connection_window": 150_000}
    c, s = pair("hbone", **kw)
    held: dict[tuple[bool, int], int] = {}  # (at the client?, sid): received, not yet taken

    def receive(src: Tunnel, dst: Tunnel, at_client: bool) -> None:
        for e in dst.receive_data(src.data_to_send()):
            assert not isinstance(e, ConnectionFailed), e
            if isinstance(e, DataReceived):
                held[at_client, e.sid] = held.get((at_client, e.sid), 0) + len(e.data)
            elif isinstance(e, StreamReset):
                held.pop((at_client, e.sid), None)

    for op, i, n in ops:
        sids = sorted(c.streams) if op in ("send", "take", "eof", "reset") else sorted(s.streams)
        sid = sids[i % len(sids)] if sids else 0
        if op == "open" and c.can_open():
            c.open_stream(INFO)
        elif op == "accept" and sid and not s.streams[sid].accepted:
            s.accept(sid)
        elif op in ("send", "back") and sid:
            t = c if op == "send" else s
            room = min(n, t.sendable(sid))
            if room and (t is c or s.streams[sid].accepted):  # a server sends after its 200
                t.send_data(sid, b"x" * room)
        elif op in ("take", "give") and sid:
            at_client = op == "take"
            t = c if at_client else s
            got = min(n, held.get((at_client, sid), 0))
            if got and sid in t.streams:
                held[at_client, sid] -= got
                t.credit(sid, got)
        elif op in ("eof", "reset") and sid:
            t = c if n else s
            if sid in t.streams and (t is c or op == "reset" or s.streams[sid].accepted):
                if op == "eof":
                    t.send_eof(sid)
                else:
                    t.reset(sid)
                    held.pop((t is c, sid), None)
        elif op == "to_server":
            receive(c, s, False)
        elif op == "to_client":
            receive(s, c, True)
        _agree(c)
        _agree(s)
    receive(c, s, False)
    receive(s, c, True)
    _agree(c)
    _agree(s)
    assert c.failed is None and s.failed is None
