"""Test helpers: real sidecar processes, small TCP apps, ports, metrics scrapes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.procs import server_port_range

from .pki import Identity

ROOT = Path(__file__).resolve().parent.parent


# Ports for servers a test starts come from below the kernel's ephemeral range:
# a port the kernel hands out with bind(0) can be taken as the local port of any
# outgoing connection between the moment a test chooses it and the moment the
# process under test binds it (seen in CI as "Address already in use").
_POOL_LOW, _POOL_HIGH = server_port_range()
_next_port = _POOL_LOW + (os.getpid() * 7919) % (_POOL_HIGH - _POOL_LOW)
_port_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, never handed out before by this process, and
    outside the ephemeral range so that no outgoing connection can take it."""
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _port_lock:
        for _ in range(_POOL_HIGH - _POOL_LOW):
            port = _next_port
            _next_port = _POOL_LOW if port >= _POOL_HIGH else port + 1
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free port in {_POOL_LOW}-{_POOL_HIGH}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(body: str) -> Samples:
    """A Prometheus text exposition as {(name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sum_samples(samples: Samples, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for (n, lbls), value in samples.items():
        d = dict(lbls)
        if n == name and all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


def identity_env(ident: Identity) -> dict[str, str]:
    return {
        "MTLS_IDENTITY_SOURCE": "files",
        "MTLS_CERT_FILE": str(ident.cert),
        "MTLS_KEY_FILE": str(ident.key),
        "MTLS_TRUST_BUNDLE_FILE": str(ident.bundle),
    }


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


class Sidecar:
    """A real `python -m proxy run` process with its admin port and its log captured."""

    def __init__(
        self, env: dict[str, str], log_path: Path, prefix: list[str] | None = None
    ) -> None:
        self.admin_port = free_port()
        self.env = base_env()
        self.env.update(
            {
                "MTLS_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
                "MTLS_WORKERS": "1",
                "MTLS_LOG_FORMAT": "json",
                "MTLS_LOG_LEVEL": "info",
            }
        )
        self.env.update(env)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "proxy", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.get("/ready", timeout=1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"sidecar not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def metrics(self) -> Samples:
        """Every sample as {(name, sorted labels): value}."""
        status, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum_samples(self.metrics(), name, labels)

    def wait_metric(self, name: str, value: float, timeout: float = 5.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        got = self.metric(name, **labels)
        while got != value and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.metric(name, **labels)
        return got

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


class TcpApp:
    """A small threaded TCP server on loopback.

    mode "echo": echoes everything back. mode "eof-reply": reads until EOF, then replies
    with b"got:" + length and closes (proves half-close is carried across).
    """

    def __init__(self, mode: str = "echo", host: str = "127.0.0.1") -> None:
        self.mode = mode
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.mode == "echo":
                    while data := conn.recv(65536):
                        conn.sendall(data)
                elif self.mode == "eof-reply":
                    n = 0
                    while data := conn.recv(65536):
                        n += len(data)
                    conn.sendall(b"got:%d" % n)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class ScriptedApp:
    """A TCP app whose handler is a function of the accepted socket."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.handler = handler
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def recv_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def exchange(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 10.0) -> bytes:
    """Connect, send `payload`, half-close, read until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s, timeout)


@contextlib.contextmanager
def running(*procs: Sidecar) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> Any:
    """Poll `cond` until it returns something true (returned) or `timeout` passes (its last
    value is returned: falsy). For waiting on observable state, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@dataclass
class Pair:
    """An inbound sidecar (mTLS in, to the app) and an outbound one (app -> mTLS) in front of it."""

    inbound: Sidecar
    outbound: Sidecar
    in_port: int
    out_port: int

    def stop(self) -> tuple[int, int]:
        return self.inbound.stop(), self.outbound.stop()

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as (inbound, outbound, in_port, out_port)."""
        return iter((self.inbound, self.outbound, self.in_port, self.out_port))
