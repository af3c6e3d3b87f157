"""Benchmark results: medians, ratios to the peers, targets, the table, JSON and the chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, NamedTuple

SIDECAR = "mtls-sidecar"
NOREUSE = "mtls-sidecar-noreuse"
HBONE = "mtls-sidecar-hbone"
ENVOY = "envoy"
ENVOY_H2 = "envoy-h2"
# mtls-sidecar's medians are divided by each of these: the other proxies, and the same sidecar
# without connection reuse (what reuse gains) and over HBONE instead of our own protocol (what
# our framing gains), with the heading of each ratio column.
PEERS = ("stunnel", "haproxy", ENVOY, ENVOY_H2, NOREUSE, HBONE)
RATIO_HEADS = {
    "stunnel": "ours/stunnel",
    "haproxy": "ours/haproxy",
    ENVOY: "ours/envoy",
    ENVOY_H2: "ours/envoy-h2",
    NOREUSE: "ours/noreuse",
    HBONE: "ours/hbone",
}

# (row key, workload, field, label, unit, higher is better). The CPU rows are the CPU time of
# both proxies (all processes and threads) per unit of work: less noisy than rates on a shared
# machine, and what the targets come down to once the CPUs are the limit.
ROWS: list[tuple[str, str, str, str, str, bool]] = [
    ("bulk", "bulk", "gbit_s", "bulk, 1 stream", "Gbit/s", True),
    ("bulk_cpu", "bulk", "cpu_s_per_gb", "  CPU, both proxies", "s/GB", False),
    ("newconn", "newconn", "conn_s", "new mTLS connections", "conn/s", True),
    ("newconn_cpu", "newconn", "cpu_us_per_req", "  CPU per connection", "us", False),
    ("keepalive", "keepalive", "rps", "keep-alive, 50 conns", "req/s", True),
    ("keepalive_p50", "keepalive", "p50_ms", "  keep-alive p50", "ms", False),
    ("keepalive_p99", "keepalive", "p99_ms", "  keep-alive p99", "ms", False),
    ("keepalive_cpu", "keepalive", "cpu_us_per_req", "  CPU per request", "us", False),
    ("idle", "idle", "kb_per_conn", "idle memory", "KB/conn", False),
]


class Target(NamedTuple):
    """A bound on `subject`'s median of `row` (mtls-sidecar unless said): its ratio to
    `peer`'s median, or the value itself when `peer` is None; "min": at least `bound`, "max":
    at most. `source` says where the target comes from (the heading it is printed under)."""

    row: str
    peer: str | None
    bound: float
    kind: str
    source: str
    subject: str = SIDECAR


ISSUE_7 = "issue 7"
REUSE = "connection reuse"
ENVOY_TARGETS = "Envoy"
TARGETS: list[Target] = [
    Target("bulk", "stunnel", 1.2, "min", ISSUE_7),
    Target("bulk", "haproxy", 1.2, "min", ISSUE_7),
    Target("newconn", "stunnel", 2.0, "min", ISSUE_7),
    Target("newconn", "haproxy", 1.5, "min", ISSUE_7),
    Target("keepalive", "haproxy", 1.0, "min", ISSUE_7),
    Target("keepalive_p99", "haproxy", 1.5, "max", ISSUE_7),
    Target("idle", None, 40.0, "max", ISSUE_7),
    # What reusing mTLS connections between the sidecars is for: far more new connections
    # per second and less memory per connection, without losing throughput on the
    # connections that are already open (against the same sidecar with reuse off).
    Target("newconn", "haproxy", 3.0, "min", REUSE),
    Target("newconn", "stunnel", 4.0, "min", REUSE),
    Target("idle", None, 20.0, "max", REUSE),
    Target("keepalive", NOREUSE, 0.95, "min", REUSE),
    Target("bulk", NOREUSE, 0.95, "min", REUSE),
    # Istio's data plane: Envoy tunnelling HTTP/2 CONNECT over pooled mTLS (ambient/HBONE), and
    # Envoy as a sidecar (one mTLS connection per app connection).
    Target("bulk", ENVOY_H2, 1.0, "min", ENVOY_TARGETS),
    Target("newconn", ENVOY_H2, 1.0, "min", ENVOY_TARGETS),
    Target("keepalive", ENVOY_H2, 1.0, "min", ENVOY_TARGETS),
    Target("newconn_cpu", ENVOY_H2, 1.0, "max", ENVOY_TARGETS),
    Target("keepalive_cpu", ENVOY_H2, 1.0, "max", ENVOY_TARGETS),
    Target("idle", ENVOY_H2, 0.5, "max", ENVOY_TARGETS),
    Target("bulk", ENVOY, 1.0, "min", ENVOY_TARGETS),
    # What every foreign peer gets (one mTLS connection per app connection): at least
    # haproxy's new connections, at most its memory per idle connection.
    Target("newconn", "haproxy", 1.0, "min", ENVOY_TARGETS, NOREUSE),
    Target("idle", "haproxy", 1.0, "max", ENVOY_TARGETS, NOREUSE),
]


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Median (and min/max) of every row's field over the repetitions, per proxy."""
    summary: dict[str, dict[str, Any]] = {}
    for proxy, by_workload in runs.items():
        rows: dict[str, Any] = {}
        for key, workload, field, _label, _unit, _hib in ROWS:
            values = [r[field] for r in by_workload.get(workload, []) if field in r]
            if values:
                rows[key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
        errors = {
            w: sum(r.get("errors", 0) for r in by_workload.get(w, []))
            for w in ("newconn", "keepalive")
        }
        rows["wrk_errors"] = errors
        summary[proxy] = rows
    return summary


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mtls-sidecar's median divided by each peer's, per row."""
    out: dict[str, dict[str, float]] = {}
    ours = summary.get(SIDECAR, {})
    for key, *_ in ROWS:
        for peer in PEERS:
            theirs = summary.get(peer, {}).get(key)
            if key in ours and theirs and theirs["median"]:
                out.setdefault(key, {})[peer] = ours[key]["median"] / theirs["median"]
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it is met (None: not measured)."""
    out: list[dict[str, Any]] = []
    for row, peer, bound, kind, source, subject in TARGETS:
        ours = summary.get(subject, {}).get(row)
        value: float | None
        who = "" if subject == SIDECAR else f"{subject}: "
        if peer is None:
            value = ours["median"] if ours else None
            text = f"{who}{row} {'<=' if kind == 'max' else '>='} {bound:g}"
        else:
            theirs = summary.get(peer, {}).get(row)
            value = (
                ours["median"] / theirs["median"] if ours and theirs and theirs["median"] else None
            )
            text = f"{who}{row} {'<=' if kind == 'max' else '>='} {bound:g}x {peer}"
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        out.append({"target": text, "value": value, "met": met, "source": source})
    return out


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(summary: dict[str, dict[str, Any]], proxies: list[str]) -> str:
    """The results as a fixed-width text table (medians), with ratios when the sidecar ran."""
    rat = ratios(summary)
    show_ratio = SIDECAR in summary and any(p in summary for p in PEERS)
    head = ["workload", "unit", "better", *proxies]
    if show_ratio:
        head += [RATIO_HEADS[p] for p in PEERS if p in summary]
    lines = [head]
    for key, _workload, _field, label, unit, hib in ROWS:
        row = [label, unit, "higher" if hib else "lower"]
        for proxy in proxies:
            cell = summary.get(proxy, {}).get(key)
            row.append(_fmt(cell["median"]) if cell else "-")
        if show_ratio:
            for peer in PEERS:
                if peer in summary:
                    r = rat.get(key, {}).get(peer)
                    row.append("-" if r is None else f"{r:.2f}x")
        lines.append(row)
    err = ["wrk errors new/ka", "count", "lower"]
    for proxy in proxies:
        e = summary.get(proxy, {}).get("wrk_errors", {})
        err.append(f"{e.get('newconn', 0)}/{e.get('keepalive', 0)}")
    lines.append(err + ([""] * (len(head) - len(err))))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = []
    for n, row in enumerate(lines):
        text.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in text)


