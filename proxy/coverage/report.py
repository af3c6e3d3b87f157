"""The coverage report model, pure: PromQL to ask, and the report built from the answers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

# Counters read over the window, each with the labels the report keeps.
COUNTERS: dict[str, str] = {
    "connections": "mtls_connections_total",
    "bytes": "mtls_bytes_total",
    "peers": "mtls_peer_connections_total",
    "peer_bytes": "mtls_peer_bytes_total",
    "peer_key_exchange": "mtls_peer_key_exchange_total",
    "peer_rejections": "mtls_peer_rejections_total",
    "rejected": "mtls_connections_rejected_total",
    "handshakes": "mtls_handshakes_total",
    "audit_connections": "mtls_audit_connections_total",
    "audit_bytes": "mtls_audit_bytes_total",
}
EXPIRY = "mtls_cert_expiry_timestamp_seconds"

UNIDENTIFIED = "unidentified"
"""The unknown end of an edge that holds refusals of peers without a known identity."""

# The wire agrees with an edge's sidecars on bytes while it carried at most 1.25 x their
# bytes plus 64 KiB per connection they counted on the edge (relayed or refused): the ratio
# and allowance of the MtlsAuditDisagrees alert (deploy/prometheus/rules/mtls-audit.yml),
# whose 64 KiB per second becomes 64 KiB per connection here: over a window, what TLS adds to
# the app's bytes on the wire (handshakes, certificates, the reuse protocol's framing) grows
# with connections, while a per-second allowance would hide a whole edge of traffic going
# around the sidecars in a long window.
WIRE_BYTES_RATIO = 1.25
WIRE_BYTES_PER_CONNECTION = 65536

_WORKLOAD = re.compile(r"/ns/([^/]+)/sa/([^/]+)$")

K = TypeVar("K")

Sample = Mapping[str, Any]
"""One element of a Prometheus instant-vector answer: {"metric": {...}, "value": [t, "v"]}."""


class ReportError(Exception):
    """The answers cannot make a report (e.g. no sidecar metric at all in the window)."""


def queries(window_seconds: int) -> dict[str, str]:
    """Every instant query the report needs, by name, evaluated at the window's end.

    A counter's increase over the window is computed exactly from three answers per series
    (see `exact_increases`); Prometheus' own `increase()` (which extrapolates to the window's
    edges) is only used for a series that restarted (reset) inside the window.
    """
    w = f"[{window_seconds}s]"
    out: dict[str, str] = {}
    for name, metric in COUNTERS.items():
        out[f"{name}:last"] = f"last_over_time({metric}{w})"
        out[f"{name}:start"] = f"{metric} offset {window_seconds}s"
        out[f"{name}:resets"] = f"resets({metric}{w})"
        out[f"{name}:increase"] = f"increase({metric}{w})"
    out["expiry"] = f"last_over_time({EXPIRY}{w})"
    return out


def coverage_range_query() -> str:
    """The coverage-over-time series (for `query_range`; RANGE is replaced by a duration)."""
    return (
        'sum(increase(mtls_bytes_total{security="mtls"}[RANGE])) '
        "/ sum(increase(mtls_bytes_total[RANGE])) * 100"
    )


def _key(metric: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in metric.items() if k != "__name__"))


def _value(sample: Sample) -> float:
    return float(sample["value"][1])


def exact_increases(
    last: Sequence[Sample],
    start: Sequence[Sample],
    resets: Sequence[Sample],
    increase: Sequence[Sample],
) -> list[tuple[dict[str, str], float, bool]]:
    """Per series: (labels, increase over the window, exact?).

    Without a reset in the window the increase is the last value minus the value at the
    window's start, or minus 0 for a series born inside the window (the counter started at 0,
    so its first scrape already counts): exact, no extrapolation. With a reset, Prometheus'
    `increase()` is used and the result is marked inexact.
    """
    starts = {_key(s["metric"]): _value(s) for s in start}
    reset = {_key(s["metric"]): _value(s) for s in resets}
    approx = {_key(s["metric"]): _value(s) for s in increase}
    out: list[tuple[dict[str, str], float, bool]] = []
    for s in last:
        k = _key(s["metric"])
        labels = dict(k)
        if reset.get(k, 0.0) > 0:
            out.append((labels, approx.get(k, 0.0), False))
        else:
            out.append((labels, max(0.0, _value(s) - starts.get(k, 0.0)), True))
    return out


def _pq(group: str) -> bool:
    return "MLKEM" in group.upper()


def workload_of(spiffe_id: str) -> str | None:
    """The wire auditor's name (`namespace/service_account`) for a SPIFFE ID that follows the
    Kubernetes convention spiffe://TRUST_DOMAIN/ns/NS/sa/SA; None for any other ID. Matched
    on the path's suffix, so the trust domain need not be known."""
    if not spiffe_id.startswith("spiffe://"):
        return None
    m = _WORKLOAD.search(spiffe_id[len("spiffe://") :])
    return None if m is None else f"{m.group(1)}/{m.group(2)}"


