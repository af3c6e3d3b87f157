"""Real sidecars enrolled with a real `ca serve`: renewals under a long connection, CA outage,
root rotation under traffic with zero failed connections."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from proxy.ca.issuer import fingerprint
from proxy.ca.store import CaDir
from proxy.ca.tokens import make_token

from .harness import ROOT, Sidecar, TcpApp, base_env, free_port

TD = "ca-test.example"
SERVER = f"spiffe://{TD}/server"
CLIENT = f"spiffe://{TD}/client"


class CaService:
    def __init__(self, directory: Path, port: int, log: Path, leaf_ttl: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "proxy",
            "ca",
            "serve",
            "--dir",
            str(directory),
            "--listen",
            f"127.0.0.1:{port}",
            "--leaf-ttl",
            leaf_ttl,
        ]
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("ca serve did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Mesh:
    def __init__(self, ca_dir: Path, ca: CaService, inbound: Sidecar, outbound: Sidecar,
                 in_port: int, out_port: int) -> None:  # fmt: skip
        self.ca_dir, self.ca = ca_dir, ca
        self.inbound, self.outbound = inbound, outbound
        self.in_port, self.out_port = in_port, out_port


def _sidecar_env(ca: CaDir, fp: str, ca_port: int, identity: str) -> dict[str, str]:
    return {
        "MTLS_IDENTITY_SOURCE": "ca",
        "MTLS_CA_URL": f"https://127.0.0.1:{ca_port}",
        "MTLS_CA_FINGERPRINT": fp,
        "MTLS_CA_TOKEN": make_token(ca.token_secret(), identity, 600),
        "MTLS_IDENTITY": identity,
    }


@contextlib.contextmanager
def _mesh(
    tmp_path: Path, leaf_ttl: str = "8s", inbound_env: dict[str, str] | None = None
) -> Iterator[Mesh]:
    """A `ca serve` and a pair enrolled with it (server inbound, client outbound to it)."""
    ca_dir = tmp_path / "ca"
    ca = CaDir.init(ca_dir, TD)
    fp = fingerprint(ca.root(1))
    ca_port = free_port()
    service = CaService(ca_dir, ca_port, tmp_path / "ca.log", leaf_ttl)
    echo = TcpApp("echo")
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **_sidecar_env(ca, fp, ca_port, SERVER),
            "MTLS_INBOUND": f"127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            **(inbound_env or {}),
        },
        tmp_path / "inbound.log",
    )
    outbound = Sidecar(
        {
            **_sidecar_env(ca, fp, ca_port, CLIENT),
            "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{in_port}@{SERVER}",
        },
        tmp_path / "outbound.log",
    )
    try:
        inbound.wait_ready(30)
        outbound.wait_ready(30)
        yield Mesh(ca_dir, service, inbound, outbound, in_port, out_port)
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0
        service.stop()
        echo.close()
        for sc in (inbound, outbound):
            assert "Traceback" not in sc.logs(), sc.logs()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with _mesh(tmp_path) as m:
        yield m


def _client_ctx(mesh: Mesh) -> ssl.SSLContext:
    """A client identity issued offline by the same CA (`ca issue`)."""
    ca = CaDir.open(mesh.ca_dir)
    prefix = mesh.ca_dir.parent / "probe"
    subprocess.run(
        [sys.executable, "-m", "proxy", "ca", "issue", "--dir", str(mesh.ca_dir),
         "--id", f"spiffe://{TD}/probe", "--ttl", "1h", "--out", str(prefix)],
        check=True, cwd=ROOT, env=base_env(), capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.bundle_pem().decode())
    ctx.load_cert_chain(f"{prefix}.crt", f"{prefix}.key")
    return ctx


def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


class Traffic(threading.Thread):
    """Short connections through the pair in a loop; every one must succeed."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            payload = b"req-%d" % i
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := s.recv(4096):
                        got += chunk
                if got == payload:
                    self.ok += 1
                else:
                    self.failures.append(f"{i}: got {got!r}")
            except OSError as exc:
                self.failures.append(f"{i}: {exc!r}")
            time.sleep(0.05)


