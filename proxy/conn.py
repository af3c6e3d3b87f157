"""One proxied connection: carries out its flow's actions with the relay's two legs.

The decisions live in `flow.Flow` (pure); this module turns what the legs report into flow
events, and the flow's actions into I/O: dials, TLS start, relaying, half-close, counters and
the one log line per connection. Bytes on an open connection go leg to leg (relay.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Protocol

from prometheus_client import Counter

from . import flow as f
from . import mux
from .errors import PolicyDenied
from .hbone import ALPN as HBONE_ALPN
from .hbone_io import HboneCarrier, HboneStream
from .identity import SpiffeId, spiffe_id_from_der
from .logs import RateLimit
from .metrics import handshake_counter
from .policyfile import Decision, destination_deny_message
from .pool import FOREIGN_TTL, Carrier, Key, Pool, StreamLeg
from .proxyproto import CallerInfo, HeaderReader, ProxyHeaderError, caller_from_tls, caller_header
from .relay import AppLeg, NetLeg, _Leg
from .revocation import PeerCert, RevocationList, is_peer_revoked, peer_cert
from .routes import Route
from .tls import TlsState, alert_name, classify_tls_error, speaks_no_tls
from .tls_ffi import (
    X509_V_ERR_APPLICATION_VERIFICATION,
    X509_V_ERR_CERT_REJECTED,
    X509_V_ERR_CERT_REVOKED,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    X509_V_OK,
)

log = logging.getLogger("mtls.conn")
# The network legs that are streams on a carrier (ours, or HBONE): no handshake of their own.
_STREAMS = (StreamLeg, HboneStream)
_OVERLOAD_LOG = RateLimit(1.0)
# Refused streams cost a peer a few bytes each: one line a second per reason says it.
_STREAM_REFUSAL_LOG: dict[f.Reason, RateLimit] = {}

# How a refusal of a stream reaches the dialling sidecar (RESET codes), and back.
_RESET_FOR: dict[f.Reason, int] = {
    f.Reason.PEER_NOT_ALLOWED: mux.RESET_NOT_ALLOWED,
    f.Reason.IDENTITY_MISMATCH: mux.RESET_NOT_ALLOWED,
    f.Reason.NO_CLIENT_CERT: mux.RESET_NOT_ALLOWED,
    f.Reason.REVOKED: mux.RESET_REVOKED,
    f.Reason.EXPIRED_CERT: mux.RESET_EXPIRED,
    f.Reason.TOO_MANY_CONNECTIONS: mux.RESET_LIMIT,
    f.Reason.BAD_DESTINATION: mux.RESET_BAD_DESTINATION,
    f.Reason.LOOP_DETECTED: mux.RESET_BAD_DESTINATION,
    f.Reason.GOING_AWAY: mux.RESET_GOING_AWAY,
}
_REFUSED_AS: dict[int, tuple[f.Reason, str]] = {
    mux.RESET_NOT_ALLOWED: (f.Reason.PEER_NOT_ALLOWED, "refused our identity"),
    mux.RESET_REVOKED: (f.Reason.REVOKED, "says our certificate is revoked"),
    mux.RESET_EXPIRED: (f.Reason.EXPIRED_CERT, "says our certificate expired"),
    mux.RESET_LIMIT: (f.Reason.TOO_MANY_CONNECTIONS, "is at its connection limit"),
    mux.RESET_BAD_DESTINATION: (f.Reason.BAD_DESTINATION, "refused the destination"),
    mux.RESET_GOING_AWAY: (f.Reason.GOING_AWAY, "had told us to go away (GOAWAY)"),
}


class ConnHost(Protocol):
    """What a connection needs from the worker that serves it."""

    loop: asyncio.AbstractEventLoop
    connect_timeout: float
    tls: TlsState
    revocations: RevocationList | None
    pool: Pool | None  # outbound pooled connections (None: MTLS_CONNECTION_REUSE=false)
    hbone_pool: Pool  # outbound HBONE connections (MTLS_HBONE_OUTBOUND)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...

    def admit(self, conn: Conn) -> str | None:
        """Take the connection in (None), or say why not (the limit, in words)."""
        ...

    def forget(self, conn: Conn) -> None: ...

    def count_peer(
        self, direction: str, identity: str | None, group: str | None
    ) -> tuple[Counter, Counter]:
        """Count one accepted mTLS connection of this peer, and its key-exchange `group`
        (None: not known); its (bytes in, bytes out) counters."""
        ...

    def count_peer_rejection(self, direction: str, identity: str, reason: str) -> None:
        """Count one refusal of this identified peer."""
        ...

    def peer_check(
        self,
        route: Route,
        peername: tuple[str, int] | None = None,
        called: tuple[str, int] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
        target: tuple[str, int] | None = None,
        judged: Decision | None = None,
    ) -> f.PeerCheck:
        """The identity policy for a new connection on `route` (the current trust domain);
        with MTLS_POLICY_FILE, judged for the caller `peername` having dialled `called`
        (outbound: going to `target`, whose destination verdict was `judged`), and each
        verdict told to `on_decision`."""
        ...

    def judge_destination(
        self, route: Route, target: tuple[str, int], called: tuple[str, int] | None
    ) -> Decision | None:
        """Outbound, before dialling: the policy file's verdict on `target` (None: none)."""
        ...

    def policy_route(self, route: Route, called: tuple[str, int] | None) -> str:
        """The policy file's name for the route of a connection that dialled `called`."""
        ...

    def original_target(
        self, route: Route, transport: asyncio.BaseTransport
    ) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """Transparent mode: (where to dial, the original destination), or None (a loop)."""
        ...

    def knows_plaintext(self, target: tuple[str, int]) -> bool: ...

    def new_carrier(
        self,
        leg: NetLeg,
        route: Route,
        *,
        peer_id: SpiffeId | None,
        peer_facts: PeerCert | None,
        peername: tuple[str, int] | None,
        called: tuple[str, int] | None,
        key: Key | None,
    ) -> Carrier:
        """Make `leg`, which negotiated connection reuse, a pooled connection."""
        ...

    def new_hbone_carrier(
        self,
        leg: NetLeg,
        route: Route,
        *,
        peer_id: SpiffeId | None,
        peer_facts: PeerCert | None,
        peername: tuple[str, int] | None,
        called: tuple[str, int] | None,
        outbound: bool = False,
        key: Key | None = None,
    ) -> HboneCarrier:
        """Make `leg` an HBONE connection: accepted on the HBONE listener, or dialled."""
        ...

    def stream_destination(
        self, dst: tuple[str, int]
    ) -> tuple[tuple[str, int] | None, tuple[f.Reason, str] | None]:
        """Transparent inbound: where a stream naming `dst` goes (our app on loopback), or
        why it may not go there."""
        ...

    def remember_plaintext(self, target: tuple[str, int]) -> None: ...