def unidentified_refusals(by_route: Mapping[str, float], identified: float) -> dict[str, float]:
    """Of one sidecar's refusals of one direction and reason (`by_route`, from the route
    counter, which counts them all), those of peers without a known identity, by route: the
    route counter minus the `identified` ones (mtls_peer_rejections_total, which has no route
    label). Exact per route when none were identified, or when one route refused them all;
    otherwise the rest cannot be placed on a route and is given under route `*`."""
    rest = sum(by_route.values()) - identified
    if rest <= 0:
        return {}
    refusing = sorted(r for r, n in by_route.items() if n > 0)
    if identified <= 0:
        return {r: by_route[r] for r in refusing}
    if len(refusing) == 1:
        return {refusing[0]: rest}
    return {"*": rest}


@dataclass
class Split:
    """A count split by how it crossed the network."""

    mtls: float = 0.0
    plaintext: float = 0.0

    def add(self, security: str, value: float) -> None:
        if security == "mtls":
            self.mtls += value
        elif security == "plaintext":
            self.plaintext += value


@dataclass
class Route:
    """One route of one sidecar over the window (connections and bytes both flows)."""

    instance: str
    identity: str
    direction: str
    route: str
    connections: Split = field(default_factory=Split)
    bytes: Split = field(default_factory=Split)
    refused: float = 0.0


@dataclass
class EdgeWire:
    """What the wire auditor saw between an edge's two workloads (its `src`/`dst` labels,
    from the SPIFFE IDs by `workload_of`), and whether that agrees with the sidecars."""

    source: str
    destination: str
    verdict: str  # agrees | disagrees | not_seen
    reasons: list[str]  # when it disagrees: plaintext_on_wire, bytes_not_carried
    connections: dict[str, float]  # by class
    bytes: dict[str, float]  # by class
    allowed_bytes: float  # the most the wire may carry and agree (WIRE_BYTES_RATIO ...)


@dataclass
class Edge:
    """Source identity -> destination identity, as each end counted its mTLS connections,
    their bytes (both flows), their key-exchange groups and its refusals; and the wire's
    verdict on it. An edge with `route` holds refusals of peers without a known identity:
    its other end is UNIDENTIFIED, and `route` is the refusing sidecar's route."""

    source: str
    destination: str
    seen_by_source: float = 0.0
    seen_by_destination: float = 0.0
    bytes_seen_by_source: float = 0.0
    bytes_seen_by_destination: float = 0.0
    route: str | None = None
    groups_seen_by_source: dict[str, float] = field(default_factory=dict)
    groups_seen_by_destination: dict[str, float] = field(default_factory=dict)
    post_quantum_percent: float | None = None
    refused_by_source: dict[str, float] = field(default_factory=dict)
    refused_by_destination: dict[str, float] = field(default_factory=dict)
    wire: EdgeWire | None = None


@dataclass
class Certificate:
    instance: str
    identity: str
    expires: str
    expires_at: float
    expires_in_window: bool


@dataclass
class WireEdge:
    src: str
    dst: str
    dst_port: str
    cls: str
    connections: float = 0.0
    bytes: float = 0.0


@dataclass
class Wire:
    """What the wire auditor saw (only when its metrics are in Prometheus)."""

    connections: dict[str, float]
    bytes: dict[str, float]
    coverage_percent: float | None
    plaintext_edges: list[WireEdge]
    agrees: bool


