"""The wire format of connection reuse between two sidecars (pure: no I/O).

When both sidecars speak it (ALPN `mtls-sidecar/2`, or `mtls-sidecar/1` with an older peer;
see README "Connection reuse"), one mTLS connection carries many application connections as
*streams*. Every frame starts with an 8-byte header:

    byte 0      type
    bytes 1-3   payload length (big-endian, up to 16 MiB - 1)
    bytes 4-7   stream id (big-endian; 0 for frames about the whole connection)

Streams are opened by the dialling (outbound) side only, with ids 1, 2, 3, ... never reused
on one connection. Frame types:

    OPEN    payload: destination host (1-byte length + UTF-8), port (2 bytes),
            source host (same), port. The app connection the stream carries.
    ACCEPT  empty. The far side reached its app: the stream relays.
    DATA    the application's bytes.
    EOF     empty. The sender's app half-closed: no more DATA from it on this stream.
    RESET   payload: one byte, a RESET_* code. The stream ends now, unsent data dropped
            (an app's TCP reset stays a reset, a refusal says why).
    WINDOW  payload: 4 bytes, more bytes the receiver of this frame may send on the stream.
    GOAWAY  stream 0, empty. No new streams on this connection; open ones finish.

Version 2 (`mtls-sidecar/2`) adds, on stream 0 only:

    WINDOW  on stream 0: more bytes the receiver of this frame may send on the whole
            connection (all streams together).
    PING    payload: 8 bytes, any. The receiver answers with PING_ACK at once.
    PING_ACK payload: the 8 bytes of the PING it answers.

Flow control is per stream (both versions): each side may have at most WINDOW_SIZE bytes of
DATA in flight per stream that the other side has not yet handed to its app, so one slow
reader never stalls the other streams of the connection. Version 2 adds a connection window
of CONNECTION_WINDOW_SIZE bytes over all streams (bounding what one connection may hold at the
receiver), credited by WINDOW frames on stream 0. The state machine that applies these rules
is tunnel.py; this module only encodes and parses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

ALPN_V1 = b"mtls-sidecar/1"
ALPN_V2 = b"mtls-sidecar/2"
ALPN_VERSIONS = {ALPN_V1: 1, ALPN_V2: 2}

HEADER = struct.Struct("!II")  # (type << 24 | length, stream id)
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = (1 << 24) - 1
MAX_STREAM_ID = (1 << 31) - 1  # a connection that used this many is retired

OPEN = 1
ACCEPT = 2
DATA = 3
EOF = 4
RESET = 5
WINDOW = 6
GOAWAY = 7
PING = 8  # version 2
PING_ACK = 9  # version 2
FRAME_NAMES_V1 = {
    OPEN: "OPEN",
    ACCEPT: "ACCEPT",
    DATA: "DATA",
    EOF: "EOF",
    RESET: "RESET",
    WINDOW: "WINDOW",
    GOAWAY: "GOAWAY",
}
FRAME_NAMES = {**FRAME_NAMES_V1, PING: "PING", PING_ACK: "PING_ACK"}
PING_SIZE = 8

WINDOW_SIZE = 4 << 20  # bytes in flight per stream and direction
CONNECTION_WINDOW_SIZE = 16 << 20  # version 2: bytes in flight per connection and direction
MAX_WINDOW = (1 << 31) - 1  # a window credited beyond this is a protocol error
# A version 1 sender stops reading its app once its window is used up, so the read in
# flight when it ran out (up to 1 MiB) may overshoot the window: the receiver allows that
# much more from a version 1 peer, and closes the connection when a peer sends beyond it (a
# protocol error, `flow_control`). A version 2 sender never reads more than its window.
WINDOW_SLACK = 1 << 20
RECEIVE_LIMIT = WINDOW_SIZE + WINDOW_SLACK
WINDOW_UPDATE_AT = WINDOW_SIZE // 2  # credit back once this much was handed to the app
MAX_CONTROL_PAYLOAD = 1024  # OPEN, RESET, WINDOW: anything longer is a protocol error

# RESET codes: why a stream ended.
RESET_CANCEL = 0  # an app reset its connection, or the sidecar cut it (drain, idle, error)
RESET_NOT_ALLOWED = 1  # the far side's policy refuses our identity for this stream
RESET_REVOKED = 2  # our certificate is revoked
RESET_EXPIRED = 3  # our certificate expired
RESET_UPSTREAM = 4  # the far side could not reach its app
RESET_BAD_DESTINATION = 5  # transparent mode: the stream named an address the far side refuses
RESET_LIMIT = 6  # the far side is at its connection limit
RESET_UNKNOWN_STREAM = 7  # DATA for a stream the far side no longer knows
RESET_GOING_AWAY = 8  # opened on a connection the far side had told to go away (GOAWAY)
RESET_PROTOCOL = 9  # the stream broke a rule of this format (e.g. DATA after its EOF)
RESET_NAMES = {
    RESET_CANCEL: "cancel",
    RESET_NOT_ALLOWED: "not_allowed",
    RESET_REVOKED: "revoked",
    RESET_EXPIRED: "expired",
    RESET_UPSTREAM: "upstream_failed",
    RESET_BAD_DESTINATION: "bad_destination",
    RESET_LIMIT: "too_many_connections",
    RESET_UNKNOWN_STREAM: "unknown_stream",
    RESET_GOING_AWAY: "going_away",
    RESET_PROTOCOL: "protocol_error",
}

_PORT = struct.Struct("!H")
_WINDOW = struct.Struct("!I")


class MuxError(ValueError):
    """The peer broke the wire format: the whole connection is closed. `reason` is the
    label it is counted under (mtls_pool_retired_total)."""

    reason = "protocol_error"


class WindowExceeded(MuxError):
    """The peer sent more DATA on a stream than the window we credited allows."""

    reason = "flow_control"


def header(kind: int, length: int, sid: int) -> bytes:
    return HEADER.pack(kind << 24 | length, sid)


def frame(kind: int, sid: int, payload: bytes = b"") -> bytes:
    """One whole frame."""
    return HEADER.pack(kind << 24 | len(payload), sid) + payload


@dataclass(frozen=True, slots=True)
class OpenInfo:
    """What an OPEN frame carries: where the app connection goes, and who made it."""

    dst: tuple[str, int]
    src: tuple[str, int]


def _addr(host: str, port: int) -> bytes:
    raw = host.encode()
    if len(raw) > 255:
        raise ValueError(f"host name too long for an OPEN frame: {host[:40]}...")
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return bytes([len(raw)]) + raw + _PORT.pack(port)


def encode_open(info: OpenInfo) -> bytes:
    return _addr(*info.dst) + _addr(*info.src)


def decode_open(payload: bytes) -> OpenInfo:
    parts: list[tuple[str, int]] = []
    pos = 0
    for _ in range(2):
        if pos >= len(payload):
            raise MuxError("OPEN frame too short")
        n = payload[pos]
        end = pos + 1 + n + 2
        if end > len(payload):
            raise MuxError("OPEN frame too short")
        try:
            host = payload[pos + 1 : pos + 1 + n].decode()
        except UnicodeDecodeError:
            raise MuxError("OPEN frame: host is not UTF-8") from None
        parts.append((host, _PORT.unpack_from(payload, pos + 1 + n)[0]))
        pos = end
    if pos != len(payload):
        raise MuxError("OPEN frame has trailing bytes")
    return OpenInfo(parts[0], parts[1])


def encode_window(increment: int) -> bytes:
    return _WINDOW.pack(increment)


def decode_window(payload: bytes) -> int:
    if len(payload) != 4:
        raise MuxError("WINDOW frame payload is not 4 bytes")
    n: int = _WINDOW.unpack(payload)[0]
    if n == 0:
        raise MuxError("WINDOW frame with a zero increment")
    return n


def decode_ping(payload: bytes) -> bytes:
    if len(payload) != PING_SIZE:
        raise MuxError(f"PING frame payload is not {PING_SIZE} bytes")
    return payload


def decode_reset(payload: bytes) -> int:
    if len(payload) != 1:
        raise MuxError("RESET frame payload is not 1 byte")
    return payload[0]


class FrameSink(Protocol):
    """Where a `Demuxer` hands what it parsed."""

    def on_data(self, sid: int, data: memoryview) -> None:
        """A piece of a DATA frame's payload (a frame may come in several pieces); `data` is
        only valid during the call."""

    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        """A whole frame of any other type."""


class Demuxer:
    """Incremental frame parser: `feed` any split of the byte stream.

    DATA payloads are handed on as they arrive (no frame is buffered whole), other frames
    once complete. Raises MuxError on an unknown frame type or an oversized control frame.
    """

    __slots__ = ("_ctl", "_head", "_kind", "_kinds", "_left", "_sid", "sink")

    def __init__(self, sink: FrameSink, version: int = 1) -> None:
        self.sink = sink
        self._kinds = FRAME_NAMES if version >= 2 else FRAME_NAMES_V1
        self._head = bytearray()  # a header split across reads
        self._kind = 0  # the frame being read (0: between frames)
        self._sid = 0
        self._left = 0  # payload bytes still to come
        self._ctl = bytearray()  # a control frame's payload so far

    def feed(self, data: memoryview) -> None:
        pos = 0
        end = len(data)
        sink = self.sink
        unpack = HEADER.unpack_from
        while pos < end:
            kind = self._kind
            if kind == DATA:
                n = min(self._left, end - pos)
                self._left -= n
                if not self._left:
                    self._kind = 0
                sink.on_data(self._sid, data[pos : pos + n])
                pos += n
                continue
            if kind:
                n = min(self._left, end - pos)
                self._ctl += data[pos : pos + n]
                self._left -= n
                pos += n
                if not self._left:
                    self._finish_control()
                continue
            head = self._head
            if head or end - pos < HEADER_SIZE:
                take = min(HEADER_SIZE - len(head), end - pos)
                head += data[pos : pos + take]
                pos += take
                if len(head) < HEADER_SIZE:
                    return
                word, sid = unpack(head)
                head.clear()
            else:
                word, sid = unpack(data, pos)
                pos += HEADER_SIZE
            self._start(word >> 24, word & MAX_PAYLOAD, sid)

    def _start(self, kind: int, length: int, sid: int) -> None:
        if kind not in self._kinds:
            raise MuxError(f"unknown frame type {kind}")
        self._sid = sid
        if kind == DATA:
            if length:
                self._kind = DATA
                self._left = length
            return
        if length > MAX_CONTROL_PAYLOAD:
            raise MuxError(f"{FRAME_NAMES[kind]} frame of {length} bytes")
        if not length:
            self.sink.on_frame(kind, sid, b"")
            return
        self._kind = kind
        self._left = length

    def _finish_control(self) -> None:
        kind, payload = self._kind, bytes(self._ctl)
        self._kind = 0
        self._ctl.clear()
        self.sink.on_frame(kind, self._sid, payload)
