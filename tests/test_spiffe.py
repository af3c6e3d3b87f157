"""MTLS_IDENTITY_SOURCE=spiffe end to end: a real sidecar process on a Workload API server
(gRPC on a Unix socket, tests/workload_api.py) that issues, rotates, restarts and federates;
real TLS peers of two trust domains with separate roots."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe._proto import workload_pb2, workload_pb2_grpc

from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, wait_for
from .pki import Issuer, key_pem, make_intermediate, make_leaf, make_root, pem, write_identity
from .workload_api import WorkloadApi, WorkloadState

A = "a.example"
B = "b.example"


@dataclass
class Domain:
    root: Issuer
    issuer: Issuer


def domain(name: str) -> Domain:
    root = make_root(f"{name} root")
    return Domain(root, make_intermediate(root, f"{name} issuer"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="wl", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def client(
    d: Path, name: str, issuer: Issuer, spiffe_id: str, trust: list[x509.Certificate]
) -> ssl.SSLContext:
    """A TLS client context with a leaf for `spiffe_id` from `issuer`."""
    cert, key = make_leaf(issuer, spiffe_id)
    (d / f"{name}.crt").write_bytes(pem(cert) + b"".join(pem(c) for c in issuer.chain))
    (d / f"{name}.key").write_bytes(key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(pem(c).decode() for c in trust))
    ctx.load_cert_chain(d / f"{name}.crt", d / f"{name}.key")
    return ctx


def connect(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw)


def roundtrip(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    with connect(port, ctx) as s:
        s.sendall(payload)
        return s.recv(65536)


def refused(port: int, ctx: ssl.SSLContext) -> str:
    """The TLS alert the sidecar refused this client with ('' if it was accepted)."""
    try:
        with connect(port, ctx) as s:
            s.sendall(b"ping")
            s.recv(65536)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return type(exc).__name__
    return ""


def status(sc: Sidecar) -> dict[str, object]:
    code, body = sc.get("/status")
    assert code == 200, body
    return dict(json.loads(body))


def serial_of(sc: Sidecar) -> str | None:
    cert = status(sc).get("certificate")
    return str(cert["serial"]) if isinstance(cert, dict) else None


def spiffe_sidecar(sock: Path, log: Path, in_port: int, app: TcpApp, **env: str) -> Sidecar:
    return Sidecar(
        {
            "MTLS_IDENTITY_SOURCE": "spiffe",
            # The SPIFFE spec's variable, as SPIRE sets it: MTLS_SPIFFE_ENDPOINT_SOCKET's default.
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{sock}",
            "MTLS_INBOUND": f"127.0.0.1:{in_port}=127.0.0.1:{app.port}",
            **env,
        },
        log,
    )


def federated_agent(short_dir: Path) -> tuple[Domain, Domain, Path, WorkloadApi]:
    """Domains A (ours: the SVID spiffe://A/web) and B (federated: its bundle sent with the
    SVID), and the started Workload API serving them on `short_dir/agent.sock`."""
    a, b = domain(A), domain(B)
    sock = short_dir / "agent.sock"
    api = WorkloadApi(sock, WorkloadState(f"spiffe://{A}/web", a.issuer, [a.root.cert]))
    api.set_federated({B: [b.root.cert]})
    api.start()
    return a, b, sock, api


def test_identity_from_the_workload_api(short_dir: Path, echo: TcpApp) -> None:
    """Not ready until the first SVID; SVIDs pushed by the agent are used at once without
    dropping open connections; a restarted agent is found again; every call carries the
    security header; a bad update is refused whole."""
    a = domain(A)
    sock = short_dir / "agent.sock"
    api = WorkloadApi(sock, WorkloadState(f"spiffe://{A}/web", a.issuer, [a.root.cert]))
    in_port = free_port()
    # Two workers: the master forks the second while its gRPC client runs.
    sc = spiffe_sidecar(sock, short_dir / "sidecar.log", in_port, echo, MTLS_WORKERS="2")
    try:
        # No agent yet: alive, not ready, and it says why.
        def not_ready() -> str | None:
            try:
                code, body = sc.get("/ready", timeout=1.0)
            except OSError:
                return None
            return body if code == 503 else None

        why = wait_for(not_ready, timeout=20)
        assert why and "no certificate" in why, why
        assert wait_for(
            lambda: any(e.get("event") == "workload_api_error" for e in sc.log_events())
        ), sc.logs()

        api.start()
        sc.wait_ready()
        assert serial_of(sc) == format(api.state.serial, "x")
        assert sc.metric("mtls_identity_source_info", source="spiffe") == 1
        assert sc.metric("mtls_workload_api_connected") == 1
        st = status(sc)
        assert st["identity_source"] == "spiffe"
        assert st["workload_api"] == {"socket": f"unix://{sock}", "connected": True, "updates": 1}
        cert0 = st["certificate"]
        assert isinstance(cert0, dict)
        assert api.state.not_after is not None
        assert cert0["not_after"] == api.state.not_after.isoformat()
        assert cert0["trust_domains"][A]["roots"] == 1
        assert cert0["trust_domains"][A]["age_seconds"] >= 0

        peer = client(short_dir, "client", a.issuer, f"spiffe://{A}/client", [a.root.cert])
        assert roundtrip(in_port, peer) == b"ping"
        held = connect(in_port, peer)
        held.sendall(b"one")
        assert held.recv(100) == b"one"

        # Rotation pushed by the agent: in use at once, the open connection goes on.
        cert = api.issue()
        assert wait_for(lambda: serial_of(sc) == format(cert.serial_number, "x")), sc.logs()
        assert (
            sc.metric("mtls_cert_expiry_timestamp_seconds", identity=f"spiffe://{A}/web")
            == cert.not_valid_after_utc.timestamp()
        )
        held.sendall(b"two")
        assert held.recv(100) == b"two"
        assert roundtrip(in_port, peer) == b"ping"

        # The agent restarts, with a new SVID when it is back: found again, applied.
        api.stop()
        assert wait_for(lambda: sc.metric("mtls_workload_api_connected") == 0), sc.logs()
        calls = api.calls
        cert = api.issue()
        api.start()
        assert wait_for(lambda: serial_of(sc) == format(cert.serial_number, "x"), 30), sc.logs()
        assert api.calls > calls
        assert sc.metric("mtls_workload_api_errors_total") >= 1
        held.sendall(b"three")
        assert held.recv(100) == b"three"
        held.close()

        # The agent pushes a new bundle for our own domain (a second root, as in a root
        # rotation): in use at once, peers of the new root accepted.
        a2 = domain(A)
        api.set_bundle([a.root.cert, a2.root.cert])
        assert wait_for(lambda: sc.metric("mtls_trust_domain_bundle_roots", trust_domain=A) == 2), (
            sc.logs()
        )
        peer2 = client(short_dir, "client2", a2.issuer, f"spiffe://{A}/client", [a.root.cert])
        assert roundtrip(in_port, peer2) == b"ping"

        # An update that cannot be used (an empty bundle): refused whole, the SVID in use
        # stays, counted.
        errors = sc.metric("mtls_cert_reloads_total", result="error")
        api.set_bundle([])
        assert wait_for(lambda: sc.metric("mtls_cert_reloads_total", result="error") > errors), (
            sc.logs()
        )
        assert serial_of(sc) == format(cert.serial_number, "x")
        assert sc.get("/ready")[0] == 200

        # Every call carried the Workload API's security header.
        assert api.calls >= 2 and api.refused == 0
    finally:
        sc.stop()
        api.stop()
    assert "Traceback" not in sc.logs(), sc.logs()


def test_federated_trust_domains(short_dir: Path, echo: TcpApp) -> None:
    """Two trust domains with separate roots: each peer verified only against the roots of
    its own trust domain; one domain's bundle rotating leaves the other alone."""
    a, b, sock, api = federated_agent(short_dir)
    in_port = free_port()
    sc = spiffe_sidecar(
        sock,
        short_dir / "sidecar.log",
        in_port,
        echo,
        MTLS_ALLOW_PEERS=f"spiffe://{A}/**,spiffe://{B}/partner,spiffe://c.example/**",
    )
    trust = [a.root.cert]
    try:
        sc.wait_ready()
        a_peer = client(short_dir, "a", a.issuer, f"spiffe://{A}/client", trust)
        b_peer = client(short_dir, "b", b.issuer, f"spiffe://{B}/partner", trust)
        # Right names, wrong roots: a B identity from A's CA, an A identity from B's CA.
        b_forged = client(short_dir, "bf", a.issuer, f"spiffe://{B}/partner", trust)
        a_forged = client(short_dir, "af", b.issuer, f"spiffe://{A}/client", trust)
        # A domain we have no bundle for, from our own CA.
        c_peer = client(short_dir, "c", a.issuer, "spiffe://c.example/x", trust)

        assert roundtrip(in_port, a_peer) == b"ping"
        assert roundtrip(in_port, b_peer) == b"ping"
        for ctx in (b_forged, a_forged, c_peer):
            assert "UNKNOWN_CA" in refused(in_port, ctx).upper()
        assert wait_for(
            lambda: sc.metric("mtls_connections_rejected_total", reason="unknown_ca") == 3
        ), sc.logs()
        lines = [
            e
            for e in sc.log_events()
            if e.get("event") == "rejected" and e.get("reason") == "unknown_ca"
        ]
        assert len(lines) == 3, lines
        assert any("trust bundle of b.example" in str(e.get("msg")) for e in lines), lines

        st = status(sc)
        cert = st["certificate"]
        assert isinstance(cert, dict)
        domains = cert["trust_domains"]
        assert set(domains) == {A, B}, domains
        a_updated = sc.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=A)
        b_updated = sc.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=B)
        assert a_updated > 0 and b_updated > 0

        # B rotates its root: B's new peers verify, B's old root no longer does, A untouched.
        b2 = domain(B)
        api.set_federated({B: [b2.root.cert]})
        assert wait_for(
            lambda: (
                sc.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=B)
                > b_updated
            )
        ), sc.logs()
        b2_peer = client(short_dir, "b2", b2.issuer, f"spiffe://{B}/partner", trust)
        assert wait_for(lambda: refused(in_port, b2_peer) == ""), sc.logs()
        assert "UNKNOWN_CA" in refused(in_port, b_peer).upper()
        assert roundtrip(in_port, a_peer) == b"ping"
        assert (
            sc.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=A)
            == a_updated
        )

        # A worker that dies is started again (forked while the gRPC client runs) and gets
        # the federated bundles with the SVID.
        workers = status(sc)["workers"]
        assert isinstance(workers, list)
        os.kill(int(workers[0]["pid"]), signal.SIGKILL)

        def restarted() -> bool:
            w = status(sc)["workers"]
            assert isinstance(w, list)
            return bool(w[0]["restarts"] == 1 and w[0]["ready"] and sc.get("/ready")[0] == 200)

        assert wait_for(restarted, 30), sc.logs()
        assert roundtrip(in_port, b2_peer) == b"ping"
        assert "UNKNOWN_CA" in refused(in_port, b_forged).upper()
    finally:
        sc.stop()
        api.stop()
    assert "Traceback" not in sc.logs(), sc.logs()


