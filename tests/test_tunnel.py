"""The sans-IO tunnel core (proxy/tunnel.py), in memory: its rules frame by frame, any split of
the received bytes, and two connected cores under any interleaving of commands."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import mux
from proxy.mux import OpenInfo
from proxy.tunnel import (
    ConnectionFailed,
    DataReceived,
    Event,
    GoawayReceived,
    MuxDialect,
    PingAcked,
    StreamAccepted,
    StreamBroken,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    Tunnel,
    TunnelError,
    WindowOpened,
)

pytestmark = pytest.mark.unit  # in-process only: part of `make unit`

INFO = OpenInfo(("10.0.0.5", 8080), ("10.0.0.9", 40000))
MiB = 1 << 20


def pair(version: int = 2, **kw: Any) -> tuple[Tunnel, Tunnel]:
    return (
        Tunnel(client=True, dialect=MuxDialect(version), **kw),
        Tunnel(client=False, dialect=MuxDialect(version), **kw),
    )


def move(a: Tunnel, b: Tunnel) -> list[Event]:
    """Everything `a` has to send, received by `b`."""
    return b.receive_data(a.data_to_send())


def server(version: int = 2, **kw: Any) -> Tunnel:
    return Tunnel(client=False, dialect=MuxDialect(version), **kw)


def opened(t: Tunnel, sid: int = 1) -> None:
    assert t.receive_data(mux.frame(mux.OPEN, sid, mux.encode_open(INFO))) == [
        StreamOpened(sid, INFO, False)
    ]


def failed(events: list[Event]) -> str:
    assert events and isinstance(events[-1], ConnectionFailed), events
    return events[-1].reason


def test_golden_version_2_frames() -> None:
    """README's version 2 additions, byte for byte."""
    assert mux.frame(mux.PING, 0, b"\0" * 7 + b"\1") == bytes.fromhex("08000008 00000000") + (
        b"\0" * 7 + b"\1"
    )
    assert mux.frame(mux.PING_ACK, 0, b"abcdefgh") == bytes.fromhex("09000008 00000000") + (
        b"abcdefgh"
    )
    assert mux.frame(mux.WINDOW, 0, mux.encode_window(MiB)) == bytes.fromhex(
        "06000004 00000000 00100000"
    )
    assert mux.ALPN_VERSIONS == {b"mtls-sidecar/1": 1, b"mtls-sidecar/2": 2}


def test_a_stream_opens_relays_and_ends_both_ways() -> None:
    c, s = pair()
    sid = c.open_stream(INFO)
    assert move(c, s) == [StreamOpened(sid, INFO, False)]
    s.accept(sid)
    c.send_data(sid, b"ping")
    assert move(s, c) == [StreamAccepted(sid)]
    assert move(c, s) == [DataReceived(sid, b"ping")]
    s.send_data(sid, b"pong")
    s.send_eof(sid)
    assert move(s, c) == [DataReceived(sid, b"pong"), StreamEnded(sid)]
    c.send_eof(sid)
    assert move(c, s) == [StreamEnded(sid)]
    assert not c.streams and not s.streams  # both halves closed: the stream is gone
    # a frame for it now is about an ended stream: DATA is answered with RESET 7
    assert s.receive_data(mux.frame(mux.DATA, sid, b"late")) == []
    assert s.data_to_send() == mux.frame(mux.RESET, sid, bytes([mux.RESET_UNKNOWN_STREAM]))


def test_ping_is_answered_with_its_payload() -> None:
    c, s = pair()
    payload = c.ping()
    assert move(c, s) == []
    assert move(s, c) == [PingAcked(payload)]


def test_version_1_knows_no_ping_nor_a_connection_window() -> None:
    t = server(1)
    assert failed(t.receive_data(mux.frame(mux.PING, 0, b"12345678"))) == "protocol_error"
    t = server(1)
    wire = mux.frame(mux.WINDOW, 0, mux.encode_window(5))
    assert failed(t.receive_data(wire)) == "protocol_error"
    with pytest.raises(TunnelError):
        server(1).ping()


