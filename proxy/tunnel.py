"""Connection reuse as a sans-IO state machine (pure: no sockets, no asyncio; time passed in).

A `Tunnel` is one end of one pooled connection, modelled on h2's `H2Connection`: the I/O side
hands it the bytes it received (`receive_data`, which returns events) and its commands
(`open_stream`, `accept`, `send_data`, `send_eof`, `reset`, `credit`, `goaway`, `ping`,
`tick`), and writes out what `data_to_send` returns. The rules live here, and only here:

- stream life cycle: the dialling side opens streams with increasing ids; a stream ends when
  both sides sent EOF, or either sent RESET; frames naming a stream that never existed, or
  out of order, break the connection;
- flow control per stream (WINDOW_SIZE) and, on version 2, per connection
  (CONNECTION_WINDOW_SIZE): `sendable(sid)` says how much may be sent now, and sending more is
  refused, so our side never overshoots; a peer that does is a protocol error
  (`flow_control`). A version 1 peer may overshoot a stream window by one read (WINDOW_SLACK);
- the stream limit (`max_streams` open at once from the peer: one more is refused with RESET
  code 6, as the format cannot tell the peer our limit) and the frame size limits;
- GOAWAY: after ours, the peer's new streams are flagged (`StreamOpened.after_goaway`);
  after the peer's, `open_stream` is refused;
- liveness (version 2): `tick(now)` sends a PING once nothing was heard for `ping_after`
  seconds (and again each `ping_after` while still silent), and gives the connection up
  (`ConnectionFailed("unresponsive")`) after `dead_after` seconds of silence.

A protocol error is an event (`ConnectionFailed` with the reason it is counted under), after
which the tunnel takes nothing more: the I/O side closes the connection. A stream-level
breach (DATA after the sender's EOF) resets only that stream (`StreamBroken`).

The wire format itself is a *dialect* (`Dialect`: received bytes -> frames, frames -> bytes).
Two run under these rules: mux.py's format (`MuxDialect` here, versions 1 and 2) and HBONE
(`hbone.HboneDialect`: HTTP/2 CONNECT through h2, its frames mapped onto these kinds; the
peer's SETTINGS arrive as PEER_SETTINGS, its initial windows as the dialect's
`send_windows`). tests/test_tunnel_dialects.py runs the same scenarios under both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import mux
from .mux import MuxError, OpenInfo

PING_AFTER = 10.0  # seconds without a frame before we PING (ztunnel's interval)
DEAD_AFTER = 20.0  # seconds without a frame before the connection is given up
# A PING unanswered this long (a healthy peer answers in a round trip) makes the connection
# suspect: it takes no new streams, which get a fresh connection instead of waiting.
SUSPECT_AFTER = 1.0
STREAM_UPDATE_AT = mux.WINDOW_UPDATE_AT
MAX_STREAMS = 100


class TunnelError(RuntimeError):
    """A command the state machine does not allow now (a bug on our side, never the peer's)."""


# --- events --------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamOpened:
    """The peer opened stream `sid` for an app connection (accept or reset it)."""

    sid: int
    info: OpenInfo
    after_goaway: bool  # it came after our GOAWAY


@dataclass(slots=True)
class StreamAccepted:
    """The far side reached its app: the stream relays."""

    sid: int


@dataclass(slots=True)
class DataReceived:
    """DATA for the app; `credit` it once the app took it. A memoryview is a view of the
    bytes given to `receive_data`: valid as long as they are (hand the events on before
    reusing that buffer)."""

    sid: int
    data: memoryview | bytearray | bytes


@dataclass(slots=True)
class StreamEnded:
    """The peer's app half-closed: no more DATA on `sid` from it."""

    sid: int


@dataclass(slots=True)
class StreamReset:
    """The peer ended stream `sid` now with `code` (a mux.RESET_* code, or one the format
    does not define: `known` is False)."""

    sid: int
    code: int
    known: bool


@dataclass(slots=True)
class StreamBroken:
    """The peer broke a stream rule: we reset the stream (RESET_PROTOCOL). Counted."""

    sid: int
    reason: str
    message: str


@dataclass(slots=True)
class StreamRefused:
    """We refused stream `sid` the peer opened beyond our stream limit, with `code`
    (RESET_LIMIT, or RESET_GOING_AWAY after our GOAWAY). Count it as a refused connection."""

    sid: int
    info: OpenInfo
    code: int


@dataclass(slots=True)
class WindowOpened:
    """More may be sent on `sid` (0: on every stream, the connection window grew)."""

    sid: int


@dataclass(slots=True)
class GoawayReceived:
    """The peer wants no new streams on this connection; open ones finish."""


@dataclass(slots=True)
class PingAcked:
    payload: bytes


@dataclass(slots=True)
class ConnectionFailed:
    """The connection is broken (a protocol error, or the peer went silent): close it and
    count `reason`. Nothing more comes from this tunnel."""

    reason: str
    message: str


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamBroken
    | StreamRefused
    | WindowOpened
    | GoawayReceived
    | PingAcked
    | ConnectionFailed
)


