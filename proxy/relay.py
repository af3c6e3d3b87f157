"""The two-way byte pump: a network leg (TLS over memory BIOs, or plaintext) and an app leg.

Both legs are `asyncio.BufferedProtocol`s reading into one process-wide buffer: whatever is
read is handed to the other leg's transport (as bytes: see `_owned`) before the callback
returns, so no connection owns a read buffer of its own. That keeps
idle connections small. Backpressure: when one leg's transport buffers too much, the other leg
stops reading, and resumes when it drains.

TLS runs in this module over `ssl.MemoryBIO`s instead of the event loop's TLS transport, for
three reasons: the first bytes can be sniffed (TLS or not) without being consumed, every
handshake error reaches us with its real cause for the rejection counters, and TCP half-close
is carried across TLS (close_notify one way while data still flows the other way).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .openssl import keep_session_resumable, set_session
from .transparent import client_hello_offers_psk, sniff

if TYPE_CHECKING:
    from .conn import Conn

Buf = bytes | bytearray | memoryview

BUF_SIZE = 1024 * 1024
# Stop decrypting into the buffer when less than a full TLS record would fit.
_BATCH_LIMIT = BUF_SIZE - 16 * 1024 - 256
_BUF = bytearray(BUF_SIZE)
_VIEW = memoryview(_BUF)

# Bytes a transport may buffer before the other leg stops reading.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024

# Network leg states.
SNIFF = 0  # server side: waiting for the first bytes to decide TLS or plaintext
HANDSHAKE = 1
WAIT = 2  # handshake done (or plaintext accepted); the other leg is not ready yet
OPEN = 3
CLOSED = 4

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_LINGER_OFF = struct.pack("ii", 0, 0)

_EOF_REASONS = {"UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL"}


def _read_into(sslobj: ssl.SSLObject, offset: int = 0) -> int:
    """Decrypt into the shared buffer at `offset`; returns the byte count (0 at close_notify)."""
    # With a buffer argument SSLObject.read returns a count (typeshed says bytes).
    return cast(int, sslobj.read(BUF_SIZE - offset, _VIEW[offset:]))


def _owned(data: Buf) -> bytes:
    """`data` as bytes the transport may keep.

    uvloop keeps a reference to the part of a write the kernel did not take, without copying
    it: a view of the shared read buffer would be overwritten by the next read (of any
    connection) before it is sent. One copy per read batch is the price of sharing the buffer.
    """
    return data if type(data) is bytes else bytes(data)


class _Leg(asyncio.BufferedProtocol):
    """What both legs share: the connection, the transport, and backpressure towards the peer."""

    __slots__ = ("conn", "peer", "read_blocked", "transport", "write_paused")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.peer: _Leg | None = None
        self.transport: asyncio.Transport | None = None
        self.read_blocked = False
        self.write_paused = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    # Our transport is full: the peer must stop feeding us.
    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None:
            self.peer.resume_reading()

    def pause_reading(self) -> None:
        self.read_blocked = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        peer = self.peer
        if peer is not None and peer.write_paused:
            # The transport only says pause_writing once: reading now would buffer without
            # bound. The peer's resume_writing resumes us.
            return
        self.read_blocked = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def send(self, data: Buf) -> None:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def _linger(self, value: bytes) -> None:
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)

    def arm_reset(self) -> None:
        """From now on, if this process dies (a worker killed), the kernel resets this
        connection instead of ending it with a FIN an app could take for a normal end."""
        self._linger(_LINGER_RST)

    def close(self, abort: bool = False) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if abort:
            # A cut connection must look cut at the other end too: RST, not a FIN that an app
            # could take for the normal end of the stream.
            self._linger(_LINGER_RST)
            t.abort()
        else:
            self._linger(_LINGER_OFF)  # a normal end: FIN after what is still buffered
            t.close()


class AppLeg(_Leg):
    """The plaintext leg to or from the local application."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.conn.app_connected(self)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.active = True
        peer = self.peer
        if peer is None:
            # Not relaying yet (outbound: the remote is still being dialled). uvloop starts
            # reading after connection_made whatever it did, so the pause at accept does not
            # hold: pause here, keep this one read, and resume once the remote is up.
            conn.hold_from_app(bytes(_VIEW[:nbytes]))
            self.pause_reading()
            return
        peer.send(_VIEW[:nbytes])

    def eof_received(self) -> bool:
        self.conn.app_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.leg_lost(self, exc)

    def send(self, data: Buf) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(_owned(data))

    def send_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()