@dataclass
class Report:
    """Everything the report shows; `to_json()` is the `--format json` document."""

    start: str
    end: str
    window_seconds: int
    coverage_percent: float | None
    connections: Split
    bytes: Split
    refusals: dict[str, float]
    handshakes: float
    post_quantum_handshakes: float
    post_quantum_percent: float | None
    handshakes_by_group: dict[str, float]
    routes: list[Route]
    edges: list[Edge]
    certificates: list[Certificate]
    wire: Wire | None
    exact: bool
    coverage_over_time: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.wire is not None:
            for e in d["wire"]["plaintext_edges"]:
                e["class"] = e.pop("cls")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pct(part: float, whole: float) -> float | None:
    return None if whole <= 0 else 100.0 * part / whole


def _add(counts: dict[K, float], key: K, value: float) -> None:
    counts[key] = counts.get(key, 0.0) + value


def edge_post_quantum(e: Edge) -> float | None:
    """Percent of the edge's connections with a known key-exchange group whose group is a
    post-quantum hybrid, from both ends' counts (each end counts the same connections, so
    the share is the same from either; one end's counts when the other is not scraped)."""
    known = pq = 0.0
    for groups in (e.groups_seen_by_source, e.groups_seen_by_destination):
        for g, v in groups.items():
            if g and g != "unknown":
                known += v
                if _pq(g):
                    pq += v
    return _pct(pq, known)


def wire_verdict(
    e: Edge, source: str, destination: str, seen: tuple[dict[str, float], dict[str, float]] | None
) -> EdgeWire:
    """The wire's verdict on a sidecar edge whose workloads are `source` -> `destination`:
    `seen` is what the auditor counted between them (connections, bytes, by class), None
    when it has no such edge. It agrees when it saw only TLS there (no plaintext connection
    or byte) and no more bytes than the sidecars carried, within the tolerance."""
    connections = max(e.seen_by_source, e.seen_by_destination) + max(
        sum(e.refused_by_source.values()), sum(e.refused_by_destination.values())
    )
    carried = max(e.bytes_seen_by_source, e.bytes_seen_by_destination)
    allowed = WIRE_BYTES_RATIO * carried + WIRE_BYTES_PER_CONNECTION * connections
    if seen is None:
        return EdgeWire(source, destination, "not_seen", [], {}, {}, allowed)
    conns, byts = seen
    reasons: list[str] = []
    if conns.get("plaintext", 0.0) > 0 or byts.get("plaintext", 0.0) > 0:
        reasons.append("plaintext_on_wire")
    if sum(byts.values()) > allowed:
        reasons.append("bytes_not_carried")
    return EdgeWire(
        source,
        destination,
        "disagrees" if reasons else "agrees",
        reasons,
        dict(sorted(conns.items())),
        dict(sorted(byts.items())),
        allowed,
    )