_MAX_PAYLOAD = mux.MAX_PAYLOAD
_OPEN = mux.OPEN
_ACCEPT = mux.ACCEPT
_DATA = mux.DATA
_EOF = mux.EOF
_RESET = mux.RESET
_WINDOW = mux.WINDOW
_GOAWAY = mux.GOAWAY
_PING = mux.PING
_PING_ACK = mux.PING_ACK
# A dialect-only frame kind (no mtls-sidecar frame has it): the peer's settings changed, as an
# HTTP/2 SETTINGS frame says them. Payload: its initial stream window and its stream limit,
# 4 bytes each (see encode_peer_settings).
PEER_SETTINGS = 0x80
DataHandler = Callable[[int, "memoryview | bytearray"], None]


def _nowhere(event: Event) -> None:
    raise TunnelError("an event outside receive_data")


# --- dialects ------------------------------------------------------------------------------


class Parser(Protocol):
    def feed(self, data: memoryview) -> None: ...


def encode_peer_settings(initial_window: int, max_streams: int) -> bytes:
    return mux.encode_window(initial_window) + mux.encode_window(max_streams)


class Dialect(Protocol):
    """A wire format. Its parser hands a `mux.FrameSink` the frames it parses, as mux's
    frame kinds (DATA in pieces as they arrive; PEER_SETTINGS when the peer states its
    windows), and raises MuxError on bytes that break the format; `encode` makes one frame.

    `send_windows`: what the peer lets us send, per stream and on the connection, before it
    says otherwise (None: the windows both ends use, as in mux's format). A `buffered`
    dialect may also have bytes of its own to send (its preface, answers to the peer's
    control frames): the tunnel takes them with `pending()` after each batch received."""

    version: int
    buffered: bool

    @property
    def send_windows(self) -> tuple[int, int] | None: ...

    def pending(self) -> bytes: ...

    def parser(self, sink: mux.FrameSink) -> Parser: ...

    def encode(self, kind: int, sid: int, payload: bytes = b"") -> bytes: ...


class MuxDialect:
    """Ours: mux.py's frames, version 1 or 2."""

    __slots__ = ("version",)
    buffered = False
    send_windows = None

    def __init__(self, version: int) -> None:
        if version not in (1, 2):
            raise ValueError(f"no mtls-sidecar version {version}")
        self.version = version

    def pending(self) -> bytes:
        return b""

    def parser(self, sink: mux.FrameSink) -> Parser:
        return mux.Demuxer(sink, self.version)

    encode = staticmethod(mux.frame)  # one frame, as bytes


# --- liveness ------------------------------------------------------------------------------

NOTHING = 0
SEND_PING = 1
DEAD = 2


