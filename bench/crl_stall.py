"""How long a big CRL holds a worker's event loop: an open mTLS connection through one
inbound sidecar is pinged every 2 ms while MTLS_CRL_FILE is replaced by an N-entry CRL.

    python -m bench.crl_stall [N] [DIR]     (N = 600000 by default)

Prints the ping round trip before and during the load, the longest answer of the admin
port's /live meanwhile, and the master's load time.
"""

from __future__ import annotations

import random
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import Sidecar, TcpApp, free_port, identity_env
from tests.pki import big_crl, make_intermediate, make_root, write_identity

TD = "spiffe://bench.example"


def main(n: int, tmp: Path) -> None:
    root = make_root()
    inter = make_intermediate(root)
    server = write_identity(tmp, "server", inter, [root.cert], f"{TD}/server")
    client = write_identity(tmp, "client", inter, [root.cert], f"{TD}/client")
    crl = tmp / "crl.pem"
    crl.write_bytes(big_crl(inter, [5], number=1))
    echo = TcpApp("echo")
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_CRL_FILE": str(crl),
            "MTLS_WORKERS": "1",
        },
        tmp / "sc.log",
    )
    try:
        sc.wait_ready()
        ctx = ssl.create_default_context(cafile=str(client.bundle))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(client.cert), str(client.key))
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))

        def rtt() -> float:
            t = time.perf_counter()
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            return time.perf_counter() - t

        base = sorted(rtt() for _ in range(300))
        rng = random.Random(1)
        serials = [rng.getrandbits(127) | (1 << 126) for _ in range(n)]
        big = big_crl(inter, serials, number=2)
        (tmp / "new.pem").write_bytes(big)
        admin: list[float] = []

        def probe_admin() -> None:
            while time.monotonic() - started < 8:
                t = time.perf_counter()
                sc.get("/live", timeout=10)
                admin.append(time.perf_counter() - t)
                time.sleep(0.01)

        (tmp / "new.pem").replace(crl)
        started, during = time.monotonic(), []
        prober = threading.Thread(target=probe_admin)
        prober.start()
        while time.monotonic() - started < 8:
            during.append(rtt())
            time.sleep(0.002)
        prober.join()
        during.sort()
        print(
            f"N={n} CRL {len(big) / 1e6:.1f} MB; ping before: p50 {base[150] * 1e3:.2f} ms, "
            f"max {base[-1] * 1e3:.2f} ms; during the load: p99 "
            f"{during[int(len(during) * 0.99)] * 1e3:.2f} ms, max {during[-1] * 1e3:.1f} ms"
        )
        print(f"admin /live during the load: max {max(admin) * 1e3:.1f} ms")
        loaded = [e for e in sc.log_events() if e.get("event") == "crl_loaded"]
        print("master:", loaded[-1]["msg"])
        s.close()
    finally:
        sc.stop()
        echo.close()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 600_000
    if len(sys.argv) > 2:
        main(count, Path(sys.argv[2]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(count, Path(d))
