"""HBONE (Istio ambient's tunnel) without I/O: HTTP/2 CONNECT streams over one connection.

Two pure objects, both wrapping `h2.H2Connection` (HTTP/2 framing, HPACK, stream states and
its own window bookkeeping stay h2's); what HBONE asks on top: ztunnel's settings (4 MiB
stream and 16 MiB connection windows, at most 100 streams, 1 MiB frames), `:authority` =
the destination `ip:port`, `forwarded: for="ip:port"`, the status codes of a refusal.

- `HboneDialect`: HBONE as a dialect of the tunnel core (tunnel.Tunnel), which then owns the
  stream life cycle, the windows' accounting, the stream limit, GOAWAY and liveness exactly
  as for our own format; tested in memory beside it (tests/test_tunnel_dialects.py).
  hbone_io's carrier runs on it.
- `HboneConnection`: a plain HBONE end on h2 without the core, which the tests and the bench
  use as an independent peer (a ztunnel-like client or server): bytes received go in
  (`receive`), events come out; commands (`open`, `respond`, `send`, `end`, `reset`, `ping`,
  `goaway`) go in, bytes to send come out (`data_to_send`). A peer that breaks a
  connection-level rule gets the connection closed (GOAWAY) and a `Broken` event.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.stream import StreamState
from hyperframe.frame import DataFrame, GoAwayFrame

from . import mux, tunnel

_HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
_CLOSED = ConnectionState.CLOSED

ALPN = b"h2"
PORT = 15008
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_STREAMS = 100
MAX_FRAME = 1024 * 1024
PING_INTERVAL = tunnel.PING_AFTER  # ztunnel's: 10 s, as our own carriers by default
PING_TIMEOUT = tunnel.DEAD_AFTER  # 20 s
_DEFAULT_WINDOW = 65_535
# Headers we read are small; a peer sending more is refused by h2 (a connection error).
MAX_HEADER_LIST = 64 * 1024

# Refusals (before 200), as ztunnel answers them.
STATUS_OK = 200
STATUS_BAD_AUTHORITY = 400
STATUS_NOT_ALLOWED = 401
STATUS_UNAVAILABLE = 503


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """Server side: a CONNECT arrived. `authority` is None when it is not `ip:port`
    (`problem` says why: answer 400)."""

    sid: int
    authority: tuple[str, int] | None
    forwarded: tuple[str, int] | None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    """Client side: the answer to our CONNECT (200: the stream relays; else refused)."""

    sid: int
    status: int


@dataclass(frozen=True, slots=True)
class Data:
    """Stream bytes. Hand `flow` back with `consumed(sid, flow)` once they are passed on."""

    sid: int
    data: bytes
    flow: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): EOF."""

    sid: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream (RST_STREAM with `code`)."""

    sid: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer gave more send window: for stream `sid`, or for all (sid 0)."""

    sid: int


@dataclass(frozen=True, slots=True)
class PingAcked:
    """Our PING was answered: the peer is alive."""


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer takes no new streams; open ones up to `last_sid` finish."""

    last_sid: int
    code: int


@dataclass(frozen=True, slots=True)
class Broken:
    """The peer broke a connection-level rule: close the connection (GOAWAY is queued)."""

    reason: str  # flow_control | stream_limit | frame_size | protocol_error
    message: str


Event = (
    StreamOpened | Response | Data | StreamEnded | StreamReset | WindowOpened | PingAcked | GoAway
) | Broken


def parse_authority(value: str) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` -> (ip, port); ValueError says what is wrong. Only IP
    literals: HBONE names the destination pod's address, never a host name."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not [IPv6]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} has no port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    if value.startswith("[") != (ip.version == 6):
        raise ValueError(f"{value!r}: IPv6 addresses go in brackets, IPv4 ones not")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: port {port!r} is not 1-65535")
    return str(ip), int(port)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_forwarded(value: str) -> tuple[str, int] | None:
    """The caller in a `forwarded` header (RFC 7239) if it names an `ip:port`: the first
    element's `for=` parameter. Anything else (obfuscated names, no port) is None."""
    first = value.split(",", 1)[0]
    for part in first.split(";"):
        name, _, val = part.strip().partition("=")
        if name.strip().lower() != "for":
            continue
        val = val.strip().strip('"')
        try:
            return parse_authority(val)
        except ValueError:
            return None
    return None


