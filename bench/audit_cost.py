"""What the wire auditor costs: its CPU while the node carries a bulk transfer, and while it
carries a high rate of new connections (issue 26).

    sudo .venv/bin/python -m bench.audit_cost [--seconds 10]

Two hosts as network namespaces on a bridge in a "wire" namespace (tests/netns.py's Lab), the
auditor in the wire namespace as on a node. Bulk: iperf3 from A to B. Connections: wrk from A
with `Connection: close` (one TCP connection per request) against a small server in B. The
auditor's CPU is user+sys from /proc/PID/stat over each run; connections and bytes from its own
metrics. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import parse_metrics, sum_samples
from tests.netns import Lab

PORT = 9100
SERVER = """
import asyncio
RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok"
async def handle(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(RESPONSE)
    await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", 8080, backlog=1024)
    print("serving", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(lab: Lab, name: str) -> float:
    proc = lab.run(lab.bridge_ns, ["curl", "-s", f"http://127.0.0.1:{PORT}/metrics"])
    return sum_samples(parse_metrics(proc.stdout), name, {})


def wait_for(what: str, check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_cost")
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="audit-cost-"))
    lab = Lab(["a", "b"])
    try:
        ok = lab.run(lab.bridge_ns, ["ip", "link", "set", "br0", "type", "bridge",
                                     "nf_call_iptables", "1"])  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        log = open(workdir / "auditor.log", "wb")  # noqa: SIM115 - lives as long as the lab
        auditor = lab.popen(lab.bridge_ns, [sys.executable, "-m", "proxy", "audit", "--listen",
                                            f"127.0.0.1:{PORT}"], log)  # fmt: skip

        def ready() -> bool:
            got = lab.run(lab.bridge_ns, ["curl", "-s", f"http://127.0.0.1:{PORT}/ready"])
            return got.stdout == "ok\n"

        wait_for("the auditor", ready)
        b = lab["b"].v4
        rows = []

        # Bulk: one iperf3 connection.
        lab.popen("b", ["iperf3", "-s", "-1"], open(workdir / "iperf3.log", "wb"))  # noqa: SIM115
        time.sleep(0.5)  # iperf3 -s prints nothing we could wait on before it binds
        cpu0, t0 = cpu_seconds(auditor.pid), time.monotonic()
        out = lab.run("a", ["iperf3", "-c", b, "-t", str(args.seconds), "-J"], timeout=120)
        wall, cpu = time.monotonic() - t0, cpu_seconds(auditor.pid) - cpu0
        sent = json.loads(out.stdout)["end"]["sum_sent"]["bytes"]
        rows.append(("bulk (iperf3, 1 connection)", f"{sent * 8 / wall / 1e9:.2f} Gbit/s",
                     cpu, wall, f"{cpu / (sent / 1e9):.4f} s/GB"))  # fmt: skip

        # New connections: wrk with Connection: close against the small server.
        lab.popen("b", [sys.executable, "-c", SERVER], open(workdir / "server.log", "wb"))  # noqa: SIM115
        wait_for(
            "the server", lambda: lab.run("a", ["curl", "-s", f"http://{b}:8080/"]).stdout == "ok"
        )
        conns0 = metric(lab, "mtls_audit_connections_total")
        pkts0 = metric(lab, "mtls_audit_packets_total")
        cpu0, t0 = cpu_seconds(auditor.pid), time.monotonic()
        wrk = lab.run("a", ["wrk", "-t", "2", "-c", "32", "-d", f"{args.seconds}s", "-H",
                            "Connection: close", f"http://{b}:8080/"], timeout=120)  # fmt: skip
        wall = time.monotonic() - t0
        # Connections are counted once they end and settle; the auditor's CPU is measured
        # until it has counted every one wrk made (or a minute more has passed).
        m = re.search(r"(\d+) requests in", wrk.stdout)
        made = int(m[1]) if m else 0
        deadline = time.monotonic() + 60
        last = metric(lab, "mtls_audit_connections_total")
        while last - conns0 < made and time.monotonic() < deadline:
            time.sleep(1)
            last = metric(lab, "mtls_audit_connections_total")
        cpu = cpu_seconds(auditor.pid) - cpu0
        conns = last - conns0
        pkts = metric(lab, "mtls_audit_packets_total") - pkts0
        rows.append((f"new connections (wrk, Connection: close; {conns:,.0f} of {made:,} "
                     f"counted, {pkts / conns:.1f} packets handed over each)",
                     f"{made / wall:,.0f} conn/s", cpu, wall,
                     f"{cpu / conns * 1e6:,.0f} us/conn"))  # fmt: skip
        rss_kb = next(
            int(ln.split()[1])
            for ln in Path(f"/proc/{auditor.pid}/status").read_text().splitlines()
            if ln.startswith("VmRSS:")
        )
        tracked = metric(lab, "mtls_audit_tracked_connections")
        print(wrk.stdout, file=sys.stderr)
        final = lab.run(lab.bridge_ns, ["curl", "-s", f"http://127.0.0.1:{PORT}/metrics"])
        print("\n".join(ln for ln in final.stdout.splitlines() if ln.startswith("mtls_audit")
                        and "_created" not in ln), file=sys.stderr)  # fmt: skip
        print("| load | rate | auditor CPU s | wall s | auditor CPU % of one core | per unit |")
        print("|---|---|---|---|---|---|")
        for name, rate, c, w, per in rows:
            print(f"| {name} | {rate} | {c:.2f} | {w:.1f} | {100 * c / w:.1f} % | {per} |")
        print(f"\nauditor RSS {rss_kb / 1024:.0f} MiB after the runs, {tracked:,.0f} connections "
              "in progress in its table")  # fmt: skip
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