def jwks(certs: list[x509.Certificate], refresh: int | None = None) -> bytes:
    """A SPIFFE bundle (JWKS) holding `certs` as x509-svid keys."""
    keys = [
        {
            "use": "x509-svid",
            "kty": "EC",
            "crv": "P-256",
            "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode()],
        }
        for c in certs
    ]
    doc: dict[str, object] = {"keys": keys}
    if refresh is not None:
        doc["spiffe_refresh_hint"] = refresh
    return json.dumps(doc).encode()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def try_exchange(port: int) -> bytes:
    try:
        return exchange(port, b"hello")
    except OSError:
        return b""


def test_federated_peers_under_a_policy_file(short_dir: Path, echo: TcpApp) -> None:
    """A policy file's allowing default is our own trust domain's, as MTLS_ALLOW_PEERS's is:
    a federated domain's peer (verified against its own roots) is refused on a route without
    a rule, and let in once a rule names it."""
    a, b, sock, api = federated_agent(short_dir)
    in_port = free_port()
    policy = short_dir / "policy.yaml"
    policy.write_text("default: allow\n")
    sc = spiffe_sidecar(
        sock, short_dir / "sidecar.log", in_port, echo, MTLS_POLICY_FILE=str(policy)
    )
    trust = [a.root.cert]
    try:
        sc.wait_ready()
        a_peer = client(short_dir, "a", a.issuer, f"spiffe://{A}/client", trust)
        b_peer = client(short_dir, "b", b.issuer, f"spiffe://{B}/partner", trust)
        assert roundtrip(in_port, a_peer) == b"ping"
        assert refused(in_port, b_peer) != ""
        assert wait_for(
            lambda: sc.metric("mtls_connections_rejected_total", reason="peer_not_allowed") == 1
        ), sc.logs()
        lines = [e for e in sc.log_events() if e.get("reason") == "peer_not_allowed"]
        assert "policy rule default.trust_domain" in str(lines[0].get("msg")), lines

        write_atomic(
            policy,
            (
                f'default: allow\ninbound:\n  "{in_port}":\n'
                f"    allow: [spiffe://{A}/**, spiffe://{B}/partner]\n"
            ).encode(),
        )
        assert wait_for(lambda: sc.metric("mtls_policy_reloads_total", result="ok") >= 1, 15), (
            sc.logs()
        )
        # The workers take the new policy from the master within a second.
        assert wait_for(lambda: refused(in_port, b_peer) == "", 10), sc.logs()
        assert roundtrip(in_port, a_peer) == b"ping"
    finally:
        sc.stop()
        api.stop()
    assert "Traceback" not in sc.logs(), sc.logs()


