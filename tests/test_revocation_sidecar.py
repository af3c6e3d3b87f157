"""Revocation enforced by the sidecar: new handshakes with a revoked peer refused, open
connections of a revoked peer cut, a forged CRL refused (the last good one kept), and a
resumed session whose certificate expired refused."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import shutil
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

from .conftest import Pki
from .harness import ROOT, Sidecar, TcpApp, base_env, free_port, identity_env, wait_for
from .pki import Identity, Issuer, big_crl, make_intermediate, make_root, pem, write_identity

TD = "spiffe://rev.example"


def _ca(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "ca", *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _issue(ca: Path, name: str, out: Path) -> Identity:
    _ca("issue", "--dir", str(ca), "--id", f"{TD}/{name}", "--out", str(out / name))
    return Identity(
        out / f"{name}.crt", out / f"{name}.key", out / f"{name}.bundle.pem", f"{TD}/{name}"
    )


def _serial(ident: Identity) -> str:
    cert = x509.load_pem_x509_certificates(ident.cert.read_bytes())[0]
    return format(cert.serial_number, "x")


class Stream(threading.Thread):
    """An open connection through an outbound sidecar, pinging the echo app until cut."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.echoes = 0
        self.ended: str | None = None
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            while True:
                self.sock.sendall(b"ping")
                if self.sock.recv(4) != b"ping":
                    self.ended = "eof"
                    break
                self.echoes += 1
                time.sleep(0.02)
        except OSError as exc:
            self.ended = type(exc).__name__
        self.ended_at = time.monotonic()


@pytest.fixture
def mesh(tmp_path: Path, echo: TcpApp) -> Iterator[dict[str, object]]:
    ca = tmp_path / "ca"
    _ca("init", "--dir", str(ca), "--trust-domain", "rev.example")
    out = tmp_path / "ids"
    out.mkdir()
    server = _issue(ca, "server", out)
    alice = _issue(ca, "alice", out)
    bob = _issue(ca, "bob", out)
    crl = tmp_path / "crl.pem"
    shutil.copyfile(ca / "crl.pem", crl)
    in_port = free_port()
    inbound = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"web=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            "MTLS_CRL_FILE": str(crl),
            "MTLS_WORKERS": "2",
        },
        tmp_path / "inbound.log",
    )
    outs = {}
    for ident in (alice, bob):
        port = free_port()
        outs[ident.spiffe_id] = (
            Sidecar(
                {
                    **identity_env(ident),
                    "MTLS_OUTBOUND": f"o=127.0.0.1:{port}=127.0.0.1:{in_port}@{TD}/server",
                },
                tmp_path / f"out-{port}.log",
            ),
            port,
        )
    inbound.wait_ready()
    for sc, _ in outs.values():
        sc.wait_ready()
    yield {"ca": ca, "crl": crl, "inbound": inbound, "outs": outs, "alice": alice, "bob": bob}
    inbound.stop()
    for sc, _ in outs.values():
        sc.stop()


def test_revoking_a_serial_cuts_its_streams_and_refuses_it(mesh: dict[str, object]) -> None:
    ca, crl = mesh["ca"], mesh["crl"]
    inbound = mesh["inbound"]
    alice, bob = mesh["alice"], mesh["bob"]
    assert isinstance(ca, Path) and isinstance(crl, Path) and isinstance(inbound, Sidecar)
    assert isinstance(alice, Identity) and isinstance(bob, Identity)
    outs = mesh["outs"]
    assert isinstance(outs, dict)
    alice_port, bob_port = outs[alice.spiffe_id][1], outs[bob.spiffe_id][1]
    streams = [Stream(alice_port), Stream(alice_port), Stream(bob_port)]
    assert wait_for(lambda: all(s.echoes > 3 for s in streams))
    revoked_at = time.monotonic()
    _ca("revoke", "--dir", str(ca), "--serial", _serial(alice), "--reason", "keyCompromise")
    shutil.copyfile(ca / "crl.pem", crl.with_suffix(".tmp"))
    crl.with_suffix(".tmp").replace(crl)  # atomically, as a secret update does
    assert wait_for(lambda: all(s.ended for s in streams[:2]), timeout=15)
    took = max(s.ended_at for s in streams[:2]) - revoked_at
    print(f"revoke -> cut: {took:.2f}s")
    assert took < 5.0
    # A cut stream looks cut: a reset, not a clean end.
    assert all(s.ended in ("ConnectionResetError", "eof") for s in streams[:2]), streams
    before = streams[2].echoes
    assert wait_for(lambda: streams[2].echoes > before + 5)  # bob untouched
    assert streams[2].ended is None
    closed = "mtls_revoked_connections_closed_total"
    assert inbound.wait_metric(closed, 2) == 2
    # New connections from alice are refused as revoked; bob's still work.
    with socket.create_connection(("127.0.0.1", alice_port), timeout=10) as s:
        s.sendall(b"hi")
        s.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(2) == b""
    name = "mtls_connections_rejected_total"
    assert inbound.wait_metric(name, 1, reason="revoked") == 1
    lines = [e for e in inbound.log_events() if e.get("reason") == "revoked"]
    assert _serial(alice) in lines[0]["msg"] and alice.spiffe_id in lines[0]["msg"]
    status = json.loads(inbound.get("/status")[1])
    assert status["revocation"]["revoked_certificates"] == 1
    assert inbound.metric("mtls_crl_revoked_certificates") == 1
    assert inbound.metric("mtls_crl_next_update_timestamp_seconds") > time.time()
    streams[2].sock.close()


