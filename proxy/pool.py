"""Connection reuse: pooled mTLS connections between two sidecars, each carrying many streams.

A *carrier* is one mTLS connection on which both ends negotiated ALPN `mtls-sidecar/2` or
`mtls-sidecar/1` (mux.py has the wire format). The protocol itself (stream states, windows,
limits, GOAWAY, PING liveness) is the carrier's `tunnel` (tunnel.py, without I/O): a carrier
hands it the bytes it receives and writes what it answers; the decisions are the tunnel's.
Each application connection is then a *stream* on a carrier:
no handshake of its own, and no TLS state of its own while it is idle. A `StreamLeg` is the
network leg of such a connection; to the connection (conn.Conn) it looks like a network leg
whose handshake completes at once with the carrier's peer.

The outbound side keeps a `Pool` of carriers per (host, port, expected identity); the
inbound side keeps the carriers its listeners accepted. Either side retires a carrier when
its own certificate or trust bundle changes (GOAWAY: no new streams, open ones finish);
the outbound side also after MTLS_POOL_IDLE_TIMEOUT without streams and
MTLS_POOL_MAX_LIFETIME of age. A carrier that breaks ends only its own streams (each as a
reset); new connections get another carrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from cryptography import x509

from . import metrics, mux, tunnel
from .identity import SpiffeId
from .logs import RateLimit
from .relay import _BUF, _FRAMED_VIEW, _PTR, Buf, LegOwner, NetLeg, _Leg
from .revocation import PeerCert
from .tls import TlsError, chain_anchored
from .tls_ffi import ffi, peer_chain_ders
from .tunnel import (
    ConnectionFailed,
    GoawayReceived,
    MuxDialect,
    StreamAccepted,
    StreamBroken,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    Tunnel,
    WindowOpened,
)

log = logging.getLogger("mtls.pool")

_pack_header = mux.HEADER.pack_into
_HEADER_SIZE = mux.HEADER_SIZE
_DATA_WORD = mux.DATA << 24
_UPDATE_AT = mux.WINDOW_UPDATE_AT

# A carrier that was told to go away but whose peer keeps it open after its streams ended
# is closed by us after this long (the peer had time to see our GOAWAY).
GOAWAY_GRACE = 5.0
# After our GOAWAY, an OPEN is refused (RESET_GOING_AWAY) once this long has passed: one sent
# before the peer could have read our GOAWAY crossed it on the wire and is still served.
GOAWAY_OPEN_GRACE = 1.0
# An upstream that answered without our ALPN (another proxy, or reuse off there) gets one TLS
# connection per app connection, without waiting for a pooled one, for this long.
FOREIGN_TTL = 60.0
# DATA frames smaller than this wait for the end of the event loop's turn and go out together;
# larger ones (bulk) go out at once, with whatever waits before them.
CORK_BELOW = 16 * 1024
# A peer that stops answering is found out three ways. Version 2: PING after
# MTLS_POOL_PING_INTERVAL of silence, the carrier closed after twice that (tunnel.py). The
# kernel: TCP keepalive probes after 10 s without traffic, every 5 s, and TCP_USER_TIMEOUT
# closes a connection whose sent data stays unacknowledged for 20 s (packets dropped, host
# gone). The peer itself (a frozen
# process's kernel still acknowledges): a stream not answered (ACCEPT or RESET) within the
# route's handshake timeout fails as `handshake_timeout`, and if nothing at all came from the
# peer since the stream was opened, the carrier is closed as unresponsive.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 2
USER_TIMEOUT_MS = 20_000


def _set_liveness(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


# One line a second per kind of stream-level protocol error, however many a peer sends.
_STREAM_ERROR_LOG: dict[str, RateLimit] = {}


def _stream_error(direction: str, reason: str, message: str) -> None:
    metrics.POOL_STREAM_ERRORS.labels(direction, reason).inc()
    limit = _STREAM_ERROR_LOG.get(reason)
    if limit is None:
        limit = _STREAM_ERROR_LOG[reason] = RateLimit(1.0)
    held = limit.allow()
    if held is None:
        return
    if held:
        message += f" ({held} more since the last line)"
    log.warning(
        message,
        extra={
            "fields": {
                "event": "pool_stream_error",
                "direction": direction,
                "reason": reason,
                "held_back": held or None,
            }
        },
    )


# Intermediates seen in pooled peers' chains: a resumed session brings no chain, only the
# leaf, so these complete it when a trust bundle change asks where it leads. Bounded.
_INTERMEDIATES: dict[bytes, None] = {}
_MAX_INTERMEDIATES = 64


def _remember_chain(ssl: Any) -> None:
    for der in peer_chain_ders(ssl):
        if der not in _INTERMEDIATES and len(_INTERMEDIATES) < _MAX_INTERMEDIATES:
            _INTERMEDIATES[der] = None


class Unresponsive(ConnectionError):
    """The carrier's peer answered nothing within a stream's answer timeout."""


class StreamOwner(LegOwner, Protocol):
    """What a stream reports to the connection it carries, beyond a network leg's reports."""

    def stream_refused(self, code: int) -> None:
        """The far side refused the stream (a RESET before ACCEPT) with this RESET_* code."""

    def stream_unanswered(self, seconds: float) -> None:
        """The far side answered the stream neither with ACCEPT nor RESET in `seconds`."""


