"""Entry point: `python -m bench.run` runs every workload on every proxy pair and reports.

Runs are interleaved (for each repetition, each workload on each proxy in turn) and the
median over repetitions is reported, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.certs import make_certs
from bench.pairs import (
    ALL_KINDS,
    KINDS_BY_NAME,
    SIDECAR_NOREUSE,
    SIDECARS,
    Context,
    PairCache,
    ProxyKind,
)
from bench.procs import (
    BenchError,
    Managed,
    PortAllocator,
    ProcessSet,
    raise_nofile,
    wait_listening,
)
from bench.workloads import WORKLOADS, Env, Settings, Workload, hold_idle, missing_tools

# wrk socket errors above this share of the requests are flagged in the output.
ERROR_SHARE = 0.01
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _sidecar_openssl() -> str:
    """The OpenSSL the sidecar's TLS engine runs on (the cryptography wheel's)."""
    from proxy.tls_ffi import VERSION_TEXT

    return VERSION_TEXT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="mtls-sidecar (with and without connection reuse) vs stunnel vs haproxy "
        "vs no proxy, on loopback.",
    )
    names = ",".join(k.name for k in ALL_KINDS)
    defaults = Settings()
    parser.add_argument("--quick", action="store_true", help="tiny workload, 1 repetition")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {names}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: print the table and redraw the chart from OUT/results.json",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--bulk-seconds", type=int, default=defaults.bulk_seconds)
    parser.add_argument("--wrk-seconds", type=int, default=defaults.wrk_seconds)
    parser.add_argument("--idle-conns", type=int, default=defaults.idle_connections)
    parser.add_argument(
        "--idle-reps",
        type=int,
        default=defaults.idle_repetitions,
        help="repetitions of the idle-memory workload (it is not noisy)",
    )
    parser.add_argument(
        "--newconn-conns",
        type=int,
        default=defaults.newconn_connections,
        help="wrk connections for the new-connection workload",
    )
    parser.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every sidecar (both sides, both sidecar contenders; "
        "repeatable), e.g. MTLS_WORKERS=1",
    )
    args = parser.parse_args(argv)
    args.sidecar_extra = {}
    for item in args.sidecar_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--sidecar-env wants KEY=VALUE, not {item!r}")
        args.sidecar_extra[key] = value
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] or [k.name for k in ALL_KINDS]
    unknown = [n for n in wanted if n not in KINDS_BY_NAME]
    if unknown:
        parser.error(f"unknown proxy {', '.join(unknown)} (known: {names})")
    args.proxies = wanted
    return args


def _tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip() and "inetd" not in line:
            return line.strip()
    return "unknown"


class Apps:
    """The apps behind the pairs: the HTTP responder and an iperf3 server, restarted if dead."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.ports = {"http": ctx.ports.get(), "iperf3": ctx.ports.get()}
        repo = Path(__file__).resolve().parents[1]
        self._env = dict(os.environ, PYTHONPATH=str(repo))
        self._procs: dict[str, Managed] = {}

    def _argv(self, name: str) -> list[str]:
        port = str(self.ports[name])
        if name == "http":
            return [sys.executable, "-m", "bench.httpserver", "--port", port]
        return ["iperf3", "-s", "-p", port]

    def ensure(self, names: list[str]) -> None:
        """Start each named app that is not running, and wait until it listens."""
        for name in names:
            proc = self._procs.get(name)
            if proc is not None and proc.alive():
                continue
            if proc is not None:
                print(f"the {name} app exited; restarting it:\n{proc.log_tail()}", flush=True)
            if name == "iperf3" and shutil.which("iperf3") is None:
                continue
            self._procs[name] = proc = self.ctx.procs.start(name, self._argv(name), env=self._env)
            wait_listening([self.ports[name]], [proc], 15)

    def restart(self, name: str) -> None:
        """Restart an app (an iperf3 server may stay busy after an aborted test)."""
        proc = self._procs.pop(name, None)
        if proc is not None:
            self.ctx.procs.stop(proc)
        self.ensure([name])