def test_a_forged_crl_is_refused_and_the_last_good_one_kept(
    mesh: dict[str, object], tmp_path: Path
) -> None:
    ca, crl, inbound = mesh["ca"], mesh["crl"], mesh["inbound"]
    alice = mesh["alice"]
    assert isinstance(ca, Path) and isinstance(crl, Path) and isinstance(inbound, Sidecar)
    assert isinstance(alice, Identity)
    before_revoke = crl.read_bytes()
    # One second apart, so thisUpdate tells the two lists apart (seconds resolution).
    time.sleep(1.1)
    _ca("revoke", "--dir", str(ca), "--id", str(alice.spiffe_id))
    shutil.copyfile(ca / "crl.pem", crl)
    assert inbound.wait_metric("mtls_crl_revoked_certificates", 1, timeout=10) == 1
    # Replaying the older list (which does not list alice) is refused: it would un-revoke.
    errors = inbound.metric("mtls_crl_reloads_total", result="error")
    crl.write_bytes(before_revoke)
    assert inbound.wait_metric("mtls_crl_reloads_total", errors + 1, result="error") == errors + 1
    refused = [e for e in inbound.log_events() if e.get("event") == "crl_refused"]
    assert "older" in refused[-1]["msg"]
    assert inbound.metric("mtls_crl_revoked_certificates") == 1
    # A CRL from another CA (same names), then garbage: both refused, alice still revoked.
    other = tmp_path / "other"
    _ca("init", "--dir", str(other), "--trust-domain", "rev.example")
    for forged in ((other / "crl.pem").read_bytes(), b"not a crl"):
        before = inbound.metric("mtls_crl_reloads_total", result="error")
        crl.write_bytes(forged)
        assert inbound.wait_metric("mtls_crl_reloads_total", before + 1, result="error") == (
            before + 1
        )
    assert inbound.metric("mtls_crl_revoked_certificates") == 1
    assert "Traceback" not in inbound.logs()


def test_a_resumed_session_with_an_expired_certificate_is_refused(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """A client saves a session made with a short-lived certificate; after the certificate
    expires, resuming that session (which skips certificate checks) is refused too."""
    root: Issuer = make_root()
    inter = make_intermediate(root)
    now = dt.datetime.now(dt.UTC)
    server = write_identity(tmp_path, "server", inter, [root.cert], f"{TD}/server")
    client = write_identity(
        tmp_path,
        "client",
        inter,
        [root.cert],
        f"{TD}/client",
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(seconds=4),
    )
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_WORKERS": "1",  # a session resumes in the worker that issued it
        },
        tmp_path / "sc.log",
    )
    ctx = ssl.create_default_context(cafile=str(server.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(client.cert), str(client.key))

    def talk(session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, session=session) as s,
        ):
            s.sendall(b"hello")
            try:
                got = s.recv(5)
            except (ssl.SSLError, ConnectionResetError):
                got = b""
            return got, s.session, bool(s.session_reused)

    try:
        sc.wait_ready()
        got, session, _ = talk(None)
        assert got == b"hello"
        assert session is not None and session.has_ticket
        # Wait for the certificate to expire (a clock, not a state to poll).
        expired = now + dt.timedelta(seconds=5)
        time.sleep(max(0.0, (expired - dt.datetime.now(dt.UTC)).total_seconds()))
        got, _, reused = talk(session)
        assert reused, "the saved session was not resumed"
        assert got == b""
        name = "mtls_connections_rejected_total"
        assert sc.wait_metric(name, 1, reason="expired_cert") >= 1
        lines = [e for e in sc.log_events() if e.get("reason") == "expired_cert"]
        assert any("resumed session" in e["msg"] for e in lines), lines
    finally:
        sc.stop()