@pytest.mark.parametrize(
    ("version", "allowed"), [(1, mux.WINDOW_SIZE + mux.WINDOW_SLACK), (2, mux.WINDOW_SIZE)]
)
def test_a_peer_that_overruns_a_stream_window_breaks_the_connection(
    version: int, allowed: int
) -> None:
    """A version 2 peer never overshoots, so the window is exact; a version 1 peer's last read
    may, by up to WINDOW_SLACK."""
    t = server(version)
    opened(t)
    events = t.receive_data(mux.frame(mux.DATA, 1, b"x" * allowed))
    assert [type(e) for e in events] == [DataReceived]
    assert failed(t.receive_data(mux.frame(mux.DATA, 1, b"x"))) == "flow_control"
    assert t.receive_data(mux.frame(mux.DATA, 1, b"x")) == []  # nothing more after a failure


def test_the_connection_window_bounds_all_streams_together() -> None:
    c, s = pair()
    sids = [c.open_stream(INFO) for _ in range(5)]
    move(c, s)
    for sid in sids[:4]:
        assert c.sendable(sid) == mux.WINDOW_SIZE
        c.send_data(sid, b"x" * mux.WINDOW_SIZE)
    assert c.sendable(sids[4]) == 0  # 16 MiB in flight: the connection window is used up
    with pytest.raises(TunnelError):
        c.send_data(sids[4], b"x")
    events = move(c, s)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 16 * MiB
    # the app takes one stream's bytes: that stream and the connection get credit back
    s.credit(sids[0], mux.WINDOW_SIZE)
    events = move(s, c)
    assert WindowOpened(0) in events and WindowOpened(sids[0]) in events
    assert c.sendable(sids[4]) == mux.WINDOW_SIZE


def test_reserve_takes_what_both_windows_allow() -> None:
    """The I/O side's send path: `reserve` accounts what it may send, never more."""
    c, _ = pair(stream_window=1000, connection_window=1500)
    one, two = c.open_stream(INFO), c.open_stream(INFO)
    assert c.reserve(one, 300) == 300 and c.room_left == 700
    assert c.reserve(one, 5000) == 700 and c.room_left == 0
    assert c.reserve(two, 5000) == 500 and c.room_left == 0  # the connection's 1500 used
    assert c.reserve(two, 1) == 0 and c.window == 0
    v1, _ = pair(1, stream_window=1000, connection_window=1500)
    one, two = v1.open_stream(INFO), v1.open_stream(INFO)
    assert v1.reserve(one, 5000) == 1000 and v1.reserve(two, 5000) == 1000  # no such window


def test_a_peer_that_overruns_the_connection_window_breaks_the_connection() -> None:
    t = server()
    for sid in range(1, 6):
        opened(t, sid)
    for sid in range(1, 5):
        t.receive_data(mux.frame(mux.DATA, sid, b"x" * mux.WINDOW_SIZE))
    assert failed(t.receive_data(mux.frame(mux.DATA, 5, b"x"))) == "flow_control"


def test_stream_limit_and_stream_ids() -> None:
    t = server(max_streams=2)
    opened(t, 1)
    opened(t, 3)  # ids may skip, never go back
    # one more is refused (our limit cannot be told to the peer), the connection kept
    events = t.receive_data(mux.frame(mux.OPEN, 4, mux.encode_open(INFO)))
    assert events == [StreamRefused(4, INFO, mux.RESET_LIMIT)]
    assert t.data_to_send() == mux.frame(mux.RESET, 4, bytes([mux.RESET_LIMIT]))
    assert sorted(t.streams) == [1, 3] and t.failed is None
    t.receive_data(mux.frame(mux.EOF, 1) + mux.frame(mux.DATA, 4, b"late"))  # 4: answered
    assert t.data_to_send() == mux.frame(mux.RESET, 4, bytes([mux.RESET_UNKNOWN_STREAM]))
    t.send_eof(1)
    opened(t, 5)  # stream 1 ended both ways: room again
    t = server()
    opened(t, 5)
    bad = t.receive_data(mux.frame(mux.OPEN, 4, mux.encode_open(INFO)))
    assert failed(bad) == "protocol_error"
    c = Tunnel(client=True, dialect=MuxDialect(2), max_streams=1)
    c.open_stream(INFO)
    assert not c.can_open()
    with pytest.raises(TunnelError):
        c.open_stream(INFO)


