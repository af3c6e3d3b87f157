"""`mtls-sidecar demo`: a CA, an app, two sidecars that enrol with the CA, traffic, metrics.

Everything runs on loopback as the current user, in a temporary directory, in under a minute:

    curl-like client --plaintext--> web sidecar (outbound) ==mTLS==> api sidecar (inbound)
        --plaintext--> api app

and then a plaintext client knocks on the mTLS port directly and is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

TD = "demo.example"
API_ID = f"spiffe://{TD}/ns/shop/sa/api"
WEB_ID = f"spiffe://{TD}/ns/shop/sa/web"


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now: all held at once while they are
    picked, so the kernel cannot hand the same port out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from the api app, path {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        body = f"api app received {len(data)} bytes\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def _process(
    name: str, args: list[str], env: dict[str, str], logdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log = open(logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _metric_lines(admin_port: int, prefixes: tuple[str, ...]) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [
        line
        for line in text.splitlines()
        if line.startswith(prefixes) and not line.rstrip().endswith(" 0.0")
    ]


def run_demo(workdir: Path) -> int:
    from .ca.issuer import fingerprint
    from .ca.store import CaDir
    from .ca.tokens import make_token

    py = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logdir = workdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    _say(f"1. a CA for trust domain {TD} in {workdir / 'ca'}")
    ca = CaDir.init(workdir / "ca", TD)
    fp = fingerprint(ca.root(1))
    print(f"   root fingerprint {fp}")
    ca_port, app_port, in_port, out_port, in_admin, out_admin = _free_ports(6)
    tokens = {sid: make_token(ca.token_secret(), sid, 600) for sid in (API_ID, WEB_ID)}
    print("   join tokens made for", API_ID, "and", WEB_ID)

    api_app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), _Api)
    threading.Thread(target=api_app.serve_forever, daemon=True).start()

    def sidecar_env(identity: str, admin: int, routes: dict[str, str]) -> dict[str, str]:
        return {
            **env,
            "MTLS_IDENTITY_SOURCE": "ca",
            "MTLS_CA_URL": f"https://127.0.0.1:{ca_port}",
            "MTLS_CA_TOKEN": tokens[identity],
            "MTLS_CA_FINGERPRINT": fp,
            "MTLS_IDENTITY": identity,
            "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "MTLS_WORKERS": "1",
            "MTLS_LOG_FORMAT": "text",
            **routes,
        }

    with contextlib.ExitStack() as stack:
        _say(f"2. the CA's enrolment service on https://127.0.0.1:{ca_port}")
        ca_proc = stack.enter_context(
            _process(
                "ca",
                [
                    py,
                    "-m",
                    "proxy",
                    "ca",
                    "serve",
                    "--dir",
                    str(workdir / "ca"),
                    "--listen",
                    f"127.0.0.1:{ca_port}",
                ],
                env,
                logdir,
            )
        )
        _wait_tcp(ca_port, 20, ca_proc)
        _say(f"3. the api app on 127.0.0.1:{app_port}, and two sidecars that enrol with the CA")
        print(f"   api sidecar (inbound):  mTLS 127.0.0.1:{in_port} -> app 127.0.0.1:{app_port}")
        print(
            f"   web sidecar (outbound): plaintext 127.0.0.1:{out_port} -> mTLS 127.0.0.1:"
            f"{in_port}, expecting {API_ID}"
        )
        api = stack.enter_context(
            _process(
                "api-sidecar",
                [py, "-m", "proxy", "run"],
                sidecar_env(
                    API_ID,
                    in_admin,
                    {
                        "MTLS_INBOUND": f"api=127.0.0.1:{in_port}=127.0.0.1:{app_port}",
                        "MTLS_ALLOW_PEERS": f"spiffe://{TD}/ns/shop/**",
                    },
                ),
                logdir,
            )
        )
        web = stack.enter_context(
            _process(
                "web-sidecar",
                [py, "-m", "proxy", "run"],
                sidecar_env(
                    WEB_ID,
                    out_admin,
                    {"MTLS_OUTBOUND": f"api=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{API_ID}"},
                ),
                logdir,
            )
        )
        _wait_http(f"http://127.0.0.1:{in_admin}/ready", 40, api)
        _wait_http(f"http://127.0.0.1:{out_admin}/ready", 40, web)
        print("   both sidecars enrolled and ready")

        _say("4. the web app talks plaintext HTTP to its sidecar; the network leg is mTLS")
        for path in ("/orders", "/orders/42", "/health"):
            with urllib.request.urlopen(f"http://127.0.0.1:{out_port}{path}", timeout=5) as r:
                print(f"   GET {path} -> {r.status} {r.read().decode().strip()}")
        payload = b"x" * 1_000_000
        req = urllib.request.Request(f"http://127.0.0.1:{out_port}/upload", data=payload)
        with urllib.request.urlopen(req, timeout=10) as r:
            print(f"   POST /upload (1 MB) -> {r.status} {r.read().decode().strip()}")

        _say("5. a plaintext client knocks on the mTLS port directly")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{in_port}/orders", timeout=5) as r:
                print(f"   unexpected answer {r.status}")
                return 1
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            print(f"   refused, as it should be ({type(exc).__name__})")

        time.sleep(1.2)  # long connections' byte counts are flushed once a second
        _say("6. what the sidecars' /metrics say")
        wanted = (
            "mtls_connections_total",
            "mtls_bytes_total",
            "mtls_connections_rejected_total",
            "mtls_peer_connections_total",
            "mtls_handshakes_total",  # the key exchange: X25519MLKEM768 is post-quantum
            "mtls_pool_streams_total",  # app connections carried on a pooled connection
            "mtls_pool_connections",
            "mtls_cert_expiry_timestamp_seconds",
            "mtls_trust_bundle_roots",
        )
        for name, port in (("web sidecar", out_admin), ("api sidecar", in_admin)):
            print(f"   -- {name} (http://127.0.0.1:{port}/metrics)")
            for line in _metric_lines(port, wanted):
                print(f"   {line}")
        plaintext = [
            line
            for port in (in_admin, out_admin)
            for line in _metric_lines(port, ("mtls_bytes_total",))
            if 'security="plaintext"' in line
        ]
        if plaintext:
            print("   plaintext bytes were relayed:", plaintext)
            return 1
        print("\n   every relayed byte crossed the network inside mTLS (no plaintext series > 0)")
        _say(f"done; logs in {logdir}")
    api_app.shutdown()
    return 0


def _wait_tcp(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"CA service exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtls-sidecar demo", description=__doc__)
    parser.add_argument("--dir", type=Path, help="keep the demo's files here (default: temp)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        return run_demo(args.dir)
    with tempfile.TemporaryDirectory(prefix="mtls-demo-") as d:
        try:
            return run_demo(Path(d))
        except RuntimeError as exc:
            print(f"demo failed: {exc}; logs:", file=sys.stderr)
            for log in sorted((Path(d) / "logs").glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            return 1