def _addr(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), peername[1]
        # Dual-stack listeners (transparent mode) see IPv4 peers as ::ffff:a.b.c.d; log them
        # as the IPv4 address people know them by.
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peername)


def connect_reason(exc: BaseException) -> tuple[str, str]:
    """(metric reason, words) for a failed dial."""
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
    """The two legs of one proxied connection, its flow, its byte counts and its log line."""

    __slots__ = (
        "active",
        "app",
        "bytes_in",
        "bytes_out",
        "called",
        "closed",
        "denied",
        "established",
        "flow",
        "flushed_in",
        "flushed_out",
        "handshake_timeout",
        "hbone_dial",
        "header",
        "header_timer",
        "held_app",
        "host",
        "hs_done",
        "hs_started",
        "idle_ticks",
        "net",
        "peer_bytes",
        "peer_cert",
        "peername",
        "policy",
        "pool_key",
        "proxied_by",
        "route",
        "started",
        "task",
        "tls",
    )

    def __init__(self, host: ConnHost, route: Route) -> None:
        self.host = host
        self.route = route
        self.flow = f.Flow(route.flow_config, host.peer_check(route))
        self.tls = host.tls  # the identity this connection began with, kept to its end
        self.net: NetLeg | StreamLeg | HboneStream | None = None
        self.app: AppLeg | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.flushed_in = 0
        self.flushed_out = 0
        self.peer_bytes: tuple[Counter, Counter] | None = None
        self.established = False
        self.closed = False
        self.active = True
        self.idle_ticks = 0
        self.started = host.loop.time()
        self.hs_started = self.started
        self.hs_done = 0.0  # when relaying began (0: not yet)
        self.held_app: bytearray | None = None
        self.task: asyncio.Task[None] | None = None
        self.handshake_timeout = route.flow_config.handshake_timeout
        self.peername: tuple[str, int] | None = None  # the caller, as an address
        self.called: tuple[str, int] | None = None  # the address it called
        self.header: HeaderReader | None = None  # outbound: reading a PROXY v2 header
        self.header_timer: asyncio.TimerHandle | None = None
        self.proxied_by: str | None = None  # the load balancer that sent the PROXY header
        self.peer_cert: PeerCert | None = None  # for revocation checks while open
        self.denied: tuple[f.Reason, str] | None = None  # refused inside the handshake
        self.pool_key: Key | None = None  # outbound: dialling a pooled connection for this
        self.hbone_dial = False  # outbound: dialling an HBONE connection (then pool_key's pool)
        self.policy: Decision | None = None  # inbound, MTLS_POLICY_FILE: the last verdict

    # --- what the legs report ----------------------------------------------------------

    @property
    def peer_addr(self) -> str:
        return self.flow.peer

    @property
    def peer_identity(self) -> str | None:
        sid = self.flow.peer_id
        return str(sid) if sid is not None else None

    @property
    def security(self) -> str:
        return str(self.flow.security)

    @property
    def target(self) -> tuple[str, int] | None:
        return self.flow.target

    def net_connected(self, leg: NetLeg) -> bool:
        """The network leg's transport is up; False if the connection is already over."""
        if self.closed:
            return False
        self.net = leg
        if self.route.direction == "inbound":
            assert leg.transport is not None
            self._accept(leg.transport)
        else:
            self.hs_started = self.host.loop.time()
            self._run(f.Dialled())
        return not self.closed

    def app_connected(self, leg: AppLeg) -> None:
        """The app leg's transport is up: accepted (outbound) or dialled (inbound)."""
        if self.route.direction == "outbound":
            self.app = leg
            assert leg.transport is not None
            if self.route.accept_proxy:
                # Behind a load balancer: the caller's address comes first, in a PROXY v2
                # header, within the handshake timeout.
                self.header = HeaderReader()
                self.header_timer = self.host.loop.call_later(
                    self.handshake_timeout, self._header_timed_out
                )
                return
            self._accept(leg.transport)
            return
        if self.closed:
            leg.close(abort=True)
            return
        self.app = leg
        if self.route.proxy_protocol:
            assert self.net is not None
            try:
                leg.prefix = self._proxy_header(self.net)
            except ValueError as exc:
                self._run(
                    f.ProxyHeaderFailed(
                        f.Reason.OTHER, f"cannot write the PROXY header for {self.peer_addr}: {exc}"
                    )
                )
                return
        self._run(f.Dialled())

    def _proxy_header(self, net: NetLeg | StreamLeg | HboneStream) -> bytes:
        """The PROXY v2 header telling the app who called: address, TLS facts, SPIFFE ID."""
        route = self.route
        src = self.peername or ("0.0.0.0", 0)
        if isinstance(net, HboneStream) and net.forwarded is not None:
            src = net.forwarded  # the caller behind the HBONE client (`forwarded: for=`)
        dst = self.called or ("0.0.0.0", 0)
        info = net.tls_info() if self.flow.security is f.Security.MTLS else None
        if info is None:
            caller = CallerInfo(None)  # plaintext (permissive/audit): no SSL TLV
        else:
            caller = caller_from_tls(
                verified=True,
                version=info[0],
                cipher=info[1],
                peer_der=net.peer_der(),
                own_der=self.tls.material.leaf_der,
                resumed=net.resumed(),
            )
        return caller_header(src, dst, caller, id_tlv=route.proxy_id_tlv, crc=route.proxy_crc)

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.header is not None:
            self.header = None
            self._run(
                f.ProxyHeaderFailed(
                    f.Reason.BAD_PROXY_HEADER,
                    f"{self._who_sent_header()} sent no complete PROXY v2 header within "
                    f"{self.handshake_timeout:g}s",
                )
            )

    def _who_sent_header(self) -> str:
        t = self.app.transport if self.app is not None else None
        return _addr(t.get_extra_info("peername")) if t is not None else "?"

    def _accept(
        self, transport: asyncio.BaseTransport, caller: tuple[str, int] | None = None
    ) -> None:
        route = self.route
        raw = transport.get_extra_info("peername")
        self.peername = caller or (
            (str(raw[0]), int(raw[1])) if isinstance(raw, tuple) and len(raw) >= 2 else None
        )
        peer = _addr(self.peername) if self.peername is not None else _addr(raw)
        target = route.target
        if route.transparent:
            found = self.host.original_target(route, transport)
            target, self.called = found if found is not None else (None, None)
        else:
            local = transport.get_extra_info("sockname")
            if isinstance(local, tuple) and len(local) >= 2:
                self.called = (str(local[0]), int(local[1]))
        forbidden = self._judge_by_policy(target)
        refused = self.host.admit(self) if target is not None else None
        plaintext_known = (
            target is not None
            and route.direction == "outbound"
            and route.mode == "permissive"
            and self.host.knows_plaintext(target)
        )
        self._run(
            f.Accepted(
                peer,
                target,
                admitted=refused is None,
                plaintext_known=plaintext_known,
                limit_note=refused or "",
                forbidden=forbidden,
            )
        )

    def stream_accepted(
        self, stream: StreamLeg | HboneStream, forbidden: tuple[f.Reason, str] | None = None
    ) -> None:
        """Inbound: a stream on a pooled connection carries a new app connection; it is
        judged like a connection of its own (policy, revocation, destination) but has no
        handshake of its own. `forbidden`: refused already (an HBONE stream's authority)."""
        self.net = stream
        carrier = stream.carrier
        route = self.route
        self.peername = carrier.peername
        peer = _addr(self.peername) if self.peername is not None else "?"
        target = route.target
        if forbidden is not None:
            self.called = stream.info.dst
        elif route.transparent:
            target, forbidden = self.host.stream_destination(stream.info.dst)
            self.called = stream.info.dst
        elif isinstance(stream, HboneStream):
            self.called = stream.info.dst  # the authority it named, an address of ours
        else:
            self.called = carrier.called
        self._judge_by_policy()
        if carrier.going_away(self.host.loop.time()):
            forbidden = (
                f.Reason.GOING_AWAY,
                f"peer {peer} opened a stream on a pooled connection we had told to go away "
                "(GOAWAY)",
            )
        refused = self.host.admit(self) if target is not None else None
        self._run(
            f.Accepted(
                peer,
                target,
                admitted=refused is None,
                limit_note=refused or "",
                forbidden=forbidden,
            )
        )
        if not self.closed:
            self.sniffed(True, b"")

    def _judge_by_policy(
        self, target: tuple[str, int] | None = None
    ) -> tuple[f.Reason, str] | None:
        """Inbound: judge the peer for where it came from and what it dialled (known now).
        Outbound (`target` known): judge the destination before dialling, and the remote's
        identity once the handshake is done; why it may not go there (None: it may)."""
        if self.route.direction == "inbound":
            self.flow.check_peer = self.host.peer_check(
                self.route, self.peername, self.called, self._decided
            )
            return None
        if target is None:
            return None
        judged = self.host.judge_destination(self.route, target, self.called)
        self.policy = judged
        self.flow.check_peer = self.host.peer_check(
            self.route, self.peername, self.called, self._decided, target, judged
        )
        if judged is None or not judged.enforced_deny:
            return None
        name = self.host.policy_route(self.route, self.called)
        return f.Reason.POLICY_DENIED, destination_deny_message(name, target, judged)

    def _decided(self, decision: Decision) -> None:
        self.policy = decision

    def policy_changed(self) -> bool:
        """A new policy file is in force; judge this connection again (its handshake, if
        still going, by the new policy too). True when it is cut for that."""
        if self.closed:
            return False
        if self.route.direction == "inbound":
            self._judge_by_policy()
            peer = self.flow.peer_id
            if peer is None or self.flow.state not in (f.State.DIALING, f.State.OPEN):
                return False  # not judged yet (the handshake's end judges it), or plaintext
        else:
            target = self.target
            if target is None or self.flow.state is f.State.NEW:
                return False  # not judged yet
            denied = self._judge_by_policy(target)
            if denied is not None:
                return self._cut_by_policy(denied[1])
            peer = self.flow.peer_id
            if peer is None or self.flow.state is not f.State.OPEN:
                return False  # the handshake's end judges it, or plaintext (by destination)
        try:
            self.flow.check_peer(peer)
        except PolicyDenied as exc:
            return self._cut_by_policy(str(exc))
        return False

    def _cut_by_policy(self, why: str) -> bool:
        if self.flow.state is f.State.OPEN:
            self._count_rejection(f.Reason.POLICY_CHANGED)
        self._run(f.PolicyChanged(f"{why} (the policy changed)"))
        return True

    def sniffed(self, tls: bool, first: bytes) -> None:
        """Inbound: the first bytes said TLS or not."""
        self._run(f.Sniffed(tls, first[:16]), first)

    def closed_before_hello(self, first: bytes) -> None:
        self._run(f.ClosedBeforeHello(len(first)))

    def handshake_done(self, leg: NetLeg | StreamLeg | HboneStream) -> None:
        sid: SpiffeId | None
        if isinstance(leg, _STREAMS):
            # The carrier's peer, parsed once for all its streams.
            sid, facts = leg.carrier.peer_id, leg.carrier.peer_facts
        else:
            der = leg.peer_der()
            sid = spiffe_id_from_der(der) if der else None
            facts = peer_cert(der) if der else None
        resumed = leg.resumed()
        self.peer_cert = facts
        expired = None
        if facts is not None and facts.not_after <= time.time():
            expired = dt.datetime.fromtimestamp(facts.not_after, dt.UTC).isoformat()
        revoked = self._revoked_serial(facts)
        if isinstance(leg, _STREAMS):
            note = "a new stream on the pooled connection it opened before"
        else:
            note = "resumed session" if resumed else ""
        if isinstance(leg, NetLeg) and self.hbone_dial:
            if leg.alpn() != HBONE_ALPN:
                self._dial_done(None, 0)
                self._run(
                    f.HandshakeFailed(
                        f.Reason.OTHER,
                        f"{self.flow.who()} did not negotiate ALPN h2: not an HBONE server",
                    )
                )
                return
            self._hbone_out_carrier(leg, sid, facts, revoked, expired, note)
        elif isinstance(leg, NetLeg) and self.route.hbone:
            if leg.alpn() != HBONE_ALPN:
                self._run(
                    f.HandshakeFailed(
                        f.Reason.OTHER, f"{self.flow.who()} did not negotiate ALPN h2 (HBONE)"
                    )
                )
                return
            if self._make_carrier(leg, sid, facts, revoked, expired, note):
                return
        elif isinstance(leg, NetLeg) and leg.alpn() in mux.ALPN_VERSIONS:
            if self._make_carrier(leg, sid, facts, revoked, expired, note):
                return
        elif self.pool_key is not None:
            # A peer without connection reuse (another proxy, or reuse turned off there):
            # one TLS connection per app connection to it for a while.
            self._dial_done(None, FOREIGN_TTL)
        self._run(
            f.HandshakeDone(
                sid, resumed, revoked_serial=revoked, expired_at=expired, expired_note=note
            )
        )

    def _make_carrier(
        self,
        leg: NetLeg,
        sid: SpiffeId | None,
        facts: PeerCert | None,
        revoked: str | None,
        expired: str | None,
        note: str,
    ) -> bool:
        """Both sides negotiated connection reuse: make `leg` a pooled connection. Inbound
        this connection was only its handshake and ends here, unlogged (True); outbound it
        becomes the carrier's first stream and goes on (False)."""
        if self.flow.judge(sid, revoked, expired, note) is not None:
            if self.pool_key is not None:
                self._dial_done(None, 0)
            return False  # refused as any connection: the flow says so
        route = self.route
        seconds = self.host.loop.time() - self.hs_started
        count_handshake = partial(self._count_handshake, leg, seconds)
        if route.hbone:
            count_handshake()
            self.host.new_hbone_carrier(
                leg,
                route,
                peer_id=sid,
                peer_facts=facts,
                peername=self.peername,
                called=self.called,
            )
            self.closed = True
            self.net = None
            self.host.forget(self)
            return True
        if route.direction == "inbound":
            count_handshake()
            self.host.new_carrier(
                leg,
                route,
                peer_id=sid,
                peer_facts=facts,
                peername=self.peername,
                called=self.called,
                key=None,
            )
            # This connection was the carrier's handshake, not an app connection.
            self.closed = True
            self.net = None
            self.host.forget(self)
            return True
        target = self.target
        assert target is not None
        key = self._key(*target)
        carrier = self.host.new_carrier(
            leg, route, peer_id=sid, peer_facts=facts, peername=target, called=None, key=key
        )
        carrier.on_answer = count_handshake  # once the remote answers: it accepted us
        self.net = carrier.open_stream(self, self._open_info())
        if self.pool_key is not None:
            self._dial_done(carrier, 0)
        else:
            pool = self.host.pool
            if pool is not None:
                pool.add(key, carrier)
        return False

    def _hbone_out_carrier(
        self,
        leg: NetLeg,
        sid: SpiffeId | None,
        facts: PeerCert | None,
        revoked: str | None,
        expired: str | None,
        note: str,
    ) -> None:
        """Outbound: the HBONE connection we dialled is up: pool it, and make this
        connection its first stream (judged next, as any handshake)."""
        if self.flow.judge(sid, revoked, expired, note) is not None:
            self._dial_done(None, 0)
            return  # refused as any connection: the flow says so
        target = self.target
        assert target is not None and leg.transport is not None
        raw = leg.transport.get_extra_info("peername")
        where = (str(raw[0]), int(raw[1])) if isinstance(raw, tuple) else None
        key = self._key(target[0], self.route.hbone_port)
        carrier = self.host.new_hbone_carrier(
            leg,
            self.route,
            peer_id=sid,
            peer_facts=facts,
            peername=where,
            called=None,
            outbound=True,
            key=key,
        )
        carrier.on_answer = partial(
            self._count_handshake, leg, self.host.loop.time() - self.hs_started
        )
        self.net = carrier.open_stream(self, self._authority(carrier), self.peername)
        if self.pool_key is not None:
            self._dial_done(carrier, 0)
        else:
            self.host.hbone_pool.add(key, carrier)  # type: ignore[arg-type]

    def _authority(self, carrier: HboneCarrier) -> tuple[str, int]:
        """The `:authority` of our CONNECT: the destination's address (the HBONE connection
        went to its host) and port."""
        target = self.target or ("", 0)
        host = carrier.peername[0] if carrier.peername is not None else target[0]
        return host, target[1]

    def _hbone(self, host: str, port: int) -> None:
        """Outbound: carry this connection as an HBONE stream to `host`'s HBONE port: on a
        pooled HBONE connection, now or once the one being dialled is up, or on a new one."""
        self.hbone_dial = True
        pool = self.host.hbone_pool
        hbone_port = self.route.hbone_port
        key = self._key(host, hbone_port)
        carrier = pool.take(key) if self.tls is self.host.tls else None
        if carrier is not None:
            self.use_carrier(carrier)
            return
        if pool.wait(key, self):
            return
        pool.dial_started(key)
        self.pool_key = key
        self.task = self.host.spawn(self._dial_remote(host, hbone_port, True), "dial-hbone")

    def _key(self, host: str, port: int) -> Key:
        """Pooled connections to (host, port) for this route's expected identity."""
        return (host, port, self.route.expected_peer)

    def _open_info(self) -> mux.OpenInfo:
        target = self.target or ("", 0)
        src = self.peername or ("", 0)
        return mux.OpenInfo(target, src)

    def _dial_done(self, carrier: Carrier | HboneCarrier | None, ttl: float) -> None:
        key, self.pool_key = self.pool_key, None
        pool = self.host.hbone_pool if self.hbone_dial else self.host.pool
        if key is not None and pool is not None:
            pool.dial_done(key, carrier, self.host.loop.time(), ttl)  # type: ignore[arg-type]

    def _try_pool(self, host: str, port: int) -> bool:
        """Outbound: carry this connection on a pooled connection to (host, port), now or
        once the one being dialled is up (True); False: dial (and maybe pool) a new one."""
        pool = self.host.pool
        if pool is None or self.tls is not self.host.tls:
            return False
        key = self._key(host, port)
        carrier = pool.take(key)
        if carrier is not None:
            self.use_carrier(carrier)
            return True
        if pool.foreign(key, self.host.loop.time()):
            return False
        if pool.wait(key, self):
            return True
        pool.dial_started(key)
        self.pool_key = key
        return False

    def use_carrier(self, carrier: Carrier | HboneCarrier) -> None:
        """Outbound: open this connection as a stream on `carrier`; its remote's identity
        is judged first, so a stream the policy denies is never opened."""
        if self.closed:
            return
        if self.flow.judge(carrier.peer_id) is not None:
            self._run(f.HandshakeDone(carrier.peer_id))  # refused, as after a handshake
            return
        if isinstance(carrier, HboneCarrier):
            self.net = carrier.open_stream(self, self._authority(carrier), self.peername)
        else:
            self.net = carrier.open_stream(self, self._open_info())
        self.hs_started = self.host.loop.time()
        self._run(f.Dialled())  # then the stream's "handshake", done at once

    def dial_alone(self) -> None:
        """Outbound: the pooled connection we waited for did not come; dial our own."""
        if self.closed or self.target is None:
            return
        host, port = self.target
        if self.hbone_dial:
            port = self.route.hbone_port
        self.task = self.host.spawn(self._dial_remote(host, port, True), "dial-remote")

    def stream_refused(self, code: int) -> None:
        """Outbound: the far sidecar refused our stream (RESET before ACCEPT)."""
        refusal = _REFUSED_AS.get(code)
        if refusal is None:
            self._run(f.Lost(f.Side.NET, True))  # e.g. it could not reach its app
            return
        reason, words = refusal
        name = mux.RESET_NAMES.get(code, str(code))
        self._run(f.TlsError(reason, f"{self.flow.who()} {words} (stream refused)", name, 0))

    def stream_unanswered(self, seconds: float) -> None:
        """Outbound: the far sidecar answered our stream neither way in time. Refused as a
        handshake timeout would be (nothing was relayed), the app's connection cut."""
        self._run(
            f.TlsError(
                f.Reason.HANDSHAKE_TIMEOUT,
                f"{self.flow.who()} did not answer a new stream on its pooled connection "
                f"within {seconds:g}s",
                "no answer",
                0,
            )
        )

    def _revoked_serial(self, facts: PeerCert | None) -> str | None:
        """The serial of this peer certificate if the revocation list in use lists it."""
        rl = self.host.revocations
        if facts is None or rl is None or not is_peer_revoked(rl, facts):
            return None
        return facts.serial_hex

    def verify_peer(self, der: bytes, anchor: bytes | None = None) -> int:
        """Inside the handshake: may this peer certificate connect? 0 (X509_V_OK), or the
        X509 error whose TLS alert tells the peer why not. The reason and message are kept
        for the rejection counter and log line. With federated trust domains (`anchor` is
        the root its chain ends at) both directions check that the root is one of the peer's
        own trust domain; inbound also judges policy and revocation here."""
        sid = spiffe_id_from_der(der)
        self.flow.peer_id = sid  # a refusal's log line names who was refused
        if anchor is not None:
            wrong = self.tls.material.trust.check(sid, anchor)
            if wrong is not None:
                self.denied = (f.Reason.UNKNOWN_CA, f"{self.flow.who()} {wrong}")
                return X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY  # alert unknown_ca
        if self.route.direction != "inbound":
            return X509_V_OK  # outbound: the identity is judged once the handshake is done
        self.denied = self.flow.judge(sid, self._revoked_serial(peer_cert(der)))
        if self.denied is None:
            return X509_V_OK
        reason = self.denied[0]
        if reason is f.Reason.REVOKED:
            return X509_V_ERR_CERT_REVOKED  # alert certificate_revoked
        if reason is f.Reason.BAD_CERT:
            return X509_V_ERR_CERT_REJECTED  # alert bad_certificate
        return X509_V_ERR_APPLICATION_VERIFICATION  # alert handshake_failure

    def revoke(self) -> None:
        """A new revocation list lists this connection's peer: cut it (RST), count it."""
        facts = self.peer_cert
        if self.closed or facts is None:
            return
        if self.established:
            self.route.metrics.revoked_closed.inc()
        self._run(f.Revoked(facts.serial_hex))

    def handshake_failed(self, exc: BaseException) -> None:
        if self.pool_key is not None:
            self._dial_done(None, 0)  # waiters dial their own (this one may fall back)
        target = self.target
        if target is not None and self.route.direction == "outbound":
            self.tls.sessions.drop(f"{target[0]}:{target[1]}")
        if self.denied is not None:  # refused by verify_peer, inside the handshake
            self._run(f.HandshakeFailed(*self.denied))
            return
        reason, message = classify_tls_error(exc, self.flow.who())
        self._run(f.HandshakeFailed(f.Reason(reason), message, no_tls=speaks_no_tls(exc)))

    def handshake_timed_out(self) -> None:
        self._run(f.HandshakeTimedOut())

    def net_failed(self, exc: BaseException) -> None:
        reason, message = classify_tls_error(exc, self.flow.who())
        alert = alert_name(str(getattr(exc, "reason", None) or ""))
        if alert == "HANDSHAKE_FAILURE" and not self.bytes_in:
            # With TLS 1.3 the server judges our certificate after our side of the handshake
            # is done: handshake_failure then means its policy refused our identity (our own
            # sidecars say so that way; see verify_peer).
            reason = "peer_not_allowed"
            message = f"{self.flow.who()} refused our identity (handshake failure alert)"
        detail = str(getattr(exc, "reason", None) or exc).lower().replace("_", " ")
        self._run(f.TlsError(f.Reason(reason), message, detail, self.bytes_in))

    def hold_from_app(self, data: bytes) -> bool:
        """Keep what the app sent before relaying; True once reading should pause."""
        if self.header is not None:
            return self._feed_header(data)
        if self.held_app is None:
            self.held_app = bytearray()
        self.held_app += data
        return True

    def _feed_header(self, data: bytes) -> bool:
        reader = self.header
        assert reader is not None
        try:
            got = reader.feed(data)
        except ProxyHeaderError as exc:
            self._stop_header()
            self._run(
                f.ProxyHeaderFailed(f.Reason.BAD_PROXY_HEADER, f"{self._who_sent_header()}: {exc}")
            )
            return True
        if got is None:
            return False  # more of the header to come
        parsed, rest = got
        self._stop_header()
        self.proxied_by = self._who_sent_header()
        if rest:
            self.held_app = bytearray(rest)
        assert self.app is not None and self.app.transport is not None
        caller = parsed.src if parsed.command == "PROXY" and parsed.src is not None else None
        self._accept(self.app.transport, caller)
        return True

    def _stop_header(self) -> None:
        self.header = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def app_eof(self) -> None:
        if self.header is not None:
            self._stop_header()
            self._run(
                f.ProxyHeaderFailed(
                    f.Reason.BAD_PROXY_HEADER,
                    f"{self._who_sent_header()} closed before a complete PROXY v2 header",
                )
            )
            return
        self._run(f.Eof(f.Side.APP))

    def net_eof(self) -> None:
        self.confirm()  # an end of stream (close_notify) is an answer too
        self._run(f.Eof(f.Side.NET))

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        if self.closed or (leg is not self.net and leg is not self.app):
            return  # already finished, or a leg we let go (plaintext fallback)
        side = f.Side.APP if leg is self.app else f.Side.NET
        self._run(f.Lost(side, exc is not None))

    def idle_timeout(self) -> None:
        self._run(f.IdleTimeout())

    def drain_timeout(self) -> None:
        self._run(f.DrainTimeout())

    # --- carrying out the flow's actions ------------------------------------------------

    def _run(self, event: f.Event, first: bytes = b"") -> None:
        try:
            for action in self.flow.handle(event):
                self._do(action, first)
        except Exception:
            self._internal_error(event)

    def _internal_error(self, event: f.Event) -> None:
        """A bug of ours while handling `event`: never leave the connection hanging (its
        legs open, its app waiting) nor the worker's loop with a half-done connection.
        Reset both legs, count it, log the traceback; every other connection goes on."""
        if self.closed:
            log.debug("error after the connection ended (%s)", type(event).__name__, exc_info=True)
            return
        self.route.metrics.internal_errors.inc()
        log.exception(
            "internal error handling %s: connection reset",
            type(event).__name__,
            extra={
                "fields": {
                    "event": "internal_error",
                    "direction": self.route.direction,
                    "route": self.route.name,
                    "peer": self.peer_addr,
                }
            },
        )
        try:
            self._finish(f.Outcome.INTERNAL_ERROR, abort=True, logged=False)
        except Exception:
            log.exception("internal error while resetting the connection")
            self.closed = True

    def _do(self, action: f.Action, first: bytes) -> None:
        match action:
            case f.StartTls():
                assert self.net is not None
                self.net.start_tls(first)
            case f.AcceptPlaintext():
                assert isinstance(self.net, NetLeg)  # a stream is never plaintext
                self.net.accept_plaintext(first)
            case f.Warn(event=event, message=message):
                log.warning(message, extra={"fields": self._fields(event)})
            case f.Dial(host=host, port=port, tls=tls):
                if self.route.direction == "inbound":
                    self.task = self.host.spawn(self._dial_app(host, port), "dial-app")
                else:
                    if self.app is not None:
                        self.app.pause_reading()  # until the remote is up
                    if tls and self.route.dials_hbone(host, port):
                        self._hbone(host, port)
                        return
                    if tls and self._try_pool(host, port):
                        return
                    self.task = self.host.spawn(self._dial_remote(host, port, tls), "dial-remote")
            case f.Fallback(host=host, port=port, message=message):
                fields = self._fields("plaintext_fallback")
                fields["target"] = f"{host}:{port}"
                log.warning(message, extra={"fields": fields})
                self.host.remember_plaintext((host, port))
                old, self.net = self.net, None
                if old is not None:
                    old.close(abort=True)
            case f.Open():
                self._open(action)
            case f.SendEof(side=side):
                leg = self.net if side is f.Side.NET else self.app
                if leg is not None:
                    leg.send_eof()
            case f.Reject(reason=reason, message=message):
                if isinstance(self.net, _STREAMS):
                    self.net.reset_code = _RESET_FOR.get(reason, mux.RESET_CANCEL)
                self._count_rejection(reason)
                held: int | None = 0
                limit: RateLimit | None = None
                if reason is f.Reason.TOO_MANY_CONNECTIONS:
                    # Overload must not also flood the log: one line a second says it.
                    limit = _OVERLOAD_LOG
                elif isinstance(self.net, _STREAMS):
                    limit = _STREAM_REFUSAL_LOG.get(reason)
                    if limit is None:
                        limit = _STREAM_REFUSAL_LOG[reason] = RateLimit(1.0)
                if limit is not None:
                    held = limit.allow()
                    if held is None:
                        return
                fields = self._fields("rejected")
                fields["reason"] = str(reason)
                fields["peer_identity"] = self.peer_identity
                if held:
                    fields["held_back"] = held
                    message += f" ({held} more refused for this since the last line)"
                log.warning("rejected: %s", message, extra={"fields": fields})
            case f.UpstreamFailed(reason=reason, text=text):
                if isinstance(self.net, _STREAMS):
                    self.net.reset_code = mux.RESET_UPSTREAM
                self.route.metrics.upstream_failure(reason).inc()
                host, port = self.target or ("?", 0)
                what = "the app" if self.route.direction == "inbound" else "the remote"
                fields = self._fields("upstream_failed")
                fields["reason"] = reason
                log.warning(
                    "cannot reach %s at %s:%s: %s", what, host, port, text, extra={"fields": fields}
                )
            case f.Finish(outcome=outcome, abort=abort, logged=logged):
                self._finish(outcome, abort=abort, logged=logged)

    def _count_rejection(self, reason: f.Reason) -> None:
        """One refusal on the route; also under the peer's identity when the refusal judged
        a verified one (flow.IDENTIFIED), so the coverage report can show it on its edge."""
        self.route.metrics.rejected(reason).inc()
        sid = self.flow.peer_id
        if sid is not None and reason in f.IDENTIFIED:
            self.host.count_peer_rejection(self.route.direction, str(sid), reason)

    def _fields(self, event: str) -> dict[str, Any]:
        return {
            "event": event,
            "direction": self.route.direction,
            "route": self.route.name,
            "peer": self.peer_addr,
        }

    async def _dial_app(self, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(self.host.connect_timeout):
                await self.host.loop.create_connection(lambda: AppLeg(self), host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._run(f.DialFailed(*connect_reason(exc)))

    async def _dial_remote(self, host: str, port: int, tls: bool) -> None:
        state = self.tls
        ctx = (state.hbone_client_ptr if self.hbone_dial else state.client_ptr) if tls else None
        cache = state.sessions
        key = f"hbone:{host}:{port}" if self.hbone_dial else f"{host}:{port}"
        self.hs_started = self.host.loop.time()

        def factory() -> NetLeg:
            return NetLeg(
                self,
                ctx,
                server_side=False,
                session=cache.get(key) if ctx is not None else None,
                # Each connection leaves its newest ticket for the next ones.
                on_session=(lambda s: cache.put(key, s)) if ctx is not None else None,
                domains=ctx is not None and state.material.checks_domains,
            )

        try:
            async with asyncio.timeout(self.host.connect_timeout):
                await self.host.loop.create_connection(factory, host, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._run(f.DialFailed(*connect_reason(exc)))

    def _open(self, action: f.Open) -> None:
        net, app = self.net, self.app
        assert net is not None and app is not None
        net.peer = app
        app.peer = net
        app.framed = isinstance(net, StreamLeg)
        net.arm_reset()
        app.arm_reset()
        self.hs_done = self.host.loop.time()
        if self.route.direction == "inbound" or action.security is not f.Security.MTLS:
            self._count_open()
        # else outbound TLS: with TLS 1.3 the remote judges our certificate after our side
        # of the handshake is done. Counted once it answers (its first byte or its end of
        # stream); a refusal (an alert before any byte) is then a rejection only.
        net.start()
        if self.route.direction == "inbound":
            return
        held = self.held_app
        if held:
            self.held_app = None
            net.send(held)
        if action.eof_to_net:
            net.send_eof()  # the app half-closed while the remote was being dialled
        else:
            app.resume_reading()

    def _count_open(self) -> None:
        """Count the connection as relayed: connections, active, handshake, peer, group."""
        net = self.net
        self.established = True
        m = self.route.metrics
        security = self.flow.security
        m.connections[security].inc()
        m.active.inc()
        if security is f.Security.MTLS and net is not None:
            # A stream's TLS facts are its pooled connection's.
            info = net.tls_info()
            group = info[2] if info is not None else None
            self.peer_bytes = self.host.count_peer(self.route.direction, self.peer_identity, group)
            if isinstance(net, NetLeg):  # a stream's handshake was its carrier's, counted then
                self._count_handshake(net, self.hs_done - self.hs_started, info)

    def _count_handshake(
        self, leg: NetLeg, seconds: float, info: tuple[str, str, str] | None = None
    ) -> None:
        """One real TLS handshake: its duration, key-exchange group and resumption (`info`:
        the leg's TLS facts when the caller has them already)."""
        self.route.metrics.handshake.observe(seconds)
        if info is None:
            info = leg.tls_info()
        if info is not None:
            handshake_counter(self.route.direction, info[2], leg.resumed()).inc()

    def confirm(self) -> None:
        """Outbound: the remote answered after our handshake, so it accepted us."""
        if not self.established and not self.closed and self.flow.state is f.State.OPEN:
            self._count_open()

    def flow_was_open(self, outcome: str) -> bool:
        """Did this connection relay, and end other than by a refusal? A stream the far
        sidecar never answered (ACCEPT) did not."""
        net = self.net
        if isinstance(net, _STREAMS) and net.carrier.outbound and not net.accepted:
            return False
        return self.hs_done > 0 and not outcome.startswith(
            (f.Outcome.REJECTED, f.Outcome.UPSTREAM_FAILED)
        )

    @property
    def relaying(self) -> bool:
        """Both legs are up and bytes flow (idle timeouts apply)."""
        return self.flow.state is f.State.OPEN

    def flush_bytes(self) -> None:
        """Add the bytes relayed since the last flush to the counters."""
        if not self.established:
            return  # not counted yet (outbound: the remote has not answered)
        din = self.bytes_in - self.flushed_in
        dout = self.bytes_out - self.flushed_out
        if din or dout:
            b = self.route.metrics.bytes
            sec = self.security
            peer = self.peer_bytes
            if din:
                b[(sec, "in")].inc(din)
                if peer is not None:
                    peer[0].inc(din)
                self.flushed_in = self.bytes_in
            if dout:
                b[(sec, "out")].inc(dout)
                if peer is not None:
                    peer[1].inc(dout)
                self.flushed_out = self.bytes_out

    def _tls_fields(self) -> dict[str, object]:
        net = self.net
        info = net.tls_info() if net is not None and self.established else None
        if net is None or info is None:
            return {
                "tls_version": None,
                "tls_cipher": None,
                "tls_group": None,
                "tls_resumed": None,
                "pooled": False,
            }
        version, cipher, group = info
        return {
            "tls_version": version,
            "tls_cipher": cipher,
            "tls_group": group,
            "tls_resumed": net.resumed(),
            "pooled": isinstance(net, _STREAMS),
        }

    def _policy_fields(self) -> dict[str, object]:
        """The route name the policy file uses, and the rule that decided."""
        decision = self.policy
        return {
            "policy_route": self.host.policy_route(self.route, self.called),
            "policy_rule": decision.rule if decision is not None else None,
        }

    def _finish(self, outcome: str, *, abort: bool, logged: bool) -> None:
        if self.closed:
            return
        if not self.established and self.flow_was_open(outcome):
            self._count_open()  # e.g. the remote never replied: still a relayed connection
        self.closed = True
        if self.pool_key is not None:
            self._dial_done(None, 0)  # waiters dial their own
        self._stop_header()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for leg in (self.net, self.app):
            if leg is not None:
                leg.close(abort=abort)
        self.flush_bytes()
        if self.established:
            self.route.metrics.active.dec()
        self.host.forget(self)
        if not logged and log.isEnabledFor(logging.INFO):
            target = self.target
            log.info(
                "connection closed",
                extra={
                    "fields": {
                        "event": "conn_closed",
                        "direction": self.route.direction,
                        "route": self.route.name,
                        "security": self.security,
                        "peer": self.peer_addr,
                        "proxied_by": self.proxied_by,
                        "peer_identity": self.peer_identity,
                        **self._policy_fields(),
                        "target": f"{target[0]}:{target[1]}" if target else None,
                        "bytes_in": self.bytes_in,
                        "bytes_out": self.bytes_out,
                        "duration_ms": round((self.host.loop.time() - self.started) * 1000, 1),
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