def test_federated_bundle_file_outbound(short_dir: Path, echo: TcpApp) -> None:
    """A sidecar of domain B (files) dials one of domain A (Workload API) with A's bundle
    from a SPIFFE bundle file (JWKS, watched): A's chain verified against that file only,
    on the outbound side; a bad file keeps the last good bundle."""
    a, b, sock, api = federated_agent(short_dir)
    in_port, out_port = free_port(), free_port()
    sa = spiffe_sidecar(
        sock, short_dir / "a.log", in_port, echo, MTLS_ALLOW_PEERS=f"spiffe://{B}/partner"
    )
    b_id = write_identity(short_dir, "b", b.issuer, [b.root.cert], f"spiffe://{B}/partner")
    a_bundle = short_dir / "a.json"
    a_bundle.write_bytes(jwks([a.root.cert]))
    sb = Sidecar(
        {
            **identity_env(b_id),
            "MTLS_FEDERATED_BUNDLES": f"{A}={a_bundle}",
            "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{in_port}@spiffe://{A}/web",
        },
        short_dir / "b.log",
    )
    try:
        sa.wait_ready()
        sb.wait_ready()
        assert exchange(out_port, b"hello") == b"hello"
        assert sb.metric("mtls_trust_domain_bundle_roots", trust_domain=A) == 1

        # A's own bundle rotates (the agent adds a root): the pooled connection from B is
        # judged by B's roots, so it is retired, not cut, and its open stream goes on.
        held = socket.create_connection(("127.0.0.1", out_port), timeout=5)
        held.sendall(b"one")
        assert held.recv(100) == b"one"
        api.set_bundle([a.root.cert, domain(A).root.cert])
        assert wait_for(lambda: sa.metric("mtls_trust_domain_bundle_roots", trust_domain=A) == 2), (
            sa.logs()
        )
        held.sendall(b"two")
        assert held.recv(100) == b"two"
        held.close()
        assert sa.metric("mtls_pool_retired_total", reason="untrusted") == 0

        # A's bundle file now names another root: A's sidecar no longer verifies.
        other = domain(A)
        updated = sb.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=A)
        write_atomic(a_bundle, jwks([other.root.cert]))
        assert wait_for(
            lambda: (
                sb.metric("mtls_trust_domain_bundle_updated_timestamp_seconds", trust_domain=A)
                > updated
            )
        ), sb.logs()
        assert wait_for(lambda: try_exchange(out_port) == b""), sb.logs()
        assert wait_for(
            lambda: (
                sb.metric(
                    "mtls_connections_rejected_total", direction="outbound", reason="unknown_ca"
                )
                >= 1
            )
        ), sb.logs()

        # Garbage: refused and counted, the bundle in use stays (still the other root).
        errors = sb.metric("mtls_trust_bundle_updates_total", trust_domain=A, result="error")
        write_atomic(a_bundle, b'{"keys": "no"}')
        assert wait_for(
            lambda: (
                sb.metric("mtls_trust_bundle_updates_total", trust_domain=A, result="error")
                > errors
            )
        ), sb.logs()

        # Both roots (an overlap, as in a root rotation): A verifies again.
        write_atomic(a_bundle, jwks([other.root.cert, a.root.cert]))
        assert wait_for(lambda: try_exchange(out_port) == b"hello"), sb.logs()
        assert sb.metric("mtls_trust_domain_bundle_roots", trust_domain=A) == 2
        assert sb.metric("mtls_trust_domain_bundle_roots", trust_domain=B) == 1
    finally:
        sa.stop()
        sb.stop()
        api.stop()
    for sc in (sa, sb):
        assert "Traceback" not in sc.logs(), sc.logs()


