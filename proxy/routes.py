"""Routes: what each listener does, built once from the settings, with their metric children."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter as _Counter

from . import metrics
from .config import Address, Settings
from .config.parse import HboneOutbound
from .flow import Direction, FlowConfig, Mode
from .proxyproto import sends_proxy_header


class RouteMetrics:
    """The labelled children of one route, resolved once so the hot path does no lookups."""

    def __init__(self, direction: str, route: str) -> None:
        self.direction = direction
        self.route = route
        self.connections = {
            sec: metrics.CONNECTIONS.labels(direction, route, sec) for sec in ("mtls", "plaintext")
        }
        self.active = metrics.ACTIVE.labels(direction, route)
        self.bytes = {
            (sec, flow): metrics.BYTES.labels(direction, route, sec, flow)
            for sec in ("mtls", "plaintext")
            for flow in ("in", "out")
        }
        self.handshake = metrics.HANDSHAKE.labels(direction)
        self.revoked_closed = metrics.REVOKED_CLOSED.labels(direction, route)
        self.internal_errors = metrics.INTERNAL_ERRORS.labels(direction, route)
        self.internal_errors.inc(0)  # a series to alert on, from the first scrape
        self._rejected: dict[str, _Counter] = {}
        self._upstream: dict[str, _Counter] = {}
        # Touch the series users alert on, so they exist (at 0) from the first scrape.
        for sec in ("mtls", "plaintext"):
            self.connections[sec].inc(0)
        for key in self.bytes:
            self.bytes[key].inc(0)

    def rejected(self, reason: str) -> _Counter:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = metrics.REJECTED.labels(
                self.direction, self.route, reason
            )
        return child

    def upstream_failure(self, reason: str) -> _Counter:
        child = self._upstream.get(reason)
        if child is None:
            child = self._upstream[reason] = metrics.UPSTREAM_FAILURES.labels(
                self.direction, self.route, reason
            )
        return child


@dataclass
class Route:
    """A listener's job: which direction, where to send, what to demand of the peer."""

    direction: str  # "inbound" | "outbound"
    name: str
    listen: Address
    target: tuple[str, int] | None  # None: the original destination (transparent mode)
    mode: str  # inbound: strict|permissive|audit; outbound: strict|permissive
    expected_peer: str | None = None
    transparent: bool = False
    handshake_timeout: float = 10.0
    # Inbound: open each connection to the app with a PROXY v2 header (MTLS_PROXY_PROTOCOL).
    proxy_protocol: bool = False
    proxy_id_tlv: int = 0xE0
    proxy_crc: bool = False
    # Outbound: each connection from the app's side starts with a PROXY v2 header.
    accept_proxy: bool = False
    # Inbound: the HBONE listener (MTLS_HBONE_LISTEN). Its connections are HTTP/2 carriers;
    # each CONNECT stream is judged under the route it names (see Worker.hbone_stream).
    hbone: bool = False
    # Outbound (MTLS_HBONE_OUTBOUND): dial HBONE to the destination host's `hbone_port`:
    # every connection of a named route, or (transparent) those whose destination matches.
    hbone_all: bool = False
    hbone_match: HboneOutbound | None = None
    hbone_port: int = 15008
    metrics: RouteMetrics = field(init=False)
    flow_config: FlowConfig = field(init=False)

    def dials_hbone(self, host: str, port: int) -> bool:
        """Outbound: does a connection to `host:port` go as an HBONE stream?"""
        if self.hbone_all:
            return True
        match = self.hbone_match
        return match is not None and match.matches(host, port)

    def __post_init__(self) -> None:
        self.metrics = RouteMetrics(self.direction, self.name)
        self.flow_config = FlowConfig(
            Direction(self.direction), self.name, Mode(self.mode), self.handshake_timeout
        )


def routes_for(settings: Settings) -> list[Route]:
    """Every listener of this sidecar, in a fixed order (the master and workers agree on it)."""
    routes = _routes(settings)
    for r in routes:
        if r.direction == "inbound":
            r.proxy_protocol = sends_proxy_header(settings.proxy_protocol, r.name)
            r.proxy_id_tlv = settings.proxy_protocol_id_tlv
            r.proxy_crc = settings.proxy_protocol_crc32c
        else:
            if not r.transparent:
                r.accept_proxy = settings.outbound_accept_proxy_protocol
            r.hbone_port = settings.hbone_port
            if r.transparent:
                r.hbone_match = settings.hbone_outbound or None
            else:
                r.hbone_all = r.name in settings.hbone_outbound.routes
    return routes


def _routes(settings: Settings) -> list[Route]:
    routes: list[Route] = []
    for r in settings.inbound:
        routes.append(
            Route(
                "inbound",
                r.name,
                r.listen,
                (r.target.host, r.target.port),
                settings.inbound_mode,
                handshake_timeout=settings.handshake_timeout,
            )
        )
    for o in settings.outbound:
        routes.append(
            Route(
                "outbound",
                o.name,
                o.listen,
                (o.remote.host, o.remote.port),
                settings.outbound_mode,
                expected_peer=str(o.expected_peer) if o.expected_peer is not None else None,
                handshake_timeout=settings.handshake_timeout,
            )
        )
    hbone = settings.hbone_address
    if hbone is not None:
        routes.append(
            Route(
                "inbound",
                str(hbone.port),
                hbone,
                ("127.0.0.1", hbone.port),  # never dialled: each stream names its own
                "strict",
                handshake_timeout=settings.handshake_timeout,
                hbone=True,
            )
        )
    if settings.transparent:
        routes.append(
            Route(
                "inbound",
                str(settings.inbound_capture_port),
                Address("", settings.inbound_capture_port),
                None,
                settings.inbound_mode,
                transparent=True,
                handshake_timeout=settings.handshake_timeout,
            )
        )
        routes.append(
            Route(
                "outbound",
                str(settings.outbound_capture_port),
                Address("", settings.outbound_capture_port),
                None,
                settings.outbound_mode,
                transparent=True,
                handshake_timeout=settings.handshake_timeout,
            )
        )
    return routes
