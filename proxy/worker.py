"""A worker process: serves the listeners handed to it by the master with one event loop.

The master binds every listener (one SO_REUSEPORT socket per worker and listener) and sends
identity material over the worker's stdin as JSON lines; the worker answers on stdout.
Logs go to stderr, shared with the master.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter as _Counter

from . import control, metrics
from .config import Settings
from .conn import Conn
from .errors import CertError, PolicyDenied
from .flow import PeerCheck, Reason
from .hbone import MAX_STREAMS as HBONE_MAX_STREAMS
from .hbone import StreamOpened
from .hbone_io import HboneCarrier, HboneStream
from .identity import SpiffeId, parse_spiffe_id
from .material import load_material, with_federation
from .mux import OpenInfo
from .policy import InboundPolicy, check_outbound
from .policyfile import (
    Decision,
    Policy,
    PolicyFileError,
    decide_destination,
    deny_message,
    destination_deny_message,
    hostport,
    outbound_check,
    outbound_deny_message,
    parse_policy,
    policy_check,
)
from .pool import Carrier, Key, Pool, StreamLeg
from .relay import AppLeg, NetLeg
from .revocation import PeerCert, RevocationList, from_compact, is_peer_revoked
from .routes import Route
from .shared import ConnectionCounts
from .tasks import Tasks
from .tls import TlsState, tls_state_for
from .transparent import is_local_address, is_local_destination, local_addresses, original_dst

log = logging.getLogger("mtls.worker")

SWEEP_INTERVAL = 1.0
CONFIRM_AFTER = 1.0  # seconds of relaying after which an unanswered outbound TLS leg counts
FD_RESERVE = 32  # descriptors kept for the event loop, logging, the control pipe, a dial


class Worker:
    """Everything one process needs to serve: routes, TLS state, policy, live connections."""

    def __init__(
        self,
        settings: Settings,
        listeners: list[tuple[Route, socket.socket]],
        counts: ConnectionCounts | None = None,
        slot: int = 0,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.listeners = listeners
        self.handshake_timeout = settings.handshake_timeout
        self.connect_timeout = settings.connect_timeout
        self.idle_ticks = (
            max(1, round(settings.idle_timeout / SWEEP_INTERVAL)) if settings.idle_timeout else 0
        )
        # MTLS_MAX_CONNECTIONS is for the whole sidecar: the workers share their counts.
        self.max_conns = settings.max_connections
        self.counts = counts
        self.slot = slot
        # Each proxied connection needs two file descriptors, a pooled connection one (its
        # streams are counted as connections); refuse (counted, logged) before the process
        # runs out, rather than let the event loop drop connections silently.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_budget = max(2, soft - FD_RESERVE - len(listeners))
        self.conns: set[Conn] = set()
        self.tasks = Tasks(log)
        self.servers: list[asyncio.AbstractServer] = []
        self._listening: list[tuple[Route, socket.socket]] = []  # dups, for _stop_listening
        self.tls: TlsState = None  # type: ignore[assignment]  # set before serving
        self.policy: InboundPolicy = None  # type: ignore[assignment]
        # MTLS_POLICY_FILE, when set: per-route rules in place of self.policy (the master
        # sends it before the first material, so before anyone is served).
        self.authz: Policy | None = None
        self._decision_children: dict[tuple[str, str, str, bool], _Counter] = {}
        self.trust_domain = settings.effective_trust_domain
        self.peers = metrics.PeerCounters(settings.peer_identity_cap)
        self._expected: dict[str, SpiffeId] = {}
        self._plaintext_until: dict[tuple[str, int], float] = {}
        self.revocations: RevocationList | None = None
        self.draining = False
        self.drained = asyncio.Event()
        self.own_ports = {s.getsockname()[1] for _, s in listeners} | {settings.admin_listen.port}
        self.excluded_inbound = frozenset(settings.exclude_inbound_ports)
        self._local_addrs: set[str] | None = None
        # Connection reuse: the outbound pool, and every pooled connection (both directions).
        self.pool: Pool | None = (
            Pool(settings.pool_max_streams, settings.pool_idle_timeout, settings.pool_max_lifetime)
            if settings.connection_reuse
            else None
        )
        self.carriers: set[Carrier | HboneCarrier] = set()
        # Outbound HBONE connections (MTLS_HBONE_OUTBOUND), at most 100 streams each.
        self.hbone_pool = Pool(
            min(settings.pool_max_streams, HBONE_MAX_STREAMS),
            settings.pool_idle_timeout,
            settings.pool_max_lifetime,
        )
        # HBONE streams go to the inbound route whose target port they name (explicit mode),
        # or to the transparent capture route.
        self._hbone_routes: dict[int, Route] = {}
        self._capture_route: Route | None = None
        for route, _ in listeners:
            if route.direction != "inbound" or route.hbone:
                continue
            if route.transparent:
                self._capture_route = route
            elif route.target is not None:
                self._hbone_routes.setdefault(route.target[1], route)
        self.max_streams = settings.pool_max_streams
        self.ping_interval = settings.pool_ping_interval

    # --- material ------------------------------------------------------------------------

    def set_tls(self, state: TlsState) -> None:
        """New connections use `state` from now on; open ones keep the context they began with.

        Everything that can fail is computed before anything is replaced: a refused state
        leaves the worker exactly as it was.
        """
        domain = self.settings.effective_trust_domain
        if domain is None:
            try:
                domain = parse_spiffe_id(state.material.identity).trust_domain
            except ValueError as exc:
                raise CertError(f"certificate identity: {exc}") from None
        policy = InboundPolicy(self.settings.allow_peers, domain)
        old = self.tls
        self.tls = state
        self.trust_domain = domain
        self.policy = policy
        if old is not None:
            # Pooled connections were made with the old certificate and trust bundle: they
            # take no new streams (the peer is told), and close once their streams end. One
            # whose peer the new bundle no longer trusts is closed now, with its streams.
            new = state.material
            check = (old.material.bundle_pem, old.material.federated) != (
                new.bundle_pem,
                new.federated,
            )
            untrusted = 0
            for carrier in list(self.carriers):
                # With federation a peer is judged by its own trust domain's roots only.
                peer = carrier.peer_id
                roots = new.roots_for(peer.trust_domain) if peer is not None else new.roots
                if check and not carrier.trusted_by(roots):
                    untrusted += 1
                    carrier.fail(ConnectionResetError("peer no longer trusted"), "untrusted")
                else:
                    carrier.retire("rotation")
            if untrusted:
                log.warning(
                    "closed %d pooled connection(s) whose peer the new trust bundle no longer "
                    "trusts",
                    untrusted,
                    extra={"fields": {"event": "pool_untrusted_closed", "count": untrusted}},
                )

    def set_policy(self, text: str) -> None:
        """A policy file from the master (which checked it): in force for new connections
        and pooled streams at once; open ones it denies are cut now, each logged with the
        rule that denied it and counted (reason policy_changed)."""
        try:
            authz = parse_policy(text)
        except PolicyFileError as exc:  # the master checked it: not expected
            log.error("policy from the master refused, keeping the current one: %s", exc)
            return
        first = self.authz is None
        self.authz = authz
        if first:
            return
        cut = sum(1 for conn in list(self.conns) if conn.policy_changed())
        if cut:
            log.warning(
                "closed %d open connection(s) that the new policy denies",
                cut,
                extra={"fields": {"event": "policy_closed", "count": cut}},
            )

    async def load_revocations(self, headers: list[dict[str, Any]], payload: bytes) -> None:
        """A revocation list from the master (which checked the CRLs), as revoked serials:
        built a slice at a time between other work (a 600,000-entry list holds the event
        loop a few ms at a time, never the whole build), then made current at once."""
        build = from_compact(headers, payload)
        try:
            while True:
                try:
                    next(build)
                except StopIteration as done:
                    rl: RevocationList = done.value
                    break
                await asyncio.sleep(0)
        except ValueError as exc:
            log.error("revocation list from the master unusable, keeping the current one: %s", exc)
            return
        self.set_revocations(rl)

    def set_revocations(self, rl: RevocationList) -> None:
        """New handshakes with a listed peer are refused, open connections with one are
        closed now."""
        self.revocations = rl
        cut = [
            c for c in self.conns if c.peer_cert is not None and is_peer_revoked(rl, c.peer_cert)
        ]
        for conn in cut:
            conn.revoke()
        for carrier in list(self.carriers):
            if carrier.peer_facts is not None and is_peer_revoked(rl, carrier.peer_facts):
                carrier.fail(ConnectionResetError("peer certificate revoked"), reason="revoked")
        if cut:
            log.warning(
                "closed %d open connection(s) whose peer certificate was revoked",
                len(cut),
                extra={"fields": {"event": "revoked_closed", "count": len(cut)}},
            )

    # --- services for connections --------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self.tasks.spawn(coro, name)

    def open_count(self) -> int:
        """What this worker holds open: connections (a pooled stream is one) and pooled
        connections themselves, each one against MTLS_MAX_CONNECTIONS."""
        return len(self.conns) + len(self.carriers)

    def _publish_count(self) -> None:
        if self.counts is not None:
            self.counts.set(self.slot, self.open_count())

    def admit(self, conn: Conn) -> str | None:
        counts = self.counts
        total = counts.total() if counts is not None else self.open_count()
        if total >= self.max_conns:
            return f"MTLS_MAX_CONNECTIONS={self.max_conns} open across all workers"
        if 2 * (len(self.conns) + 1) + len(self.carriers) > self.fd_budget:
            return (
                f"the open-file limit of this worker leaves {self.fd_budget} descriptors for "
                "connections (two each, one per pooled connection; raise ulimit -n)"
            )
        self.conns.add(conn)
        self._publish_count()
        return None

    def forget(self, conn: Conn) -> None:
        self.conns.discard(conn)
        self._publish_count()
        if self.draining and not self.conns:
            self.drained.set()

    def count_peer(
        self, direction: str, identity: str | None, group: str | None
    ) -> tuple[_Counter, _Counter]:
        return self.peers.connection(direction, identity, group)

    def count_peer_rejection(self, direction: str, identity: str, reason: str) -> None:
        self.peers.rejection(direction, identity, reason)

    def policy_route(self, route: Route, called: tuple[str, int] | None) -> str:
        """The name a policy file's `inbound` rules use for this connection's route: the
        route's name, or in transparent mode the port the caller dialled."""
        if route.transparent and called is not None:
            return str(called[1])
        return route.name

    def _count_decision(self, direction: str, name: str, decision: Decision) -> None:
        key = (direction, name, decision.label, decision.dry_run)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = metrics.POLICY_DECISIONS.labels(
                direction, name, decision.label, "true" if decision.dry_run else "false"
            )
        child.inc()

    def _log_dry_run(self, message: str, fields: dict[str, object]) -> None:
        log.warning(
            "dry run: %s; allowed, since the rule is dry-run",
            message,
            extra={"fields": {"event": "policy_dry_run_deny", **fields}},
        )

    def judge_destination(
        self, route: Route, target: tuple[str, int], called: tuple[str, int] | None
    ) -> Decision | None:
        """Outbound, before dialling: the policy file's verdict on `target` (None: the file
        says nothing of outbound). A deny is counted (and, dry-run, logged) here; an allow
        is counted once the remote's identity is judged too."""
        authz = self.authz
        if authz is None:
            return None
        name = self.policy_route(route, called)
        decision = decide_destination(authz, name, *target)
        if decision is not None and not decision.allow:
            self._count_decision("outbound", name, decision)
            if decision.dry_run:
                self._log_dry_run(
                    destination_deny_message(name, target, decision),
                    {
                        "direction": "outbound",
                        "route": name,
                        "target": hostport(target),
                        "rule": decision.rule,
                    },
                )
        return decision

    def peer_check(
        self,
        route: Route,
        peername: tuple[str, int] | None = None,
        called: tuple[str, int] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
        target: tuple[str, int] | None = None,
        judged: Decision | None = None,
    ) -> PeerCheck:
        if route.hbone:
            return _hbone_carrier_check  # each stream is judged under its own route
        if route.direction == "inbound":
            authz = self.authz
            if authz is None:
                return self.policy.check
            name = self.policy_route(route, called)
            ip = peername[0] if peername is not None else None

            def decided(peer: SpiffeId, decision: Decision) -> None:
                self._count_decision("inbound", name, decision)
                if on_decision is not None:
                    on_decision(decision)
                if not decision.allow and decision.dry_run:
                    where = f"{ip}" if ip is not None else "?"
                    self._log_dry_run(
                        f"{deny_message(peer, name, decision)} (from {where})",
                        {
                            "route": name,
                            "peer": where,
                            "peer_identity": str(peer),
                            "rule": decision.rule,
                        },
                    )

            return policy_check(authz, name, ip, decided, self.trust_domain)
        exp: SpiffeId | None = None
        if route.expected_peer is not None:
            exp = self._expected.get(route.expected_peer)
            if exp is None:
                exp = self._expected[route.expected_peer] = parse_spiffe_id(route.expected_peer)
        domain = self.trust_domain or ""

        def check(sid: SpiffeId | None) -> None:
            check_outbound(sid, exp, domain)

        authz = self.authz
        if authz is None or authz.outbound_default is None or target is None:
            return check
        out_name = self.policy_route(route, called)
        # A destination denied in dry-run was counted (and logged) as such already.
        counted = judged is not None and not judged.allow
        dst = target

        def outbound_decided(peer: SpiffeId, decision: Decision) -> None:
            if not counted:
                self._count_decision("outbound", out_name, decision)
            if on_decision is not None:
                on_decision(decision)
            if not decision.allow and decision.dry_run and not counted:
                self._log_dry_run(
                    outbound_deny_message(peer, out_name, dst, decision),
                    {
                        "direction": "outbound",
                        "route": out_name,
                        "target": hostport(dst),
                        "peer_identity": str(peer),
                        "rule": decision.rule,
                    },
                )

        return outbound_check(authz, out_name, dst, check, outbound_decided)

    # --- transparent mode ----------------------------------------------------------------

    def _original_dst(self, transport: asyncio.BaseTransport) -> tuple[str, int] | None:
        sock = transport.get_extra_info("socket")
        try:
            host, port = original_dst(sock)
        except (ValueError, OSError):
            return None
        return host, port

    def _addresses(self) -> set[str]:
        """This host's addresses, read once."""
        if self._local_addrs is None:
            self._local_addrs = local_addresses()
        return self._local_addrs

    def _is_self(self, host: str, port: int) -> bool:
        return is_local_destination(host, port, self.own_ports, self._addresses())

    def original_target(
        self, route: Route, transport: asyncio.BaseTransport
    ) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """Transparent mode: (where to dial, the original destination); inbound dials our
        app's port on loopback. None when there is no original destination or it is this
        sidecar."""
        dst = self._original_dst(transport)
        if dst is None or self._is_self(*dst):
            return None
        if route.direction == "inbound":
            return ("127.0.0.1", dst[1]), dst
        return dst, dst

    def knows_plaintext(self, target: tuple[str, int]) -> bool:
        until = self._plaintext_until.get(target)
        if until is None:
            return False
        if until < time.monotonic():
            del self._plaintext_until[target]
            return False
        return True

    def remember_plaintext(self, target: tuple[str, int]) -> None:
        self._plaintext_until[target] = time.monotonic() + self.settings.plaintext_fallback_ttl

    # --- connection reuse ----------------------------------------------------------------

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
        carrier = Carrier(
            self,
            leg,
            outbound=route.direction == "outbound",
            route=route,
            peer_id=peer_id,
            peer_facts=peer_facts,
            peername=peername,
            called=called,
            key=key,
            pool=self.pool if route.direction == "outbound" else None,
        )
        self._keep_carrier(carrier)
        return carrier

    def carrier_stream(self, carrier: Carrier, sid: int, info: OpenInfo) -> None:
        conn = Conn(self, carrier.route)
        stream = StreamLeg(carrier, conn, sid, info)
        carrier.accept_stream(stream)
        conn.stream_accepted(stream)

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
        carrier = HboneCarrier(
            self,
            leg,
            route=route,
            peer_id=peer_id,
            peer_facts=peer_facts,
            peername=peername,
            called=called,
            outbound=outbound,
            key=key,
            pool=self.hbone_pool if outbound else None,
        )
        self._keep_carrier(carrier)
        return carrier

    def _keep_carrier(self, carrier: Carrier | HboneCarrier) -> None:
        """A new carrier of either kind: counted, and retired at once while draining."""
        self.carriers.add(carrier)
        self._publish_count()
        if self.draining:
            carrier.retire("drain")

    def hbone_stream(self, carrier: HboneCarrier, opened: StreamOpened) -> None:
        """A CONNECT on an HBONE connection: a connection of the route it names, judged
        like any other (policy, revocation, limits, PROXY v2, its log line)."""
        dst = opened.authority
        forbidden: tuple[Reason, str] | None = None
        route = self._capture_route if self.settings.transparent else None
        if dst is None:
            dst = ("0.0.0.0", 0)
            forbidden = (Reason.BAD_DESTINATION, f"an HBONE stream was refused: {opened.problem}")
        elif route is None:
            route = self._hbone_routes.get(dst[1])
            if route is None:
                forbidden = (
                    Reason.BAD_DESTINATION,
                    f"an HBONE stream named {dst[0]}:{dst[1]}, but no inbound route forwards "
                    f"to port {dst[1]}",
                )
            elif not self._arrived_at(dst[0], carrier):
                forbidden = (
                    Reason.BAD_DESTINATION,
                    f"an HBONE stream named {dst[0]}:{dst[1]}, which is not an address of "
                    "this host",
                )
        conn = Conn(self, route or carrier.route)
        stream = HboneStream(carrier, conn, opened.sid, dst, opened.forwarded)
        carrier.accept_stream(stream)
        conn.stream_accepted(stream, forbidden)

    def _arrived_at(self, host: str, carrier: HboneCarrier) -> bool:
        called = carrier.called
        return (called is not None and called[0] == host) or is_local_address(
            host, self._addresses()
        )

    def carrier_closed(self, carrier: Carrier | HboneCarrier) -> None:
        self.carriers.discard(carrier)
        self._publish_count()

    def stream_destination(
        self, dst: tuple[str, int]
    ) -> tuple[tuple[str, int] | None, tuple[Reason, str] | None]:
        host, port = dst
        if not is_local_address(host, self._addresses()):
            return None, (
                Reason.BAD_DESTINATION,
                f"a pooled stream named {host}:{port}, which is not an address of this host "
                "(streams are only forwarded to the local app)",
            )
        if port in self.own_ports:
            return None, (
                Reason.LOOP_DETECTED,
                f"a pooled stream named {host}:{port}, a port of this sidecar",
            )
        if port in self.excluded_inbound:
            # Not captured: a connection from outside never reaches what listens there (on
            # loopback, say), so a stream may not either.
            return None, (
                Reason.BAD_DESTINATION,
                f"a pooled stream named {host}:{port}, a port excluded from interception "
                "(MTLS_EXCLUDE_INBOUND_PORTS)",
            )
        return ("127.0.0.1", port), None

    # --- serving -------------------------------------------------------------------------

    def _factory(self, route: Route) -> Any:
        if route.direction == "inbound":

            def inbound() -> NetLeg:
                tls = self.tls
                return NetLeg(
                    Conn(self, route),
                    tls.hbone_server_ptr if route.hbone else tls.server_ptr,
                    server_side=True,
                    domains=tls.material.checks_domains,
                )

            return inbound

        def outbound() -> AppLeg:
            return AppLeg(Conn(self, route))

        return outbound

    async def serve(self) -> None:
        for route, sock in self.listeners:
            # Our own handle on the listening socket, to end its listening at drain (below).
            self._listening.append((route, sock.dup()))
            server = await self.loop.create_server(
                self._factory(route), sock=sock, backlog=4096, start_serving=True
            )
            self.servers.append(server)
        self.spawn(self._sweep(), "sweeper")

    async def _sweep(self) -> None:
        """Once a second: idle timeouts; byte counters of long connections brought up to date."""
        idle_ticks = self.idle_ticks
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.tls.cap_session_lifetime()
            now = self.loop.time()
            s = self.settings
            for carrier in list(self.carriers):
                carrier.sweep(now, s.pool_idle_timeout, s.pool_max_lifetime)
            for conn in list(self.conns):
                if (
                    not conn.established
                    and conn.hs_done
                    and now - conn.hs_done >= CONFIRM_AFTER
                    and not isinstance(conn.net, StreamLeg)
                ):
                    # Outbound: a remote that refuses us does so within a round trip; one
                    # that stayed silent this long accepted (a long upload's bytes count now).
                    # A stream waits for its ACCEPT instead.
                    conn.confirm()
                conn.flush_bytes()
                if conn.active:
                    conn.active = False
                    conn.idle_ticks = 0
                elif idle_ticks and conn.relaying:
                    conn.idle_ticks += 1
                    if conn.idle_ticks >= idle_ticks:
                        log.info(
                            "closing idle connection from %s after %ss",
                            conn.peer_addr,
                            self.settings.idle_timeout,
                            extra={"fields": {"route": conn.route.name}},
                        )
                        conn.idle_timeout()

    async def _stop_listening(self) -> None:
        """End every listener of this worker for good: stop the loop accepting, take what
        the kernel has queued already (served like any connection), then shut the socket
        down. Closing our descriptor alone is not enough: the master keeps a copy of each
        listener (to hand it to a restarted worker), so the socket would stay LISTEN, the
        kernel would complete handshakes nobody accepts, and those clients would be reset
        with nothing when the sidecar exits. A shut-down socket is no longer listening in
        any process: a new client is refused (connection refused) from then on."""
        for server in self.servers:
            server.close()
        queued: list[tuple[Route, socket.socket]] = []
        for route, sock in self._listening:
            sock.setblocking(False)
            queued += [(route, conn) for conn in _accept_queued(route, sock)]
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._listening.clear()
        if queued:
            log.info(
                "draining: serving %d connection(s) queued before the listeners closed", len(queued)
            )
        await asyncio.gather(*(self._adopt(route, conn) for route, conn in queued))

    async def _adopt(self, route: Route, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self._factory(route), sock=conn)
        except OSError as exc:
            log.warning("a connection queued at drain could not be served: %s", exc)
            conn.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let open connections finish, cut what is left after `timeout`."""
        self.draining = True
        await self._stop_listening()
        for carrier in list(self.carriers):
            carrier.retire("drain")  # no new streams; the peer is told
        if self.conns:
            log.info("draining %d open connection(s), up to %ss", len(self.conns), timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), timeout)
        left = list(self.conns)
        for conn in left:
            conn.drain_timeout()
        if left:
            log.warning("drain timeout: cut %d connection(s)", len(left))
        for carrier in list(self.carriers):
            carrier.close("drain")


def _hbone_carrier_check(peer: SpiffeId | None) -> None:
    """An HBONE connection needs a valid SPIFFE ID; policy is for each of its streams."""
    if peer is None:
        raise PolicyDenied("bad_cert", "peer certificate is no valid X509-SVID")


def _accept_queued(route: Route, sock: socket.socket) -> list[socket.socket]:
    """The connections the kernel has completed on a (non-blocking) listening socket."""
    out: list[socket.socket] = []
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return out
        except OSError as exc:  # out of descriptors: what is left is reset at shutdown
            log.error("draining %s: cannot accept its queued connections: %s", route.name, exc)
            return out
        conn.setblocking(False)
        out.append(conn)


# --- the worker process ----------------------------------------------------------------------


def _send(msg: dict[str, Any]) -> None:
    # Replies are short JSON lines (an error text is cut to fit the master's line reader).
    if isinstance(msg.get("error"), str):
        msg["error"] = msg["error"][:2000]
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def _control(worker: Worker, settings: Settings, stop: asyncio.Event) -> None:
    """Read the master's commands from stdin (length-prefixed frames, proxy/control.py)
    until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    serving = False
    while True:
        try:
            frame = await control.read(reader)
        except ValueError as exc:
            log.error("unreadable message from the master, ignored: %s", exc)
            continue
        if frame is None:
            log.info("master went away: draining")
            stop.set()
            return
        msg, payload = frame
        op = msg.get("op")
        if op == "material":
            try:
                material = load_material(
                    msg["chain"].encode(),
                    msg["key"].encode(),
                    msg["bundle"].encode(),
                    msg.get("origin", "master"),
                )
                if msg.get("federated") or msg.get("domain_bound"):
                    material = with_federation(
                        material,
                        {td: str(pem).encode() for td, pem in msg.get("federated", {}).items()},
                        domain_bound=bool(msg.get("domain_bound")),
                    )
                state = tls_state_for(material, settings)
                worker.set_tls(state)
            except (CertError, ValueError, KeyError) as exc:
                _send({"op": "material_error", "error": str(exc)})
                continue
            if not serving:
                # The master sends the revocation list (if any) before the first material:
                # by now it is in force, so no revoked peer gets through at start-up.
                await worker.serve()
                serving = True
                _send({"op": "ready", "pid": os.getpid()})
            else:
                _send({"op": "material_ok", "serial": material.serial_hex})
        elif op == "crl":
            await worker.load_revocations(list(msg.get("issuers", [])), payload)
        elif op == "policy":
            worker.set_policy(str(msg.get("text", "")))
        elif op == "drain":
            stop.set()
            return


_PR_SET_PDEATHSIG = 1


def _die_with_master() -> None:
    """Have the kernel send us SIGTERM (drain) when the master goes away, even by SIGKILL;
    the master's closed stdin says the same, but only to a worker whose loop still reads."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def worker_main(
    settings: Settings, fds: list[tuple[Route, int]], counts: ConnectionCounts, slot: int
) -> int:
    master = os.getppid()
    _die_with_master()
    listeners = []
    for route, fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        listeners.append((route, sock))
    worker = Worker(settings, listeners, counts, slot)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the master decides, workers follow its word.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    async def control_then_stop() -> None:
        try:
            await _control(worker, settings, stop)
        finally:
            stop.set()  # however the control channel ends, a worker without it stops

    control = worker.spawn(control_then_stop(), "control")
    if os.getppid() != master:
        stop.set()  # the master died before the death signal was armed
    await stop.wait()
    control.cancel()
    await worker.drain(settings.drain_timeout)
    return 0