@pytest.mark.parametrize(
    "wire",
    [
        mux.frame(mux.DATA, 1, b"x"),  # never opened
        mux.frame(mux.EOF, 9, b""),
        mux.frame(mux.WINDOW, 0, b"\0\0\0\0"),  # zero increment
        mux.frame(mux.PING, 0, b"short"),
        mux.frame(mux.PING, 1, b"12345678"),  # PING names stream 0 only
        mux.header(42, 0, 0),  # unknown type
        mux.header(mux.OPEN, 5000, 1),  # oversized control frame
    ],
)
def test_frames_that_break_the_format_fail_the_connection(wire: bytes) -> None:
    t = server()
    if wire.startswith(mux.header(mux.PING, 8, 1)):
        opened(t, 1)
    assert failed(t.receive_data(wire)) == "protocol_error"


def test_data_after_eof_resets_only_its_stream() -> None:
    t = server()
    opened(t, 1)
    opened(t, 2)
    t.receive_data(mux.frame(mux.EOF, 1))
    events = t.receive_data(mux.frame(mux.DATA, 1, b"more") + mux.frame(mux.DATA, 2, b"ok"))
    assert events == [
        StreamBroken(1, "data_after_eof", "DATA after its EOF"),
        DataReceived(2, b"ok"),
    ]
    assert t.data_to_send() == mux.frame(mux.RESET, 1, bytes([mux.RESET_PROTOCOL]))


def test_resets_with_known_and_unknown_codes() -> None:
    t = server()
    opened(t, 1)
    opened(t, 2)
    assert t.receive_data(mux.frame(mux.RESET, 1, b"\x04")) == [StreamReset(1, 4, True)]
    assert t.receive_data(mux.frame(mux.RESET, 2, b"\x63")) == [StreamReset(2, 99, False)]
    assert not t.streams


def test_goaway_both_ways() -> None:
    c, s = pair()
    s.goaway()
    assert move(s, c) == [GoawayReceived()]
    assert not c.can_open()
    with pytest.raises(TunnelError):
        c.open_stream(INFO)
    # an OPEN that crossed our GOAWAY on the wire is flagged, the I/O side decides
    t = server()
    t.goaway()
    events = t.receive_data(mux.frame(mux.OPEN, 1, mux.encode_open(INFO)))
    assert events == [StreamOpened(1, INFO, True)]


def test_liveness_pings_a_silent_peer_and_gives_it_up() -> None:
    c, s = pair(now=100.0)
    assert c.tick(105.0) == [] and c.data_to_send() == b""
    assert c.tick(110.0) == []  # 10 s silent: a PING
    assert s.receive_data(c.data_to_send()) == []
    assert not c.suspect(110.5)
    assert c.suspect(111.0)  # unanswered for a second: no new streams on it
    assert c.tick(115.0) == [] and c.data_to_send() == b""  # one PING per interval
    # the answer counts as heard: the silence starts again
    assert c.receive_data(s.data_to_send()) == [PingAcked((1).to_bytes(8, "big"))]
    assert not c.suspect(116.0)
    assert c.tick(116.0) == []
    assert c.tick(125.0) == [] and c.data_to_send() == b""
    assert c.tick(126.0) == [] and c.data_to_send()[:1] == bytes([mux.PING])
    assert c.tick(136.0) == [ConnectionFailed("unresponsive", "nothing heard for 20.0s")]
    assert c.tick(140.0) == []
    v1 = Tunnel(client=True, dialect=MuxDialect(1), now=0.0)
    assert v1.tick(1000.0) == [] and v1.data_to_send() == b""  # version 1: no PING


# --- property tests ----------------------------------------------------------------------

