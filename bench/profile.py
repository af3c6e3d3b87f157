"""`python -m bench.profile CONTENDER WORKLOAD`: where one contender's CPU goes under one
benchmark workload, from py-spy samples of every process of its pair.

The pair, the apps and the workload are the benchmark's own (bench/pairs.py,
bench/workloads.py). After a one-second warm-up (which starts the pair), `py-spy record`
samples each process of the pair while the workload runs; the samples are summed over the
processes and printed as the functions with the most samples of their own ("self") and
mtls-sidecar's functions with the most samples under them ("inclusive"). The raw samples stay
in OUT/PID.txt (py-spy's collapsed-stack format, for a flame graph). py-spy is not a
dependency of the project: `pip install py-spy`, or name its binary with --py-spy. Only Python
processes are sampled, so for Envoy, haproxy and stunnel this says nothing.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.certs import make_certs
from bench.pairs import KINDS_BY_NAME, SIDECARS, Context, PairCache
from bench.procs import PortAllocator, ProcessSet, process_tree, raise_nofile
from bench.run import Apps
from bench.workloads import WORKLOADS, Env, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("contender", choices=[n for n in KINDS_BY_NAME if n.startswith("mtls")])
    p.add_argument("workload", choices=[w.key for w in WORKLOADS if w.key != "idle"])
    p.add_argument("--seconds", type=int, default=8, help="length of the run (default 8)")
    p.add_argument("--rate", type=int, default=200, help="samples per second (default 200)")
    p.add_argument("--out", type=Path, default=Path("bench/out/profile"))
    p.add_argument("--py-spy", default=None, help="py-spy binary (default: on PATH)")
    p.add_argument("--top", type=int, default=25, help="lines per list (default 25)")
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for both sidecars, as in bench.run",
    )
    args = p.parse_args(argv)
    spy = args.py_spy or shutil.which("py-spy")
    if spy is None or not Path(spy).exists():
        p.error("py-spy not found: pip install py-spy, or give --py-spy PATH")
    args.py_spy = spy
    try:
        args.sidecar_extra = dict(kv.split("=", 1) for kv in args.sidecar_env)
    except ValueError:
        p.error("--sidecar-env takes K=V")
    if args.seconds < 2:
        p.error("--seconds must be at least 2")
    return args


_WHERE = re.compile(r" \(/[^)]*/(proxy|site-packages|lib/python3[.\d]*)/")
_LINE = re.compile(r":\d+\)$")


def summarise(files: list[Path], top: int) -> str:
    """Self and inclusive shares of the samples in py-spy's collapsed-stack files."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_LINE.sub(")", _WHERE.sub(r" (\1/", f)) for f in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                under[frame] += n
    if not total:
        return "no samples (was the pair busy?)"
    lines = [f"{total} samples; functions by their own samples:"]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in own.most_common(top)]
    lines.append("mtls-sidecar's functions by the samples under them:")
    ours = [(f, n) for f, n in under.most_common() if "(proxy/" in f and "__main__" not in f]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sidecar in SIDECARS:
        sidecar.extra_env = args.sidecar_extra
    raise_nofile()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.txt"):
        old.unlink()
    kind = KINDS_BY_NAME[args.contender]
    workload = next(w for w in WORKLOADS if w.key == args.workload)

    def settings(seconds: int) -> Settings:
        return Settings(
            bulk_seconds=seconds,
            wrk_seconds=seconds,
            idle_connections=200,
            idle_repetitions=1,
            newconn_connections=32,
        )

    with tempfile.TemporaryDirectory(prefix="mtls-profile-") as tmp, ProcessSet(out) as procs:
        workdir = Path(tmp)
        ctx = Context(
            procs=procs, ports=PortAllocator(), certs=make_certs(workdir), workdir=workdir
        )
        apps = Apps(ctx)
        apps.ensure(list(apps.ports))
        pairs = PairCache(ctx)
        try:
            warm = Env(ctx=ctx, settings=settings(1), pairs=pairs, apps=apps.ports)
            workload.run(warm, kind)
            target = apps.ports["iperf3" if workload.key == "bulk" else "http"]
            pair = pairs.get(kind, target)
            pids = sorted(process_tree([p.pid for p in pair.procs]))
            spies = [
                subprocess.Popen(
                    [
                        *(args.py_spy, "record", "--nonblocking", "-r", str(args.rate)),
                        *("-d", str(args.seconds - 1), "-f", "raw"),
                        *("-o", str(out / f"{pid}.txt"), "-p", str(pid)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for pid in pids
            ]
            env = Env(ctx=ctx, settings=settings(args.seconds), pairs=pairs, apps=apps.ports)
            result = workload.run(env, kind)
            for spy in spies:
                spy.wait(timeout=args.seconds + 30)
        finally:
            pairs.close()
    print(f"{args.contender}, {args.workload}: {result}")
    print(summarise(sorted(out.glob("*.txt")), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
