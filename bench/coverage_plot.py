"""Draw docs/coverage.png from real data: two sidecars, a real Prometheus, a plaintext episode.

    python -m bench.coverage_plot [--seconds 20]

Phase 1: mTLS traffic through an outbound -> inbound sidecar pair. Phase 2: a client without a
sidecar also talks plaintext to the inbound sidecar (permissive mode). Phase 3: mTLS only again.
The plot shows what Prometheus recorded: bytes/s by security, and the encryption coverage.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import Sidecar, TcpApp, free_port, identity_env
from tests.pki import make_intermediate, make_root, write_identity
from tests.promserver import Prometheus

OUT = Path(__file__).resolve().parent.parent / "docs" / "coverage.png"
TD = "spiffe://plot.example"


def _pump(port: int, stop: threading.Event, chunk: int = 64 * 1024) -> None:
    data = b"p" * chunk
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for _ in range(16):
                s.sendall(data)
                got = 0
                while got < chunk:
                    got += len(s.recv(chunk))
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="length of each phase")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(tempfile.mkdtemp(prefix="mtls-plot-"))
    root = make_root()
    inter = make_intermediate(root)
    server = write_identity(d, "server", inter, [root.cert], f"{TD}/api")
    client = write_identity(d, "client", inter, [root.cert], f"{TD}/web")
    echo = TcpApp("echo")
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"api=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            "MTLS_INBOUND_MODE": "permissive",
            "MTLS_LOG_LEVEL": "warning",
        },
        d / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(client),
            "MTLS_OUTBOUND": f"api=127.0.0.1:{out_port}=127.0.0.1:{in_port}",
            "MTLS_LOG_LEVEL": "warning",
        },
        d / "outbound.log",
    )
    inbound.wait_ready()
    outbound.wait_ready()
    prom = Prometheus(
        [f"127.0.0.1:{inbound.admin_port}", f"127.0.0.1:{outbound.admin_port}"], d / "prom"
    )
    try:
        prom.wait_targets_up(2)
        start = time.time()
        stop_mtls, stop_plain = threading.Event(), threading.Event()
        threading.Thread(target=_pump, args=(out_port, stop_mtls), daemon=True).start()
        time.sleep(args.seconds)
        threading.Thread(target=_pump, args=(in_port, stop_plain), daemon=True).start()
        time.sleep(args.seconds)
        stop_plain.set()
        time.sleep(args.seconds)
        stop_mtls.set()
        time.sleep(3)
        end = time.time()
        win = "5s"

        def series(expr: str) -> tuple[list[float], list[float]]:
            res = prom.api("query_range", query=expr, start=str(start), end=str(end), step="1")[
                "result"
            ]
            if not res:
                return [], []
            values = res[0]["values"]
            return [float(t) - start for t, _ in values], [float(v) for _, v in values]

        sel = 'direction="inbound"'
        t_m, mtls = series(f'sum(rate(mtls_bytes_total{{{sel},security="mtls"}}[{win}]))')
        t_p, plain = series(f'sum(rate(mtls_bytes_total{{{sel},security="plaintext"}}[{win}]))')
        t_c, cov = series(
            f'sum(rate(mtls_bytes_total{{{sel},security="mtls"}}[{win}])) / '
            f"sum(rate(mtls_bytes_total{{{sel}}}[{win}]))"
        )
    finally:
        prom.stop()
        inbound.stop()
        outbound.stop()
        echo.close()

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax1.plot(t_m, [v / 1e6 for v in mtls], label='security="mtls"', color="tab:green")
    ax1.plot(t_p, [v / 1e6 for v in plain], label='security="plaintext"', color="tab:red")
    ax1.set_ylabel("MB/s (inbound)")
    ax1.set_title("mtls_bytes_total as scraped by Prometheus: a client without a sidecar appears")
    ax1.legend(loc="upper right")
    ax2.plot(t_c, cov, color="tab:blue")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("encryption coverage")
    ax2.set_xlabel("seconds")
    for ax in (ax1, ax2):
        ax.axvspan(args.seconds, 2 * args.seconds, color="tab:red", alpha=0.08)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