def format_forwarded(host: str, port: int) -> str:
    return f'for="{format_authority(host, port)}"'


class _DataFrame(DataFrame):
    """A received DATA frame whose repr does not hex-dump its payload. h2 (4.4) formats
    every frame it receives for its trace log, whether anything logs or not, and
    hyperframe's repr hexlifies the whole body: 60% of the CPU of receiving bulk data."""

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


class _H2(h2.connection.H2Connection):
    """h2's connection, with a graceful GOAWAY received as RFC 9113 (6.8) says: no new
    streams, while the open ones finish. h2 itself closes the whole connection on any
    GOAWAY (and drops what waits to be sent), which would cut every open stream of a
    carrier the peer only retired (a certificate rotation, a drain). And DATA frames with
    a cheap repr (see _DataFrame)."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._frame_dispatch_table[_DataFrame] = self._receive_data_frame

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        if frame.__class__ is DataFrame:
            frame.__class__ = _DataFrame  # same layout; only the repr differs
        return super()._receive_frame(frame)

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[h2.events.Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _new_h2(
    client: bool,
    max_streams: int = MAX_STREAMS,
    stream_window: int = STREAM_WINDOW,
    connection_window: int = CONNECTION_WINDOW,
) -> _H2:
    """An h2 connection with HBONE's settings, its preface (and connection window) queued."""
    config = h2.config.H2Configuration(
        client_side=client, header_encoding=None, validate_inbound_headers=True
    )
    conn = _H2(config=config)
    conn.local_settings = h2.settings.Settings(
        client=client,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # Values given this way are in force at once (h2 sends them in the preface), but the
    # connection copied the defaults of these two before we replaced the settings.
    conn.max_inbound_frame_size = MAX_FRAME
    conn.decoder.max_header_list_size = MAX_HEADER_LIST
    conn.initiate_connection()
    if connection_window > _DEFAULT_WINDOW:
        conn.increment_flow_control_window(connection_window - _DEFAULT_WINDOW)
    return conn


def _breach(exc: h2.exceptions.ProtocolError) -> Broken:
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return Broken("stream_limit", f"more than {MAX_STREAMS} streams at once: {exc}")
    code = getattr(exc, "error_code", None)
    if isinstance(exc, h2.exceptions.FlowControlError) or code == ErrorCodes.FLOW_CONTROL_ERROR:
        return Broken("flow_control", f"flow-control window exceeded: {exc}")
    if code == ErrorCodes.FRAME_SIZE_ERROR or isinstance(
        exc.__cause__, h2.exceptions.FrameTooLargeError
    ):
        return Broken("frame_size", f"frame too large: {exc}")
    return Broken("protocol_error", f"HTTP/2 protocol error: {exc}")


def _connect_request(
    ev: h2.events.RequestReceived,
) -> tuple[tuple[str, int] | None, tuple[str, int] | None, str]:
    """A request's (authority, forwarded, problem): authority None (and a problem, to be
    answered 400) unless it is a classic CONNECT to an `ip:port`."""
    headers = {name: value for name, value in ev.headers or ()}
    method = headers.get(b":method", b"")
    forwarded = parse_forwarded(headers.get(b"forwarded", b"").decode("latin-1"))
    if method != b"CONNECT" or b":path" in headers or b":protocol" in headers:
        what = method.decode("latin-1", "replace")
        return None, forwarded, f"not a classic CONNECT ({what})"
    try:
        authority = parse_authority(headers.get(b":authority", b"").decode("latin-1"))
    except ValueError as exc:
        return None, forwarded, f"bad :authority: {exc}"
    return authority, forwarded, ""


class HboneConnection:
    """One HBONE connection, either side, as a pure object: bytes and commands in, events
    and bytes out."""

    def __init__(self, *, client: bool) -> None:
        self.client = client
        self._h2 = _new_h2(client)
        self.broken: Broken | None = None
        self.goaway_sent = False
        self._extra = b""  # frames written here, after h2's own

    # --- bytes in, events out ---------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; the events they make, in order."""
        if self.broken is not None:
            return []
        try:
            raw = self._h2.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as exc:
            self.broken = _breach(exc)
            return [self.broken]
        out: list[Event] = []
        for ev in raw:
            self._translate(ev, out)
        return out

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            out.append(self._request(ev))
        elif isinstance(ev, h2.events.ResponseReceived):
            status = 0
            for name, value in ev.headers or ():
                if name == b":status":
                    status = int(value) if value.isdigit() else 0
            out.append(Response(ev.stream_id or 0, status))
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            if ev.data:
                out.append(Data(sid, ev.data, ev.flow_controlled_length or 0))
            elif ev.flow_controlled_length:
                # Padding only: nothing to pass on, the window goes back at once.
                self._h2.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            out.append(StreamEnded(ev.stream_id or 0))
        elif isinstance(ev, h2.events.StreamReset):
            if ev.remote_reset:
                out.append(StreamReset(ev.stream_id or 0, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A new initial window (or frame size) changes every stream's send room.
            out.append(WindowOpened(0))
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked())
        elif isinstance(ev, h2.events.ConnectionTerminated):
            out.append(GoAway(ev.last_stream_id or 0, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.TrailersReceived | h2.events.InformationalResponseReceived):
            pass  # nothing in HBONE uses them
        # Anything else (SETTINGS acks, PINGs, priority) is h2's own business.

    def _request(self, ev: h2.events.RequestReceived) -> StreamOpened:
        return StreamOpened(ev.stream_id or 0, *_connect_request(ev))

    # --- commands in, bytes out -------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer now (and forget)."""
        out = self._h2.data_to_send()
        if self._extra:
            out, self._extra = out + self._extra, b""
        return out

    def open(self, authority: tuple[str, int], forwarded: tuple[str, int] | None) -> int:
        """Client side: a CONNECT for `authority`; its stream id."""
        sid = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", b"CONNECT"),
            (b":authority", format_authority(*authority).encode()),
        ]
        if forwarded is not None:
            headers.append((b"forwarded", format_forwarded(*forwarded).encode()))
        self._h2.send_headers(sid, headers)
        return sid

    def respond(self, sid: int, status: int) -> None:
        """Server side: 200 (the stream relays from now on) or a refusal (ends it)."""
        if not self._open(sid):
            return
        self._h2.send_headers(sid, [(b":status", str(status).encode())], end_stream=status != 200)

    def room(self, sid: int) -> int:
        """How many bytes `send` may take for this stream now."""
        stream = self._h2.streams.get(sid)
        if stream is None or stream.closed or stream.state_machine.state is _HALF_CLOSED_LOCAL:
            return 0
        try:
            return max(0, self._h2.local_flow_control_window(sid))
        except h2.exceptions.StreamClosedError:
            return 0

    def send(self, sid: int, data: bytes | bytearray | memoryview) -> int:
        """Send as much of `data` as the windows allow; how much that was."""
        n = min(len(data), self.room(sid))
        if n <= 0:
            return 0
        step = self._h2.max_outbound_frame_size
        view = memoryview(data)
        for i in range(0, n, step):
            self._h2.send_data(sid, bytes(view[i : min(n, i + step)]))
        return n

    def end(self, sid: int) -> None:
        """Our side of the stream is done (END_STREAM: the app's EOF)."""
        if self._open(sid):
            stream = self._h2.streams.get(sid)
            if stream is not None and stream.state_machine.state is not _HALF_CLOSED_LOCAL:
                self._h2.end_stream(sid)

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        if self._open(sid):
            self._h2.reset_stream(sid, code)

    def consumed(self, sid: int, n: int) -> None:
        """`n` flow-controlled bytes of `sid` were passed on: the peer may send them again."""
        if n > 0:
            # h2 gives back the connection window even when the stream has ended.
            self._h2.acknowledge_received_data(n, sid)

    def ping(self) -> None:
        """Ask the peer for a sign of life (PingAcked answers it)."""
        if self.broken is None and not self.goaway_sent:
            self._h2.ping(os.urandom(8))

    def goaway(self, *, final: bool = False) -> None:
        """No new streams. Graceful (default): a GOAWAY naming the last stream the peer
        opened, while the open ones go on (h2 would close the whole connection, so the
        frame is written here); `final`: the connection ends now."""
        if final:
            if self._h2.state_machine.state is not _CLOSED:
                self._h2.close_connection(ErrorCodes.NO_ERROR)
            return
        if self.goaway_sent:
            return
        self.goaway_sent = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self._extra += frame.serialize()

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_inbound_streams + self._h2.open_outbound_streams)

    def _open(self, sid: int) -> bool:
        stream = self._h2.streams.get(sid)
        return stream is not None and not stream.closed


# --- HBONE as a dialect of the tunnel core -----------------------------------------------

# Why a stream ended, both ways between HTTP/2's RST_STREAM codes and the core's RESET codes.
_RESET_FROM_H2: dict[int, int] = {
    ErrorCodes.NO_ERROR: mux.RESET_CANCEL,
    ErrorCodes.CANCEL: mux.RESET_CANCEL,
    ErrorCodes.REFUSED_STREAM: mux.RESET_LIMIT,
    ErrorCodes.PROTOCOL_ERROR: mux.RESET_PROTOCOL,
    ErrorCodes.STREAM_CLOSED: mux.RESET_UNKNOWN_STREAM,
    ErrorCodes.CONNECT_ERROR: mux.RESET_UPSTREAM,
}
_RESET_TO_H2: dict[int, int] = {
    mux.RESET_CANCEL: ErrorCodes.CANCEL,
    mux.RESET_LIMIT: ErrorCodes.REFUSED_STREAM,
    mux.RESET_GOING_AWAY: ErrorCodes.REFUSED_STREAM,
    mux.RESET_PROTOCOL: ErrorCodes.PROTOCOL_ERROR,
    mux.RESET_UNKNOWN_STREAM: ErrorCodes.STREAM_CLOSED,
    mux.RESET_UPSTREAM: ErrorCodes.CONNECT_ERROR,
}
# A refusal before the answer is a status, as ztunnel answers it.
_STATUS_OF_RESET = {
    mux.RESET_NOT_ALLOWED: STATUS_NOT_ALLOWED,
    mux.RESET_REVOKED: STATUS_NOT_ALLOWED,
    mux.RESET_EXPIRED: STATUS_NOT_ALLOWED,
    mux.RESET_BAD_DESTINATION: STATUS_BAD_AUTHORITY,
    mux.RESET_UPSTREAM: STATUS_UNAVAILABLE,
    mux.RESET_LIMIT: STATUS_UNAVAILABLE,
    mux.RESET_GOING_AWAY: STATUS_UNAVAILABLE,
    mux.RESET_CANCEL: STATUS_UNAVAILABLE,
}
_RESET_OF_STATUS = {
    STATUS_NOT_ALLOWED: mux.RESET_NOT_ALLOWED,
    403: mux.RESET_NOT_ALLOWED,
    STATUS_BAD_AUTHORITY: mux.RESET_BAD_DESTINATION,
    STATUS_UNAVAILABLE: mux.RESET_UPSTREAM,
}
# A CONNECT whose authority is not `ip:port` reaches the core with this destination; the
# dialect's `problems` says what was wrong (reset it with RESET_BAD_DESTINATION: a 400).
NO_AUTHORITY = ("", 0)


class HboneDialect:
    """HBONE under the tunnel core (tunnel.Tunnel): h2 does the HTTP/2 (framing, HPACK, its
    own flow-control bookkeeping, which the core's agrees with); this maps h2's events onto
    the core's frame kinds and the core's frames onto h2's commands.

    The core numbers streams 1, 2, 3...; HTTP/2 numbers the client's streams 1, 3, 5...
    CONNECT is OPEN (`:authority` the destination, `forwarded` the source), 200 is ACCEPT, a
    refusal status is RESET (and RESET before the answer a status), END_STREAM is EOF. The
    core decides every window: its WINDOW frames become WINDOW_UPDATEs through h2's
    `increment_flow_control_window` (never h2's automatic `acknowledge_received_data`), so
    h2's receive windows are the core's. Our windows and stream limit are told to the peer
    in the SETTINGS h2 sends; the peer's reach the core as PEER_SETTINGS and WINDOW frames.
    The accepting side sends nothing on a stream before it answers (`accept`, or a reset:
    a refusal status), as the I/O side never does: TunnelError.
    h2 answers PINGs itself; a breach h2 finds fails the connection with `_breach`'s reason.
    """

    version = 2  # PING and a connection window
    buffered = True
    send_windows = (_DEFAULT_WINDOW, _DEFAULT_WINDOW)  # HTTP/2's, until the peer says more

    def __init__(
        self,
        *,
        client: bool,
        max_streams: int = MAX_STREAMS,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self.client = client
        self._h2 = _new_h2(client, max_streams, stream_window, connection_window)
        self._sink: Any = None
        self._unanswered: set[int] = set()  # server: CONNECTs not yet answered (h2 ids)
        self.problems: dict[int, str] = {}  # server: core sid -> why its CONNECT is bad

    def pending(self) -> bytes:
        return self._h2.data_to_send()

    def close_connection(self) -> bytes:
        """The last bytes of the connection: a GOAWAY that ends it now (naming the last
        stream the peer opened)."""
        if self._h2.state_machine.state is _CLOSED:
            return b""
        self._h2.close_connection(ErrorCodes.NO_ERROR)
        return self._h2.data_to_send()

    def parser(self, sink: mux.FrameSink) -> HboneDialect:
        self._sink = sink
        return self

    def feed(self, data: memoryview) -> None:
        conn = self._h2
        window = conn._inbound_flow_control_window_manager
        before = window.current_window_size
        try:
            events = conn.receive_data(bytes(data))
        except h2.exceptions.ProtocolError as exc:
            broken = _breach(exc)
            err = mux.MuxError(broken.message)
            err.reason = broken.reason
            raise err from None
        # DATA for a stream h2 had closed (we reset it) never reaches the core, which does
        # not count it either: h2's connection window gets it back at once, so that both
        # windows stay the same.
        unseen = before - window.current_window_size
        for ev in events:
            if type(ev) is h2.events.DataReceived:
                unseen -= ev.flow_controlled_length or 0
        if unseen > 0:
            conn.increment_flow_control_window(unseen)
        sink = self._sink
        for ev in events:
            if type(ev) is h2.events.DataReceived:
                self._data(sink, ev)
            elif type(ev) is h2.events.StreamEnded:
                sink.on_frame(mux.EOF, _core_sid(ev.stream_id), b"")
            elif type(ev) is h2.events.WindowUpdated:
                sid = ev.stream_id or 0
                sink.on_frame(mux.WINDOW, _core_sid(sid) if sid else 0, mux.encode_window(ev.delta))
            elif type(ev) is h2.events.RequestReceived:
                self._request(sink, ev)
            elif type(ev) is h2.events.ResponseReceived:
                self._response(sink, ev)
            elif type(ev) is h2.events.StreamReset:
                h2sid = ev.stream_id or 0
                self._unanswered.discard(h2sid)
                code = _RESET_FROM_H2.get(ev.error_code, mux.RESET_CANCEL)
                if not ev.remote_reset:
                    code = mux.RESET_PROTOCOL  # h2 reset it: the peer broke a stream rule
                sink.on_frame(mux.RESET, _core_sid(h2sid), bytes([code]))
            elif type(ev) is h2.events.RemoteSettingsChanged:
                settings = self._h2.remote_settings
                payload = tunnel.encode_peer_settings(
                    settings.initial_window_size, settings.max_concurrent_streams
                )
                sink.on_frame(tunnel.PEER_SETTINGS, 0, payload)
            elif type(ev) is h2.events.PingAckReceived:
                sink.on_frame(mux.PING_ACK, 0, ev.ping_data or b"")
            elif type(ev) is h2.events.ConnectionTerminated:
                if ev.error_code != ErrorCodes.NO_ERROR:
                    err = mux.MuxError(f"peer sent GOAWAY (error {ev.error_code})")
                    err.reason = "goaway"
                    raise err
                sink.on_frame(mux.GOAWAY, 0, b"")
            # Anything else (SETTINGS acks, PINGs h2 answered, trailers, priority) is h2's.

    def _data(self, sink: mux.FrameSink, ev: h2.events.DataReceived) -> None:
        h2sid = ev.stream_id or 0
        data = ev.data or b""
        padding = (ev.flow_controlled_length or 0) - len(data)
        if padding > 0:  # the core counts data only: padding goes back at once
            self._h2.increment_flow_control_window(padding)
            self._h2.increment_flow_control_window(padding, h2sid)
        if data:
            sink.on_data(_core_sid(h2sid), memoryview(data))

    def _request(self, sink: mux.FrameSink, ev: h2.events.RequestReceived) -> None:
        h2sid = ev.stream_id or 0
        sid = _core_sid(h2sid)
        authority, forwarded, problem = _connect_request(ev)
        if authority is None:
            authority = NO_AUTHORITY
            self.problems[sid] = problem
        self._unanswered.add(h2sid)
        info = mux.OpenInfo(authority, forwarded or NO_AUTHORITY)
        sink.on_frame(mux.OPEN, sid, mux.encode_open(info))

    def _response(self, sink: mux.FrameSink, ev: h2.events.ResponseReceived) -> None:
        h2sid = ev.stream_id or 0
        status = 0
        for name, value in ev.headers or ():
            if name == b":status":
                status = int(value) if value.isdigit() else 0
        if status == STATUS_OK:
            sink.on_frame(mux.ACCEPT, _core_sid(h2sid), b"")
            return
        code = _RESET_OF_STATUS.get(status, mux.RESET_UPSTREAM)
        sink.on_frame(mux.RESET, _core_sid(h2sid), bytes([code]))
        self._reset(h2sid, ErrorCodes.CANCEL)  # refused: our half ends too

    def _reset(self, h2sid: int, code: int) -> None:
        stream = self._h2.streams.get(h2sid)
        if stream is not None and not stream.closed:
            self._h2.reset_stream(h2sid, code)

    def encode(self, kind: int, sid: int, payload: bytes = b"") -> bytes:
        h2sid = 2 * sid - 1
        conn = self._h2
        if kind in _AFTER_ANSWER and h2sid in self._unanswered:
            # HTTP/2 has no way to say it: the stream's bytes follow its response.
            raise tunnel.TunnelError(f"stream {sid}: DATA or EOF before the answer (accept)")
        if kind == mux.DATA:
            step = conn.max_outbound_frame_size
            if len(payload) <= step:
                conn.send_data(h2sid, payload)
            else:
                view = memoryview(payload)
                for i in range(0, len(payload), step):
                    conn.send_data(h2sid, bytes(view[i : i + step]))
        elif kind == mux.WINDOW:
            n = mux.decode_window(payload)
            if sid == 0:
                conn.increment_flow_control_window(n)
            else:
                stream = conn.streams.get(h2sid)
                if stream is not None and stream.open:
                    conn.increment_flow_control_window(n, h2sid)
        elif kind == mux.EOF:
            stream = conn.streams.get(h2sid)
            if stream is not None and stream.state_machine.state in _SENDING:
                conn.end_stream(h2sid)
        elif kind == mux.OPEN:
            info = mux.decode_open(payload)
            headers = [
                (b":method", b"CONNECT"),
                (b":authority", format_authority(*info.dst).encode()),
            ]
            if info.src != NO_AUTHORITY:
                headers.append((b"forwarded", format_forwarded(*info.src).encode()))
            conn.send_headers(h2sid, headers)
        elif kind == mux.ACCEPT:
            self._unanswered.discard(h2sid)
            conn.send_headers(h2sid, [(b":status", b"200")])
        elif kind == mux.RESET:
            code = payload[0]
            self.problems.pop(sid, None)
            if h2sid in self._unanswered:
                self._unanswered.discard(h2sid)
                status = str(_STATUS_OF_RESET.get(code, STATUS_UNAVAILABLE)).encode()
                conn.send_headers(h2sid, [(b":status", status)], end_stream=True)
            else:
                self._reset(h2sid, _RESET_TO_H2.get(code, ErrorCodes.CANCEL))
        elif kind == mux.PING:
            conn.ping(payload)
        elif kind == mux.GOAWAY:
            # Graceful (RFC 9113 6.8): the open streams finish (h2's own would close all).
            frame = GoAwayFrame(0)
            frame.last_stream_id = conn.highest_inbound_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            return conn.data_to_send() + frame.serialize()
        # PING_ACK: h2 answered the PING already.
        return conn.data_to_send()


_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_AFTER_ANSWER = (mux.DATA, mux.EOF)


def _core_sid(h2sid: int | None) -> int:
    return ((h2sid or 0) + 1) // 2
