"""Soak: sustained mixed traffic through a real sidecar pair, with RSS and open fds sampled.

    python -m tests.soak --minutes 10            # `make soak` (SOAK_MINUTES=N to change)
    python -m tests.soak --minutes 0.5 --concurrent 5000

Traffic, all on loopback through outbound -> inbound -> echo app:
  bulk      a few connections at a time, each 8 MiB echoed and checked by SHA-256
  short     many short connections: a few KiB, half-close, read to EOF, checked
  idle      connections opened at the start, pinged now and then, checked at the end
  rejected  straight to the inbound port: plaintext, no client cert, a cert of another CA;
            each attempt must show up in mtls_connections_rejected_total with its reason
  concurrent (once, after the mixed phase) N proxied connections open at the same time

Pass/fail (printed, and `run()` returns the list of failures):
  - zero errors on good connections; every rejection counted exactly, by reason;
  - no worker restarted;
  - RSS: for every sidecar process, the highest sample of the last third of the mixed phase is
    at most RSS_GROWTH_MB above the sample at the end of warm-up;
  - fds: once the load stops and its connections are closed, every sidecar process holds at
    most FD_SLACK more fds than before the load started.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .harness import ROOT, Sidecar, free_port, identity_env
from .pki import Identity, make_intermediate, make_root, write_identity

TD = "spiffe://soak.example"
RSS_GROWTH_MB = 10.0
FD_SLACK = 4
SAMPLE_EVERY = 2.0


# --- the echo app: its own process, asyncio, any number of connections ------------------------

ECHO_APP = """
import asyncio, sys
async def handle(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=8192)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- /proc sampling ----------------------------------------------------------------------------


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Proc:
    role: str
    pid: int
    rss: list[tuple[float, int]] = field(default_factory=list)  # (t, KiB)
    fds: list[tuple[float, int]] = field(default_factory=list)
    fd_baseline: int = 0


def sidecar_procs(name: str, sc: Sidecar) -> list[Proc]:
    code, body = sc.get("/status")
    assert code == 200, body
    workers = json.loads(body)["workers"]
    return [Proc(f"{name} master", sc.proc.pid)] + [
        Proc(f"{name} worker {w['slot']}", int(w["pid"])) for w in workers
    ]


def sample(procs: list[Proc], t: float) -> None:
    for p in procs:
        try:
            p.rss.append((t, proc_rss_kib(p.pid)))
            p.fds.append((t, proc_fds(p.pid)))
        except OSError:
            p.rss.append((t, -1))
            p.fds.append((t, -1))


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    rejected_sent: Counter[str] = field(default_factory=Counter)
    bytes_checked: int = 0

    def error(self, kind: str, exc: BaseException | str) -> None:
        if len(self.errors) < 50:
            self.errors.append(f"{kind}: {exc!r}")
        else:
            self.errors.append("...")