any_frame = st.one_of(
    st.tuples(st.just(mux.OPEN), st.integers(0, 6), st.just(mux.encode_open(INFO))),
    st.tuples(st.just(mux.DATA), st.integers(0, 6), st.binary(max_size=300)),
    st.tuples(st.sampled_from([mux.EOF, mux.ACCEPT, mux.GOAWAY]), st.integers(0, 6), st.just(b"")),
    st.tuples(st.just(mux.RESET), st.integers(0, 6), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just(mux.WINDOW), st.integers(0, 6), st.integers(1, 2**20).map(mux.encode_window)),
    st.tuples(
        st.sampled_from([mux.PING, mux.PING_ACK]), st.just(0), st.binary(min_size=8, max_size=8)
    ),
    st.tuples(st.integers(0, 255), st.integers(0, 6), st.binary(max_size=20)),
)


def _joined(events: list[Event]) -> list[Event]:
    """DATA events of one stream one after the other are one piece of its byte stream."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, DataReceived) and isinstance(last, DataReceived) and last.sid == e.sid:
            out[-1] = DataReceived(e.sid, bytes(last.data) + bytes(e.data))
        elif isinstance(e, DataReceived):
            out.append(DataReceived(e.sid, bytes(e.data)))
        else:
            out.append(e)
    return out


@settings(max_examples=300)
@given(
    st.sampled_from([1, 2]),
    st.booleans(),
    st.lists(any_frame, max_size=25),
    st.binary(max_size=12),
    st.data(),
)
def test_any_split_of_the_received_bytes_gives_the_same_events(
    version: int, client: bool, frames: list[tuple[int, int, bytes]], tail: bytes, data: Any
) -> None:
    wire = b"".join(mux.frame(k, sid, p) for k, sid, p in frames) + tail
    whole = Tunnel(client=client, dialect=MuxDialect(version))
    if client:
        for _ in range(3):
            whole.open_stream(INFO)
    expected = _joined(whole.receive_data(wire))
    expected_out = whole.data_to_send()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    split = Tunnel(client=client, dialect=MuxDialect(version))
    if client:
        for _ in range(3):
            split.open_stream(INFO)
    got: list[Event] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        got += split.receive_data(wire[pos:cut])
        pos = cut
    assert _joined(got) == expected
    assert split.data_to_send() == expected_out
    assert split.failed == whole.failed


# Small windows (a stream 1000 bytes, the connection 1500) so that few steps use them up.
SMALL = {"stream_window": 1000, "connection_window": 1500}
sizes = st.integers(1, 3000)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.just("accept"), st.integers(0, 7)),
        st.tuples(st.just("send"), st.booleans(), st.integers(0, 7), sizes),
        st.tuples(st.just("send"), st.just(True), st.integers(0, 7), sizes),
        st.tuples(st.just("open")),
        st.tuples(st.just("eof"), st.booleans(), st.integers(0, 7)),
        st.tuples(st.just("reset"), st.booleans(), st.integers(0, 7)),
        st.tuples(st.just("take"), st.booleans(), st.integers(0, 7), sizes),
        st.tuples(st.just("move"), st.booleans(), sizes),
        st.tuples(st.just("ping"), st.booleans()),
        st.tuples(st.just("settle")),
    ),
    min_size=10,
    max_size=80,
)


class Side:
    def __init__(self, t: Tunnel) -> None:
        self.t = t
        self.wire = bytearray()  # sent, not yet received by the other side
        self.sent: dict[int, bytearray] = {}  # per stream, all DATA bytes sent
        self.got: dict[int, bytearray] = {}  # per stream, all DATA bytes received
        self.held: dict[int, int] = {}  # received, not yet taken by the app
        self.opened: list[int] = []  # streams the peer opened, not yet accepted
        self.reset: set[int] = set()

    def check(self) -> None:
        t = self.t
        assert t.failed is None
        assert t.window is None or t.window >= 0
        assert t.receivable is None or t.receivable >= 0
        for s in t.streams.values():
            assert s.window >= 0 and s.receivable >= 0 and s.held >= 0


def _pick(side: Side, i: int) -> int | None:
    sids = sorted(side.t.streams)
    return sids[i % len(sids)] if sids else None


def _receive(side: Side, peer: Side, data: bytes) -> None:
    for e in side.t.receive_data(data):
        assert not isinstance(e, (ConnectionFailed, StreamBroken)), e
        if isinstance(e, DataReceived):
            side.got.setdefault(e.sid, bytearray()).extend(e.data)
            side.held[e.sid] = side.held.get(e.sid, 0) + len(e.data)
            # in order and exact, as far as it has come
            assert peer.sent[e.sid].startswith(side.got[e.sid])
        elif isinstance(e, StreamOpened):
            side.opened.append(e.sid)
        elif isinstance(e, StreamReset):
            side.reset.add(e.sid)


def _flush(a: Side) -> None:
    a.wire += a.t.data_to_send()


def _settle(sides: dict[bool, Side]) -> None:
    """Deliver everything, the apps taking all they get, until both sides are quiet."""
    for _ in range(50):
        moved = False
        for key, side in sides.items():
            _flush(side)
            if side.wire:
                data, side.wire = bytes(side.wire), bytearray()
                _receive(sides[not key], side, data)
                moved = True
        for side in sides.values():
            for sid, n in list(side.held.items()):
                if n and sid in side.t.streams:
                    side.t.credit(sid, n)
                side.held[sid] = 0
        if not moved:
            break


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), ops)
def test_two_cores_stay_consistent_under_any_interleaving(
    version: int, steps: list[tuple[Any, ...]]
) -> None:
    """Windows never go negative, neither side sees a protocol error, and each stream's bytes
    arrive exactly, in order; with everything delivered and taken, all of them."""
    c, s = pair(version, **SMALL)
    sides = {True: Side(c), False: Side(s)}
    pattern = bytes(range(256)) * 20

    def send(side: Side, sid: int, n: int) -> None:
        done = len(side.sent.setdefault(sid, bytearray()))
        if n % 2:  # as the I/O side does: reserve the window, write the frame itself
            m = side.t.reserve(sid, n)
            assert m <= n and side.t.room_left == side.t.sendable(sid)
            if m:
                chunk = pattern[done % 256 : done % 256 + m]
                _flush(side)  # what the tunnel queued goes first
                side.wire += mux.frame(mux.DATA, sid, chunk)
                side.sent[sid].extend(chunk)
            return
        n = min(n, side.t.sendable(sid))
        if n:
            chunk = pattern[done % 256 : done % 256 + n]
            side.t.send_data(sid, chunk)
            side.sent[sid].extend(chunk)

    for op in steps:
        kind = op[0]
        if kind == "settle":
            _settle(sides)
        elif kind == "open":
            if c.can_open():
                sid = c.open_stream(INFO)
                sides[True].sent[sid] = bytearray()
        elif kind == "accept":
            opened_ = sides[False].opened
            if opened_:
                sid = opened_.pop(op[1] % len(opened_))
                if sid in s.streams:
                    s.accept(sid)
                    sides[False].sent.setdefault(sid, bytearray())
        else:
            side = sides[op[1]]
            if kind == "move":
                _flush(side)
                chunk, side.wire[:] = bytes(side.wire[: op[2]]), side.wire[op[2] :]
                _receive(sides[not op[1]], side, chunk)
            elif kind == "ping":
                if version >= 2:
                    side.t.ping()
            else:
                picked = _pick(side, op[2])
                if picked is None:
                    continue
                sid = picked
                if kind == "send":
                    side.sent.setdefault(sid, bytearray())
                    send(side, sid, op[3])
                elif kind == "eof":
                    side.t.send_eof(sid)
                elif kind == "reset":
                    side.t.reset(sid)
                    side.reset.add(sid)
                elif kind == "take":
                    n = min(op[3], side.held.get(sid, 0))
                    if n:
                        side.t.credit(sid, n, minimum=op[3] % 400)
                        side.held[sid] -= n
        for x in sides.values():
            x.check()

    _settle(sides)
    for key, side in sides.items():
        side.check()
        peer = sides[not key]
        for sid, sent in side.sent.items():
            got = peer.got.get(sid, bytearray())
            assert sent.startswith(got)
            if sid not in side.reset and sid not in peer.reset:
                # a stream neither side reset got all its bytes
                assert got == sent, (sid, len(got), len(sent))