class CarrierHost(Protocol):
    """What a carrier needs from the worker."""

    loop: asyncio.AbstractEventLoop
    max_streams: int  # streams at once the far side may open on an inbound carrier
    ping_interval: float  # version 2: PING after this long without a frame, give up at 2x

    def carrier_stream(self, carrier: Carrier, sid: int, info: mux.OpenInfo) -> None:
        """Inbound: the peer opened stream `sid`; make its connection."""

    def carrier_closed(self, carrier: Carrier) -> None: ...


class AnsweredCarrier(Protocol):
    """What a stream waiting for its answer needs of its carrier (ours, or HBONE's)."""

    heard: int  # batches of bytes the peer sent
    unanswered: int  # outbound streams waiting for their answer

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def unresponsive(self, why: str) -> None: ...


class AnswerLeg(_Leg):
    """An outbound stream's wait for the far side's answer (ACCEPT or RESET; HBONE: a
    status), for the stream legs of both dialects: no answer within the handshake timeout
    fails the stream if the peer was heard meanwhile, else the whole carrier."""

    __slots__ = ("heard_mark", "timer")
    carrier: AnsweredCarrier
    conn: StreamOwner
    ended: bool
    timer: asyncio.TimerHandle | None  # set while the answer is awaited
    heard_mark: int  # the carrier's `heard` when it began

    def wait_answer(self) -> None:
        """Outbound: the answer must come within the connection's handshake timeout."""
        carrier = self.carrier
        self.heard_mark = carrier.heard
        carrier.unanswered += 1
        self.timer = carrier.loop.call_later(self.conn.handshake_timeout, self._answer_timed_out)

    def _answered(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
            self.carrier.unanswered -= 1

    def _answer_timed_out(self) -> None:
        if self.timer is None:
            return
        self.timer = None
        carrier = self.carrier
        carrier.unanswered -= 1
        if self.ended:
            return
        seconds = self.conn.handshake_timeout
        if carrier.heard != self.heard_mark:
            # The peer is alive (it sent something since), only this stream is stuck.
            self.conn.stream_unanswered(seconds)
        else:
            carrier.unresponsive(f"no answer to a new stream within {seconds:g}s")


class StreamLeg(AnswerLeg):
    """The network leg of one application connection carried on a carrier.

    The carrier's `tunnel` (tunnel.py) holds the stream's protocol state (its windows, its
    half-closes); this leg moves the bytes between it and the app leg."""

    __slots__ = (
        "accepted",
        "carrier",
        "consumed",
        "ended",
        "eof_in",
        "eof_out",
        "eof_wanted",
        "held",
        "info",
        "read_limit",
        "reset_code",
        "sid",
        "started",
        "unsent",
    )

    conn: StreamOwner
    carrier: Carrier

    def __init__(self, carrier: Carrier, conn: StreamOwner, sid: int, info: mux.OpenInfo) -> None:
        super().__init__(conn)
        self.carrier = carrier
        self.sid = sid
        self.info = info
        self.consumed = 0  # bytes handed to our app's transport, not yet credited back
        self.held: bytearray | None = None  # DATA that came before the app leg was up
        # App bytes read beyond the window (a read larger than the room left: rare, as the
        # app leg reads at most the room), sent as soon as the far side credits more.
        self.unsent: bytearray | None = None
        self.eof_in = False
        self.eof_out = False
        self.eof_wanted = False  # our app half-closed while `unsent` still waits
        # What our app leg may read at once: the room left in the window after our last
        # send (a hint: other streams use the connection window too; sends are exact).
        self.read_limit = mux.WINDOW_SIZE
        self.ended = False
        self.started = False
        self.accepted = False
        self.reset_code = mux.RESET_CANCEL
        # Outbound: waiting for the far side's answer (ACCEPT or RESET) while this is set.
        self.timer: asyncio.TimerHandle | None = None
        self.heard_mark = 0

    # --- what a connection asks of a network leg ---------------------------------------

    def start_tls(self, first: bytes = b"") -> None:
        """The carrier's handshake is this stream's: done already."""
        self.conn.handshake_done(self)  # type: ignore[arg-type]  # conn.Conn takes either leg

    def resumed(self) -> bool:
        return self.carrier.leg.resumed()

    def tls_info(self) -> tuple[str, str, str] | None:
        return self.carrier.tls_info

    def peer_der(self) -> bytes | None:
        return self.carrier.peer_der

    def arm_reset(self) -> None:
        """Nothing to arm: if this process dies the carrier's TCP connection is reset, and
        with it every stream."""

    def start(self) -> None:
        """Both legs are up: relay. Inbound, tell the far side its app is reached."""
        self.started = True
        carrier = self.carrier
        if carrier.outbound:
            return
        if not self.ended:
            carrier.tunnel.accept(self.sid)
            carrier.pull()
        held = self.held
        if held:
            self.held = None
            self._deliver(held)
        if self.eof_in:
            self.conn.net_eof()

    def room(self) -> int:
        """How many bytes our app leg should read for this stream now: the window left."""
        return self.read_limit

    def send(self, data: Buf) -> None:
        if self.ended or self.eof_out:
            return
        n = len(data)
        if not n:
            return
        self.conn.bytes_out += n
        if self.unsent:
            self._stash(data)
            self._sent(0, n)
            return
        m = self.carrier.tunnel.reserve(self.sid, n)
        if m < n:
            self._stash(data[m:])
        if m:
            self.carrier.send_data(self.sid, data[:m] if m < n else data)
        self._sent(m, n)

    def send_framed(self, n: int) -> None:
        """Send the `n` bytes the app leg read into the shared buffer after the header's room."""
        if self.ended or self.eof_out:
            return
        self.conn.bytes_out += n
        if self.unsent:
            self._stash(_FRAMED_VIEW[:n])
            self._sent(0, n)
            return
        carrier = self.carrier
        t = carrier.tunnel
        m = t.reserve(self.sid, n)
        if m == n:  # the usual case: all of it fits (the app leg read at most the room)
            carrier.send_data_in_place(self.sid, n)
            left = self.read_limit = t.room_left
            if left <= 0 or t.window == 0:
                self._sent(m, n)
            return
        self._stash(_FRAMED_VIEW[m:n])
        if m:
            carrier.send_data_in_place(self.sid, m)
        self._sent(m, n)

    def _stash(self, data: Buf) -> None:
        if self.unsent is None:
            self.unsent = bytearray()
        self.unsent += data

    def _sent(self, m: int, n: int) -> None:
        """`m` of `n` bytes from our app went out (the rest waits in `unsent`)."""
        t = self.carrier.tunnel
        left = self.read_limit = t.room_left if m else 0
        if left <= 0 and not self.write_paused:
            self.pause_writing()  # the app leg stops reading until the far side credits us
        if t.window == 0:
            self.carrier.connection_window_used()

    def _send_unsent(self) -> None:
        """The window grew: what waits goes first."""
        unsent = self.unsent
        if unsent is None or self.ended:
            return
        t = self.carrier.tunnel
        m = t.reserve(self.sid, len(unsent))
        self.read_limit = t.room_left
        if not m:
            return
        if m == len(unsent):
            self.unsent = None
            self.carrier.send_data(self.sid, unsent)
            if self.eof_wanted:
                self.send_eof()
            return
        self.carrier.send_data(self.sid, unsent[:m])
        del unsent[:m]

    def send_eof(self) -> None:
        if self.ended or self.eof_out:
            return
        if self.unsent:
            self.eof_wanted = True
            return
        self.eof_out = True
        carrier = self.carrier
        carrier.tunnel.send_eof(self.sid)
        carrier.pull()

    def pause_reading(self) -> None:
        self.read_blocked = True  # our app reads slowly: its buffer holds back the credit

    def resume_reading(self) -> None:
        peer = self.peer
        if peer is not None and peer.write_paused:
            return
        self.read_blocked = False
        if self.consumed and not self.ended:
            self._credit(1)

    def close(self, abort: bool = False) -> None:
        if self.ended:
            return
        self._answered()
        carrier = self.carrier
        if abort or not self.accepted_or_started() or self.unsent:
            carrier.tunnel.reset(self.sid, self.reset_code)
        else:
            self.send_eof()
        carrier.pull()
        self.ended = True
        carrier.forget(self)

    def accepted_or_started(self) -> bool:
        return self.accepted if self.carrier.outbound else self.started

    # --- what the carrier hands on ------------------------------------------------------

    def on_data(self, data: memoryview | bytearray | bytes) -> None:
        if self.ended:
            # Our side is done with the stream (the far side has not ended it yet): what
            # still comes is dropped, and its window given back.
            self.carrier.tunnel.credit(self.sid, len(data))
            return
        if not self.started or self.peer is None:
            if self.held is None:
                self.held = bytearray()
            self.held += data
            return
        self._deliver(data)

    def broken(self, reason: str, what: str) -> None:
        """The far side broke a stream rule; the tunnel reset the stream: count it, end it."""
        carrier = self.carrier
        _stream_error(
            carrier.direction,
            reason,
            f"resetting stream {self.sid} of the pooled connection with {carrier._who()}: {what}",
        )
        if self.ended:
            return
        self._answered()
        self.ended = True
        carrier.forget(self)
        self.conn.leg_lost(self, ConnectionResetError(f"protocol error: {what}"))

    def _deliver(self, data: Buf) -> None:
        conn = self.conn
        conn.active = True
        n = len(data)
        conn.bytes_in += n
        assert self.peer is not None
        self.peer.send(data)
        self.consumed += n
        if self.consumed >= _UPDATE_AT:
            self._credit(_UPDATE_AT // 2)

    def _credit(self, minimum: int) -> None:
        """Give the far side back the window of what our app's transport has passed on to
        the kernel (what it still buffers stays uncredited), if that is `minimum` or more.
        So the far side may have WINDOW_SIZE bytes in flight or buffered here, no more, and
        credit flows while the app keeps up, instead of after each pause of its transport."""
        peer = self.peer
        t = peer.transport if peer is not None else None
        buffered = t.get_write_buffer_size() if t is not None else 0
        give = self.consumed - buffered
        if give < minimum or give <= 0:
            return
        self.consumed -= give
        carrier = self.carrier
        if carrier.tunnel.credit(self.sid, give):
            carrier.pull()

    def window_opened(self) -> None:
        if self.ended:
            return
        if self.unsent:
            self._send_unsent()
        self.read_limit = self.carrier.tunnel.sendable(self.sid)
        self._resume_if_clear()

    def accepted_by_peer(self) -> None:
        if self.ended or self.accepted:
            return
        self.accepted = True
        self._answered()
        self.conn.confirm()

    def eof_received(self) -> None:
        if self.ended or self.eof_in:
            return
        self.eof_in = True
        if self.started:
            self.conn.net_eof()

    def reset_by_peer(self, code: int, known: bool) -> None:
        if not known:
            _stream_error(
                self.carrier.direction,
                "unknown_reset_code",
                f"stream {self.sid} of the pooled connection with {self.carrier._who()} "
                f"was reset with code {code}, which the format does not define",
            )
        if self.ended:
            return
        self._answered()
        self.ended = True
        self.carrier.forget(self)
        if self.carrier.outbound and not self.accepted and code != mux.RESET_CANCEL:
            self.conn.stream_refused(code)
        else:
            self.conn.leg_lost(self, ConnectionResetError(f"stream reset by peer ({code})"))

    def carrier_lost(self, exc: Exception) -> None:
        if self.ended:
            return
        self._answered()
        self.ended = True
        if self.carrier.outbound and not self.accepted:
            if isinstance(exc, TlsError):
                # With TLS 1.3 the far side judges our certificate after our handshake is
                # done: a refusal (an alert) ends the carrier before any stream was accepted.
                self.conn.net_failed(exc)
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
        else:
            self._resume_if_clear()

    def _resume_if_clear(self) -> None:
        """Let our app be read again once both the window and the carrier have room."""
        if (
            self.write_paused
            and not self.unsent
            and not self.carrier.write_blocked
            and self.carrier.tunnel.sendable(self.sid) > 0
        ):
            self.resume_writing()


class _Blockable(Protocol):
    def block(self, blocked: bool) -> None: ...


class _LoopHost(Protocol):
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class CarrierBase:
    """What both kinds of carrier (ours, `Carrier`, and HBONE's, `hbone_io.HboneCarrier`) do
    the same way: the TLS leg's owner (LegOwner) once its handshake is over, availability for
    new streams, failing, giving up on a silent peer, and whether the peer is still trusted.
    A subclass sets up the attributes below and writes `close` and `_end`."""

    __slots__ = (
        "closed",
        "direction",
        "host",
        "leg",
        "peer_der",
        "peername",
        "retiring",
        "streams",
        "suspect",
        "tunnel",
        "write_blocked",
    )

    NOUN = "pooled connection"  # in log lines and the streams' reset messages
    LOG = log

    host: _LoopHost
    leg: NetLeg
    tunnel: Tunnel
    streams: Mapping[int, _Blockable]
    direction: str
    peername: tuple[str, int] | None
    peer_der: bytes | None
    closed: bool
    retiring: bool
    suspect: bool
    write_blocked: bool

    def close(self, reason: str = "closed") -> None:
        raise NotImplementedError

    def _end(self, exc: Exception) -> None:
        raise NotImplementedError

    # --- streams ------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.host.loop

    @property
    def available(self) -> bool:
        t = self.tunnel
        if self.closed or self.retiring or self.suspect or not t.can_open():
            return False
        live = t.liveness
        # a PING unanswered for a second: new streams go elsewhere
        return live is None or live.first_ping is None or not t.suspect(self.host.loop.time())

    def _close_if_idle(self) -> None:
        if not self.streams and not self.closed:
            self.close()

    # --- what the TLS leg reports (LegOwner) --------------------------------------------

    @property
    def established(self) -> bool:
        return True

    @property
    def handshake_timeout(self) -> float:
        return 0.0

    def pause_reading(self) -> None:
        """The TLS leg's TCP buffer is full: every stream's app stops reading."""
        self.write_blocked = True
        for stream in list(self.streams.values()):
            stream.block(True)

    def resume_reading(self) -> None:
        self.write_blocked = False
        for stream in list(self.streams.values()):
            stream.block(False)

    def net_eof(self) -> None:
        """The peer closed the carrier (close_notify or FIN)."""
        self.close(reason="peer_closed")

    def net_failed(self, exc: BaseException) -> None:
        self.fail(exc)

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        if not self.closed:
            self.fail(exc or ConnectionResetError(f"{self.NOUN} closed"))

    def confirm(self) -> None:
        pass

    # The handshake is over before a leg is handed to a carrier: nothing of it is left.
    def net_connected(self, leg: NetLeg) -> bool:
        return False

    def app_connected(self, leg: Any) -> None:
        pass

    def sniffed(self, tls: bool, first: bytes) -> None:
        pass

    def closed_before_hello(self, first: bytes) -> None:
        pass

    def verify_peer(self, der: bytes, anchor: bytes | None = None) -> int:
        return 0

    def handshake_done(self, leg: NetLeg) -> None:
        pass

    def handshake_failed(self, exc: BaseException) -> None:
        self.fail(exc)

    def handshake_timed_out(self) -> None:
        pass

    def hold_from_app(self, data: bytes) -> bool:
        return True

    def app_eof(self) -> None:
        pass

    # --- failing ------------------------------------------------------------------------

    def trusted_by(self, roots: Sequence[x509.Certificate]) -> bool:
        """Does the peer's certificate chain still end at one of these trust roots?"""
        leg = self.leg
        if leg.ssl is None or self.peer_der is None:
            return False
        ders = [self.peer_der, *peer_chain_ders(leg.ssl)]
        return chain_anchored(ders, roots, tuple(_INTERMEDIATES))

    def fail(self, exc: BaseException, reason: str = "broken") -> None:
        """The carrier broke: its streams end as resets, the TCP connection is reset."""
        if self.closed:
            return
        if not self.retiring:
            metrics.POOL_RETIRED.labels(self.direction, reason).inc()
        self._end(exc if isinstance(exc, Exception) else ConnectionResetError(str(exc)))
        self.leg.close(abort=True)

    def unresponsive(self, why: str) -> None:
        """The peer is gone or frozen (a stream's answer did not come and nothing else did
        either, or a PING went unanswered): close the carrier; its streams still waiting
        fail as handshake timeouts, the others as resets."""
        if self.closed:
            return
        self.LOG.warning(
            "closing the %s with %s: %s",
            self.NOUN,
            self._who(),
            why,
            extra={"fields": {"event": "pool_unresponsive", "direction": self.direction}},
        )
        self.fail(Unresponsive(why), reason="unresponsive")

    def _who(self) -> str:
        p = self.peername
        return f"{p[0]}:{p[1]}" if p else "?"


class Carrier(CarrierBase):
    """One pooled mTLS connection: the owner of its TLS leg, and the sink of its frames."""

    __slots__ = (
        "_flush_handle",
        "_gauges",
        "active",
        "bytes_in",
        "bytes_out",
        "called",
        "created",
        "goaway_at",
        "heard",
        "heard_mark",
        "idle_since",
        "key",
        "on_answer",
        "out",
        "outbound",
        "peer_facts",
        "peer_id",
        "pool",
        "route",
        "tls_info",
        "total",
        "unanswered",
        "version",
        "write_paused",
    )

    host: CarrierHost

    def __init__(
        self,
        host: CarrierHost,
        leg: NetLeg,
        *,
        outbound: bool,
        route: Any,
        peer_id: SpiffeId | None,
        peer_facts: PeerCert | None,
        peername: tuple[str, int] | None,
        called: tuple[str, int] | None = None,
        key: tuple[str, int, str | None] | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.host = host
        self.leg = leg
        self.outbound = outbound
        self.direction = "outbound" if outbound else "inbound"
        self.route = route
        self.peer_id = peer_id
        self.peer_facts = peer_facts
        self.peer_der = leg.peer_der()
        self.tls_info = leg.tls_info()
        self.peername = peername
        self.called = called
        self.key = key
        self.pool = pool
        self.streams: dict[int, StreamLeg] = {}
        self.total = 0
        self.closed = False
        self.retiring = False
        self.write_blocked = False
        self.write_paused = False  # what NetLeg asks of its peer leg: we never stop it
        self.active = True
        self.bytes_in = 0
        self.bytes_out = 0
        self.created = host.loop.time()
        self.idle_since: float | None = self.created
        self.goaway_at: float | None = None
        self.out: bytearray | None = None  # control frames waiting for the next flush
        self._flush_handle: asyncio.Handle | None = None
        self._gauges = metrics.pool_gauges(self.direction)
        # The protocol: stream states, windows, limits, liveness. We only move its bytes.
        self.version = mux.ALPN_VERSIONS.get(leg.alpn(), 1)
        ping = host.ping_interval
        self.tunnel = Tunnel(
            client=outbound,
            dialect=MuxDialect(self.version),
            now=self.created,
            max_streams=host.max_streams,
            ping_after=ping,
            dead_after=2 * ping,
        )
        self.tunnel.bind(self._event, self._stream_data)
        # Outbound: called at the far side's first frame, which says it accepted us (with TLS
        # 1.3 it judges our certificate after our side of the handshake is done).
        self.on_answer: Callable[[], None] | None = None
        # Liveness: `heard` counts the batches of bytes the peer sent; `unanswered` the
        # outbound streams waiting for their ACCEPT. A carrier with a stream waiting that
        # heard nothing for a whole sweep is `suspect`: no new streams go to it.
        self.heard = 0
        self.heard_mark = 0
        self.unanswered = 0
        self.suspect = False
        _set_liveness(leg.transport.get_extra_info("socket") if leg.transport else None)
        if leg.ssl is not None and not leg.resumed():
            _remember_chain(leg.ssl)
        self._gauges.open.inc()
        self._gauges.idle.inc()
        # From now on the TLS leg reports to us, and hands us what it decrypts.
        leg.conn = self
        leg.peer = self  # type: ignore[assignment]  # a sink for decrypted bytes, like a leg
        leg.start()

    # --- streams ------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        """Streams open as the protocol counts them (until both sides ended them), which
        is what the far side's stream limit counts."""
        return len(self.tunnel.streams)

    def open_stream(self, conn: StreamOwner, info: mux.OpenInfo) -> StreamLeg:
        """Outbound: a new stream for `conn`; its OPEN goes out with the next write."""
        t = self.tunnel
        sid = t.open_stream(info)
        if t.next_sid > mux.MAX_STREAM_ID:
            self.retire("stream_ids")  # 2**31 streams opened on it
        stream = StreamLeg(self, conn, sid, info)
        self._add(stream)
        stream.wait_answer()
        self.pull()
        if self.write_blocked:
            stream.block(True)
        return stream

    def _add(self, stream: StreamLeg) -> None:
        if not self.streams:
            self.idle_since = None
            self._gauges.idle.dec()
        self.streams[stream.sid] = stream
        self.total += 1
        self._gauges.streams.inc()

    def forget(self, stream: StreamLeg) -> None:
        if self.streams.pop(stream.sid, None) is None:
            return
        if not self.streams:
            self.idle_since = self.host.loop.time()
            if not self.closed:
                self._gauges.idle.inc()
                if self.retiring and self.outbound:
                    self.host.loop.call_soon(self._close_if_idle)

    # --- writing ------------------------------------------------------------------------

    def _waiting(self) -> bytearray:
        """The frames waiting for the end of this turn of the event loop (the buffer made,
        and its flush scheduled, if there is none yet)."""
        out = self.out
        if out is None:
            out = self.out = bytearray()
            if self._flush_handle is None:
                self._flush_handle = self.host.loop.call_soon(self._flush_queued)
        return out

    def pull(self) -> None:
        """Take what the tunnel has to send (control frames): written with the next DATA
        frame, or at the end of this turn of the event loop (many frames of one turn go out
        in one TLS record)."""
        data = self.tunnel.data_to_send()
        if not data or self.closed:
            return
        if self.out is None and type(data) is bytearray:
            self._waiting()
            self.out = data  # handed over: no copy
        else:
            self._waiting().extend(data)

    def _flush_queued(self) -> None:
        self._flush_handle = None
        out = self.out
        if out is not None and not self.closed:
            self.out = None
            self._write(out)

    def _flush_now(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_queued()

    def _cork(self, sid: int, data: Buf) -> None:
        """A small DATA frame: written with the others of this turn of the event loop, so the
        messages of many streams cost one TLS record and one send() (keep-alive traffic)."""
        if self.closed:
            return
        out = self._waiting()
        out += mux.header(mux.DATA, len(data), sid)
        out += data

    def send_data(self, sid: int, data: Buf) -> None:
        """DATA on `sid`, already accounted in the tunnel (`Tunnel.reserve`)."""
        n = len(data)
        if n < CORK_BELOW:
            self._cork(sid, data)
            return
        if self.closed:
            return
        out = self.out
        if out is None:
            out = bytearray()
        else:
            self.out = None
        out += mux.header(mux.DATA, n, sid)
        out += data
        self._write(out)

    def send_data_in_place(self, sid: int, n: int) -> None:
        """DATA whose payload sits in the shared buffer after `HEADER_SIZE` bytes of room,
        already accounted in the tunnel (`Tunnel.reserve`)."""
        if n < CORK_BELOW:
            self._cork(sid, memoryview(_BUF)[_HEADER_SIZE : _HEADER_SIZE + n])
            return
        if self.closed:
            return
        if self.out is not None:
            self._flush_now()  # what waits goes first, on its own: no copy of a big frame
        _pack_header(_BUF, 0, _DATA_WORD | n, sid)
        self._write_ptr(_PTR, n + _HEADER_SIZE)

    def connection_window_used(self) -> None:
        """Version 2: the connection window is used up: every stream's app stops reading
        (rather than each reading once more, into memory) until the far side credits it."""
        for stream in list(self.streams.values()):
            if not stream.write_paused:
                stream.pause_writing()

    def _write(self, data: Buf) -> None:
        if not self.closed:
            self._write_ptr(ffi.from_buffer(data), len(data))

    def _write_ptr(self, ptr: Any, n: int) -> None:
        if self.closed:
            return
        exc = self.leg.write_ptr(ptr, n)
        if exc is not None:
            self.fail(exc)

    # --- what the TLS leg reports (LegOwner) --------------------------------------------

    def send(self, data: memoryview) -> None:
        """Decrypted bytes from the TLS leg: frames, for the tunnel to judge."""
        self.heard += 1
        if self.on_answer is not None:
            on_answer, self.on_answer = self.on_answer, None
            on_answer()
        t = self.tunnel
        t.receive(data)
        if t.out:
            self.pull()

    def _stream_data(self, sid: int, data: memoryview | bytearray) -> None:
        """DATA the tunnel let through, for a stream's app."""
        if self.closed:
            return
        stream = self.streams.get(sid)
        if stream is not None:
            stream.on_data(data)
        else:
            # Ended on our side, not yet on the far side's: dropped, credited.
            self.tunnel.credit(sid, len(data))

    def _event(self, event: tunnel.Event) -> None:
        """What the tunnel made of a frame, as soon as it is known (the commonest first)."""
        if self.closed:
            return
        kind = type(event)
        if kind is StreamEnded or kind is StreamAccepted or kind is StreamReset:
            stream = self.streams.get(event.sid)  # type: ignore[union-attr]
            if stream is None:
                return
            if type(event) is StreamEnded:
                stream.eof_received()
            elif type(event) is StreamAccepted:
                stream.accepted_by_peer()
            elif type(event) is StreamReset:
                stream.reset_by_peer(event.code, event.known)
        elif type(event) is StreamOpened:
            self.host.carrier_stream(self, event.sid, event.info)
        elif type(event) is WindowOpened:
            if event.sid:
                stream = self.streams.get(event.sid)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in list(self.streams.values()):
                    stream.window_opened()
        elif type(event) is ConnectionFailed:
            self._protocol_error(event.reason, event.message)
        elif type(event) is GoawayReceived:
            self._goaway_received()
        elif type(event) is StreamBroken:
            stream = self.streams.get(event.sid)
            if stream is not None:
                stream.broken(event.reason, event.message)
        elif type(event) is StreamRefused:
            self._refused(event.sid, event.code)
        # PingAcked: hearing it is all that counts

    def _refused(self, sid: int, code: int) -> None:
        """The tunnel refused a stream beyond the stream limit: counted as any refused
        connection (`too_many_connections`, or `going_away` after our GOAWAY)."""
        reason = mux.RESET_NAMES[code]
        self.route.metrics.rejected(reason).inc()
        limit = self.host.max_streams
        _stream_error(
            self.direction,
            "stream_limit",
            f"refused stream {sid} of the pooled connection with {self._who()}: "
            f"more than MTLS_POOL_MAX_STREAMS={limit} streams at once ({reason})",
        )

    def _protocol_error(self, reason: str, message: str) -> None:
        log.warning(
            "closing a pooled connection with %s: %s",
            self._who(),
            message,
            extra={
                "fields": {
                    "event": "pool_protocol_error",
                    "direction": self.direction,
                    "reason": reason,
                }
            },
        )
        self.fail(ConnectionResetError(f"protocol error: {message}"), reason=reason)

    def accept_stream(self, stream: StreamLeg) -> None:
        """Inbound: take in a stream the worker made for an OPEN."""
        self._add(stream)
        if self.write_blocked:
            stream.block(True)

    # --- retiring and closing -----------------------------------------------------------

    def retire(self, why: str) -> None:
        """No new streams; close once the open ones end. Inbound, the peer is told
        (GOAWAY) so it stops opening streams here."""
        if self.retiring or self.closed:
            return
        self.retiring = True
        metrics.POOL_RETIRED.labels(self.direction, why).inc()
        if self.pool is not None:
            self.pool.remove(self)
        if not self.outbound:
            self.goaway_at = self.host.loop.time()
            self.tunnel.goaway()
            self.pull()
        elif not self.streams:
            self.close()

    def going_away(self, now: float) -> bool:
        """Inbound: did we tell the peer to go away long enough ago that its new streams
        are refused?"""
        at = self.goaway_at
        return at is not None and now - at >= GOAWAY_OPEN_GRACE

    def _goaway_received(self) -> None:
        if self.outbound:
            self.retire("goaway")

    def sweep(self, now: float, idle_timeout: float, max_lifetime: float) -> None:
        """Once a second (the worker's sweep): idle and age limits, liveness."""
        if self.closed:
            return
        for event in self.tunnel.tick(now):  # version 2: PING a silent peer, or give it up
            if isinstance(event, ConnectionFailed):
                self.unresponsive(f"{event.message} (PING unanswered)")
                return
        self.pull()
        if self.outbound:
            heard = self.heard
            self.suspect = bool(self.unanswered) and heard == self.heard_mark
            self.heard_mark = heard
            if not self.retiring and now - self.created >= max_lifetime:
                self.retire("max_lifetime")
            idle = self.idle_since
            if (
                not self.streams
                and idle is not None
                and (self.retiring or now - idle >= idle_timeout)
            ):
                if not self.retiring:
                    metrics.POOL_RETIRED.labels(self.direction, "idle").inc()
                self.close()
            return
        # Inbound: the dialling side closes idle carriers; a peer that vanished without a
        # FIN is let go after twice its idle time, and a retired one after the grace.
        if self.streams or self.idle_since is None:
            return
        if self.goaway_at is not None and now - self.goaway_at >= GOAWAY_GRACE:
            self.close()
        elif now - self.idle_since >= 2 * idle_timeout:
            metrics.POOL_RETIRED.labels(self.direction, "idle").inc()
            self.close()

    def close(self, reason: str = "closed") -> None:
        """End the carrier: open streams end as resets; close_notify, then FIN."""
        if self.closed:
            return
        self._flush_now()
        self._end(ConnectionResetError(f"pooled connection {reason}"))
        self.leg.send_eof()
        self.leg.close()

    def _end(self, exc: Exception) -> None:
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.out = None
        if self.pool is not None:
            self.pool.remove(self)
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


Key = tuple[str, int, str | None]


class PoolWaiter(Protocol):
    """An outbound connection waiting for a carrier that is being dialled."""

    @property
    def closed(self) -> bool: ...

    def use_carrier(self, carrier: Carrier) -> None: ...

    def dial_alone(self) -> None: ...


class Pool:
    """The outbound side's carriers, by (host, port, expected identity)."""

    def __init__(self, max_streams: int, idle_timeout: float, max_lifetime: float) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.carriers: dict[Key, list[Carrier]] = {}
        self.dialing: dict[Key, list[PoolWaiter]] = {}
        self._foreign: dict[Key, float] = {}

    def take(self, key: Key) -> Carrier | None:
        """The least busy carrier for `key` with room for one more stream."""
        best: Carrier | None = None
        for carrier in self.carriers.get(key, ()):
            n = carrier.open_streams
            if (
                n < self.max_streams
                and carrier.available
                and (best is None or n < best.open_streams)
            ):
                best = carrier
        return best

    def wait(self, key: Key, waiter: PoolWaiter) -> bool:
        """If a carrier for `key` is being dialled with room, queue `waiter` on it (True)."""
        waiters = self.dialing.get(key)
        if waiters is None or len(waiters) + 1 >= self.max_streams:
            return False
        waiters.append(waiter)
        return True

    def dial_started(self, key: Key) -> None:
        self.dialing.setdefault(key, [])

    def foreign(self, key: Key, now: float) -> bool:
        """Did this upstream recently answer without our ALPN (a foreign peer)?"""
        until = self._foreign.get(key)
        if until is None:
            return False
        if until < now:
            del self._foreign[key]
            return False
        return True

    def dial_done(self, key: Key, carrier: Carrier | None, now: float, ttl: float) -> None:
        """The dial for `key` ended: with a carrier, or without (failed, or a foreign peer,
        remembered for `ttl` seconds when `ttl` > 0). Waiters get the carrier or dial alone."""
        waiters = self.dialing.pop(key, [])
        if carrier is not None:
            self.carriers.setdefault(key, []).append(carrier)
        elif ttl > 0:
            self._foreign[key] = now + ttl
        for waiter in waiters:
            if waiter.closed:
                continue
            chosen = self.take(key) if carrier is not None else None
            if chosen is not None:
                waiter.use_carrier(chosen)
            else:
                waiter.dial_alone()

    def add(self, key: Key, carrier: Carrier) -> None:
        self.carriers.setdefault(key, []).append(carrier)

    def remove(self, carrier: Carrier) -> None:
        key = carrier.key
        if key is None:
            return
        group = self.carriers.get(key)
        if group is not None and carrier in group:
            group.remove(carrier)
            if not group:
                del self.carriers[key]
