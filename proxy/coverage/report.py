"""The coverage report model, pure: PromQL to ask, and the report built from the answers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# Counters read over the window, each with the labels the report keeps.
COUNTERS: dict[str, str] = {
    "connections": "mtls_connections_total",
    "bytes": "mtls_bytes_total",
    "peers": "mtls_peer_connections_total",
    "peer_bytes": "mtls_peer_bytes_total",
    "rejected": "mtls_connections_rejected_total",
    "handshakes": "mtls_handshakes_total",
    "audit_connections": "mtls_audit_connections_total",
    "audit_bytes": "mtls_audit_bytes_total",
}
EXPIRY = "mtls_cert_expiry_timestamp_seconds"

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
class Edge:
    """Source identity -> destination identity, as each end counted its mTLS connections
    and their bytes (both flows)."""

    source: str
    destination: str
    seen_by_source: float = 0.0
    seen_by_destination: float = 0.0
    bytes_seen_by_source: float = 0.0
    bytes_seen_by_destination: float = 0.0


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
    for m, v, _ in inc["rejected"]:
        route(m).refused += v
        refusals[m.get("reason", "")] = refusals.get(m.get("reason", ""), 0.0) + v

    edges: dict[tuple[str, str], Edge] = {}

    def edge(m: Mapping[str, str]) -> tuple[Edge, bool]:
        me, peer = ident(m.get("instance", "")), m.get("peer_identity", "")
        if m.get("direction") == "inbound":
            return edges.setdefault((peer, me), Edge(peer, me)), False
        return edges.setdefault((me, peer), Edge(me, peer)), True

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

    groups: dict[str, float] = {}
    for m, v, _ in inc["handshakes"]:
        groups[m.get("group", "")] = groups.get(m.get("group", ""), 0.0) + v
    hs = sum(groups.values())
    pq = sum(v for g, v in groups.items() if _pq(g))

    wire: Wire | None = None
    if inc["audit_connections"] or inc["audit_bytes"]:
        wc: dict[str, float] = {}
        wb: dict[str, float] = {}
        wedges: dict[tuple[str, str, str, str], WireEdge] = {}
        for m, v, _ in inc["audit_connections"]:
            c = m.get("class", "")
            wc[c] = wc.get(c, 0.0) + v
            if c == "plaintext":
                k = (m.get("src", ""), m.get("dst", ""), m.get("dst_port", ""), c)
                wedges.setdefault(k, WireEdge(*k)).connections += v
        for m, v, _ in inc["audit_bytes"]:
            c = m.get("class", "")
            wb[c] = wb.get(c, 0.0) + v
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
        edges=sorted(edges.values(), key=lambda e: (e.source, e.destination)),
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


def edge_rows(r: Report) -> list[list[str]]:
    return [
        [
            e.source,
            e.destination,
            _n(e.seen_by_source),
            _n(e.seen_by_destination),
            _n(e.bytes_seen_by_source),
            _n(e.bytes_seen_by_destination),
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
    lines += ["", "Edges (mTLS connections and bytes, as each end counted them)"]
    lines += _table(
        ["source", "destination", "conn (src)", "conn (dst)", "bytes (src)", "bytes (dst)"],
        edge_rows(r),
    )
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
