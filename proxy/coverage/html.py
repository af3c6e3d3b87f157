"""The `--format html` report: one self-contained page (inline CSS, charts as inline SVG
drawn by matplotlib), nothing fetched when it is opened; readable printed to PDF."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from .report import (
    EDGE_HEAD,
    ROUTE_HEAD,
    Report,
    certificate_rows,
    count_text,
    edge_rows,
    passes,
    percent_text,
    route_rows,
    wire_plaintext_rows,
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d232a; margin: 2em auto; max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
  border-bottom: 1px solid #ccd; padding-bottom: 0.2em; }
.sub { color: #556; margin-top: 0; }
.kpis { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 1em 0; }
.kpi { border: 1px solid #ccd; border-radius: 6px; padding: 0.6em 1em; min-width: 10em; }
.kpi b { display: block; font-size: 1.5em; }
.pass { color: #176f2c; } .fail { color: #b3261e; }
table { border-collapse: collapse; width: 100%; margin: 0.5em 0; font-size: 0.92em; }
th, td { border-bottom: 1px solid #e3e5ea; padding: 0.3em 0.5em; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f4f7; }
.chart svg { width: 100%; height: auto; }
.note { color: #556; font-size: 0.9em; }
@media print { body { margin: 0; max-width: none; font-size: 11px; }
  h2, .chart, tr { break-inside: avoid; page-break-inside: avoid; } }
"""


