"""`mtls-sidecar coverage`: ask Prometheus, build the report, write it, exit by the gate."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.parse import parse_duration
from .report import (
    ReportError,
    Sample,
    build,
    coverage_range_query,
    passes,
    queries,
    to_text,
)


class PromError(Exception):
    """Prometheus could not be asked or did not answer (one line for the user)."""


class Client:
    """The few Prometheus HTTP API calls the report needs (/api/v1/query, query_range)."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        u = urllib.parse.urlsplit(base)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise PromError(f"--prometheus {base!r} is not an http(s):// URL")
        self.base = base.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, OSError):
                detail = ""
            raise PromError(f"Prometheus at {self.base} answered {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PromError(f"Prometheus at {self.base} is unreachable: {reason}") from None
        except ValueError:
            raise PromError(f"{self.base} did not answer like a Prometheus server") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise PromError(f"Prometheus at {self.base} refused the query: {body!r:.200}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[Sample]:
        data = self._get("query", {"query": expr, "time": f"{at:.3f}"})
        return list(data.get("result", []))

    def query_range(self, expr: str, start: float, end: float, step: int) -> list[Sample]:
        data = self._get(
            "query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)},
        )
        return list(data.get("result", []))


POINTS = 120
"""Points of the coverage-over-time chart."""


def _coverage_over_time(client: Client, end: float, window: int) -> list[tuple[float, float]]:
    """(time, percent inside mTLS of the bytes of the RANGE before it); points without bytes
    are left out. RANGE is two steps but at least 60s, so that every pair of consecutive
    scrapes (up to a 30s interval) falls inside some point's range."""
    step = max(1, window // POINTS)
    expr = coverage_range_query().replace("RANGE", f"{max(2 * step, 60)}s")
    points: list[tuple[float, float]] = []
    for series in client.query_range(expr, end - window + step, end, step):
        for t, v in series.get("values", []):
            value = float(v)
            if value == value:  # NaN: no bytes in that step
                points.append((float(t), value))
    return sorted(points)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtls-sidecar coverage",
        description="The coverage report: who talked to whom over a window, how much of it "
        "inside mTLS, from Prometheus.",
    )
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://prom:9090")
    p.add_argument("--window", default="7d", help="how far back from now (default 7d)")
    p.add_argument(
        "--format",
        choices=("text", "json", "html"),
        default="text",
        help="text for a terminal, json for tools, html: one self-contained page with charts "
        "(needs matplotlib: pip install 'mtls-sidecar[report]')",
    )
    p.add_argument("--out", type=Path, help="write the report to this file (default: stdout)")
    p.add_argument(
        "--min-coverage",
        type=float,
        default=99.9,
        help="percent of bytes inside mTLS below which the exit status is 1 (default 99.9)",
    )
    return p


def _fail(message: str) -> int:
    print(f"mtls-sidecar coverage: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str]) -> int:
    """Exit 0 at or above --min-coverage, 1 below, 2 on any error (one line on stderr)."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        window = round(parse_duration(args.window))
    except ValueError as exc:
        return _fail(f"--window: {exc}")
    if window < 1:
        return _fail("--window must be at least 1s")
    if not 0 <= args.min_coverage <= 100:
        return _fail("--min-coverage is a percent between 0 and 100")
    if args.format == "html":
        try:
            from .html import to_html
        except ImportError:  # pragma: no cover - the extra is installed in development
            return _fail("--format html needs matplotlib: pip install 'mtls-sidecar[report]'")
    end = time.time()
    try:
        client = Client(args.prometheus)
        answers = {name: client.query(expr, end) for name, expr in queries(window).items()}
        report = build(answers, end, window)
        if args.format == "html":
            report.coverage_over_time = _coverage_over_time(client, end, window)
    except (PromError, ReportError) as exc:
        return _fail(str(exc))
    if args.format == "html":
        text = to_html(report, args.min_coverage)
    elif args.format == "json":
        text = report.to_json() + "\n"
    else:
        text = to_text(report, args.min_coverage)
    if args.out is None:
        sys.stdout.write(text)
    else:
        try:
            args.out.write_text(text)
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    return 0 if passes(report, args.min_coverage) else 1