def _talks(port: int, ident: Identity) -> bool:
    """Does an mTLS client with `ident` get its bytes echoed through the inbound on `port`?"""
    ctx = ssl.create_default_context(cafile=str(ident.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(ident.cert), str(ident.key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw) as s,
        ):
            s.sendall(b"ping")
            return s.recv(4) == b"ping"
    except (ssl.SSLError, OSError):
        return False


def _serial_of(ident: Identity) -> int:
    return x509.load_pem_x509_certificates(ident.cert.read_bytes())[0].serial_number


def test_a_crl_over_16_mib_loads_without_taking_the_workers_down(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """A legitimate 600,000-entry CRL (28 MB), then a small one padded to 17 MiB with text
    between its PEM blocks: both load in every worker, no worker restarts, /ready stays
    200 (issue 22, defect 1: each once killed the workers' control channel in a loop)."""
    rng = random.Random(22)
    many = [rng.getrandbits(127) | (1 << 126) for _ in range(600_000)]
    crl = tmp_path / "crl.pem"
    crl.write_bytes(big_crl(pki.inter, [*many, _serial_of(pki.client)], number=1))
    assert crl.stat().st_size > 16 * 1024 * 1024
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_CRL_FILE": str(crl),
            "MTLS_WORKERS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready(timeout=90)
        assert sc.metric("mtls_crl_revoked_certificates") == 600_001
        for _ in range(4):  # both workers, whichever takes the connection
            assert not _talks(port, pki.client)
            assert _talks(port, pki.server2)
        assert sc.metric("mtls_connections_rejected_total", reason="revoked") == 4
        # Padding between the PEM blocks is ignored; the size alone must not break anything.
        padding = b"# padding\n" * (17 * 1024 * 1024 // 10)
        small = big_crl(pki.inter, [_serial_of(pki.server2)], number=2)
        crl.with_suffix(".tmp").write_bytes(small + padding + pem(pki.inter.cert))
        crl.with_suffix(".tmp").replace(crl)
        assert sc.wait_metric("mtls_crl_reloads_total", 2, timeout=30, result="ok") == 2
        assert sc.metric("mtls_crl_revoked_certificates") == 1
        assert wait_for(lambda: not _talks(port, pki.server2) and _talks(port, pki.client))
        assert sc.get("/ready")[0] == 200
        logs = sc.logs()
        assert "exited with" not in logs and "Traceback" not in logs
        assert "Separator is not found" not in logs
    finally:
        sc.stop()


def _refused_via(port: int) -> bool:
    """Through an outbound sidecar on `port`: is the echo refused (nothing comes back)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hi")
            s.settimeout(10)
            return s.recv(2) != b"hi"
    except (ConnectionResetError, BrokenPipeError):  # the reset may beat the send
        return True


def test_a_crl_may_not_disappear_after_an_intermediate_rotation(mesh: dict[str, object]) -> None:
    """After `ca rotate-intermediate` the CRL file holds two CRLs. Writing it back without
    the one listing a keyCompromise certificate is refused, counted and logged, and that
    certificate stays refused (issue 22, defect 2)."""
    ca, crl, inbound = mesh["ca"], mesh["crl"], mesh["inbound"]
    alice, outs = mesh["alice"], mesh["outs"]
    assert isinstance(ca, Path) and isinstance(crl, Path) and isinstance(inbound, Sidecar)
    assert isinstance(alice, Identity) and isinstance(outs, dict)
    alice_port = outs[alice.spiffe_id][1]
    _ca("rotate-intermediate", "--dir", str(ca))
    _ca("revoke", "--dir", str(ca), "--serial", _serial(alice), "--reason", "keyCompromise")
    full = (ca / "crl.pem").read_bytes()
    blocks = [b"-----BEGIN X509 CRL-----" + b for b in full.split(b"-----BEGIN X509 CRL-----")[1:]]
    blocks[-1], certs = blocks[-1].split(b"-----BEGIN CERTIFICATE-----", 1)
    certs = b"-----BEGIN CERTIFICATE-----" + certs
    assert len(blocks) == 2  # one CRL per intermediate, then their certificates
    alice_serial = int(_serial(alice), 16)
    listing = [
        b
        for b in blocks
        if x509.load_pem_x509_crl(b).get_revoked_certificate_by_serial_number(alice_serial)
    ]
    assert len(listing) == 1
    crl.write_bytes(full)
    assert inbound.wait_metric("mtls_crl_revoked_certificates", 1, timeout=10) == 1
    assert _refused_via(alice_port)
    rejected = inbound.wait_metric("mtls_connections_rejected_total", 1, reason="revoked")
    assert rejected == 1
    errors = inbound.metric("mtls_crl_reloads_total", result="error")
    # The same file without the CRL that lists alice.
    crl.write_bytes(b"".join(b for b in blocks if b not in listing) + certs)
    assert inbound.wait_metric("mtls_crl_reloads_total", errors + 1, result="error") == errors + 1
    refused = [e for e in inbound.log_events() if e.get("event") == "crl_refused"]
    assert "missing" in refused[-1]["msg"] and "keeping the last accepted one" in refused[-1]["msg"]
    assert inbound.metric("mtls_crl_revoked_certificates") == 1
    assert _refused_via(alice_port)
    name = "mtls_connections_rejected_total"
    assert inbound.wait_metric(name, rejected + 1, reason="revoked") == rejected + 1
    assert "Traceback" not in inbound.logs()