def targets_text(summary: dict[str, dict[str, Any]]) -> str:
    """The targets under a heading per source, one line each: measured value and met /
    MISSED (or not measured)."""
    found = targets(summary)
    width = max(len(t["target"]) for t in found)
    lines: list[str] = []
    for source in dict.fromkeys(t["source"] for t in found):
        if lines:
            lines.append("")
        lines.append(f"{source} targets ({SIDECAR} unless named, medians):")
        for t in found:
            if t["source"] != source:
                continue
            if t["value"] is None:
                state, value = "not measured", ""
            else:
                state = "met" if t["met"] else "MISSED"
                value = _fmt(t["value"])
            lines.append(f"  {t['target']:<{width}} {value:>8}  {state}")
    return "\n".join(lines)


COLOURS = {
    "noproxy": "#9e9e9e",
    "stunnel": "#5b8cc9",
    "haproxy": "#e0a040",
    ENVOY: "#b05fb0",
    ENVOY_H2: "#d9a3d9",
    SIDECAR: "#3a9a5b",
    NOREUSE: "#9fd4ad",
    HBONE: "#1f6b3a",
}
# Names too long for a bar's width on the chart.
TICK_LABELS = {
    SIDECAR: "mtls-\nsidecar",
    NOREUSE: "mtls-\nsidecar\nno reuse",
    HBONE: "mtls-\nsidecar\nHBONE",
    ENVOY: "Envoy\n1:1",
    ENVOY_H2: "Envoy\nh2 pooled",
}