def _preflight(env: Env, kind: ProxyKind) -> None:
    """One request through the pair, so a broken proxy is reported once, clearly."""
    pair = env.pairs.get(kind, env.apps["http"])
    opened, _, failures = asyncio.run(hold_idle(pair.entry_port, 1, 1, lambda: 0, 15))
    if opened != 1:
        tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in pair.procs)
        env.pairs.drop(kind)
        raise BenchError(f"a request through the pair failed: {failures}\n{tails}")


def _progress(
    rep: str, workload: Workload, kind: ProxyKind, result: dict[str, Any], t: float
) -> None:
    extra = ""
    if "p99_ms" in result:
        extra = f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
    if result.get("errors"):
        extra += f"  {result['errors']} errors {result['errors_detail']}"
        if result["errors"] > ERROR_SHARE * result["requests"]:
            extra += f"  WARNING: more than {ERROR_SHARE:.0%} of requests failed"
    value = result[workload.metric]
    print(
        f"[{rep}] {workload.key:<9} {kind.name:<20} {value:>10.2f} {workload.unit}{extra}"
        f"  ({t:.1f} s)",
        flush=True,
    )


def _measure_all(
    env: Env,
    apps: Apps,
    kinds: list[ProxyKind],
    workloads: list[Workload],
    reps: int,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    errors: list[dict[str, Any]],
) -> None:
    """For each repetition, each workload on each proxy in turn (round robin)."""
    for rep in range(reps):
        # Rotate the order each repetition so no proxy always runs first or last.
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        for workload in workloads:
            for kind in order:
                if kind.name == "noproxy" and not workload.applies_to_noproxy:
                    continue
                if workload.key == "idle" and rep >= env.settings.idle_repetitions:
                    continue
                tag = f"{rep + 1}/{reps}"
                apps.ensure(list(env.apps))
                t0 = time.monotonic()
                try:
                    result = workload.run(env, kind)
                except BenchError as exc:
                    errors.append(
                        {
                            "rep": rep,
                            "workload": workload.key,
                            "proxy": kind.name,
                            "error": str(exc),
                        }
                    )
                    print(f"[{tag}] {workload.key:<9} {kind.name:<20} ERROR {exc}", flush=True)
                    # Next measurement starts from fresh processes.
                    env.pairs.drop(kind)
                    if workload.key == "bulk":
                        apps.restart("iperf3")
                    continue
                result["rep"] = rep
                runs[kind.name][workload.key].append(result)
                _progress(tag, workload, kind, result, time.monotonic() - t0)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so that every `with` block stops its processes.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when at least one figure was measured."""
    args = parse_args(argv)
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        _report(results, args.out)
        return 0
    settings = (
        Settings.quick()
        if args.quick
        else Settings(
            bulk_seconds=args.bulk_seconds,
            wrk_seconds=args.wrk_seconds,
            idle_connections=args.idle_conns,
            idle_repetitions=args.idle_reps,
            newconn_connections=args.newconn_conns,
        )
    )
    reps = 1 if args.quick else max(1, args.reps)
    for sidecar in SIDECARS:
        sidecar.extra_env = args.sidecar_extra
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    signal.signal(signal.SIGTERM, _on_sigterm)
    nofile = raise_nofile()
    needed_fds = settings.idle_connections * 2 + 1000
    if nofile < needed_fds:
        print(f"warning: open-files limit {nofile} < {needed_fds}; idle test may fail")

    started = time.monotonic()
    load_start = os.getloadavg()
    skipped: dict[str, str] = {}
    errors: list[dict[str, Any]] = []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    kinds: list[ProxyKind] = []
    workloads: list[Workload] = []
    with tempfile.TemporaryDirectory(prefix="mtls-bench-") as tmp, ProcessSet(logdir) as procs:
        workdir = Path(tmp)
        ctx = Context(
            procs=procs, ports=PortAllocator(), certs=make_certs(workdir), workdir=workdir
        )
        for workload in WORKLOADS:
            missing = missing_tools(workload)
            if missing:
                skipped[f"workload:{workload.key}"] = f"{', '.join(missing)} not installed"
            else:
                workloads.append(workload)
        apps = Apps(ctx)
        apps.ensure(list(apps.ports))
        pairs = PairCache(ctx)
        env = Env(ctx=ctx, settings=settings, pairs=pairs, apps=apps.ports)
        try:
            for name in args.proxies:
                kind = KINDS_BY_NAME[name]
                reason = kind.unavailable()
                # Two tries: a port taken by someone else between our pick and its bind
                # should not cost a proxy its place in the run.
                for _attempt in range(2 if reason is None else 0):
                    try:
                        _preflight(env, kind)
                    except BenchError as exc:
                        reason = f"failed its first request: {exc}"
                    else:
                        reason = None
                        break
                if reason is None:
                    kinds.append(kind)
                    runs[kind.name] = {w.key: [] for w in workloads}
                else:
                    skipped[name] = reason
            for what, reason in skipped.items():
                print(f"SKIPPED {what}: {reason}", flush=True)
            if kinds:
                _measure_all(env, apps, kinds, workloads, reps, runs, errors)
        finally:
            pairs.close()

    elapsed = time.monotonic() - started
    summary = report.summarise(runs)
    results = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "cpus": os.cpu_count(),
            # Other work on the machine skews every figure: kept so a noisy run can be spotted.
            "loadavg_start": load_start,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,  # the system's: stunnel's and haproxy's
            "sidecar_openssl": _sidecar_openssl(),
            "tools": {
                "stunnel": _tool_version(["stunnel", "-version"]),
                "haproxy": _tool_version(["haproxy", "-v"]),
                "wrk": _tool_version(["wrk", "-v"]),
                "iperf3": _tool_version(["iperf3", "--version"]),
            },
            "quick": args.quick,
            "repetitions": reps,
            "settings": settings.__dict__,
            "sidecar_env": args.sidecar_extra,
            # What mtls-sidecar-noreuse always runs with, over sidecar_env.
            "sidecar_noreuse_env": dict(SIDECAR_NOREUSE.forced_env),
        },
        "proxies": [k.name for k in kinds],
        "skipped": skipped,
        "errors": errors,
        # Counters read from the pairs before they stopped (what crossed how).
        "evidence": pairs.evidence,
        "runs": runs,
        "summary": summary,
        "ratios": report.ratios(summary),
        "targets": report.targets(summary) if report.SIDECAR in summary else [],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _report(results, out)
    measured = any(any(v for v in by_w.values()) for by_w in runs.values())
    return 0 if measured else 1


def _report(results: dict[str, Any], out: Path) -> None:
    """Print the table, targets and notes, and draw the chart, from a results document."""
    meta = results["meta"]
    # Recomputed from the runs, so that --report-only shows what the current code computes.
    summary = report.summarise(results["runs"])
    proxies: list[str] = results["proxies"]
    print()
    print(report.table(summary, proxies))
    if report.SIDECAR in summary:
        print()
        print(report.targets_text(summary))
    for what, reason in results["skipped"].items():
        print(f"\nSKIPPED {what}: {reason.splitlines()[0] if reason else ''}")
    load = meta["loadavg_start"][0]
    if load > (meta["cpus"] or 1):
        # Taken before the benchmark started anything: this load is someone else's.
        print(f"\nnote: load average was {load:.1f} at the start: figures are noisy")
    for proxy, found in results.get("evidence", {}).items():
        if found:
            counts = ", ".join(f"{k} {v:,.0f}" for k, v in found.items())
            print(f"\n{proxy}, read from its sidecars: {counts}")
    if results["errors"]:
        print(f"\n{len(results['errors'])} measurement(s) failed: see results.json and logs/")
    reps = meta["repetitions"]
    subtitle = f"{meta['cpus']} CPUs, median of {reps} runs"
    idle_reps = meta["settings"].get("idle_repetitions", reps)
    if idle_reps < reps:
        subtitle += f" (idle memory: {idle_reps})"
    if meta["quick"]:
        subtitle += " - quick run, tiny workload"
    if proxies:
        report.chart(summary, proxies, out / "bench.png", subtitle)
    print(
        f"\n{meta['date']}: {out / 'results.json'}, {out / 'bench.png'} ({meta['elapsed_s']:.0f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