def test_renewals_keep_long_connection_and_rotate_served_cert(mesh: Mesh) -> None:
    ctx = _client_ctx(mesh)
    first = _served_serial(mesh.in_port, ctx)
    long = socket.create_connection(("127.0.0.1", mesh.out_port), timeout=10)
    serials = {first}
    deadline = time.monotonic() + 40
    i = 0
    while time.monotonic() < deadline:
        i += 1
        long.sendall(b"tick-%d;" % i)
        want = b"tick-%d;" % i
        got = b""
        while len(got) < len(want):
            got += long.recv(100)
        assert got == want
        serials.add(_served_serial(mesh.in_port, ctx))
        renewed = min(
            mesh.inbound.metric("mtls_cert_renewals_total", result="ok"),
            mesh.outbound.metric("mtls_cert_renewals_total", result="ok"),
        )
        # the enrolment counts once; three renewals after it
        if renewed >= 4 and len(serials) >= 3:
            break
        time.sleep(0.5)
    long.close()
    assert len(serials) >= 3, "new connections did not see renewed certificates"
    assert mesh.inbound.metric("mtls_cert_renewals_total", result="ok") >= 4
    assert mesh.inbound.metric("mtls_cert_renewals_total", result="error") == 0


def test_ca_down_sidecar_keeps_serving_then_recovers(mesh: Mesh) -> None:
    traffic = Traffic(mesh.out_port)
    traffic.start()
    try:
        time.sleep(1)
        mesh.ca.stop()
        deadline = time.monotonic() + 30
        while mesh.inbound.metric("mtls_cert_renewals_total", result="error") < 1:
            assert time.monotonic() < deadline, "renewal never failed"
            time.sleep(0.2)
        assert mesh.inbound.get("/ready")[0] == 200  # still holding a valid certificate
        before_ok = mesh.inbound.metric("mtls_cert_renewals_total", result="ok")
        mesh.ca.start()
        deadline = time.monotonic() + 30
        while mesh.inbound.metric("mtls_cert_renewals_total", result="ok") <= before_ok:
            assert time.monotonic() < deadline, "did not recover after the CA came back"
            time.sleep(0.2)
    finally:
        traffic.stop.set()
        traffic.join(20)
    assert traffic.failures == []
    assert traffic.ok > 10


def test_root_rotation_under_traffic(mesh: Mesh) -> None:
    traffic = Traffic(mesh.out_port)
    traffic.start()

    def step(stage: str) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "proxy", "ca", "rotate-root", "--dir", str(mesh.ca_dir),
             "--stage", stage, "--wait", "0s"],
            cwd=ROOT, env=base_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr

    def wait_roots(n: int) -> None:
        deadline = time.monotonic() + 40
        while not all(
            sc.metric("mtls_trust_bundle_roots") == n for sc in (mesh.inbound, mesh.outbound)
        ):
            assert time.monotonic() < deadline, f"sidecars did not reach {n} roots"
            time.sleep(0.3)

    def wait_renewals(k: int) -> None:
        start = [
            sc.metric("mtls_cert_renewals_total", result="ok")
            for sc in (mesh.inbound, mesh.outbound)
        ]
        deadline = time.monotonic() + 40
        while any(
            sc.metric("mtls_cert_renewals_total", result="ok") < s + k
            for sc, s in zip((mesh.inbound, mesh.outbound), start, strict=True)
        ):
            assert time.monotonic() < deadline
            time.sleep(0.3)

    try:
        step("add")
        wait_roots(2)
        step("switch")
        wait_renewals(2)  # every sidecar now holds a leaf of the new root
        step("remove")
        wait_roots(1)
        wait_renewals(1)
        time.sleep(1)
    finally:
        traffic.stop.set()
        traffic.join(20)
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 20


def test_ca_revocation_by_identity_cuts_the_stream_within_one_refresh(tmp_path: Path) -> None:
    """CA mode: `ca revoke --id` reaches the inbound sidecar with its next bundle/CRL fetch
    (MTLS_BUNDLE_REFRESH), which cuts the revoked client's open stream."""
    with _mesh(tmp_path, "1h", {"MTLS_BUNDLE_REFRESH": "1s"}) as mesh:
        ca_dir, inbound, out_port = mesh.ca_dir, mesh.inbound, mesh.out_port
        s = socket.create_connection(("127.0.0.1", out_port), timeout=10)
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "proxy", "ca", "revoke", "--dir", str(ca_dir), "--id", CLIENT],
            cwd=ROOT,
            env=base_env(),
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        s.settimeout(15)
        try:
            cut = s.recv(4) == b""
        except ConnectionResetError:
            cut = True
        took = time.monotonic() - started
        s.close()
        print(f"ca revoke --id -> stream cut: {took:.2f}s")
        assert cut and took < 10.0
        assert inbound.wait_metric("mtls_revoked_connections_closed_total", 1) == 1
        assert inbound.metric("mtls_crl_reloads_total", result="ok") >= 1
