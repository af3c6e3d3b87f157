"""HBONE's protocol object in memory (proxy/hbone.py): bytes and commands in, events and
bytes out; no sockets. Both sides are our `HboneConnection`, or raw frames for a peer that
breaks the rules."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import hbone
from proxy.hbone import (
    Broken,
    Data,
    GoAway,
    HboneConnection,
    PingAcked,
    Response,
    StreamEnded,
    StreamOpened,
    StreamReset,
    parse_authority,
    parse_forwarded,
)

pytestmark = pytest.mark.unit


def pump(a: HboneConnection, b: HboneConnection) -> list[Any]:
    data = a.data_to_send()
    return b.receive(data) if data else []


def pair() -> tuple[HboneConnection, HboneConnection]:
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    pump(client, server)
    pump(server, client)
    pump(client, server)  # the SETTINGS acks
    return client, server


def meaningful(events: list[Any]) -> list[Any]:
    """The events a carrier acts on, with DATA joined per stream run (frame boundaries
    depend on how the bytes were split)."""
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, hbone.WindowOpened):
            continue
        if isinstance(ev, Data) and out and isinstance(out[-1], Data) and out[-1].sid == ev.sid:
            prev = out.pop()
            ev = Data(ev.sid, prev.data + ev.data, prev.flow + ev.flow)
        out.append(ev)
    return out


def test_connect_200_data_both_ways_and_half_close() -> None:
    client, server = pair()
    sid = client.open(("10.1.2.3", 8080), ("10.9.9.9", 41000))
    client.send(sid, b"request")
    events = meaningful(pump(client, server))
    assert events == [
        StreamOpened(sid, ("10.1.2.3", 8080), ("10.9.9.9", 41000)),
        Data(sid, b"request", 7),
    ]
    server.respond(sid, 200)
    assert pump(server, client) == [Response(sid, 200)]
    client.end(sid)  # the caller's EOF
    assert meaningful(pump(client, server)) == [StreamEnded(sid)]
    server.send(sid, b"answer")  # the other way still flows after a half-close
    server.end(sid)
    assert meaningful(pump(server, client)) == [Data(sid, b"answer", 6), StreamEnded(sid)]


@pytest.mark.parametrize(
    ("status", "code"), [(401, "not allowed"), (503, "unreachable"), (400, "bad")]
)
def test_refusal_is_a_status_that_ends_the_stream(status: int, code: str) -> None:
    client, server = pair()
    sid = client.open(("10.1.2.3", 8080), None)
    pump(client, server)
    server.respond(sid, status)
    assert pump(server, client) == [Response(sid, status), StreamEnded(sid)]
    assert server.room(sid) == 0


def test_reset_reaches_the_other_side() -> None:
    client, server = pair()
    sid = client.open(("10.1.2.3", 8080), None)
    pump(client, server)
    server.respond(sid, 200)
    pump(server, client)
    client.reset(sid)
    assert pump(client, server) == [StreamReset(sid, 8)]  # CANCEL


def test_windows_and_limits_are_ztunnels() -> None:
    client, server = pair()
    sid = client.open(("10.1.2.3", 8080), None)
    pump(client, server)
    assert client.room(sid) == hbone.STREAM_WINDOW
    assert client.send(sid, b"x" * (hbone.STREAM_WINDOW + 10)) == hbone.STREAM_WINDOW
    assert client.room(sid) == 0  # the rest waits for WINDOW_UPDATE
    got = meaningful(pump(client, server))
    assert got[0].flow == hbone.STREAM_WINDOW
    server.consumed(sid, hbone.STREAM_WINDOW)
    pump(server, client)
    assert client.room(sid) == hbone.STREAM_WINDOW


def test_ping_and_its_answer() -> None:
    client, server = pair()
    server.ping()
    assert pump(server, client) == []  # h2 answers it
    assert pump(client, server) == [PingAcked()]


def test_graceful_goaway_lets_open_streams_finish() -> None:
    client, server = pair()
    sid = client.open(("10.1.2.3", 8080), None)
    pump(client, server)
    server.respond(sid, 200)
    server.goaway()
    events = pump(server, client)
    assert events[-1] == GoAway(sid, 0)
    server.send(sid, b"still")  # the open stream goes on
    server.end(sid)
    assert meaningful(pump(server, client)) == [Data(sid, b"still", 5), StreamEnded(sid)]
    client.send(sid, b"up")  # and the client's side of it too (h2 alone would refuse)
    assert meaningful(pump(client, server)) == [Data(sid, b"up", 2)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("[fd00::1]:8080", ("fd00::1", 8080)),
    ],
)
def test_authority_is_an_ip_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "10.0.0.1", "host:80", "10.0.0.1:0", "10.0.0.1:65536", "fd00::1:80", "[10.0.0.1]:80"],
)
def test_bad_authority_says_why(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_authority(text)


def test_bad_authority_is_an_event_not_an_error() -> None:
    client, server = pair()
    raw = client._h2  # a client that names a host, not an address
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"db.example:5432")])
    (opened,) = pump(client, server)
    assert opened.authority is None and "not an IP address" in opened.problem


def test_forwarded() -> None:
    assert parse_forwarded('for="10.0.0.7:4321"') == ("10.0.0.7", 4321)
    assert parse_forwarded('proto=https;for="[fd00::7]:99", for=1.2.3.4:5') == ("fd00::7", 99)
    assert parse_forwarded("for=_hidden") is None
    assert parse_forwarded("") is None


# --- a peer that breaks the rules: the connection ends with a counted reason ---------------


def raw_client(server: HboneConnection) -> None:
    """A client preface and its SETTINGS ack, by hand."""
    server.receive(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    ack = SettingsFrame(0)
    ack.flags.add("ACK")
    server.receive(ack.serialize())
    server.data_to_send()


def connect_frame(sid: int, server: HboneConnection) -> bytes:
    enc = HboneConnection(client=True)._h2.encoder
    frame = HeadersFrame(sid)
    frame.data = enc.encode([(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")])
    frame.flags.add("END_HEADERS")
    return frame.serialize()


def test_data_beyond_the_stream_window_closes_the_connection() -> None:
    server = HboneConnection(client=False)
    raw_client(server)
    server.receive(connect_frame(1, server))
    chunk = DataFrame(1)
    chunk.data = b"x" * hbone.MAX_FRAME
    events: list[Any] = []
    for _ in range(5):  # 5 MiB on a 4 MiB window
        events += server.receive(chunk.serialize())
    assert isinstance(events[-1], Broken) and events[-1].reason == "flow_control"
    assert b"\x07" in server.data_to_send()  # GOAWAY frame type


def test_more_streams_than_allowed_closes_the_connection() -> None:
    server = HboneConnection(client=False)
    raw_client(server)
    events: list[Any] = []
    for i in range(hbone.MAX_STREAMS + 1):
        events += server.receive(connect_frame(2 * i + 1, server))
    assert sum(isinstance(e, StreamOpened) for e in events) == hbone.MAX_STREAMS
    assert isinstance(events[-1], Broken) and events[-1].reason == "stream_limit"


def test_a_frame_over_1_mib_closes_the_connection() -> None:
    server = HboneConnection(client=False)
    raw_client(server)
    server.receive(connect_frame(1, server))
    big = DataFrame(1)
    big.data = b"x" * (hbone.MAX_FRAME + 1)
    (event,) = server.receive(big.serialize())
    assert isinstance(event, Broken) and event.reason == "frame_size"
    assert server.receive(b"anything") == []  # broken stays broken


def test_a_window_update_overflow_closes_the_connection() -> None:
    server = HboneConnection(client=False)
    raw_client(server)
    frame = WindowUpdateFrame(0)
    frame.window_increment = 2**31 - 1
    (event,) = server.receive(frame.serialize())
    assert isinstance(event, Broken) and event.reason == "flow_control"


# --- any split of the byte stream gives the same events ----------------------------------


def _client_bytes() -> tuple[bytes, bytes]:
    """What a client sends: preface, streams with data, an end, a reset, a ping; and what
    the server says first (so the client is in a state to send all that)."""
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    server_first = server.data_to_send()
    client.receive(server_first)
    sids = [client.open((f"10.0.0.{i}", 8000 + i), ("10.9.0.1", 5000 + i)) for i in range(3)]
    for n, sid in enumerate(sids):
        client.send(sid, bytes([n]) * (20_000 + n))
    client.end(sids[0])
    client.reset(sids[1])
    client.ping()
    client.send(sids[2], b"tail")
    return client.data_to_send(), server_first


STREAM, _ = _client_bytes()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    whole = HboneConnection(client=False)
    expected = meaningful(whole.receive(STREAM))
    split = HboneConnection(client=False)
    got: list[Any] = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        got += split.receive(STREAM[a:b])
    assert meaningful(got) == expected
    kinds = [type(e) for e in expected]
    assert kinds.count(StreamOpened) == 3
    assert {Data, StreamEnded, StreamReset} <= set(kinds)
    assert not any(isinstance(e, Broken) for e in expected)
