"""The connection-reuse wire format (proxy/mux.py): golden bytes, the parser against any split
of the byte stream, and the protocol errors that close a pooled connection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import mux
from proxy.mux import Demuxer, MuxError, OpenInfo

pytestmark = pytest.mark.unit  # in-process only: part of `make unit`


class Sink:
    """Collects what the demuxer hands on; DATA pieces joined per stream, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, bytes]] = []

    def on_data(self, sid: int, data: memoryview) -> None:
        last = self.events[-1] if self.events else None
        if last is not None and last[0] == mux.DATA and last[1] == sid:
            self.events[-1] = (mux.DATA, sid, last[2] + bytes(data))
        else:
            self.events.append((mux.DATA, sid, bytes(data)))

    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        self.events.append((kind, sid, payload))


def test_golden_frames() -> None:
    """The README's wire format, byte for byte."""
    assert mux.frame(mux.DATA, 1, b"hi") == bytes.fromhex("03000002 00000001") + b"hi"
    assert mux.frame(mux.GOAWAY, 0) == bytes.fromhex("07000000 00000000")
    assert mux.frame(mux.RESET, 7, bytes([mux.RESET_NOT_ALLOWED])) == bytes.fromhex(
        "05000001 00000007 01"
    )
    assert mux.frame(mux.WINDOW, 2, mux.encode_window(65536)) == bytes.fromhex(
        "06000004 00000002 00010000"
    )
    info = OpenInfo(("10.0.0.5", 8080), ("10.0.0.9", 40000))
    assert mux.encode_open(info) == (
        b"\x0810.0.0.5" + (8080).to_bytes(2, "big") + b"\x0810.0.0.9" + (40000).to_bytes(2, "big")
    )
    assert mux.ALPN_V1 == b"mtls-sidecar/1"


@given(
    dst=st.tuples(st.text(max_size=60), st.integers(0, 65535)),
    src=st.tuples(st.text(max_size=60), st.integers(0, 65535)),
)
def test_open_round_trip(dst: tuple[str, int], src: tuple[str, int]) -> None:
    info = OpenInfo(dst, src)
    if len(dst[0].encode()) > 255 or len(src[0].encode()) > 255:
        with pytest.raises(ValueError):
            mux.encode_open(info)
        return
    assert mux.decode_open(mux.encode_open(info)) == info


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05abc", b"\x01a\x00\x50", b"\x01a\x00\x50\x01b\x00\x50extra", b"\x01\xff\x00\x50"],
)
def test_bad_open_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(MuxError):
        mux.decode_open(payload)


frames = st.one_of(
    st.tuples(st.just(mux.DATA), st.integers(1, 9), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just(mux.EOF), st.integers(1, 9), st.just(b"")),
    st.tuples(st.just(mux.ACCEPT), st.integers(1, 9), st.just(b"")),
    st.tuples(st.just(mux.RESET), st.integers(1, 9), st.binary(min_size=1, max_size=1)),
    st.tuples(
        st.just(mux.WINDOW),
        st.integers(1, 9),
        st.integers(1, 2**32 - 1).map(mux.encode_window),
    ),
    st.tuples(st.just(mux.GOAWAY), st.just(0), st.just(b"")),
)


def _merged(events: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Adjacent DATA frames of one stream are one piece of its byte stream."""
    out: list[tuple[int, int, bytes]] = []
    for kind, sid, payload in events:
        if out and kind == mux.DATA and out[-1][0] == mux.DATA and out[-1][1] == sid:
            out[-1] = (kind, sid, out[-1][2] + payload)
        else:
            out.append((kind, sid, payload))
    return out


@settings(max_examples=200)
@given(st.lists(frames, max_size=30), st.data())
def test_any_split_gives_the_same_frames(
    sent: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    wire = b"".join(mux.frame(kind, sid, payload) for kind, sid, payload in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    sink = Sink()
    demux = Demuxer(sink)
    pos = 0
    for cut in [*cuts, len(wire)]:
        demux.feed(memoryview(wire[pos:cut]))
        pos = cut
    assert sink.events == _merged(sent)


def test_unknown_frame_type_is_a_protocol_error() -> None:
    demux = Demuxer(Sink())
    with pytest.raises(MuxError, match="unknown frame type 99"):
        demux.feed(memoryview(mux.header(99, 0, 1)))


def test_oversized_control_frame_is_refused_before_its_payload() -> None:
    demux = Demuxer(Sink())
    with pytest.raises(MuxError, match="OPEN frame of 100000 bytes"):
        demux.feed(memoryview(mux.header(mux.OPEN, 100000, 1)))


def test_window_and_reset_payloads_are_checked() -> None:
    with pytest.raises(MuxError):
        mux.decode_window(b"\x00\x00\x00\x00")
    with pytest.raises(MuxError):
        mux.decode_window(b"\x00\x01")
    with pytest.raises(MuxError):
        mux.decode_reset(b"")
    assert mux.decode_reset(b"\x04") == mux.RESET_UPSTREAM


def test_a_large_data_frame_is_handed_on_in_pieces_without_waiting_for_all_of_it() -> None:
    sink = Sink()
    demux = Demuxer(sink)
    wire = mux.frame(mux.DATA, 3, b"x" * 100_000)
    demux.feed(memoryview(wire[:50_000]))
    assert sink.events == [(mux.DATA, 3, b"x" * (50_000 - mux.HEADER_SIZE))]
    demux.feed(memoryview(wire[50_000:]))
    assert sink.events == [(mux.DATA, 3, b"x" * 100_000)]