_n = count_text
_p = percent_text


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def coverage_chart(points: Sequence[tuple[float, float]], start: float, end: float) -> str:
    """Coverage (% of bytes inside mTLS) over the window [start, end], as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.2))
    try:
        if points:
            xs = [datetime.fromtimestamp(t, UTC) for t, _ in points]
            ys = [v for _, v in points]
            ax.plot(xs, ys, color="#2f6fdb", marker="o", markersize=3, linewidth=1.8)  # type: ignore[arg-type]
            ax.fill_between(xs, ys, color="#2f6fdb", alpha=0.12)  # type: ignore[arg-type]
            locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        else:
            ax.text(0.5, 0.5, "no traffic in the window", ha="center", transform=ax.transAxes)
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))  # type: ignore[arg-type]
        ax.set_ylim(0, 105)
        ax.set_ylabel("% of bytes in mTLS")
        ax.set_title("Encryption coverage over the window (UTC)")
        ax.grid(True, alpha=0.3)
        return _svg(fig)
    finally:
        plt.close(fig)


def edge_chart(report: Report) -> str:
    """Connections per edge: mTLS edges, and plaintext accepted per inbound route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows: list[tuple[str, float, str]] = [
        (f"{e.source} -> {e.destination}", max(e.seen_by_source, e.seen_by_destination), "mtls")
        for e in report.edges
        if e.route is None  # an unidentified edge holds refusals only
    ]
    rows += [
        (f"(plaintext) -> {r.identity} [{r.direction} {r.route}]", r.connections.plaintext, "pt")
        for r in report.routes
        if r.connections.plaintext
    ]
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * max(1, len(rows))))
    try:
        if rows:
            labels = [r[0] for r in rows][::-1]
            values = [r[1] for r in rows][::-1]
            colors = ["#2e9d4f" if r[2] == "mtls" else "#d2462f" for r in rows][::-1]
            bars = ax.barh(labels, values, color=colors)
            ax.bar_label(bars, labels=[_n(v) for v in values], padding=3, fontsize=8)
        else:
            ax.text(0.5, 0.5, "no connections in the window", ha="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("connections (green: mTLS, red: plaintext)")
        ax.set_title("Connections per edge")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        return _svg(fig)
    finally:
        plt.close(fig)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    def cell(tag: str, i: int, v: str) -> str:
        cls = ' class="n"' if i in numeric else ""
        return f"<{tag}{cls}>{escape(v)}</{tag}>"

    h = "".join(cell("th", i, v) for i, v in enumerate(head))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(head)}">none</td></tr>'
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: Report, min_coverage: float) -> str:
    """The whole page."""
    r = report
    end = datetime.strptime(r.end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    chart = coverage_chart(r.coverage_over_time, end - r.window_seconds, end)
    ok = passes(r, min_coverage)
    verdict = (
        f'<span class="{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'
        f" (minimum {min_coverage:g}%)"
    )
    kpis = [
        ("coverage (mTLS bytes / all bytes)", f"{_p(r.coverage_percent)}", verdict),
        ("mTLS connections", _n(r.connections.mtls), f"plaintext {_n(r.connections.plaintext)}"),
        ("mTLS bytes", _n(r.bytes.mtls), f"plaintext {_n(r.bytes.plaintext)}"),
        (
            "post-quantum handshakes",
            _p(r.post_quantum_percent),
            f"{_n(r.post_quantum_handshakes)} of {_n(r.handshakes)}",
        ),
        ("refused", _n(sum(r.refusals.values())), ""),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mTLS coverage report {escape(r.start)} .. {escape(r.end)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>mTLS coverage report</h1>",
        f'<p class="sub">{escape(r.start)} .. {escape(r.end)} (UTC)</p>',
        '<div class="kpis">'
        + "".join(
            f'<div class="kpi">{escape(t)}<b>{escape(v)}</b>{extra}</div>' for t, v, extra in kpis
        )
        + "</div>",
    ]
    if not r.exact:
        parts.append(
            '<p class="note">A sidecar restarted inside the window: its counts are '
            "extrapolated by Prometheus' increase().</p>"
        )
    parts += [
        "<h2>Coverage over time</h2>",
        f'<div class="chart" id="coverage-chart">{chart}</div>',
        "<h2>Edges</h2>",
        f'<div class="chart" id="edge-chart">{edge_chart(r)}</div>',
        _table(EDGE_HEAD, edge_rows(r), {2, 3, 4, 5, 6}),
        '<p class="note">conn, bytes and refused: as the source (src) and destination (dst) '
        "sidecar counted them; PQ: the share of the connections with a post-quantum key "
        "exchange; wire: whether the wire auditor agrees (only TLS between the two workloads, "
        "and no more bytes than the sidecars carried) or has not seen the edge.</p>",
        "<h2>Routes</h2>",
        _table(ROUTE_HEAD, route_rows(r), {3, 4, 5, 6, 7}),
        "<h2>Refusals and key exchange</h2>",
        _table(["reason", "refused"], [[k, _n(v)] for k, v in r.refusals.items()], {1}),
        _table(
            ["key-exchange group", "handshakes"],
            [[g, _n(v)] for g, v in r.handshakes_by_group.items()],
            {1},
        ),
        "<h2>Certificates</h2>",
        _table(
            ["identity", "instance", "expires (UTC)", "expires inside the window"],
            certificate_rows(r),
            set(),
        ),
    ]
    if r.wire is not None:
        w = r.wire
        parts += [
            "<h2>The wire auditor</h2>",
            f"<p>Wire coverage {escape(_p(w.coverage_percent))}; the wire "
            f"{'agrees' if w.agrees else '<b class=fail>disagrees</b>'} with the sidecars.</p>",
            _table(
                ["class", "connections", "bytes"],
                [
                    [k, _n(w.connections.get(k, 0.0)), _n(w.bytes.get(k, 0.0))]
                    for k in sorted(set(w.connections) | set(w.bytes))
                ],
                {1, 2},
            ),
            _table(
                ["plaintext src", "dst", "port", "connections", "bytes"],
                wire_plaintext_rows(w),
                {3, 4},
            ),
        ]
    parts.append(
        '<p class="note">Made by <code>mtls-sidecar coverage</code> from Prometheus; how each '
        "number is computed is in the README (The coverage report).</p></body></html>"
    )
    return "\n".join(parts) + "\n"
