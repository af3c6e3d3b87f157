"""HBONE's I/O edge: an accepted TLS connection speaking HBONE, and its streams as legs.

The protocol is the tunnel core (tunnel.Tunnel, pure: stream life cycle, windows, the stream
limit, GOAWAY, PING liveness), in its HBONE dialect (hbone.HboneDialect, on h2), exactly as
pool.Carrier runs our own format on it; this module only moves bytes between it, the TLS leg
(relay.NetLeg) and each stream's connection (conn.Conn), and shares with pool.py the wait for
a stream's answer (pool.AnswerLeg). An `HboneStream` is the
network leg of one application connection: to its `Conn` it looks like a pooled stream of
our own protocol (its handshake was the carrier's), so every stream is judged, counted and
logged exactly as any inbound connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from . import hbone, metrics, mux, tunnel
from .identity import SpiffeId
from .pool import (
    GOAWAY_GRACE,
    GOAWAY_OPEN_GRACE,
    AnswerLeg,
    CarrierBase,
    Pool,
    StreamOwner,
    Unresponsive,
    _remember_chain,
    _set_liveness,
)
from .relay import _BUF, Buf, NetLeg
from .revocation import PeerCert
from .tls import TlsError
from .tls_ffi import ffi

log = logging.getLogger("mtls.hbone")


class HboneHost(Protocol):
    """What an HBONE carrier needs from the worker."""

    loop: asyncio.AbstractEventLoop

    def hbone_stream(self, carrier: HboneCarrier, opened: hbone.StreamOpened) -> None:
        """The peer opened a CONNECT stream; make its connection."""

    def carrier_closed(self, carrier: Any) -> None: ...


class HboneStream(AnswerLeg):
    """The network leg of one application connection carried on an HBONE stream."""

    __slots__ = (
        "accepted",
        "carrier",
        "consumed",
        "draining",
        "ended",
        "eof_in",
        "eof_out",
        "forwarded",
        "held",
        "info",
        "pending",
        "reset_code",
        "sid",
        "started",
    )

    conn: StreamOwner
    carrier: HboneCarrier

    def __init__(
        self,
        carrier: HboneCarrier,
        conn: StreamOwner,
        sid: int,
        dst: tuple[str, int],
        forwarded: tuple[str, int] | None,
    ) -> None:
        super().__init__(conn)
        self.carrier = carrier
        self.sid = sid
        src = forwarded or carrier.peername or ("", 0)
        self.info = mux.OpenInfo(dst, src)
        self.forwarded = forwarded  # the caller, as the HBONE client says (PROXY v2 source)
        self.consumed = 0  # bytes handed to our app's transport, not yet credited back
        self.held: list[Buf] | None = None  # data before the app leg was up
        self.pending: bytearray | None = None  # from our app, beyond the send window
        self.eof_in = False
        self.eof_out = False
        self.ended = False
        self.draining = False  # ended for its connection, its last bytes still to send
        self.started = False
        self.accepted = False  # outbound: the far side answered 200
        self.reset_code = mux.RESET_CANCEL
        # Outbound: waiting for the far side's answer (a status) while this is set.
        self.timer: asyncio.TimerHandle | None = None
        self.heard_mark = 0

    def on_accepted(self) -> None:
        """Outbound: the far side answered 200: relay (what the app sent meanwhile goes now)."""
        if self.ended or self.accepted:
            return
        self._answered()
        self.accepted = True
        self.conn.confirm()
        self.window_opened()

    def on_refused(self, code: int) -> None:
        """Outbound: refused (a status, as the core's RESET code: 401 is RESET_NOT_ALLOWED)."""
        if self.ended:
            return
        self._answered()
        self.ended = True
        self.carrier.forget(self)
        self.conn.stream_refused(code)

    # --- what a connection asks of a network leg ---------------------------------------

    def start_tls(self, first: bytes = b"") -> None:
        """The carrier's handshake is this stream's: done already."""
        self.conn.handshake_done(self)  # type: ignore[arg-type]  # conn.Conn takes any leg

    def resumed(self) -> bool:
        return self.carrier.leg.resumed()

    def tls_info(self) -> tuple[str, str, str] | None:
        return self.carrier.tls_info

    def peer_der(self) -> bytes | None:
        return self.carrier.peer_der

    def arm_reset(self) -> None:
        """Nothing to arm: if this process dies, the carrier's TCP connection is reset."""

    def start(self) -> None:
        """Inbound: the app is reached: answer 200, then relay what came meanwhile.
        Outbound: relay (the app's bytes wait for the far side's 200)."""
        self.started = True
        carrier = self.carrier
        if carrier.outbound:
            return
        carrier.tunnel.accept(self.sid)
        carrier.flush_soon()
        held = self.held
        if held:
            self.held = None
            for data in held:
                self._deliver(data)
        if self.eof_in:
            self.conn.net_eof()

    def send(self, data: Buf) -> None:
        if self.ended or self.eof_out:
            return
        n = len(data)
        if not n:
            return
        self.conn.bytes_out += n
        pending = self.pending
        if pending is not None:
            pending += data
            return
        carrier = self.carrier
        if carrier.outbound and not self.accepted:
            # CONNECT's bytes follow its 200: hold them, and the app, until it comes.
            self.pending = bytearray(data)
            if not self.write_paused:
                self.pause_writing()
            return
        sent = carrier.send_data(self.sid, data)
        if sent < n:
            # The window is used up: keep the rest, stop reading our app until it opens.
            self.pending = bytearray(memoryview(data)[sent:])
            if not self.write_paused:
                self.pause_writing()

    def send_framed(self, n: int) -> None:
        """The app leg read `n` bytes into the shared buffer after the frame header's room."""
        self.send(memoryview(_BUF)[mux.HEADER_SIZE : mux.HEADER_SIZE + n])

    def send_eof(self) -> None:
        if self.ended or self.eof_out:
            return
        self.eof_out = True
        if self.pending is None:
            self.carrier.tunnel.send_eof(self.sid)
            self.carrier.flush_soon()
        # else: END_STREAM follows the pending bytes (window_opened)

    def pause_reading(self) -> None:
        self.read_blocked = True  # our app reads slowly: its buffer holds back the credit

    def resume_reading(self) -> None:
        peer = self.peer
        if peer is not None and peer.write_paused:
            return
        self.read_blocked = False
        self._credit()

    def close(self, abort: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        self._answered()
        carrier = self.carrier
        t = carrier.tunnel
        if carrier.outbound and not self.accepted:
            t.reset(self.sid)
        elif not carrier.outbound and not self.started:
            t.reset(self.sid, self.reset_code)  # a refusal: its status
        elif abort:
            t.reset(self.sid)
        else:
            self.eof_out = True
            if self.pending is not None:
                # The app's last bytes wait for the peer's window: the connection is over
                # for its owner, but the stream stays with the carrier until they are sent,
                # then ends (END_STREAM) as the app did.
                self.draining = True
            else:
                t.send_eof(self.sid)
        if self.consumed:
            t.credit(self.sid, self.consumed)  # the windows come back
            self.consumed = 0
        carrier.flush_soon()
        if not self.draining:
            carrier.forget(self)

    # --- what the carrier hands on ------------------------------------------------------

    def on_data(self, data: Buf) -> None:
        if self.ended:
            self.carrier.tunnel.credit(self.sid, len(data))
            return
        if not self.started or self.peer is None:
            if self.held is None:
                self.held = []
            self.held.append(data)
            return
        self._deliver(data)

    def _deliver(self, data: Buf) -> None:
        conn = self.conn
        conn.active = True
        n = len(data)
        conn.bytes_in += n
        assert self.peer is not None
        self.peer.send(data)
        self.consumed += n
        if not self.read_blocked:
            self._credit()

    def _credit(self) -> None:
        """Give the peer back the window of what our app's transport passed on to the kernel;
        what it still buffers stays uncredited, so a slow app holds at most a window here."""
        if not self.consumed or self.ended:
            return
        peer = self.peer
        t = peer.transport if peer is not None else None
        buffered = t.get_write_buffer_size() if t is not None else 0
        give = min(self.consumed, self.consumed - buffered)
        if give <= 0:
            return
        self.consumed -= give
        # The core gives the stream's window back once half of it is taken (the
        # connection's at a quarter): one WINDOW_UPDATE per 2 MiB, not one per read.
        if self.carrier.tunnel.credit(self.sid, give, _CREDIT_AT):
            self.carrier.flush_soon()

    def on_end(self) -> None:
        if self.ended or self.eof_in:
            return
        self.eof_in = True
        if self.started:
            self.conn.net_eof()

    def on_reset(self, code: int) -> None:
        if self.draining:
            self.draining = False
            self.pending = None
            self.carrier.forget(self)
        if self.ended:
            return
        self.ended = True
        self.carrier.forget(self)
        self.conn.leg_lost(self, ConnectionResetError(f"stream reset by peer ({code})"))

    def window_opened(self) -> None:
        """More send window: send what waited, and let our app be read again."""
        if (self.ended and not self.draining) or (self.carrier.outbound and not self.accepted):
            return
        pending = self.pending
        carrier = self.carrier
        if pending is not None:
            sent = carrier.send_data(self.sid, pending)
            if sent < len(pending):
                del pending[:sent]
                return
            self.pending = None
            if self.eof_out:
                carrier.tunnel.send_eof(self.sid)
                carrier.flush_soon()
            if self.draining:
                self.draining = False
                carrier.forget(self)
                return
        if self.write_paused and not carrier.write_blocked:
            self.resume_writing()

    def carrier_lost(self, exc: Exception) -> None:
        self.draining = False
        if self.ended:
            return
        self._answered()
        self.ended = True
        if self.carrier.outbound and not self.accepted:
            if isinstance(exc, TlsError):
                self.conn.net_failed(exc)  # the far side refused our certificate (an alert)
                return
            if isinstance(exc, Unresponsive):
                self.conn.stream_unanswered(self.conn.handshake_timeout)
                return
        self.conn.leg_lost(self, exc)

    def block(self, blocked: bool) -> None:
        """The carrier's TCP buffer filled (True) or drained: stop or resume our app."""
        if blocked:
            if not self.write_paused:
                self.pause_writing()
        elif self.write_paused and self.pending is None:
            self.resume_writing()


_CREDIT_AT = hbone.STREAM_WINDOW // 2


class HboneCarrier(CarrierBase):
    """One HBONE connection (accepted, or dialled and pooled): owner of its TLS leg and of
    its streams."""

    NOUN = "HBONE connection"
    LOG = log
    host: HboneHost

    def __init__(
        self,
        host: HboneHost,
        leg: NetLeg,
        *,
        route: Any,
        peer_id: SpiffeId | None,
        peer_facts: PeerCert | None,
        peername: tuple[str, int] | None,
        called: tuple[str, int] | None,
        outbound: bool = False,
        key: tuple[str, int, str | None] | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.host = host
        self.leg = leg
        self.route = route
        self.outbound = outbound
        self.direction = "outbound" if outbound else "inbound"
        self.key = key
        self.pool = pool
        self.peer_id = peer_id
        self.peer_facts = peer_facts
        self.peer_der = leg.peer_der()
        self.tls_info = leg.tls_info()
        self.peername = peername
        self.called = called  # where the TLS connection arrived (its local address)
        now = host.loop.time()
        # The protocol: stream states, windows, limits, GOAWAY, liveness (PING after
        # PING_INTERVAL of silence, given up after PING_TIMEOUT), as for our own format; h2
        # does the HTTP/2 under it. We only move its bytes.
        self.dialect = hbone.HboneDialect(client=outbound)
        self.tunnel = tunnel.Tunnel(
            client=outbound,
            dialect=self.dialect,
            now=now,
            max_streams=hbone.MAX_STREAMS,
            ping_after=hbone.PING_INTERVAL,
            dead_after=hbone.PING_TIMEOUT,
            stream_window=hbone.STREAM_WINDOW,
            connection_window=hbone.CONNECTION_WINDOW,
        )
        self.streams: dict[int, HboneStream] = {}
        self.closed = False
        self.retiring = False
        self.goaway_at: float | None = None
        self.write_blocked = False
        self.write_paused = False  # what NetLeg asks of its peer leg: we never stop it
        self.active = True
        self.bytes_in = 0
        self.bytes_out = 0
        self.created = now
        self.idle_since: float | None = now
        # `heard` counts the batches of bytes the peer sent, `unanswered` the streams
        # waiting for their status; a carrier with a stream waiting that heard nothing for a
        # whole sweep, or whose PING is unanswered, is `suspect`, and takes no new streams.
        self.heard = 0
        self.heard_mark = 0
        self.unanswered = 0
        self.suspect = False
        # Outbound: called at the far side's first bytes, which say it accepted us.
        self.on_answer: Callable[[], None] | None = None
        self.total = 0
        self._flush_handle: asyncio.Handle | None = None
        self._gauges = metrics.pool_gauges(self.direction)
        _set_liveness(leg.transport.get_extra_info("socket") if leg.transport else None)
        if leg.ssl is not None and not leg.resumed():
            _remember_chain(leg.ssl)
        self._gauges.open.inc()
        self._gauges.idle.inc()
        leg.conn = self  # the TLS leg reports to us now
        leg.peer = self  # type: ignore[assignment]  # a sink for decrypted bytes, like a leg
        leg.start()
        self._flush()  # our SETTINGS and connection window

    # --- bytes --------------------------------------------------------------------------

    def flush_soon(self) -> None:
        """Write what the protocol has to send at the end of this turn of the event loop:
        the frames of many streams go out in one TLS record."""
        if self._flush_handle is None and not self.closed:
            self._flush_handle = self.host.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self.closed:
            return
        data = self.tunnel.data_to_send()
        if data:
            exc = self.leg.write_ptr(ffi.from_buffer(data), len(data))
            if exc is not None:
                self.fail(exc)

    def send(self, data: memoryview) -> None:
        """Decrypted bytes from the TLS leg: HTTP/2 frames."""
        self.heard += 1
        if self.on_answer is not None:
            on_answer, self.on_answer = self.on_answer, None
            on_answer()
        for ev in self.tunnel.receive_data(data):
            if self.closed:
                return
            self._event(ev)
        self.flush_soon()

    def send_data(self, sid: int, data: Buf) -> int:
        """As much of `data` as the windows allow now, on stream `sid`; how much."""
        t = self.tunnel
        n = min(len(data), t.sendable(sid))
        if n <= 0:
            return 0
        t.send_data(sid, data if n == len(data) else memoryview(data)[:n])
        self.flush_soon()
        return n

    def _event(self, ev: tunnel.Event) -> None:
        cls = type(ev)
        if cls is tunnel.DataReceived:
            assert isinstance(ev, tunnel.DataReceived)
            stream = self.streams.get(ev.sid)
            if stream is not None:
                stream.on_data(ev.data)
            else:
                self.tunnel.credit(ev.sid, len(ev.data))
        elif cls is tunnel.WindowOpened:
            assert isinstance(ev, tunnel.WindowOpened)
            if ev.sid:
                stream = self.streams.get(ev.sid)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in list(self.streams.values()):
                    stream.window_opened()
        elif isinstance(ev, tunnel.StreamEnded):
            stream = self.streams.get(ev.sid)
            if stream is not None:
                stream.on_end()
        elif isinstance(ev, tunnel.StreamAccepted):
            stream = self.streams.get(ev.sid)
            if stream is not None:
                stream.on_accepted()
        elif isinstance(ev, tunnel.StreamOpened):
            problem = self.dialect.problems.pop(ev.sid, "")
            info = ev.info
            opened = hbone.StreamOpened(
                ev.sid,
                None if problem else info.dst,
                None if info.src == hbone.NO_AUTHORITY else info.src,
                problem,
            )
            self.host.hbone_stream(self, opened)
        elif isinstance(ev, tunnel.StreamReset | tunnel.StreamBroken):
            stream = self.streams.get(ev.sid)
            if stream is None:
                return
            code = ev.code if isinstance(ev, tunnel.StreamReset) else mux.RESET_PROTOCOL
            if self.outbound and not stream.accepted:
                stream.on_refused(code)
            else:
                stream.on_reset(code)
        elif isinstance(ev, tunnel.GoawayReceived):
            if self.outbound:
                self.retire("goaway")  # no new streams; the open ones finish
            elif not self.streams:
                self.close("peer_goaway")
        elif isinstance(ev, tunnel.ConnectionFailed):
            log.warning(
                "closing an HBONE connection with %s: %s",
                self._who(),
                ev.message,
                extra={
                    "fields": {
                        "event": "pool_protocol_error",
                        "direction": self.direction,
                        "reason": ev.reason,
                    }
                },
            )
            self._flush()  # the GOAWAY saying why
            self.fail(ConnectionResetError(f"protocol error: {ev.message}"), reason=ev.reason)
        # PingAcked: liveness noted it; StreamRefused: h2 refuses beyond the limit first.

    # --- streams ------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        """Streams open on this connection (what Pool.take balances on)."""
        return len(self.streams)

    def open_stream(
        self, conn: StreamOwner, dst: tuple[str, int], src: tuple[str, int] | None
    ) -> HboneStream:
        """Outbound: a CONNECT to `dst` for `conn`, sent with the next write."""
        sid = self.tunnel.open_stream(mux.OpenInfo(dst, src or hbone.NO_AUTHORITY))
        stream = HboneStream(self, conn, sid, dst, src)
        self.accept_stream(stream)
        stream.wait_answer()
        self.flush_soon()
        return stream

    def accept_stream(self, stream: HboneStream) -> None:
        if not self.streams:
            self.idle_since = None
            self._gauges.idle.dec()
        self.streams[stream.sid] = stream
        self.total += 1
        self._gauges.streams.inc()
        if self.write_blocked:
            stream.block(True)

    def forget(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.sid, None) is None:
            return
        if not self.streams:
            self.idle_since = self.host.loop.time()
            if not self.closed:
                self._gauges.idle.inc()
                if self.retiring and self.outbound:
                    self.host.loop.call_soon(self._close_if_idle)

    def going_away(self, now: float) -> bool:
        """Did we tell the peer to go away long enough ago that its new streams are refused?"""
        at = self.goaway_at
        return at is not None and now - at >= GOAWAY_OPEN_GRACE

    # --- retiring and closing -----------------------------------------------------------

    def retire(self, why: str) -> None:
        """No new streams (GOAWAY tells the peer); close once the open ones end."""
        if self.retiring or self.closed:
            return
        self.retiring = True
        metrics.POOL_RETIRED.labels(self.direction, why).inc()
        if self.pool is not None:
            self.pool.remove(self)  # type: ignore[arg-type]  # a pool of either carrier
        if self.outbound:
            if not self.streams:
                self.close()
            return
        self.goaway_at = self.host.loop.time()
        self.tunnel.goaway()
        self.flush_soon()

    def sweep(self, now: float, idle_timeout: float, max_lifetime: float) -> None:
        """Once a second (the worker's sweep): liveness, then idle and retirement."""
        if self.closed:
            return
        for event in self.tunnel.tick(now):  # PING a silent peer, or give it up
            if isinstance(event, tunnel.ConnectionFailed):
                self.unresponsive(f"{event.message} (PING unanswered)")
                return
        if self.tunnel.out:
            self.flush_soon()  # a PING
        heard = self.heard
        suspect = bool(self.unanswered) and heard == self.heard_mark
        self.heard_mark = heard
        if self.outbound:
            self.suspect = suspect
            if not self.retiring and now - self.created >= max_lifetime:
                self.retire("max_lifetime")
            idle = self.idle_since
            if not self.streams and idle is not None and now - idle >= idle_timeout:
                if not self.retiring:
                    metrics.POOL_RETIRED.labels(self.direction, "idle").inc()
                self.close()
            return
        if self.streams or self.idle_since is None:
            return
        if self.goaway_at is not None and now - self.goaway_at >= GOAWAY_GRACE:
            self.close()
        elif now - self.idle_since >= 2 * idle_timeout:
            metrics.POOL_RETIRED.labels(self.direction, "idle").inc()
            self.close()

    def close(self, reason: str = "closed") -> None:
        """End the carrier: open streams end as resets; GOAWAY, close_notify, then FIN."""
        if self.closed:
            return
        self._flush()
        final = self.dialect.close_connection()
        if final:
            self.leg.write_ptr(ffi.from_buffer(final), len(final))
        self._end(ConnectionResetError(f"HBONE connection {reason}"))
        self.leg.send_eof()
        self.leg.close()

    def _end(self, exc: Exception) -> None:
        self.closed = True
        if self.pool is not None:
            self.pool.remove(self)  # type: ignore[arg-type]
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.carrier_lost(exc)
        g = self._gauges
        g.open.dec()
        if self.idle_since is not None:
            g.idle.dec()
        metrics.POOL_STREAMS_PER_CONNECTION.labels(self.direction).observe(self.total)
        self.host.carrier_closed(self)
        self.leg.peer = None