def chart(
    summary: dict[str, dict[str, Any]], proxies: list[str], path: Path, subtitle: str
) -> None:
    """A bar chart PNG, one panel per workload (medians, whiskers = min..max of the runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("bulk", "bulk throughput, 1 stream (Gbit/s)\nhigher is better"),
        ("newconn", "new mTLS connections (conn/s)\nhigher is better"),
        ("keepalive", "keep-alive, 50 connections (req/s; latency ms)\nhigher is better"),
        ("idle", "idle memory, both proxies (KB/conn)\nlower is better"),
    ]
    fig, grid = plt.subplots(2, 2, figsize=(10, 8))
    for ax, (key, title) in zip(grid.flat, panels, strict=True):
        # No proxy is many times faster than any pair: as a bar it would flatten the others,
        # so it is written in the corner instead.
        names = [p for p in proxies if key in summary.get(p, {}) and p != "noproxy"]
        cells = [summary[p][key] for p in names]
        medians = [c["median"] for c in cells]
        low = [c["median"] - c["min"] for c in cells]
        high = [c["max"] - c["median"] for c in cells]
        bars = ax.bar(
            names,
            medians,
            yerr=[low, high],
            capsize=4,
            color=[COLOURS.get(n, "#777777") for n in names],
        )
        ax.set_xticks(range(len(names)), [TICK_LABELS.get(n, n) for n in names])
        for bar, name, cell in zip(bars, names, cells, strict=True):
            value = cell["median"]
            label = _fmt(value)
            if key == "keepalive":
                p50 = summary[name].get("keepalive_p50", {}).get("median")
                p99 = summary[name].get("keepalive_p99", {}).get("median")
                if p50 is not None and p99 is not None:
                    label += f"\np50 {p50:.2f}\np99 {p99:.1f}"
            ax.annotate(
                label,
                # Above the whisker, so the figure stays readable.
                (bar.get_x() + bar.get_width() / 2, cell["max"]),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        direct = summary.get("noproxy", {}).get(key)
        if direct:
            ax.text(
                0.98,
                0.97,
                f"no proxy: {_fmt(direct['median'])}",
                ha="right",
                va="top",
                fontsize=8,
                color="#555555",
                transform=ax.transAxes,
            )
        if not names:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        ax.margins(y=0.25)
    fig.suptitle(
        f"mtls-sidecar benchmark: a pair of proxies on loopback, mTLS 1.3\n{subtitle}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