class Liveness:
    """When to PING and when to give up, from when a frame last arrived (pure)."""

    __slots__ = ("dead_after", "first_ping", "last_heard", "last_ping", "ping_after")

    def __init__(self, now: float, ping_after: float = PING_AFTER, dead_after: float = DEAD_AFTER):
        self.ping_after = ping_after
        self.dead_after = dead_after
        self.last_heard = now
        self.last_ping: float | None = None
        self.first_ping: float | None = None  # the first PING not answered yet

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.last_ping = self.first_ping = None

    def due(self, now: float) -> int:
        """NOTHING, SEND_PING (noted as sent now) or DEAD."""
        silent = now - self.last_heard
        if silent >= self.dead_after:
            return DEAD
        if silent >= self.ping_after and (
            self.last_ping is None or now - self.last_ping >= self.ping_after
        ):
            self.last_ping = now
            if self.first_ping is None:
                self.first_ping = now
            return SEND_PING
        return NOTHING

    def suspect(self, now: float) -> bool:
        """A PING went unanswered for SUSPECT_AFTER: no new streams should wait on this."""
        first = self.first_ping
        return first is not None and now - first >= SUSPECT_AFTER

    def silent_for(self, now: float) -> float:
        return now - self.last_heard


# --- the state machine ---------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "accepted",
        "eof_in",
        "eof_out",
        "held",
        "receivable",
        "sid",
        "uncredited",
        "window",
    )

    def __init__(self, sid: int, window: int, receivable: int) -> None:
        self.sid = sid
        self.window = window  # bytes we may still send before the peer credits more
        self.receivable = receivable  # bytes the peer may still send before we credit more
        self.held = 0  # received, not yet taken by our app (credit() takes them)
        self.uncredited = 0  # taken by our app, not yet credited back
        self.eof_in = False
        self.eof_out = False
        self.accepted = False