def build(answers: Mapping[str, Sequence[Sample]], end: float, window_seconds: int) -> Report:
    """The report from the answers to `queries(window_seconds)` evaluated at `end`."""
    inc: dict[str, list[tuple[dict[str, str], float, bool]]] = {}
    exact = True
    for name in COUNTERS:
        inc[name] = exact_increases(
            answers.get(f"{name}:last", ()),
            answers.get(f"{name}:start", ()),
            answers.get(f"{name}:resets", ()),
            answers.get(f"{name}:increase", ()),
        )
        exact = exact and all(ok for _, _, ok in inc[name])
    expiry = answers.get("expiry", ())
    if not expiry and not inc["connections"] and not inc["bytes"]:
        raise ReportError(
            "no mtls-sidecar metrics in Prometheus over the window "
            "(is it scraping the sidecars' admin ports?)"
        )

    # Which identity each scraped sidecar has (the newest certificate if several).
    identity_of: dict[str, tuple[float, str]] = {}
    certificates: list[Certificate] = []
    for s in expiry:
        m, at = s["metric"], _value(s)
        inst, who = m.get("instance", ""), m.get("identity", "")
        if inst not in identity_of or at > identity_of[inst][0]:
            identity_of[inst] = (at, who)
        certificates.append(Certificate(inst, who, _iso(at), at, at <= end + window_seconds))
    certificates.sort(key=lambda c: (c.expires_at, c.identity, c.instance))

    def ident(inst: str) -> str:
        return identity_of.get(inst, (0.0, f"instance {inst}"))[1]

    routes: dict[tuple[str, str, str], Route] = {}

    def route(m: Mapping[str, str]) -> Route:
        key = (m.get("instance", ""), m.get("direction", ""), m.get("route", ""))
        if key not in routes:
            routes[key] = Route(key[0], ident(key[0]), key[1], key[2])
        return routes[key]

    connections, byts = Split(), Split()
    for m, v, _ in inc["connections"]:
        route(m).connections.add(m.get("security", ""), v)
        connections.add(m.get("security", ""), v)
    for m, v, _ in inc["bytes"]:
        route(m).bytes.add(m.get("security", ""), v)
        byts.add(m.get("security", ""), v)
    refusals: dict[str, float] = {}
    # per (instance, direction, reason): refusals by route, for the unidentified ones
    refused_by_route: dict[tuple[str, str, str], dict[str, float]] = {}
    for m, v, _ in inc["rejected"]:
        route(m).refused += v
        _add(refusals, m.get("reason", ""), v)
        where = (m.get("instance", ""), m.get("direction", ""), m.get("reason", ""))
        _add(refused_by_route.setdefault(where, {}), m.get("route", ""), v)

    edges: dict[tuple[str, str, str], Edge] = {}

    def edge(m: Mapping[str, str]) -> tuple[Edge, bool]:
        me, peer = ident(m.get("instance", "")), m.get("peer_identity", "")
        if m.get("direction") == "inbound":
            return edges.setdefault((peer, me, ""), Edge(peer, me)), False
        return edges.setdefault((me, peer, ""), Edge(me, peer)), True

    for m, v, _ in inc["peers"]:
        e, by_source = edge(m)
        if by_source:
            e.seen_by_source += v
        else:
            e.seen_by_destination += v
    for m, v, _ in inc["peer_bytes"]:
        e, by_source = edge(m)
        if by_source:
            e.bytes_seen_by_source += v
        else:
            e.bytes_seen_by_destination += v
    # (a group or refusal series that did not grow in the window says nothing of it)
    for m, v, _ in inc["peer_key_exchange"]:
        if v <= 0:
            continue
        e, by_source = edge(m)
        _add(
            e.groups_seen_by_source if by_source else e.groups_seen_by_destination,
            m.get("group", ""),
            v,
        )
    identified: dict[tuple[str, str, str], float] = {}
    for m, v, _ in inc["peer_rejections"]:
        if v <= 0:
            continue
        e, by_source = edge(m)
        reason = m.get("reason", "")
        _add(e.refused_by_source if by_source else e.refused_by_destination, reason, v)
        _add(identified, (m.get("instance", ""), m.get("direction", ""), reason), v)
    for (inst, direction, reason), by_route in refused_by_route.items():
        rest = unidentified_refusals(by_route, identified.get((inst, direction, reason), 0.0))
        for name, v in rest.items():
            me = ident(inst)
            if direction == "inbound":
                e = edges.setdefault((UNIDENTIFIED, me, name), Edge(UNIDENTIFIED, me, route=name))
                _add(e.refused_by_destination, reason, v)
            else:
                e = edges.setdefault((me, UNIDENTIFIED, name), Edge(me, UNIDENTIFIED, route=name))
                _add(e.refused_by_source, reason, v)
    for e in edges.values():
        e.post_quantum_percent = edge_post_quantum(e)
        for counts in (e.refused_by_source, e.refused_by_destination):
            ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            counts.clear()
            counts.update(ordered)

    groups: dict[str, float] = {}
    for m, v, _ in inc["handshakes"]:
        _add(groups, m.get("group", ""), v)
    hs = sum(groups.values())
    pq = sum(v for g, v in groups.items() if _pq(g))

    wire: Wire | None = None
    if inc["audit_connections"] or inc["audit_bytes"]:
        wc: dict[str, float] = {}
        wb: dict[str, float] = {}
        wedges: dict[tuple[str, str, str, str], WireEdge] = {}
        # per (src, dst) workload pair, all ports: (connections, bytes) by class
        pairs: dict[tuple[str, str], tuple[dict[str, float], dict[str, float]]] = {}
        for m, v, _ in inc["audit_connections"]:
            c = m.get("class", "")
            _add(wc, c, v)
            _add(pairs.setdefault((m.get("src", ""), m.get("dst", "")), ({}, {}))[0], c, v)
            if c == "plaintext":
                k = (m.get("src", ""), m.get("dst", ""), m.get("dst_port", ""), c)
                wedges.setdefault(k, WireEdge(*k)).connections += v
        for m, v, _ in inc["audit_bytes"]:
            c = m.get("class", "")
            _add(wb, c, v)
            _add(pairs.setdefault((m.get("src", ""), m.get("dst", "")), ({}, {}))[1], c, v)
            if c == "plaintext":
                k = (m.get("src", ""), m.get("dst", ""), m.get("dst_port", ""), c)
                wedges.setdefault(k, WireEdge(*k)).bytes += v
        tls, plain = wb.get("tls", 0.0), wb.get("plaintext", 0.0)
        wire = Wire(
            connections=dict(sorted(wc.items())),
            bytes=dict(sorted(wb.items())),
            coverage_percent=_pct(tls, tls + plain),
            plaintext_edges=sorted(
                (e for e in wedges.values() if e.connections or e.bytes),
                key=lambda e: (-e.bytes, e.src, e.dst, e.dst_port),
            ),
            # The wire agrees when it saw no more plaintext connections than the sidecars
            # admit to having carried (permissive inbound, permissive outbound fallback).
            agrees=wc.get("plaintext", 0.0) <= connections.plaintext,
        )
        for e in edges.values():
            src, dst = workload_of(e.source), workload_of(e.destination)
            if e.route is None and src is not None and dst is not None:
                e.wire = wire_verdict(e, src, dst, pairs.get((src, dst)))

    return Report(
        start=_iso(end - window_seconds),
        end=_iso(end),
        window_seconds=window_seconds,
        coverage_percent=_pct(byts.mtls, byts.mtls + byts.plaintext),
        connections=connections,
        bytes=byts,
        refusals=dict(sorted(refusals.items(), key=lambda kv: (-kv[1], kv[0]))),
        handshakes=hs,
        post_quantum_handshakes=pq,
        post_quantum_percent=_pct(pq, hs),
        handshakes_by_group=dict(sorted(groups.items())),
        routes=sorted(routes.values(), key=lambda r: (r.identity, r.direction, r.route)),
        edges=sorted(edges.values(), key=lambda e: (e.source, e.destination, e.route or "")),
        certificates=certificates,
        wire=wire,
        exact=exact,
    )