class BundleEndpoint:
    """An https_web SPIFFE bundle endpoint: HTTPS with a Web PKI style certificate."""

    def __init__(self, d: Path, body: bytes) -> None:
        self.body = body
        self.fetches = 0
        web = make_root("test web root")
        cert, key = make_leaf(web, None, dns=("localhost",))
        (d / "web.crt").write_bytes(pem(cert))
        (d / "web.key").write_bytes(key_pem(key))
        self.ca_file = d / "web-root.pem"
        self.ca_file.write_bytes(pem(web.cert))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(d / "web.crt", d / "web.key")
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(endpoint.body)))
                self.end_headers()
                self.wfile.write(endpoint.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/bundle"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_federated_bundle_endpoint(short_dir: Path, echo: TcpApp) -> None:
    """A trust domain's bundle from its bundle endpoint (https_web), fetched again on its
    refresh hint: a root rotation there reaches the sidecar with no restart."""
    a, b = domain(A), domain(B)
    endpoint = BundleEndpoint(short_dir, jwks([b.root.cert], refresh=1))
    a_id = write_identity(short_dir, "a", a.issuer, [a.root.cert], f"spiffe://{A}/web")
    in_port = free_port()
    sc = Sidecar(
        {
            **identity_env(a_id),
            "MTLS_FEDERATED_BUNDLES": f"{B}={endpoint.url}",
            "MTLS_INBOUND": f"127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            "MTLS_ALLOW_PEERS": f"spiffe://{B}/partner",
            # https_web: the endpoint's certificate is checked against the Web PKI roots,
            # here the test's (OpenSSL reads SSL_CERT_FILE).
            "SSL_CERT_FILE": str(endpoint.ca_file),
        },
        short_dir / "a.log",
    )
    trust = [a.root.cert]
    try:
        sc.wait_ready()
        b_peer = client(short_dir, "b", b.issuer, f"spiffe://{B}/partner", trust)
        assert roundtrip(in_port, b_peer) == b"ping"
        b2 = domain(B)
        endpoint.body = jwks([b2.root.cert], refresh=1)
        b2_peer = client(short_dir, "b2", b2.issuer, f"spiffe://{B}/partner", trust)
        assert wait_for(lambda: refused(in_port, b2_peer) == "", 20), sc.logs()
        assert "UNKNOWN_CA" in refused(in_port, b_peer).upper()
        assert sc.metric("mtls_trust_bundle_updates_total", trust_domain=B, result="ok") == 2
    finally:
        sc.stop()
        endpoint.close()
    assert "Traceback" not in sc.logs(), sc.logs()


def test_workload_api_server_requires_the_security_header(short_dir: Path) -> None:
    """The test agent, like SPIRE's, refuses a call without `workload.spiffe.io: true`:
    `api.refused == 0` in the tests above means the sidecar sent it on every call."""
    a = domain(A)
    sock = short_dir / "agent.sock"
    api = WorkloadApi(sock, WorkloadState(f"spiffe://{A}/web", a.issuer, [a.root.cert]))
    api.start()
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest())))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            call = stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),)
            )
            first = next(iter(call))
            assert first.svids[0].spiffe_id == f"spiffe://{A}/web"
            call.cancel()
        assert api.refused == 1
    finally:
        api.stop()