class Tunnel:
    """One end of a pooled connection; `client` is the dialling side (it opens streams)."""

    def __init__(
        self,
        *,
        client: bool,
        dialect: Dialect,
        now: float = 0.0,
        max_streams: int = MAX_STREAMS,
        ping_after: float = PING_AFTER,
        dead_after: float = DEAD_AFTER,
        stream_window: int = mux.WINDOW_SIZE,
        connection_window: int = mux.CONNECTION_WINDOW_SIZE,
    ) -> None:
        """The windows are the format's (both ends must agree); smaller ones are for tests."""
        self.client = client
        self.dialect = dialect
        self.version = dialect.version
        v2 = self.version >= 2
        self.max_streams = max_streams
        self.peer_max_streams = max_streams  # what the peer takes, if it says so
        self.streams: dict[int, _Stream] = {}
        self.next_sid = 1  # client: the next id to open; server: the lowest id a new OPEN may use
        # Version 2's connection windows; version 1 has none (None: unbounded).
        self.window: int | None = connection_window if v2 else None
        self._send_window = stream_window  # the send window of a new stream
        if dialect.send_windows is not None:
            self._send_window, self.window = dialect.send_windows
        self.receivable: int | None = connection_window if v2 else None
        self.uncredited = 0  # taken by our apps (or dropped), not yet credited on stream 0
        self._connection_update_at = connection_window // 4
        # A version 1 peer may overshoot a stream window by one read; a version 2 one never.
        self._stream_receivable = stream_window + (0 if v2 else mux.WINDOW_SLACK)
        self.room_left = 0  # see reserve()
        self._told_unknown = 0  # the ended stream whose DATA we last answered with RESET 7
        self.goaway_sent = False
        self.goaway_received = False
        self.failed: str | None = None
        self.liveness = Liveness(now, ping_after, dead_after) if v2 else None
        self._heard = False
        self._ping_count = 0
        # What to send (data_to_send hands it over); non-empty when there is something.
        self.out = bytearray()
        self._emit: Callable[[Event], None] = _nowhere
        self._data_to: DataHandler | None = None
        # DATA not yet handed on (see on_data): its stream and bytes.
        self._pend_sid = 0
        self._pend: memoryview | bytearray | None = None
        self._parser = dialect.parser(self)
        self._encode = dialect.encode
        self._buffered = dialect.buffered
        if self._buffered:
            self.out += dialect.pending()

    # --- received bytes ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse received bytes (any split of the stream); the events they cause."""
        events: list[Event] = []
        bound = self._emit, self._data_to
        self.bind(events.append)
        try:
            self.receive(data)
        finally:
            self._emit, self._data_to = bound
        return events

    def bind(self, emit: Callable[[Event], None], on_data: DataHandler | None = None) -> None:
        """Where `receive` hands what it finds: each event to `emit` as soon as it is known,
        so that what the caller does about one frame (say, refuse a stream, which frees its
        place) is done before the next frame is judged, as if the frames had come one by
        one. With `on_data`, DATA goes there as (sid, bytes) instead of as DataReceived
        events (the I/O side's fast path: no event object per piece)."""
        self._emit = emit
        self._data_to = on_data

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """`receive_data` for a tunnel that was bound (`bind`) to its handlers."""
        if self.failed is not None or not data:
            return
        self._heard = True
        try:
            self._parser.feed(data if type(data) is memoryview else memoryview(data))
        except MuxError as exc:
            self._fail(exc.reason, str(exc))
        self._flush_data()
        if self._buffered:
            self.out += self.dialect.pending()

    def _event(self, event: Event) -> None:
        if self._pend is not None:
            self._flush_data()
        self._emit(event)

    def _flush_data(self) -> None:
        pend = self._pend
        if pend is not None:
            self._pend = None
            to = self._data_to
            if to is not None:
                to(self._pend_sid, pend)
            else:
                self._emit(DataReceived(self._pend_sid, pend))

    def _fail(self, reason: str, message: str) -> None:
        self.failed = reason
        self._event(ConnectionFailed(reason, message))

    def on_frame(self, kind: int, sid: int, payload: bytes) -> None:
        """(mux.FrameSink) A whole frame other than DATA from the parser."""
        if self.failed is not None:
            return
        if sid == 0:
            self._connection_frame(kind, payload)
            return
        stream = self.streams.get(sid)
        if kind == _OPEN:
            self._open(sid, payload, stream)
            return
        if stream is None:
            if not self._existed(sid):
                raise MuxError(f"{mux.FRAME_NAMES[kind]} for stream {sid}, which was never opened")
            if kind == _RESET:
                mux.decode_reset(payload)
            elif kind == _WINDOW:
                mux.decode_window(payload)
            elif kind in (_PING, _PING_ACK, _GOAWAY):
                raise MuxError(f"{mux.FRAME_NAMES[kind]} on stream {sid}, not 0")
            return  # about a stream that ended here already
        if kind == _EOF:  # the commonest first
            if stream.eof_in:
                return
            stream.eof_in = True
            self._event(StreamEnded(sid))
            if stream.eof_out:
                self._remove(stream)
        elif kind == _ACCEPT:
            if not self.client:
                raise MuxError(f"ACCEPT for stream {sid} from the dialling side")
            if stream.accepted:
                raise MuxError(f"a second ACCEPT for stream {sid}")
            stream.accepted = True
            self._event(StreamAccepted(sid))
        elif kind == _WINDOW:
            n = mux.decode_window(payload)
            stream.window += n
            if stream.window > mux.MAX_WINDOW:
                raise mux.WindowExceeded(f"stream {sid} credited beyond 2^31-1 bytes")
            self._event(WindowOpened(sid))
        elif kind == _RESET:
            code = mux.decode_reset(payload)
            self._remove(stream)
            self._event(StreamReset(sid, code, code in mux.RESET_NAMES))
        else:
            raise MuxError(f"{mux.FRAME_NAMES[kind]} on stream {sid}, not 0")

    def _existed(self, sid: int) -> bool:
        return 0 < sid < self.next_sid

    def _connection_frame(self, kind: int, payload: bytes) -> None:
        if kind == _GOAWAY:
            if not self.goaway_received:
                self.goaway_received = True
                self._event(GoawayReceived())
        elif kind == _WINDOW and self.window is not None:
            self.window += mux.decode_window(payload)
            if self.window > mux.MAX_WINDOW:
                raise mux.WindowExceeded("connection credited beyond 2^31-1 bytes")
            self._event(WindowOpened(0))
        elif kind == _PING:
            self.out += self._encode(_PING_ACK, 0, mux.decode_ping(payload))
        elif kind == _PING_ACK:
            self._event(PingAcked(mux.decode_ping(payload)))
        elif kind == PEER_SETTINGS:
            self._peer_settings(payload)
        else:
            raise MuxError(f"{mux.FRAME_NAMES[kind]} for stream 0, which was never opened")

    def _peer_settings(self, payload: bytes) -> None:
        window = int.from_bytes(payload[:4], "big")
        self.peer_max_streams = min(self.max_streams, int.from_bytes(payload[4:8], "big"))
        delta = window - self._send_window
        if not delta:
            return
        # As HTTP/2 says (RFC 9113 6.9.2): every open stream's window moves by the change.
        self._send_window = window
        for stream in self.streams.values():
            stream.window += delta
            if stream.window > mux.MAX_WINDOW:
                raise mux.WindowExceeded(f"stream {stream.sid} credited beyond 2^31-1 bytes")
        if delta > 0:
            self._event(WindowOpened(0))

    def _open(self, sid: int, payload: bytes, stream: _Stream | None) -> None:
        if stream is not None:
            raise MuxError(f"OPEN for stream {sid}, which is open")
        if self.client:
            raise MuxError("the accepting side opened a stream")
        if sid < self.next_sid:
            raise MuxError(f"OPEN for stream {sid}, not above {self.next_sid - 1}")
        info = mux.decode_open(payload)
        self.next_sid = sid + 1
        if len(self.streams) >= self.max_streams:
            # Refused, the connection kept: the format has no way to tell the peer our limit,
            # so a peer configured with a higher one is not misbehaving. What it costs us is
            # bounded all the same (no state is kept for the stream).
            # After our GOAWAY the peer should open no more here at all: say that instead.
            code = mux.RESET_GOING_AWAY if self.goaway_sent else mux.RESET_LIMIT
            self.out += self._encode(_RESET, sid, bytes([code]))
            self._event(StreamRefused(sid, info, code))
            return
        self.streams[sid] = _Stream(sid, self._send_window, self._stream_receivable)
        self._event(StreamOpened(sid, info, self.goaway_sent))

    def on_data(self, sid: int, data: memoryview) -> None:
        """(mux.FrameSink) A piece of a DATA frame from the parser."""
        if self.failed is not None:
            return
        n = len(data)
        if self.receivable is not None:
            self.receivable -= n
            if self.receivable < 0:
                raise mux.WindowExceeded(
                    f"{-self.receivable} byte(s) beyond the connection's flow-control window"
                )
        stream = self.streams.get(sid)
        if stream is None:
            if not self._existed(sid):
                raise MuxError(f"DATA for stream {sid}, which was never opened")
            # A stream that ended here: its data is dropped (and credited on stream 0), and
            # the sender told, as TCP answers data for a closed socket with a reset: once (a
            # frame comes in pieces, and more may be on the way before the RESET arrives).
            self._credit_connection(n)
            if self._told_unknown != sid:
                self._told_unknown = sid
                self.out += self._encode(_RESET, sid, bytes([mux.RESET_UNKNOWN_STREAM]))
            return
        stream.receivable -= n
        if stream.receivable < 0:
            raise mux.WindowExceeded(
                f"stream {sid} sent {-stream.receivable} byte(s) beyond its flow-control window"
            )
        if stream.eof_in:
            self._credit_connection(n)
            self._event(StreamBroken(sid, "data_after_eof", "DATA after its EOF"))
            self._send_reset(stream, mux.RESET_PROTOCOL)
            return
        stream.held += n
        # A batch often holds the end of one DATA frame and the start of the next of the
        # same stream: one event (one write to the app) instead of two. So DATA is handed on
        # once something else comes, or at the end of the batch.
        pend = self._pend
        if pend is not None:
            if self._pend_sid == sid:
                if type(pend) is not bytearray:
                    pend = self._pend = bytearray(pend)
                pend += data
                return
            self._flush_data()
        self._pend_sid = sid
        self._pend = data

    # --- commands ------------------------------------------------------------------------

    def _stream(self, sid: int) -> _Stream:
        stream = self.streams.get(sid)
        if stream is None:
            raise TunnelError(f"stream {sid} is not open")
        return stream

    def _check_open(self) -> None:
        if self.failed is not None:
            raise TunnelError(f"the connection failed ({self.failed})")

    def can_open(self) -> bool:
        return (
            self.client
            and self.failed is None
            and not self.goaway_received
            and len(self.streams) < self.peer_max_streams
            and self.next_sid <= mux.MAX_STREAM_ID
        )

    def open_stream(self, info: OpenInfo) -> int:
        """Dialling side: open a stream for an app connection; its id."""
        self._check_open()
        if not self.client:
            raise TunnelError("only the dialling side opens streams")
        if not self.can_open():
            raise TunnelError("no new stream on this connection (limit, ids, or GOAWAY)")
        sid = self.next_sid
        self.next_sid += 1
        self.streams[sid] = _Stream(sid, self._send_window, self._stream_receivable)
        self.out += self._encode(_OPEN, sid, mux.encode_open(info))
        return sid

    def accept(self, sid: int) -> None:
        """Accepting side: the app is reached, the stream relays."""
        self._check_open()
        stream = self._stream(sid)
        if self.client or stream.accepted:
            raise TunnelError(f"stream {sid} cannot be accepted")
        stream.accepted = True
        self.out += self._encode(_ACCEPT, sid)

    def sendable(self, sid: int) -> int:
        """How many bytes of DATA may be sent on `sid` now (0 when none, or it is gone)."""
        stream = self.streams.get(sid)
        if stream is None or stream.eof_out or self.failed is not None:
            return 0
        n = stream.window
        w = self.window
        if w is not None and w < n:
            n = w
        if n > _MAX_PAYLOAD:
            return _MAX_PAYLOAD
        return n if n > 0 else 0

    def sent(self, sid: int, n: int) -> None:
        """`n` bytes of DATA on `sid` go out in a frame the caller writes itself (the
        zero-copy path); they must fit in `sendable(sid)`."""
        stream = self.streams.get(sid)
        w = self.window
        if (
            stream is None
            or stream.eof_out
            or n > stream.window
            or (w is not None and n > w)
            or n > _MAX_PAYLOAD
            or self.failed is not None
        ):
            raise TunnelError(f"{n} bytes on stream {sid} exceed its window")
        stream.window -= n
        if w is not None:
            self.window = w - n

    def reserve(self, sid: int, n: int) -> int:
        """Up to `n` bytes of DATA on `sid` within the windows: how many (accounted as sent;
        the caller writes the frame itself). 0 when the window is used up or the stream
        gone. `room_left` is then what may still be sent on `sid` after them."""
        stream = self.streams.get(sid)
        if stream is None or stream.eof_out or self.failed is not None:
            self.room_left = 0
            return 0
        m = stream.window
        w = self.window
        if w is not None and w < m:
            m = w
        if n < m:
            m = n
        if m <= 0:
            self.room_left = 0
            return 0
        if m > _MAX_PAYLOAD:
            m = _MAX_PAYLOAD
        left = stream.window = stream.window - m
        if w is not None:
            w = self.window = w - m
            if w < left:
                left = w
        self.room_left = left
        return m

    def send_data(self, sid: int, data: bytes | bytearray | memoryview) -> None:
        self.sent(sid, len(data))
        if data:
            self.out += self._encode(_DATA, sid, bytes(data))

    def send_eof(self, sid: int) -> None:
        """Our app half-closed `sid` (a no-op for a stream already gone)."""
        stream = self.streams.get(sid)
        if stream is None or stream.eof_out or self.failed is not None:
            return
        stream.eof_out = True
        self.out += self._encode(_EOF, sid)
        if stream.eof_in:
            self._remove(stream)

    def reset(self, sid: int, code: int = mux.RESET_CANCEL) -> None:
        """End stream `sid` now (a no-op for a stream already gone)."""
        stream = self.streams.get(sid)
        if stream is not None and self.failed is None:
            self._send_reset(stream, code)

    def _send_reset(self, stream: _Stream, code: int) -> None:
        self._remove(stream)
        self.out += self._encode(_RESET, stream.sid, bytes([code]))

    def _remove(self, stream: _Stream) -> None:
        del self.streams[stream.sid]
        # What it still held at our side is dropped: the connection window gets it back.
        if stream.held:
            self._credit_connection(stream.held)
            stream.held = 0

    def credit(self, sid: int, n: int, minimum: int = 1) -> bool:
        """Our app took `n` more bytes of `sid`: once at least `minimum` are uncredited, give
        the peer that much window back (True if a WINDOW frame was queued)."""
        stream = self.streams.get(sid)
        if stream is None or self.failed is not None:
            return False
        if n > stream.held:
            raise TunnelError(f"stream {sid}: {n} bytes taken, {stream.held} held")
        stream.held -= n
        stream.uncredited += n
        self._credit_connection(n)
        give = stream.uncredited
        if give < minimum or give <= 0:
            return False
        stream.uncredited = 0
        stream.receivable += give
        self.out += self._encode(_WINDOW, sid, mux.encode_window(give))
        return True

    def _credit_connection(self, n: int) -> None:
        if self.receivable is None or n <= 0:
            return
        self.uncredited += n
        if self.uncredited >= self._connection_update_at:
            give, self.uncredited = self.uncredited, 0
            self.receivable += give
            self.out += self._encode(_WINDOW, 0, mux.encode_window(give))

    def goaway(self) -> None:
        """No new streams from the peer; open ones finish."""
        if self.goaway_sent or self.failed is not None:
            return
        self.goaway_sent = True
        self.out += self._encode(_GOAWAY, 0)

    def ping(self) -> bytes:
        """Version 2: send a PING; its payload (the PING_ACK echoes it)."""
        self._check_open()
        if self.version < 2:
            raise TunnelError("PING needs mtls-sidecar/2")
        self._ping_count += 1
        payload = self._ping_count.to_bytes(mux.PING_SIZE, "big")
        self.out += self._encode(_PING, 0, payload)
        return payload

    def tick(self, now: float) -> list[Event]:
        """Timers: note when the peer was last heard, PING a silent peer, give up on a dead
        one (`ConnectionFailed("unresponsive")`)."""
        live = self.liveness
        if live is None or self.failed is not None:
            return []
        if self._heard:
            self._heard = False
            live.heard(now)
        due = live.due(now)
        if due == SEND_PING:
            self.ping()
        elif due == DEAD:
            self.failed = "unresponsive"
            silent = live.silent_for(now)
            return [ConnectionFailed("unresponsive", f"nothing heard for {silent:.1f}s")]
        return []

    def suspect(self, now: float) -> bool:
        """Version 2: a PING has gone unanswered (as of the last `tick`) for SUSPECT_AFTER."""
        live = self.liveness
        return live is not None and not self._heard and live.suspect(now)

    def data_to_send(self) -> bytes | bytearray:
        """The bytes to send, handed over (the caller may keep and change them)."""
        out = self.out
        if not out:
            return b""
        self.out = bytearray()
        return out
