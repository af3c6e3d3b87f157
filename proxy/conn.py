"""One proxied connection from accept to close: its flow, its counters and its log line."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import TYPE_CHECKING

from .errors import PolicyDenied
from .identity import spiffe_id_from_der
from .metrics import handshake_counter
from .relay import AppLeg, NetLeg, _Leg
from .routes import Route
from .tls import classify_tls_error, speaks_no_tls

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("mtls.conn")


def _addr(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), peername[1]
        # Dual-stack listeners (transparent mode) see IPv4 peers as ::ffff:a.b.c.d; log them
        # as the IPv4 address people know them by.
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peername)


def _connect_reason(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "connect_timeout", "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused", "connection refused"
    if isinstance(exc, socket.gaierror):
        return "dns", f"name resolution failed ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EADDRNOTAVAIL,
    ):
        return "unreachable", exc.strerror or str(exc)
    if isinstance(exc, OSError):
        return "other", exc.strerror or str(exc)
    return "other", repr(exc)


class Conn:
    """State shared by the two legs of one proxied connection."""

    __slots__ = (
        "active",
        "app",
        "app_eof_seen",
        "bytes_in",
        "bytes_out",
        "closed",
        "established",
        "flushed_in",
        "flushed_out",
        "handshake_timeout",
        "held_app",
        "hs_started",
        "idle_ticks",
        "net",
        "net_eof_seen",
        "peer_addr",
        "peer_identity",
        "route",
        "security",
        "started",
        "target",
        "task",
        "worker",
    )

    def __init__(self, worker: Worker, route: Route) -> None:
        self.worker = worker
        self.route = route
        self.net: NetLeg | None = None
        self.app: AppLeg | None = None
        self.peer_addr = "?"
        self.target: tuple[str, int] | None = route.target
        self.security = "mtls"
        self.peer_identity: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.flushed_in = 0
        self.flushed_out = 0
        self.established = False
        self.closed = False
        self.active = True
        self.idle_ticks = 0
        self.net_eof_seen = False
        self.app_eof_seen = False
        self.started = worker.loop.time()
        self.hs_started = self.started
        self.held_app: bytearray | None = None
        self.task: asyncio.Task[None] | None = None
        self.handshake_timeout = worker.handshake_timeout

    # --- called by the legs -------------------------------------------------------------

    def app_connected(self, leg: AppLeg) -> None:
        raise NotImplementedError

    def net_connected(self, leg: NetLeg) -> bool:
        raise NotImplementedError

    def handshake_done(self, leg: NetLeg) -> None:
        raise NotImplementedError

    def plaintext_hello(self, first: bytes) -> None:
        raise NotImplementedError

    def hold_from_app(self, data: bytes) -> None:
        if self.held_app is None:
            self.held_app = bytearray()
        self.held_app += data

    def closed_before_hello(self, first: bytes) -> None:
        if first:
            self.reject("not_tls", f"peer {self.peer_addr} sent {len(first)} byte(s) and closed")
        else:
            # A TCP connect-and-close (port probe, load balancer check): nothing to count.
            log.debug("peer %s closed before sending anything", self.peer_addr)
            self.finish("closed_before_hello", abort=False)

    def handshake_failed(self, exc: BaseException) -> None:
        who = self._who()
        reason, message = classify_tls_error(exc, who)
        self.reject(reason, message)

    def handshake_timed_out(self) -> None:
        self.reject(
            "handshake_timeout",
            f"{self._who()} did not complete the TLS handshake within {self.handshake_timeout:g}s",
        )

    def net_failed(self, exc: BaseException) -> None:
        reason, message = classify_tls_error(exc, self._who())
        if not self.established or self.bytes_in == 0:
            # With TLS 1.3 a server checks our certificate after our side of the handshake
            # is done: its refusal arrives as an alert before any data. Count it as such.
            self.reject(reason, message)
            return
        # The handshake sentence ("refused our certificate"...) would mislead here: say what
        # OpenSSL saw on the open connection.
        detail = getattr(exc, "reason", None) or exc
        log.warning(
            "TLS error on an open connection with %s: %s",
            self._who(),
            str(detail).lower().replace("_", " "),
            extra={"fields": {"route": self.route.name, "reason": reason}},
        )
        self.finish(f"tls_error:{reason}", abort=True)

    def app_eof(self) -> None:
        self.app_eof_seen = True
        if self.established and self.net is not None:
            self.net.send_eof()
            self._check_done()
        # else: carried across once the network leg is up (OutboundConn.handshake_done)

    def net_eof(self) -> None:
        self.net_eof_seen = True
        if self.app is not None:
            self.app.send_eof()
        self._check_done()

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        if self.closed or (leg is not self.net and leg is not self.app):
            return  # already finished, or a leg we let go (plaintext fallback)
        if exc is not None:
            side = "app" if leg is self.app else "peer"
            self.finish(f"{side}_reset", abort=True)
        else:
            self.finish("ok" if self.net_eof_seen or self.app_eof_seen else "closed", abort=False)

    # --- shared steps --------------------------------------------------------------------

    def _who(self) -> str:
        if self.route.direction == "inbound":
            return f"peer {self.peer_addr}"
        host, port = self.target or ("?", 0)
        return f"remote {host}:{port}"

    def _check_done(self) -> None:
        if self.net_eof_seen and self.app_eof_seen and not self.closed:
            self.finish("ok", abort=False)

    def _link(self) -> None:
        net, app = self.net, self.app
        assert net is not None and app is not None
        net.peer = app
        app.peer = net

    def mark_established(self) -> None:
        self.established = True
        m = self.route.metrics
        m.connections[self.security].inc()
        m.active.inc()
        if self.security == "mtls":
            m.handshake.observe(self.worker.loop.time() - self.hs_started)
            net = self.net
            info = net.tls_info() if net is not None else None
            if info is not None:
                assert net is not None
                handshake_counter(self.route.direction, info[2], net.resumed()).inc()
            self.worker.count_peer(self.route.direction, self.peer_identity)

    def reject(self, reason: str, message: str) -> None:
        """Refuse the connection: one counter, one log line, a clean close."""
        if self.closed:
            return
        self.route.metrics.rejected(reason).inc()
        log.warning(
            "rejected: %s",
            message,
            extra={
                "fields": {
                    "event": "rejected",
                    "direction": self.route.direction,
                    "route": self.route.name,
                    "reason": reason,
                    "peer": self.peer_addr,
                    "peer_identity": self.peer_identity,
                }
            },
        )
        self.finish(f"rejected:{reason}", abort=False, logged=True)

    def upstream_failed(self, exc: BaseException) -> None:
        if self.closed:
            return
        reason, text = _connect_reason(exc)
        self.route.metrics.upstream_failure(reason).inc()
        host, port = self.target or ("?", 0)
        what = "the app" if self.route.direction == "inbound" else "the remote"
        log.warning(
            "cannot reach %s at %s:%s: %s",
            what,
            host,
            port,
            text,
            extra={
                "fields": {
                    "event": "upstream_failed",
                    "direction": self.route.direction,
                    "route": self.route.name,
                    "reason": reason,
                    "peer": self.peer_addr,
                }
            },
        )
        self.finish(f"upstream_failed:{reason}", abort=False, logged=True)

    def flush_bytes(self) -> None:
        """Add the bytes relayed since the last flush to the counters."""
        din = self.bytes_in - self.flushed_in
        dout = self.bytes_out - self.flushed_out
        if din or dout:
            b = self.route.metrics.bytes
            sec = self.security
            if din:
                b[(sec, "in")].inc(din)
                self.flushed_in = self.bytes_in
            if dout:
                b[(sec, "out")].inc(dout)
                self.flushed_out = self.bytes_out

    def _tls_fields(self) -> dict[str, object]:
        net = self.net
        info = net.tls_info() if net is not None and self.established else None
        if info is None:
            return {"tls_version": None, "tls_cipher": None, "tls_group": None, "tls_resumed": None}
        assert net is not None
        version, cipher, group = info
        return {
            "tls_version": version,
            "tls_cipher": cipher,
            "tls_group": group,
            "tls_resumed": net.resumed(),
        }

    def finish(self, outcome: str, *, abort: bool, logged: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for leg in (self.net, self.app):
            if leg is not None:
                leg.close(abort=abort)
        self.flush_bytes()
        if self.established:
            self.route.metrics.active.dec()
        self.worker.forget(self)
        if not logged and log.isEnabledFor(logging.INFO):
            log.info(
                "connection closed",
                extra={
                    "fields": {
                        "event": "conn_closed",
                        "direction": self.route.direction,
                        "route": self.route.name,
                        "security": self.security,
                        "peer": self.peer_addr,
                        "peer_identity": self.peer_identity,
                        "target": f"{self.target[0]}:{self.target[1]}" if self.target else None,
                        "bytes_in": self.bytes_in,
                        "bytes_out": self.bytes_out,
                        "duration_ms": round((self.worker.loop.time() - self.started) * 1000, 1),
                        **self._tls_fields(),
                        "outcome": outcome,
                    }
                },
            )
        # Break the conn <-> legs <-> peer cycles, so the memory goes back now rather than
        # at the cyclic garbage collector's next full pass.
        for leg in (self.net, self.app):
            if leg is not None:
                leg.peer = None
        self.net = self.app = None
        self.task = None


class InboundConn(Conn):
    """mTLS (or, if allowed, plaintext) from the network, forwarded as plaintext to the app."""

    __slots__ = ()

    def net_connected(self, leg: NetLeg) -> bool:
        assert leg.transport is not None
        self.peer_addr = _addr(leg.transport.get_extra_info("peername"))
        if self.route.transparent:
            self.target = self.worker.inbound_target(leg.transport)
            if self.target is None:
                self.reject("loop_detected", f"peer {self.peer_addr}: no original destination")
                return False
        return self.worker.admit(self)

    def plaintext_hello(self, first: bytes) -> None:
        mode = self.route.mode
        if mode == "strict":
            preview = first[:16].decode("ascii", "replace")
            self.reject(
                "not_tls",
                f"peer {self.peer_addr} sent plaintext ({preview!r}...) to an mTLS-only port",
            )
            return
        self.security = "plaintext"
        if mode == "audit":
            log.warning(
                "plaintext connection from %s accepted (audit mode): it would be rejected "
                "in strict mode",
                self.peer_addr,
                extra={
                    "fields": {
                        "event": "audit_plaintext",
                        "direction": self.route.direction,
                        "route": self.route.name,
                        "peer": self.peer_addr,
                    }
                },
            )
        assert self.net is not None
        self.net.accept_plaintext(first)
        self._dial_app()

    def handshake_done(self, leg: NetLeg) -> None:
        der = leg.peer_der()
        sid = spiffe_id_from_der(der) if der else None
        self.peer_identity = str(sid) if sid is not None else None
        try:
            self.worker.policy.check(sid)
        except PolicyDenied as exc:
            self.reject(exc.reason, f"peer {self.peer_addr}: {exc}")
            return
        self._dial_app()

    def _dial_app(self) -> None:
        self.task = self.worker.spawn(self._connect_app(), "dial-app")

    async def _connect_app(self) -> None:
        assert self.target is not None
        host, port = self.target
        loop = self.worker.loop
        try:
            async with asyncio.timeout(self.worker.connect_timeout):
                await loop.create_connection(lambda: AppLeg(self), host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.upstream_failed(exc)

    def app_connected(self, leg: AppLeg) -> None:
        if self.closed:
            leg.close(abort=True)
            return
        self.app = leg
        self._link()
        self.mark_established()
        assert self.net is not None
        self.net.start()


class OutboundConn(Conn):
    """Plaintext from the local app, carried to the remote over mTLS."""

    __slots__ = ()

    def app_connected(self, leg: AppLeg) -> None:
        assert leg.transport is not None
        self.app = leg
        self.peer_addr = _addr(leg.transport.get_extra_info("peername"))
        if self.route.transparent:
            self.target = self.worker.outbound_target(leg.transport)
            if self.target is None:
                self.reject(
                    "loop_detected",
                    f"app {self.peer_addr}: original destination is this sidecar",
                )
                return
        if not self.worker.admit(self):
            return
        leg.pause_reading()
        self.task = self.worker.spawn(self._dial(), "dial-remote")

    async def _dial(self) -> None:
        assert self.target is not None
        host, port = self.target
        worker = self.worker
        plaintext = self.route.mode == "permissive" and worker.knows_plaintext(self.target)
        tls = worker.tls
        ctx = None if plaintext else tls.client_ptr
        cache = tls.sessions
        key = f"{host}:{port}"
        if plaintext:
            self.security = "plaintext"
        self.hs_started = worker.loop.time()

        def factory() -> NetLeg:
            return NetLeg(
                self,
                ctx,
                server_side=False,
                session=cache.get(key) if ctx is not None else None,
                # Each connection leaves its newest ticket for the next ones.
                on_session=(lambda s: cache.put(key, s)) if ctx is not None else None,
            )

        try:
            async with asyncio.timeout(worker.connect_timeout):
                await worker.loop.create_connection(factory, host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.upstream_failed(exc)

    def net_connected(self, leg: NetLeg) -> bool:
        return not self.closed

    def handshake_failed(self, exc: BaseException) -> None:
        target = self.target
        if target is not None:
            self.worker.tls.sessions.drop(f"{target[0]}:{target[1]}")
        if (
            target is not None
            and self.route.mode == "permissive"
            and self.security == "mtls"
            and speaks_no_tls(exc)
        ):
            # Permissive outbound: the destination has no sidecar. Remember it for a while
            # and carry this connection in plaintext; the app leg has not been read yet.
            log.warning(
                "remote %s:%s does not speak mTLS: falling back to plaintext (permissive mode)",
                target[0],
                target[1],
                extra={
                    "fields": {
                        "event": "plaintext_fallback",
                        "direction": self.route.direction,
                        "route": self.route.name,
                        "peer": self.peer_addr,
                        "target": f"{target[0]}:{target[1]}",
                    }
                },
            )
            self.worker.remember_plaintext(target)
            old, self.net = self.net, None
            if old is not None:
                old.close(abort=True)
            self.task = self.worker.spawn(self._dial(), "dial-remote-plaintext")
            return
        super().handshake_failed(exc)

    def handshake_done(self, leg: NetLeg) -> None:
        if leg.ssl is not None:
            der = leg.peer_der()
            sid = spiffe_id_from_der(der) if der else None
            self.peer_identity = str(sid) if sid is not None else None
            try:
                self.worker.check_remote(sid, self.route.expected_peer)
            except PolicyDenied as exc:
                self.reject(exc.reason, f"{self._who()}: {exc}")
                return
        self._link()
        self.mark_established()
        leg.start()
        app = self.app
        assert app is not None
        held = self.held_app
        if held:
            self.held_app = None
            leg.send(held)
        if self.app_eof_seen:
            leg.send_eof()  # the app half-closed while the remote was being dialled
            self._check_done()
        else:
            app.resume_reading()

    def plaintext_hello(self, first: bytes) -> None:  # never called on a client leg
        raise AssertionError("client legs do not sniff")
