"""Every Prometheus collector of the sidecar, defined once; names and labels are API."""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONNECTIONS = Counter(
    "mtls_connections",
    "Connections proxied, by direction, route and whether the network leg was mTLS or plaintext.",
    ["direction", "route", "security"],
)
ACTIVE = Gauge(
    "mtls_connections_active",
    "Connections open right now (after the handshake), by direction and route.",
    ["direction", "route"],
    multiprocess_mode="livesum",
)
REJECTED = Counter(
    "mtls_connections_rejected",
    "Connections refused before any application byte was relayed, by reason; "
    "reason policy_changed: open connections cut because a new policy file denies them; "
    "policy_denied: outbound destinations or remote identities the policy file denies.",
    ["direction", "route", "reason"],
)
BYTES = Counter(
    "mtls_bytes",
    "Application bytes relayed; flow=in is from the network peer, flow=out is to it. "
    "security=mtls bytes crossed the network inside TLS, security=plaintext without it.",
    ["direction", "route", "security", "flow"],
)
HANDSHAKE = Histogram(
    "mtls_handshake_seconds",
    "Duration of successful TLS handshakes (including client certificate verification).",
    ["direction"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PEERS = Counter(
    "mtls_peer_connections",
    "Accepted mTLS connections by peer SPIFFE ID (capped; the rest are counted as 'other').",
    ["direction", "peer_identity"],
)
PEER_BYTES = Counter(
    "mtls_peer_bytes",
    "Application bytes relayed on accepted mTLS connections, by peer SPIFFE ID (capped like "
    "mtls_peer_connections_total) and flow (in: from the peer, out: to it).",
    ["direction", "peer_identity", "flow"],
)
PEER_KEY_EXCHANGE = Counter(
    "mtls_peer_key_exchange",
    "Accepted mTLS connections by peer SPIFFE ID (capped like mtls_peer_connections_total) "
    "and the key-exchange group of their TLS connection (a stream on a pooled connection: "
    "that connection's group; X25519MLKEM768 is post-quantum hybrid).",
    ["direction", "peer_identity", "group"],
)
PEER_REJECTIONS = Counter(
    "mtls_peer_rejections",
    "Refusals of a peer whose verified certificate named a SPIFFE ID, by that ID (capped "
    "like mtls_peer_connections_total) and reason (peer_not_allowed, policy_denied, "
    "policy_changed, revoked, expired_cert, identity_mismatch); each is also counted in "
    "mtls_connections_rejected_total, where refusals of unknown peers stay.",
    ["direction", "peer_identity", "reason"],
)
UPSTREAM_FAILURES = Counter(
    "mtls_upstream_connect_failures",
    "Failures to reach the next hop (the local app inbound, the remote peer outbound).",
    ["direction", "route", "reason"],
)
CERT_RENEWALS = Counter(
    "mtls_cert_renewals",
    "Certificate renewals with the CA (ca identity source), by result.",
    ["result"],
)
CERT_RELOADS = Counter(
    "mtls_cert_reloads",
    "Reloads of certificate, key and trust bundle (SIGHUP, file change, renewal), by result.",
    ["result"],
)
CRL_RELOADS = Counter(
    "mtls_crl_reloads",
    "Revocation lists received (CA fetch, MTLS_CRL_FILE change), by result: a list that fails "
    "its signature check is refused and the last good one kept.",
    ["result"],
)
BUNDLE_UPDATES = Counter(
    "mtls_trust_bundle_updates",
    "Trust bundles received per trust domain (SPIFFE federation: Workload API, bundle file, "
    "bundle endpoint), by result: a bad one is refused and the domain keeps its last good one.",
    ["trust_domain", "result"],
)
WORKLOAD_API_ERRORS = Counter(
    "mtls_workload_api_errors",
    "Failed or broken FetchX509SVID streams with the SPIFFE Workload API, by gRPC status "
    "code (unavailable: the agent is down or restarting); the stream is opened again.",
    ["code"],
)
POLICY_DECISIONS = Counter(
    "mtls_policy_decisions",
    "Verdicts of the authorization policy (MTLS_POLICY_FILE) on connections and pooled "
    "streams, by direction; dry_run=true verdicts were only counted and logged, not enforced.",
    ["direction", "route", "decision", "dry_run"],
)
POLICY_RELOADS = Counter(
    "mtls_policy_reloads",
    "Loads of MTLS_POLICY_FILE (start, change, SIGHUP): ok, or error (refused: the policy "
    "in force stays).",
    ["result"],
)
REVOKED_CLOSED = Counter(
    "mtls_revoked_connections_closed",
    "Open connections closed because a new revocation list lists their peer's certificate.",
    ["direction", "route"],
)
INTERNAL_ERRORS = Counter(
    "mtls_internal_errors",
    "Connections cut because the sidecar itself failed while handling them (a bug: the "
    "connection is reset and logged with its traceback, event=internal_error; every other "
    "connection goes on).",
    ["direction", "route"],
)
HANDSHAKES = Counter(
    "mtls_handshakes",
    "Completed mTLS handshakes, by direction, key-exchange group (e.g. X25519MLKEM768 is "
    "post-quantum hybrid) and whether the session was resumed from a ticket.",
    ["direction", "group", "resumed"],
)

POOL_CONNECTIONS = Gauge(
    "mtls_pool_connections",
    "Pooled mTLS connections between sidecars (connection reuse), by direction; state=open "
    "counts all of them, state=idle those carrying no stream right now.",
    ["direction", "state"],
    multiprocess_mode="livesum",
)
POOL_STREAMS = Counter(
    "mtls_pool_streams",
    "Application connections carried as streams on a pooled mTLS connection (no handshake "
    "of their own), by direction.",
    ["direction"],
)
POOL_STREAMS_PER_CONNECTION = Histogram(
    "mtls_pool_streams_per_connection",
    "Streams a pooled mTLS connection carried in its life, observed when it closes.",
    ["direction"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000, 100000),
)
POOL_RETIRED = Counter(
    "mtls_pool_retired",
    "Pooled mTLS connections retired, by direction and why: idle, max_lifetime, rotation "
    "(our certificate or trust bundle changed), goaway (the peer's did), drain, revoked, "
    "broken (TCP or TLS error), protocol_error, flow_control (the peer sent beyond a stream's "
    "or the connection's window), untrusted (the new trust bundle no longer trusts the peer), "
    "unresponsive (a new stream got no answer, nor anything else; or PINGs went unanswered; "
    "HBONE: no answer to a PING), stream_ids (2**31 streams opened on it); HBONE connections "
    "also stream_limit and frame_size.",
    ["direction", "reason"],
)
POOL_STREAM_ERRORS = Counter(
    "mtls_pool_stream_errors",
    "Streams on pooled mTLS connections that the peer ended by breaking a stream rule of the "
    "wire format, by direction and reason: data_after_eof (we reset the stream), "
    "unknown_reset_code (a RESET with a code the format does not define), stream_limit "
    "(opened beyond MTLS_POOL_MAX_STREAMS at once: refused).",
    ["direction", "reason"],
)


class PoolChildren:
    """The labelled pool series of one direction."""

    def __init__(self, direction: str) -> None:
        self.open = POOL_CONNECTIONS.labels(direction, "open")
        self.idle = POOL_CONNECTIONS.labels(direction, "idle")
        self.streams = POOL_STREAMS.labels(direction)


_pool_children: dict[str, PoolChildren] = {}


def pool_gauges(direction: str) -> PoolChildren:
    children = _pool_children.get(direction)
    if children is None:
        children = _pool_children[direction] = PoolChildren(direction)
    return children


class IdentityGauges(Collector):
    """The master's view of its identity: the current certificate's expiry and the trust
    bundle's size. Only the identity held now has a series: after a reload to another
    identity the old one's expiry is gone (it must not fire an expiry alert later). Kept out
    of the multi-process files, which cannot forget a label set."""

    def __init__(self) -> None:
        self._expiry: tuple[str, float] | None = None
        self._roots: int | None = None
        self._crl: tuple[float | None, float | None, int] | None = None
        self._source: str | None = None
        self._domains: dict[str, tuple[int, float | None]] = {}
        self._workload_api: bool | None = None

    def set_source(self, source: str) -> None:
        """The identity source in use (files, ca, spiffe)."""
        self._source = source

    def set_domains(self, domains: dict[str, tuple[int, float | None]]) -> None:
        """Each trust domain's bundle in use: (roots, unix time it last changed or None)."""
        self._domains = dict(domains)

    def set_workload_api(self, connected: bool) -> None:
        """Whether the FetchX509SVID stream with the Workload API is open right now."""
        self._workload_api = connected

    def set_crl(self, this_update: float | None, next_update: float | None, revoked: int) -> None:
        """The revocation list in use: its oldest thisUpdate, earliest nextUpdate, entries."""
        self._crl = (this_update, next_update, revoked)

    def set(self, identity: str, not_after: float, roots: int) -> None:
        """Hold `identity`, valid until `not_after` (unix time), with `roots` trust roots."""
        self._expiry = (identity, not_after)
        self._roots = roots

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "mtls_cert_expiry_timestamp_seconds",
            "Unix time at which the sidecar's current certificate expires.",
            labels=["identity"],
        )
        if self._expiry is not None:
            expiry.add_metric([self._expiry[0]], self._expiry[1])
        yield expiry
        roots = GaugeMetricFamily(
            "mtls_trust_bundle_roots", "Number of CA certificates in the trust bundle in use."
        )
        if self._roots is not None:
            roots.add_metric([], self._roots)
        yield roots
        this = GaugeMetricFamily(
            "mtls_crl_this_update_timestamp_seconds",
            "thisUpdate of the oldest revocation list in use (its age is time() minus this).",
        )
        nxt = GaugeMetricFamily(
            "mtls_crl_next_update_timestamp_seconds",
            "nextUpdate of the revocation lists in use: past it, they are stale.",
        )
        entries = GaugeMetricFamily(
            "mtls_crl_revoked_certificates", "Certificates listed by the revocation lists in use."
        )
        if self._crl is not None:
            if self._crl[0] is not None:
                this.add_metric([], self._crl[0])
            if self._crl[1] is not None:
                nxt.add_metric([], self._crl[1])
            entries.add_metric([], self._crl[2])
        yield this
        yield nxt
        yield entries
        source = GaugeMetricFamily(
            "mtls_identity_source_info",
            "Where the sidecar's identity comes from (files, ca, spiffe): always 1.",
            labels=["source"],
        )
        if self._source is not None:
            source.add_metric([self._source], 1)
        yield source
        domain_roots = GaugeMetricFamily(
            "mtls_trust_domain_bundle_roots",
            "CA certificates in each trust domain's bundle in use (our own and federated ones).",
            labels=["trust_domain"],
        )
        updated = GaugeMetricFamily(
            "mtls_trust_domain_bundle_updated_timestamp_seconds",
            "Unix time each trust domain's bundle last changed (its age is time() minus this).",
            labels=["trust_domain"],
        )
        for td, (count, when) in sorted(self._domains.items()):
            domain_roots.add_metric([td], count)
            if when is not None:
                updated.add_metric([td], when)
        yield domain_roots
        yield updated
        connected = GaugeMetricFamily(
            "mtls_workload_api_connected",
            "1 while the FetchX509SVID stream with the SPIFFE Workload API is open, else 0.",
        )
        if self._workload_api is not None:
            connected.add_metric([], 1 if self._workload_api else 0)
        yield connected


IDENTITY = IdentityGauges()
REGISTRY.register(IDENTITY)


_handshake_children: dict[tuple[str, str, bool], Counter] = {}


def handshake_counter(direction: str, group: str, resumed: bool) -> Counter:
    """The mtls_handshakes_total child for these labels (looked up once per label set)."""
    key = (direction, group, resumed)
    child = _handshake_children.get(key)
    if child is None:
        child = HANDSHAKES.labels(direction, group or "unknown", "yes" if resumed else "no")
        _handshake_children[key] = child
    return child


class PeerLabels:
    """Caps the peer_identity label: the first `cap` identities seen keep their name."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._known: set[str] = set()

    def label(self, identity: str | None) -> str:
        if identity is None:
            return "none"
        if identity in self._known:
            return identity
        if len(self._known) < self._cap:
            self._known.add(identity)
            return identity
        return "other"


class PeerCounters:
    """One worker's per-peer series (mtls_peer_*), under capped identity labels
    (`PeerLabels`): the children are looked up once per label set, as the hot path wants."""

    def __init__(self, cap: int) -> None:
        self.labels = PeerLabels(cap)
        # per (direction, peer label): connections, bytes in, bytes out
        self._conns: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        # per (direction, peer label, group) and (direction, peer label, reason)
        self._groups: dict[tuple[str, str, str], Counter] = {}
        self._refusals: dict[tuple[str, str, str], Counter] = {}

    def connection(
        self, direction: str, identity: str | None, group: str | None
    ) -> tuple[Counter, Counter]:
        """Count one accepted mTLS connection of this peer, and its key-exchange `group`
        (None: not known, nothing counted); its (bytes in, bytes out) counters."""
        label = self.labels.label(identity)
        key = (direction, label)
        children = self._conns.get(key)
        if children is None:
            children = self._conns[key] = (
                PEERS.labels(direction, label),
                PEER_BYTES.labels(direction, label, "in"),
                PEER_BYTES.labels(direction, label, "out"),
            )
        children[0].inc()
        if group is not None:
            gkey = (direction, label, group)
            child = self._groups.get(gkey)
            if child is None:
                child = self._groups[gkey] = PEER_KEY_EXCHANGE.labels(
                    direction, label, group or "unknown"
                )
            child.inc()
        return children[1], children[2]

    def rejection(self, direction: str, identity: str, reason: str) -> None:
        """Count one refusal of this identified peer."""
        label = self.labels.label(identity)
        key = (direction, label, reason)
        child = self._refusals.get(key)
        if child is None:
            child = self._refusals[key] = PEER_REJECTIONS.labels(direction, label, reason)
        child.inc()


def _registry() -> CollectorRegistry:
    """What a scrape reads: the sum over all worker processes when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(IDENTITY)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The /metrics body."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def totals() -> dict[str, float]:
    """Sum of every sample per sample name (all label values, all processes), for /status."""
    out: dict[str, float] = {}
    for family in _registry().collect():
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