def passes(report: Report, min_coverage: float) -> bool:
    """The gate: coverage over the window at least `min_coverage` percent.

    A window with no bytes at all proves nothing, so it does not pass.
    """
    return report.coverage_percent is not None and report.coverage_percent >= min_coverage


def count_text(x: float) -> str:
    """A count or byte figure as both renderings print it."""
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def percent_text(x: float | None) -> str:
    """A share in percent, or n/a when there was nothing to divide."""
    return "n/a" if x is None else f"{x:.3f}%"


_n = count_text
_p = percent_text

# The tables' cells, shared by the text and HTML renderings (their headings differ where a
# terminal needs shorter ones).
ROUTE_HEAD = [
    "identity",
    "dir",
    "route",
    "conn mTLS",
    "conn plain",
    "bytes mTLS",
    "bytes plain",
    "refused",
]


def route_rows(r: Report) -> list[list[str]]:
    return [
        [
            x.identity,
            x.direction,
            x.route,
            _n(x.connections.mtls),
            _n(x.connections.plaintext),
            _n(x.bytes.mtls),
            _n(x.bytes.plaintext),
            _n(x.refused),
        ]
        for x in r.routes
    ]


def reasons_text(counts: Mapping[str, float]) -> str:
    """Refusals by reason in one cell ("peer_not_allowed 2, revoked 1"), "-" for none."""
    return ", ".join(f"{k} {_n(v)}" for k, v in counts.items()) or "-"