class NetLeg(_Leg):
    """The leg that crosses the network: TLS (server or client side) or, if allowed, plaintext."""

    __slots__ = (
        "_ctx",
        "_ctx_ptr",
        "_resume_ctx",
        "_session",
        "eof_in",
        "eof_out",
        "first",
        "held",
        "incoming",
        "on_session",
        "outgoing",
        "server_side",
        "sslobj",
        "state",
        "timer",
    )

    def __init__(
        self,
        conn: Conn,
        ctx: ssl.SSLContext | None,
        *,
        server_side: bool,
        session: ssl.SSLSession | None = None,
        ctx_ptr: int | None = None,
        on_session: Callable[[ssl.SSLSession | None], None] | None = None,
        resume_ctx: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(conn)
        self._resume_ctx = resume_ctx
        self.server_side = server_side
        self._ctx = ctx
        self._session = session
        self._ctx_ptr = ctx_ptr
        self.on_session = on_session
        self.sslobj: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.first: bytearray | None = None
        self.held: bytearray | None = None
        self.eof_in = False
        self.eof_out = False
        self.timer: asyncio.TimerHandle | None = None
        self.state = SNIFF if server_side else HANDSHAKE

    # --- transport callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        conn = self.conn
        # The timer runs from accept (inbound: sniffing included) or connect (outbound);
        # set before the flow acts, which may start the handshake at once.
        self.timer = asyncio.get_running_loop().call_later(
            conn.handshake_timeout, self._handshake_timeout
        )
        if not conn.net_connected(self):
            self._cancel_timer()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.active = True
        state = self.state
        if self.sslobj is not None:
            assert self.incoming is not None
            self.incoming.write(_VIEW[:nbytes])
            if state == OPEN:
                self._pump_in()
            elif state == HANDSHAKE:
                self._handshake_step()
            return
        if state == OPEN:
            peer = self.peer
            if peer is None:
                return  # the connection was finished; the transport is closing
            self.conn.bytes_in += nbytes
            peer.send(_VIEW[:nbytes])
        elif state == SNIFF:
            self._sniff(_VIEW[:nbytes])
        elif state == WAIT:
            # Plaintext accepted, the app leg is not connected yet: reading is paused, keep
            # what raced the pause.
            if self.first is None:
                self.first = bytearray()
            self.first += _VIEW[:nbytes]

    def eof_received(self) -> bool:
        state = self.state
        if self.sslobj is not None:
            assert self.incoming is not None
            self.incoming.write_eof()
            if state == HANDSHAKE:
                self._handshake_step()
            elif state == OPEN:
                self._pump_in()
            return True
        if state == SNIFF:
            self.conn.closed_before_hello(bytes(self.first or b""))
            return False
        self.eof_in = True
        if state == OPEN:
            self.conn.net_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        state = self.state
        self.state = CLOSED
        if state == HANDSHAKE and not self.conn.closed:
            self.conn.handshake_failed(
                exc or ConnectionResetError("connection closed during handshake")
            )
            return
        self.conn.leg_lost(self, exc)

    # --- sniffing and handshake ---------------------------------------------------------

    def _sniff(self, data: memoryview) -> None:
        if self.first is None:
            self.first = bytearray(data)
        else:
            self.first += data
        verdict = sniff(bytes(self.first[:8]))
        if verdict == "need_more":
            return
        first = bytes(self.first)
        self.first = None
        self.conn.sniffed(verdict == "tls", first)

    def accept_plaintext(self, first: bytes) -> None:
        """Relay this connection without TLS (permissive/audit inbound, permissive outbound)."""
        self.state = WAIT
        self.pause_reading()
        self.first = bytearray(first) if first else None
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def start_tls(self, first: bytes = b"") -> None:
        """Begin the handshake; `first` holds bytes already read (the sniffed ClientHello)."""
        self._start_tls(first)

    def _start_tls(self, first: bytes) -> None:
        assert self._ctx is not None
        self.state = HANDSHAKE
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        session = self._session
        self._session = None
        ctx = self._ctx
        if self._resume_ctx is not None and client_hello_offers_psk(first):
            ctx = self._resume_ctx  # same identity and ticket keys, issues no new ticket
        sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=self.server_side)
        if session is not None and not (
            self._ctx_ptr is not None and set_session(sslobj, self._ctx_ptr, session)
        ):
            sslobj.session = session  # the ssl module's way: correct, but copies the session
        self.sslobj = sslobj
        if first:
            self.incoming.write(first)
        self._handshake_step()

    def _handshake_step(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # carries our alert to the peer
            self.state = CLOSED
            self.conn.handshake_failed(exc)
            return
        self._flush()
        self._handshake_finished()

    def _handshake_finished(self) -> None:
        self._cancel_timer()
        self.state = WAIT
        self.pause_reading()
        self.conn.handshake_done(self)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state in (SNIFF, HANDSHAKE):
            self.state = CLOSED
            self.conn.handshake_timed_out()

    # --- relaying -----------------------------------------------------------------------

    def start(self) -> None:
        """The other leg is ready: relay in both directions."""
        self._cancel_timer()
        self.state = OPEN
        first = self.first
        if first:
            self.first = None
            self.conn.bytes_in += len(first)
            assert self.peer is not None
            self.peer.send(first)
        self.resume_reading()
        if self.eof_in and self.sslobj is None:
            self.conn.net_eof()

    def resume_reading(self) -> None:
        peer = self.peer
        if peer is not None and peer.write_paused:
            return  # see _Leg.resume_reading
        self.read_blocked = False
        if self.state != OPEN:
            return
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()
        if self.sslobj is not None:
            self._pump_in()

    def _pump_in(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the app leg, until blocked."""
        sslobj = self.sslobj
        incoming = self.incoming
        peer = self.peer
        conn = self.conn
        assert sslobj is not None and incoming is not None
        if peer is None:
            return  # the connection was finished; the transport is closing
        held = self.held
        if held:
            self.held = None
            conn.bytes_in += len(held)
            peer.send(held)
        # Decrypt record after record into the shared buffer and hand it over in one write:
        # a 16 KiB record per write would cost a send() each.
        while not self.read_blocked and not self.eof_in:
            filled = 0
            eof = False
            while filled <= _BATCH_LIMIT:
                try:
                    n = _read_into(sslobj, filled)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    n = 0
                except ssl.SSLError as exc:
                    if not (isinstance(exc, ssl.SSLEOFError) or exc.reason in _EOF_REASONS):
                        self._flush()
                        conn.net_failed(exc)
                        return
                    n = 0  # TCP FIN without close_notify: treat as end of stream
                if not n:
                    eof = True
                    break
                filled += n
                if not incoming.pending and not incoming.eof and not sslobj.pending():
                    break  # all consumed: skip the SSLWantReadError a further read would raise
            if filled:
                conn.bytes_in += filled
                peer.send(_VIEW[:filled])
                if self.on_session is not None:
                    # The ticket arrives after the handshake, before the first application data.
                    self.on_session(sslobj.session)
                    self.on_session = None
            if eof:
                self.eof_in = True
                self._flush()
                conn.net_eof()
                return
            if filled <= _BATCH_LIMIT:
                break  # the BIO holds no complete record
        self._flush()

    def send(self, data: Buf) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.eof_out:
            return
        self.conn.bytes_out += len(data)
        sslobj = self.sslobj
        if sslobj is None:
            t.write(_owned(data))
            return
        try:
            sslobj.write(data)
        except ssl.SSLError as exc:
            self.conn.net_failed(exc)
            return
        self._flush()

    def send_eof(self) -> None:
        """Half-close towards the network peer: close_notify (TLS), then TCP FIN."""
        t = self.transport
        if t is None or t.is_closing() or self.eof_out:
            return
        self.eof_out = True
        sslobj = self.sslobj
        if sslobj is not None:
            self._hold_pending()
            try:
                sslobj.unwrap()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                pass
            self._flush()
        if t.can_write_eof():
            t.write_eof()
        if self.held and self.state == OPEN and not self.read_blocked:
            self._pump_in()

    def _hold_pending(self) -> None:
        # SSL_shutdown discards application records it finds while looking for the peer's
        # close_notify, so decrypt whatever complete records are waiting first.
        sslobj = self.sslobj
        incoming = self.incoming
        assert sslobj is not None and incoming is not None
        while incoming.pending and not self.eof_in:
            try:
                n = _read_into(sslobj)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            except ssl.SSLError:
                break
            if n == 0:
                break
            if self.held is None:
                self.held = bytearray()
            self.held += _VIEW[:n]

    def _flush(self) -> None:
        out = self.outgoing
        if out is not None and out.pending:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(out.read())
            else:
                out.read()

    def close(self, abort: bool = False) -> None:
        sslobj = self.sslobj
        if sslobj is not None and self._ctx_ptr is not None and not self.eof_out:
            # A client leg whose session may be shared (openssl.set_session): closing it
            # without close_notify must not spoil that session for the others.
            keep_session_resumable(sslobj, self._ctx_ptr)
        super().close(abort)

    def peer_der(self) -> bytes | None:
        sslobj = self.sslobj
        if sslobj is None:
            return None
        return sslobj.getpeercert(binary_form=True)