async def bulk_once(port: int, stats: Stats, size: int = 8 << 20) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = random.randbytes(64 * 1024)
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        for i in range(size // len(block)):
            chunk = i.to_bytes(4, "big") + block[4:]
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()

    task = asyncio.ensure_future(send())
    n = 0
    while data := await reader.read(1 << 20):
        got.update(data)
        n += len(data)
    await task
    writer.close()
    if n != size or got.digest() != sent.digest():
        raise AssertionError(f"bulk echo differs ({n} of {size} bytes)")
    stats.bytes_checked += size


async def short_once(port: int, stats: Stats) -> None:
    payload = random.randbytes(random.randrange(16, 4096))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await reader.read(-1)
    writer.close()
    if got != payload:
        raise AssertionError(f"short echo differs ({len(got)} of {len(payload)} bytes)")
    stats.bytes_checked += len(payload)


async def loop_until(
    stop: asyncio.Event, kind: str, stats: Stats, once: Callable[[], Awaitable[None]]
) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(once(), 60)
            stats.ok[kind] += 1
        except Exception as exc:
            stats.error(kind, exc)
            await asyncio.sleep(0.2)


class IdleConns:
    """Connections opened at the start and kept; each pings now and then."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        for _ in range(self.n):
            self.conns.append(await asyncio.open_connection("127.0.0.1", self.port))

    async def ping_all(self, stats: Stats) -> None:
        for i, (reader, writer) in enumerate(self.conns):
            msg = b"idle-%06d" % i
            try:
                writer.write(msg)
                got = await asyncio.wait_for(reader.readexactly(len(msg)), 20)
                if got != msg:
                    raise AssertionError("idle echo differs")
                stats.ok["idle_ping"] += 1
            except Exception as exc:
                stats.error("idle", exc)

    async def pinger(self, stop: asyncio.Event, stats: Stats) -> None:
        while not stop.is_set():
            with_timeout = asyncio.ensure_future(stop.wait())
            await asyncio.wait([with_timeout], timeout=10)
            with_timeout.cancel()
            # Ping a sample each round; all of them at the end.
            for i in random.sample(range(len(self.conns)), min(20, len(self.conns))):
                reader, writer = self.conns[i]
                try:
                    writer.write(b"p")
                    if await asyncio.wait_for(reader.readexactly(1), 20) != b"p":
                        raise AssertionError("idle ping differs")
                    stats.ok["idle_ping"] += 1
                except Exception as exc:
                    stats.error("idle", exc)

    async def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()


def _tls_ctx(bundle: Path, ident: Identity | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(bundle)
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


async def rejected_once(in_port: int, kind: str, ctxs: dict[str, ssl.SSLContext]) -> None:
    """One bad client straight to the inbound port; it must be refused."""
    if kind == "not_tls":
        reader, writer = await asyncio.open_connection("127.0.0.1", in_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n")
        got = await reader.read(-1)
        writer.close()
        if got:
            raise AssertionError(f"plaintext client got {got[:20]!r}")
        return
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", in_port, ssl=ctxs[kind], server_hostname="soak"
        )
        writer.write(b"must not arrive")
        got = await reader.read(100)
        writer.close()
    except (ssl.SSLError, ConnectionError, OSError):
        return
    if got:
        raise AssertionError(f"{kind} client got data")


async def rejected_loop(
    stop: asyncio.Event, in_port: int, stats: Stats, ctxs: dict[str, ssl.SSLContext]
) -> None:
    kinds = ["not_tls", "no_client_cert", "unknown_ca"]
    i = 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        stats.rejected_sent[kind] += 1
        try:
            await asyncio.wait_for(rejected_once(in_port, kind, ctxs), 20)
        except Exception as exc:
            stats.error(f"rejected-{kind}", exc)
        await asyncio.sleep(0.25)


async def concurrent_phase(
    port: int, n: int, stats: Stats
) -> tuple[float, list[str], list[asyncio.StreamWriter]]:
    """Open `n` proxied connections, all at once (at most 200 being set up at a time), and check
    each echoes. Returns (seconds to open all, errors, the open connections)."""
    gate = asyncio.Semaphore(200)
    errors: list[str] = []
    conns: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 30
                )
                msg = b"c%07d" % i
                writer.write(msg)
                got = await asyncio.wait_for(reader.readexactly(len(msg)), 30)
                if got != msg:
                    raise AssertionError("echo differs")
                conns.append(writer)
            except Exception as exc:
                errors.append(f"conn {i}: {exc!r}")

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    took = time.monotonic() - t0
    stats.ok["concurrent"] += len(conns)
    if len(errors) > 20:
        errors = [*errors[:20], f"... {len(errors)} in all"]
    return took, errors, conns


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Result:
    failures: list[str]
    summary: str
    figures: dict[str, object]


async def _main(
    minutes: float, concurrent: int, work: Path, rss_growth_mb: float, verbose: bool
) -> Result:
    nofile = raise_nofile()
    d = work / "pki"
    d.mkdir()
    root = make_root("Soak Root")
    inter = make_intermediate(root, "Soak Intermediate")
    other_root = make_root("Soak Other Root")
    other_inter = make_intermediate(other_root, "Soak Other Intermediate")
    server = write_identity(d, "server", inter, [root.cert], f"{TD}/server")
    client = write_identity(d, "client", inter, [root.cert], f"{TD}/client")
    stranger = write_identity(d, "stranger", other_inter, [root.cert], f"{TD}/client")
    ctxs = {
        "no_client_cert": _tls_ctx(server.bundle, None),
        "unknown_ca": _tls_ctx(server.bundle, stranger),
    }

    echo = subprocess.Popen([sys.executable, "-c", ECHO_APP], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    app_port = int(echo.stdout.readline())
    in_port, out_port = free_port(), free_port()
    max_conns = str(max(10000, 2 * concurrent + 1000))
    inbound = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"soak=127.0.0.1:{in_port}=127.0.0.1:{app_port}",
            "MTLS_WORKERS": "2",
            "MTLS_MAX_CONNECTIONS": max_conns,
            "MTLS_LOG_LEVEL": "warning",
            # Pooled connections are let go soon after the load, so fds return to baseline.
            "MTLS_POOL_IDLE_TIMEOUT": "2s",
        },
        work / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(client),
            "MTLS_OUTBOUND": f"soak=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
            "MTLS_WORKERS": "2",
            "MTLS_MAX_CONNECTIONS": max_conns,
            "MTLS_LOG_LEVEL": "warning",
            # Pooled connections are let go soon after the load, so fds return to baseline.
            "MTLS_POOL_IDLE_TIMEOUT": "2s",
        },
        work / "outbound.log",
    )
    failures: list[str] = []
    figures: dict[str, object] = {"nofile_soft_limit_test_process": nofile}
    stats = Stats()
    try:
        inbound.wait_ready(30)
        outbound.wait_ready(30)
        procs = sidecar_procs("inbound", inbound) + sidecar_procs("outbound", outbound)
        # Warm the session caches and imports before the fd baseline.
        await short_once(out_port, stats)
        await asyncio.sleep(1.5)
        for p in procs:
            p.fd_baseline = proc_fds(p.pid)

        duration = minutes * 60
        warmup = max(5.0, duration / 5)
        stop = asyncio.Event()
        idle = IdleConns(out_port, 200)
        await idle.open()
        tasks = [
            asyncio.ensure_future(
                loop_until(stop, "bulk", stats, lambda: bulk_once(out_port, stats))
            )
            for _ in range(2)
        ]
        tasks += [
            asyncio.ensure_future(
                loop_until(stop, "short", stats, lambda: short_once(out_port, stats))
            )
            for _ in range(8)
        ]
        tasks.append(asyncio.ensure_future(rejected_loop(stop, in_port, stats, ctxs)))
        tasks.append(asyncio.ensure_future(idle.pinger(stop, stats)))

        t0 = time.monotonic()
        warm_rss: dict[int, int] = {}
        next_report = 30.0
        while (now := time.monotonic() - t0) < duration:
            sample(procs, now)
            if not warm_rss and now >= warmup:
                warm_rss = {p.pid: p.rss[-1][1] for p in procs}
            if verbose and now >= next_report:
                next_report += 30.0
                rss = " ".join(f"{p.rss[-1][1] / 1024:.1f}" for p in procs)
                fds = " ".join(str(p.fds[-1][1]) for p in procs)
                print(f"[{now:5.0f}s] RSS MB {rss} | fds {fds} | ok {dict(stats.ok)}", flush=True)
            await asyncio.sleep(SAMPLE_EVERY)
        sample(procs, time.monotonic() - t0)
        if not warm_rss:
            warm_rss = {p.pid: p.rss[0][1] for p in procs}
        stop.set()
        await asyncio.gather(*tasks)
        await idle.ping_all(stats)
        await idle.close()

        # RSS: the last third of the mixed phase against the end of warm-up.
        for p in procs:
            late = [kib for t, kib in p.rss if t >= duration * 2 / 3] or [p.rss[-1][1]]
            growth = (max(late) - warm_rss[p.pid]) / 1024
            if growth > rss_growth_mb:
                failures.append(f"{p.role}: RSS grew {growth:.1f} MB after warm-up")

        # The concurrent phase.
        if concurrent:
            took, errs, held = await concurrent_phase(out_port, concurrent, stats)
            figures["concurrent_open_seconds"] = round(took, 2)
            active_in = inbound.metric("mtls_connections_active")
            active_out = outbound.metric("mtls_connections_active")
            figures["concurrent_active"] = {"inbound": active_in, "outbound": active_out}
            peak_fds = {p.role: proc_fds(p.pid) for p in procs}
            figures["concurrent_fds"] = peak_fds
            figures["concurrent_rss_mb"] = {
                p.role: round(proc_rss_kib(p.pid) / 1024, 1) for p in procs
            }
            if errs:
                failures.append(f"concurrent: {len(errs)} error(s): {errs[:5]}")
            if active_in < concurrent or active_out < concurrent:
                failures.append(f"concurrent: active {active_in}/{active_out} < {concurrent}")
            for writer in held:
                writer.close()
            held.clear()
        # Let every connection the load opened be closed and counted.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(
                sc.metric("mtls_connections_active") == 0
                and sc.metric("mtls_pool_connections", state="open") == 0
                for sc in (inbound, outbound)
            ):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)
        for p in procs:
            end = proc_fds(p.pid)
            p.fds.append((time.monotonic() - t0, end))
            if end > p.fd_baseline + FD_SLACK:
                failures.append(f"{p.role}: {end} fds at the end, {p.fd_baseline} before the load")

        # Rejections: each one sent was counted, with its reason.
        for reason, sent in sorted(stats.rejected_sent.items()):
            counted = inbound.metric("mtls_connections_rejected_total", reason=reason)
            figures[f"rejected_{reason}"] = f"{int(counted)}/{sent}"
            if counted != sent:
                failures.append(f"rejected {reason}: sent {sent}, counted {counted}")
        other = sum(
            inbound.metric("mtls_connections_rejected_total", reason=r)
            for r in ("handshake_timeout", "too_many_connections", "other", "bad_cert")
        )
        if other or outbound.metric("mtls_connections_rejected_total"):
            failures.append("unexpected rejections (good clients refused?)")
        if outbound.metric("mtls_upstream_connect_failures_total"):
            failures.append("the outbound failed to reach the inbound")
        for name, sc in (("inbound", inbound), ("outbound", outbound)):
            st = json.loads(sc.get("/status")[1])
            if any(w["restarts"] for w in st["workers"]):
                failures.append(f"{name}: a worker restarted")
        if stats.errors:
            failures.append(f"{len(stats.errors)} error(s) on good connections: {stats.errors[:5]}")
        figures["good_ok"] = dict(stats.ok)
        figures["bytes_checked_mib"] = round(stats.bytes_checked / 2**20, 1)
    finally:
        codes = [inbound.stop(), outbound.stop()]
        echo.kill()
        echo.wait()
    if codes != [0, 0]:
        failures.append(f"sidecars exited with {codes}")
    for name, sc in (("inbound", inbound), ("outbound", outbound)):
        if "Traceback" in sc.logs():
            failures.append(f"{name}: traceback in the log")
    return Result(failures, table(procs, warm_rss, duration), figures)


def table(procs: list[Proc], warm: dict[int, int], duration: float) -> str:
    head = (
        f"{'process':<20}{'pid':>8}{'RSS start':>11}{'warm':>9}{'max late':>10}"
        f"{'end':>9}{'growth':>8}{'fds base':>10}{'fds peak':>10}{'fds end':>9}"
    )
    lines = [head, "-" * len(head)]
    for p in procs:
        rss = [k for _, k in p.rss if k >= 0]
        late = [k for t, k in p.rss if t >= duration * 2 / 3 and k >= 0] or rss[-1:]
        fds = [n for _, n in p.fds if n >= 0]
        lines.append(
            f"{p.role:<20}{p.pid:>8}{rss[0] / 1024:>10.1f}M{warm[p.pid] / 1024:>8.1f}M"
            f"{max(late) / 1024:>9.1f}M{rss[-1] / 1024:>8.1f}M"
            f"{(max(late) - warm[p.pid]) / 1024:>7.1f}M"
            f"{p.fd_baseline:>10}{max(fds):>10}{fds[-1]:>9}"
        )
    return "\n".join(lines)


def run(
    minutes: float,
    concurrent: int,
    rss_growth_mb: float = RSS_GROWTH_MB,
    verbose: bool = False,
) -> Result:
    """The whole soak in a scratch directory; `Result.failures` is empty when it passed."""
    with tempfile.TemporaryDirectory(prefix="mtls-soak-") as work:
        return asyncio.run(_main(minutes, concurrent, Path(work), rss_growth_mb, verbose))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrent", type=int, default=5000)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    t0 = time.monotonic()
    result = run(args.minutes, args.concurrent, verbose=True)
    print(result.summary)
    for k, v in result.figures.items():
        print(f"{k}: {v}")
    print(f"bounds: RSS growth after warm-up <= {RSS_GROWTH_MB} MB; fds <= baseline + {FD_SLACK}")
    print(f"took {time.monotonic() - t0:.0f}s")
    if result.failures:
        print("FAILED:")
        for f in result.failures:
            print(f"  - {f}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