def wire_text(w: EdgeWire | None) -> str:
    """The wire's verdict on an edge in one cell; "-" without an auditor or a workload name."""
    if w is None:
        return "-"
    if w.reasons:
        return f"{w.verdict}: {', '.join(w.reasons)}"
    return w.verdict


def edge_ends(e: Edge) -> tuple[str, str]:
    """An edge's two ends as the tables show them: the refusing sidecar's side of an
    unidentified edge names its route."""
    if e.route is None:
        return e.source, e.destination
    if e.source == UNIDENTIFIED:
        return e.source, f"{e.destination} [{e.route}]"
    return f"{e.source} [{e.route}]", e.destination


EDGE_HEAD = [
    "source",
    "destination",
    "conn (src)",
    "conn (dst)",
    "bytes (src)",
    "bytes (dst)",
    "PQ",
    "refused (src)",
    "refused (dst)",
    "wire",
]


def edge_rows(r: Report) -> list[list[str]]:
    return [
        [
            *edge_ends(e),
            _n(e.seen_by_source),
            _n(e.seen_by_destination),
            _n(e.bytes_seen_by_source),
            _n(e.bytes_seen_by_destination),
            "-" if e.post_quantum_percent is None else _p(e.post_quantum_percent),
            reasons_text(e.refused_by_source),
            reasons_text(e.refused_by_destination),
            wire_text(e.wire),
        ]
        for e in r.edges
    ]


def certificate_rows(r: Report) -> list[list[str]]:
    return [
        [c.identity, c.instance, c.expires, "yes" if c.expires_in_window else "no"]
        for c in r.certificates
    ]


def wire_plaintext_rows(w: Wire) -> list[list[str]]:
    return [[e.src, e.dst, e.dst_port, _n(e.connections), _n(e.bytes)] for e in w.plaintext_edges]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join("{:<%d}" % w for w in widths)  # noqa: UP031 - widths are computed
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return [line.rstrip() for line in lines + [fmt.format(*r) for r in rows]]


def to_text(report: Report, min_coverage: float) -> str:
    """The `--format text` report, for a terminal."""
    r = report
    verdict = "PASS" if passes(r, min_coverage) else "FAIL"
    lines = [
        f"mTLS coverage report  {r.start} .. {r.end}",
        "",
        f"coverage (mTLS bytes / all bytes): {_p(r.coverage_percent)}  "
        f"[{verdict}: minimum {min_coverage:g}%]",
        f"connections: {_n(r.connections.mtls)} mTLS, {_n(r.connections.plaintext)} plaintext",
        f"bytes:       {_n(r.bytes.mtls)} mTLS, {_n(r.bytes.plaintext)} plaintext",
        f"handshakes:  {_n(r.handshakes)}, post-quantum {_n(r.post_quantum_handshakes)} "
        f"({_p(r.post_quantum_percent)})"
        + "".join(f"\n  {g}: {_n(v)}" for g, v in r.handshakes_by_group.items()),
        f"refused:     {_n(sum(r.refusals.values()))}"
        + "".join(f"\n  {k}: {_n(v)}" for k, v in r.refusals.items()),
    ]
    if not r.exact:
        lines.append("note: a sidecar restarted in the window; its counts are extrapolated")
    lines += [
        "",
        "Edges (as each end counted them; PQ: post-quantum share; wire: the auditor's verdict)",
    ]
    lines += _table(EDGE_HEAD, edge_rows(r))
    lines += ["", "Routes"]
    lines += _table(ROUTE_HEAD, route_rows(r))
    lines += ["", "Certificates"]
    lines += _table(["identity", "instance", "expires", "inside window"], certificate_rows(r))
    if r.wire is not None:
        w = r.wire
        lines += [
            "",
            f"Wire auditor: coverage {_p(w.coverage_percent)}, "
            f"{'agrees' if w.agrees else 'DISAGREES'} with the sidecars",
            "connections: " + ", ".join(f"{k} {_n(v)}" for k, v in w.connections.items()),
            "bytes:       " + ", ".join(f"{k} {_n(v)}" for k, v in w.bytes.items()),
        ]
        if w.plaintext_edges:
            lines += ["plaintext on the wire:"]
            lines += _table(["src", "dst", "port", "connections", "bytes"], wire_plaintext_rows(w))
    return "\n".join(lines) + "\n"
