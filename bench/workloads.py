"""The four workloads: bulk (iperf3), new connections and keep-alive (wrk), idle memory."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.pairs import Context, Pair, PairCache, ProxyKind
from bench.procs import BenchError, cpu_seconds, rss_kb

# wrk prints its own summary in a form made for humans; this script adds one JSON line.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""

Result = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """Workload sizes; `quick()` is the tiny smoke-test variant."""

    bulk_seconds: int = 5
    wrk_seconds: int = 4
    newconn_connections: int = 32
    keepalive_connections: int = 50
    idle_connections: int = 5000
    idle_concurrency: int = 64
    # RSS per idle connection hardly moves between runs (< 1 % over 3 repetitions here),
    # unlike timings; measuring it once keeps the default run under 5 minutes.
    idle_repetitions: int = 1

    @classmethod
    def quick(cls) -> Settings:
        return cls(bulk_seconds=1, wrk_seconds=1, idle_connections=200)


@dataclass
class Env:
    """What a workload runs with: the context, sizes, long-lived pairs and the apps' ports."""

    ctx: Context
    settings: Settings
    pairs: PairCache
    apps: dict[str, int]


@dataclass(frozen=True)
class Workload:
    """One workload: `key` in the JSON, `metric` is the headline figure, `unit` its unit."""

    key: str
    title: str
    metric: str
    unit: str
    higher_is_better: bool
    needs: tuple[str, ...]
    run: Callable[[Env, ProxyKind], Result]
    applies_to_noproxy: bool = True


def _bulk(env: Env, kind: ProxyKind) -> Result:
    pair = env.pairs.get(kind, env.apps["iperf3"])
    seconds = env.settings.bulk_seconds
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(pair.entry_port), "-t", str(seconds), "--json"]
    cpu_before = cpu_seconds(pair.pids())
    out = env.ctx.procs.run("iperf3-client", argv, timeout=seconds + 20)
    cpu = cpu_seconds(pair.pids()) - cpu_before
    pair.check_alive()
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 output is not JSON: {out[-500:]}") from exc
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    result = {
        "gbit_s": received["bits_per_second"] / 1e9,
        "seconds": received["seconds"],
        "bytes": received["bytes"],
    }
    if pair.procs and received["bytes"]:
        result["cpu_s_per_gb"] = cpu / (received["bytes"] / 1e9)
    return result


def _cpu_by_side(pair: Pair) -> dict[str, float]:
    """CPU seconds so far of each proxy of the pair, keyed by side (client / server)."""
    return {p.name.rsplit("-", 1)[-1]: cpu_seconds([p.pid]) for p in pair.procs}


def _wrk(ctx: Context, pair: Pair, seconds: int, connections: int, close: bool) -> Result:
    script = ctx.workdir / "report.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s"]
    argv += ["-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{pair.entry_port}/")
    cpu_before = _cpu_by_side(pair)
    out = ctx.procs.run("wrk", argv, timeout=seconds + 30)
    cpu_after = _cpu_by_side(pair)
    cpu_sides = {side: cpu_after[side] - cpu_before[side] for side in cpu_before}
    pair.check_alive()
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            raw = json.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise BenchError(f"wrk printed no summary: {out[-500:]}")
    duration = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    if raw["requests"] <= 0:
        raise BenchError(f"wrk: no request succeeded ({errors} errors): {out[-500:]}")
    result: dict[str, Any] = {
        "requests": raw["requests"],
        "rps": raw["requests"] / duration,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
        "errors_detail": {
            k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]
        },
    }
    if pair.procs:
        # CPU of both proxies per request: unlike rates, barely moved by other load.
        result["cpu_us_per_req"] = sum(cpu_sides.values()) / raw["requests"] * 1e6
        result["cpu_us_per_req_by_side"] = {
            side: cpu / raw["requests"] * 1e6 for side, cpu in cpu_sides.items()
        }
    return result


def _newconn(env: Env, kind: ProxyKind) -> Result:
    pair = env.pairs.get(kind, env.apps["http"])
    settings = env.settings
    result = _wrk(env.ctx, pair, settings.wrk_seconds, settings.newconn_connections, close=True)
    return {"conn_s": result.pop("rps"), **result}


def _keepalive(env: Env, kind: ProxyKind) -> Result:
    pair = env.pairs.get(kind, env.apps["http"])
    settings = env.settings
    return _wrk(env.ctx, pair, settings.wrk_seconds, settings.keepalive_connections, close=False)


REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def _open_one(
    port: int, gate: asyncio.Semaphore
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchError(f"unexpected reply {head[:40]!r}")
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer


async def hold_idle(
    port: int, count: int, concurrency: int, measure: Callable[[], int], timeout: float
) -> tuple[int, int, list[str]]:
    """Open `count` connections (one request each), measure while all are open, close."""
    gate = asyncio.Semaphore(concurrency)
    tasks = [asyncio.ensure_future(_open_one(port, gate)) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    opened = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    failures = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    failures += ["timeout"] * len(pending)
    try:
        # Let the proxies finish their own bookkeeping (worker hand-offs, buffers) first.
        await asyncio.sleep(0.5)
        after = measure()
    finally:
        for _, writer in opened:
            writer.transport.abort()
        await asyncio.gather(*pending, return_exceptions=True)
    return len(opened), after, failures


def _idle(env: Env, kind: ProxyKind) -> Result:
    # A fresh pair, so that every proxy starts from the same state: nothing cached yet.
    settings = env.settings
    with kind.running(env.ctx, env.apps["http"]) as pair:
        pids = pair.pids()
        # Warm up first, so that one-time allocations (contexts, pools) are not counted per
        # connection.
        asyncio.run(hold_idle(pair.entry_port, 20, 20, lambda: 0, 30))
        time.sleep(0.3)
        before = rss_kb(pids)
        count = settings.idle_connections
        opened, after, failures = asyncio.run(
            hold_idle(
                pair.entry_port,
                count,
                settings.idle_concurrency,
                lambda: rss_kb(pids),
                timeout=30 + count / 50,
            )
        )
        pair.check_alive()
    if opened < count * 0.99:
        sample = "; ".join(sorted(set(failures))[:3])
        raise BenchError(f"only {opened} of {count} idle connections opened ({sample})")
    return {
        "kb_per_conn": (after - before) / opened,
        "connections": opened,
        "failed": count - opened,
        "rss_before_kb": before,
        "rss_after_kb": after,
    }


WORKLOADS: list[Workload] = [
    Workload("bulk", "bulk, 1 stream", "gbit_s", "Gbit/s", True, ("iperf3",), _bulk),
    Workload("newconn", "new connections", "conn_s", "conn/s", True, ("wrk",), _newconn),
    Workload("keepalive", "keep-alive requests", "rps", "req/s", True, ("wrk",), _keepalive),
    Workload(
        "idle",
        "idle memory",
        "kb_per_conn",
        "KB/conn",
        False,
        (),
        _idle,
        applies_to_noproxy=False,
    ),
]


def missing_tools(workload: Workload) -> list[str]:
    """Binaries the workload needs that are not installed."""
    return [tool for tool in workload.needs if shutil.which(tool) is None]
