"""The two-way byte pump: a network leg (TLS over memory BIOs, or plaintext) and an app leg.

Both legs are `asyncio.BufferedProtocol`s reading into one process-wide buffer: whatever is
read is handed to the other leg's transport (as bytes: see `_owned`) before the callback
returns, so no connection owns a read buffer of its own. That keeps
idle connections small. Backpressure: when one leg's transport buffers too much, the other leg
stops reading, and resumes when it drains.

TLS runs in this module over OpenSSL memory BIOs (raw binding calls, see tls_ffi.py) instead
of the event loop's TLS transport, for three reasons: the first bytes can be sniffed (TLS or
not) without being consumed, every handshake error reaches us with its real cause for the
rejection counters, and TCP half-close is carried across TLS (close_notify one way while
data still flows the other way).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol, cast

from . import tls_ffi
from .tls import get_session, tls_error, tls_info
from .tls_ffi import ffi, lib
from .transparent import sniff

Buf = bytes | bytearray | memoryview

BUF_SIZE = 1024 * 1024
# Stop decrypting into the buffer when less than a full TLS record would fit.
_BATCH_LIMIT = BUF_SIZE - 16 * 1024 - 256
_BUF = bytearray(BUF_SIZE)
_VIEW = memoryview(_BUF)
_PTR = ffi.from_buffer(_BUF)  # the same buffer for OpenSSL: SSL_read and BIO_write use it
# An app leg whose peer is a stream on a pooled connection reads after room for the frame
# header (mux.HEADER_SIZE), so the frame goes to SSL_write without a copy.
FRAME_ROOM = 8
_FRAMED_VIEW = _VIEW[FRAME_ROOM:]
_FRAMED_SIZE = len(_FRAMED_VIEW)

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

_WANT_READ = tls_ffi.WANT_READ
_ZERO_RETURN = tls_ffi.ZERO_RETURN
_SSL_read = lib.SSL_read
_SSL_write = lib.SSL_write
_SSL_get_error = lib.SSL_get_error
_BIO_write = lib.BIO_write
_BIO_read = lib.BIO_read
_BIO_pending = lib.BIO_get_mem_data  # with NULL: the byte count a memory BIO holds
_NULL = ffi.NULL

# Server legs in their handshake, by SSL*: the verify callback asks their connection about
# the peer's identity (policy, revocation) while OpenSSL can still refuse with an alert.
_VERIFYING: dict[int, NetLeg] = {}


def _decide(ssl_id: int, der: bytes, anchor: bytes | None) -> int:
    leg = _VERIFYING.get(ssl_id)
    return leg.conn.verify_peer(der, anchor) if leg is not None else tls_ffi.X509_V_OK


_VERIFY_CALLBACK = tls_ffi.verify_callback(_decide)
# With federated trust domains: the callback also hands over the root each chain ends at,
# which must belong to the peer's own trust domain (Material.trust).
_VERIFY_DOMAINS_CALLBACK = tls_ffi.verify_callback(_decide, anchor=True)
_from_buffer = ffi.from_buffer


def _owned(data: Buf) -> bytes | bytearray:
    """`data` as something the transport may keep.

    uvloop keeps a reference to the part of a write the kernel did not take, without copying
    it: a view of the shared read buffer would be overwritten by the next read (of any
    connection) before it is sent. One copy per read batch is the price of sharing the buffer.
    A bytearray is passed on as it is: whoever sends one gives it up (held bytes, a merged
    batch), and never touches it again.
    """
    t = type(data)
    return data if t is bytes or t is bytearray else bytes(data)  # type: ignore[return-value]


class LegOwner(Protocol):
    """What the legs report to and read from the connection they carry (proxy.conn.Conn)."""

    active: bool  # set on every read: the idle sweep resets it
    bytes_in: int  # application bytes from the network peer
    bytes_out: int  # application bytes to it

    @property
    def closed(self) -> bool: ...

    @property
    def established(self) -> bool: ...

    @property
    def handshake_timeout(self) -> float: ...

    def net_connected(self, leg: NetLeg) -> bool: ...

    def app_connected(self, leg: AppLeg) -> None: ...

    def sniffed(self, tls: bool, first: bytes) -> None: ...

    def closed_before_hello(self, first: bytes) -> None: ...

    def verify_peer(self, der: bytes, anchor: bytes | None = None) -> int: ...

    def handshake_done(self, leg: NetLeg) -> None: ...

    def handshake_failed(self, exc: BaseException) -> None: ...

    def handshake_timed_out(self) -> None: ...

    def net_failed(self, exc: BaseException) -> None: ...

    def confirm(self) -> None: ...

    def hold_from_app(self, data: bytes) -> bool: ...

    def app_eof(self) -> None: ...

    def net_eof(self) -> None: ...

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None: ...


class _Leg(asyncio.BufferedProtocol):
    """What both legs share: the connection, the transport, and backpressure towards the peer."""

    __slots__ = ("conn", "peer", "read_blocked", "transport", "write_paused")

    def __init__(self, conn: LegOwner) -> None:
        self.conn = conn
        self.peer: _Leg | None = None
        self.transport: asyncio.Transport | None = None
        self.read_blocked = False
        self.write_paused = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    def room(self) -> int:
        """How many bytes the other leg may read for us now (a stream: its window)."""
        return BUF_SIZE

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

    def send_framed(self, n: int) -> None:
        """Send `n` bytes read into the shared buffer after FRAME_ROOM bytes (stream legs)."""
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

    __slots__ = ("framed", "prefix")

    def __init__(self, conn: LegOwner) -> None:
        super().__init__(conn)
        self.framed = False  # the peer is a stream: read after the frame header's room
        # Bytes to write before anything else (the PROXY v2 header), in the same write as
        # the first payload where there is one.
        self.prefix: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.conn.app_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.framed:
            # Read no more than the stream may send now (its window), so a read never
            # overshoots it (what would not fit waits in the stream leg, a copy).
            peer = self.peer
            room = peer.room() if peer is not None else 0
            return _FRAMED_VIEW[:room] if 0 < room < _FRAMED_SIZE else _FRAMED_VIEW
        return _VIEW

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        conn.active = True
        peer = self.peer
        if self.framed:
            if peer is not None:
                peer.send_framed(nbytes)
            return
        if peer is None:
            # Not relaying yet (outbound: the remote is still being dialled, or a PROXY
            # header is still coming). uvloop starts reading after connection_made whatever
            # it did, so the pause at accept does not hold: pause here, keep what was read,
            # and resume once the remote is up.
            if conn.hold_from_app(bytes(_VIEW[:nbytes])):
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
            prefix = self.prefix
            if prefix is not None:
                self.prefix = None
                t.write(prefix + data)
                return
            t.write(_owned(data))

    def flush_prefix(self) -> None:
        """Write the prefix now if no payload came along to carry it."""
        prefix = self.prefix
        t = self.transport
        if prefix is not None and t is not None and not t.is_closing():
            self.prefix = None
            t.write(prefix)

    def send_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            self.flush_prefix()
            t.write_eof()


class NetLeg(_Leg):
    """The leg that crosses the network: TLS (server or client side) or, if allowed, plaintext.

    `ssl` is the connection's SSL* (None before the handshake starts and for plaintext);
    its two memory BIOs are `_bio_in` (ciphertext from the network) and `_bio_out`.
    """

    __slots__ = (
        "_bio_eof",
        "_bio_in",
        "_bio_out",
        "_ctx",
        "_domains",
        "_session",
        "eof_in",
        "eof_out",
        "first",
        "held",
        "on_session",
        "server_side",
        "ssl",
        "state",
        "timer",
    )

    def __init__(
        self,
        conn: LegOwner,
        ctx: Any,
        *,
        server_side: bool,
        session: Any = None,
        on_session: Callable[[Any], None] | None = None,
        domains: bool = False,
    ) -> None:
        """`ctx` is an SSL_CTX* (TlsState.server_ptr/client_ptr), or None for plaintext;
        `session` an SSL_SESSION* to resume (client side), handed over to this leg.
        `domains`: the peer's chain must end at a root of its own trust domain (federation);
        the connection's `verify_peer` gets that root, on the client side too."""
        super().__init__(conn)
        self._domains = domains
        self.server_side = server_side
        self._ctx = ctx
        self._session = session
        self.on_session = on_session
        self.ssl: Any = None
        self._bio_in: Any = None
        self._bio_out: Any = None
        self._bio_eof = False
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
        if self.ssl is not None:
            _BIO_write(self._bio_in, _PTR, nbytes)
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
        if self.ssl is not None:
            # From now on the BIO reports end of stream instead of "retry".
            lib.BIO_set_mem_eof_return(self._bio_in, 0)
            self._bio_eof = True
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
        if self.ssl is not None:
            _VERIFYING.pop(tls_ffi.ssl_id(self.ssl), None)
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
        ssl = tls_ffi.new_ssl(self._ctx)
        self._ctx = None
        bio_in = tls_ffi.new_mem_bio()
        bio_out = tls_ffi.new_mem_bio()
        lib.SSL_set_bio(ssl, bio_in, bio_out)  # the SSL owns both BIOs from here on
        self._bio_in, self._bio_out = bio_in, bio_out
        if self.server_side:
            lib.SSL_set_accept_state(ssl)
            # The peer's identity is judged inside the handshake, so a refusal reaches it as
            # a TLS alert (certificate_revoked, handshake_failure) rather than a bare close.
            tls_ffi.set_verify(ssl, _VERIFY_DOMAINS_CALLBACK if self._domains else _VERIFY_CALLBACK)
            _VERIFYING[tls_ffi.ssl_id(ssl)] = self
        else:
            lib.SSL_set_connect_state(ssl)
            if self._domains:
                tls_ffi.set_verify(ssl, _VERIFY_DOMAINS_CALLBACK)
                _VERIFYING[tls_ffi.ssl_id(ssl)] = self
            session = self._session
            self._session = None
            if session is not None:
                lib.SSL_set_session(ssl, session)  # OpenSSL takes its own reference
        self.ssl = ssl
        if first:
            _BIO_write(bio_in, first, len(first))
        self._handshake_step()

    def _handshake_step(self) -> None:
        ssl = self.ssl
        r = lib.SSL_do_handshake(ssl)
        code = _SSL_get_error(ssl, r) if r != 1 else 0
        if r != 1 and code == _WANT_READ and not self._bio_eof:
            self._flush()
            return
        _VERIFYING.pop(tls_ffi.ssl_id(ssl), None)  # the handshake is over: so is verifying
        if r != 1:
            exc = tls_error(ssl, code)
            self._flush()  # carries our alert to the peer
            self.state = CLOSED
            self.conn.handshake_failed(exc)
            return
        self._flush()
        self._fresh_bios()
        self._handshake_finished()

    def _fresh_bios(self) -> None:
        # A memory BIO keeps the largest buffer it ever held; the handshake's (certificate
        # chains, ML-KEM key shares) would stay with every idle connection: ~5 KB per SSL.
        ssl = self.ssl
        bio_in = self._bio_in
        if not self._bio_eof and not _BIO_pending(bio_in, _NULL):
            bio_in = tls_ffi.new_mem_bio()
        bio_out = tls_ffi.new_mem_bio()  # empty: just flushed
        lib.SSL_set_bio(ssl, bio_in, bio_out)  # frees the BIOs it replaces
        self._bio_in, self._bio_out = bio_in, bio_out

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

    # --- facts about the TLS session ----------------------------------------------------

    def alpn(self) -> bytes:
        """The ALPN protocol agreed on (b'' for none, or plaintext)."""
        return tls_ffi.alpn_selected(self.ssl) if self.ssl is not None else b""

    def write_ptr(self, ptr: Any, n: int) -> Exception | None:
        """Encrypt `n` bytes at `ptr` and send them (a pooled connection's frames); the
        TLS error if that failed."""
        t = self.transport
        if t is None or t.is_closing() or self.eof_out:
            return None
        ssl = self.ssl
        r = _SSL_write(ssl, ptr, n)
        if r <= 0:
            return tls_error(ssl, _SSL_get_error(ssl, r))
        self._flush()
        return None

    def resumed(self) -> bool:
        """Was this TLS connection resumed from a session ticket?"""
        return self.ssl is not None and bool(lib.SSL_session_reused(self.ssl))

    def tls_info(self) -> tuple[str, str, str] | None:
        """(version, cipher, key-exchange group) once TLS is up; None for plaintext."""
        return tls_info(self.ssl) if self.ssl is not None else None

    def peer_der(self) -> bytes | None:
        """The DER of the peer's certificate (None for plaintext or no certificate)."""
        return tls_ffi.peer_der(self.ssl) if self.ssl is not None else None

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
        if self.eof_in and self.ssl is None:
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
        if self.ssl is not None:
            self._pump_in()

    def _pump_in(self) -> None:
        """Decrypt what the incoming BIO holds and hand it to the app leg, until blocked."""
        ssl = self.ssl
        bio_in = self._bio_in
        peer = self.peer
        conn = self.conn
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
                n = _SSL_read(ssl, _PTR + filled, BUF_SIZE - filled)
                if n <= 0:
                    code = _SSL_get_error(ssl, n)
                    if code == _WANT_READ and not self._bio_eof:
                        break
                    if code != _ZERO_RETURN:
                        exc = tls_error(ssl, code)
                        if not exc.eof:
                            self._flush()
                            conn.net_failed(exc)
                            return
                        # TCP FIN without close_notify: treat as end of stream
                    eof = True
                    break
                filled += n
                if not self._bio_eof and not _BIO_pending(bio_in, _NULL):
                    break  # all consumed: skip the SSL_ERROR_WANT_READ a further read would give
            if filled:
                conn.bytes_in += filled
                if not conn.established:
                    conn.confirm()  # outbound: the remote's first byte says it accepted us
                peer.send(_VIEW[:filled])
                self._got_session()
            if eof:
                self.eof_in = True
                self._got_session()
                self._flush()
                conn.net_eof()
                return
            if filled <= _BATCH_LIMIT:
                break  # the BIO holds no complete record
        self._flush()

    def _got_session(self) -> None:
        on_session = self.on_session
        if on_session is not None:
            # The ticket arrives after the handshake, before the first application data.
            self.on_session = None
            on_session(get_session(self.ssl))

    def send(self, data: Buf) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.eof_out:
            return
        n = len(data)
        self.conn.bytes_out += n
        ssl = self.ssl
        if ssl is None:
            t.write(_owned(data))
            return
        if not n:
            return
        r = _SSL_write(ssl, _from_buffer(data), n)
        if r <= 0:
            self.conn.net_failed(tls_error(ssl, _SSL_get_error(ssl, r)))
            return
        self._flush()

    def send_eof(self) -> None:
        """Half-close towards the network peer: close_notify (TLS), then TCP FIN."""
        t = self.transport
        if t is None or t.is_closing() or self.eof_out:
            return
        self.eof_out = True
        ssl = self.ssl
        if ssl is not None:
            self._hold_pending()
            if lib.SSL_shutdown(ssl) < 0:
                tls_ffi.errors()  # nothing to report: the peer may be gone already
            self._flush()
        if t.can_write_eof():
            t.write_eof()
        if self.held and self.state == OPEN and not self.read_blocked:
            self._pump_in()

    def _hold_pending(self) -> None:
        # SSL_shutdown discards application records it finds while looking for the peer's
        # close_notify, so decrypt whatever complete records are waiting first.
        ssl = self.ssl
        while not self.eof_in and _BIO_pending(self._bio_in, _NULL):
            n = _SSL_read(ssl, _PTR, BUF_SIZE)
            if n <= 0:
                if _SSL_get_error(ssl, n) != _WANT_READ:
                    tls_ffi.errors()  # reported by the next read, if it persists
                break
            if self.held is None:
                self.held = bytearray()
            self.held += _VIEW[:n]

    def _flush(self) -> None:
        out = self._bio_out
        if out is None:
            return
        n = _BIO_pending(out, _NULL)
        if not n:
            return
        # A fresh buffer the transport may keep (see `_owned`); one copy out of OpenSSL.
        data = bytearray(n)
        _BIO_read(out, _from_buffer(data), n)
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self, abort: bool = False) -> None:
        ssl = self.ssl
        if ssl is not None:
            _VERIFYING.pop(tls_ffi.ssl_id(ssl), None)
        if ssl is not None and not self.server_side and not self.eof_out:
            # Freed without close_notify, OpenSSL would flag the session as not resumable;
            # it may be the one the next connection resumes with. Nothing goes on the wire.
            lib.SSL_set_shutdown(ssl, tls_ffi.SENT_SHUTDOWN)
        super().close(abort)
