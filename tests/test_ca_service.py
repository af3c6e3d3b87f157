"""`ca serve` as a real process on loopback: enrolment, renewal, refusals, outage, rotation."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.ca.issuer import (
    cert_pem,
    fingerprint,
    issue_leaf,
    key_pem,
    make_csr,
    make_intermediate,
    make_root,
    new_key,
)
from proxy.ca.memcert import load_cert_chain_from_memory
from proxy.ca.store import CaDir
from proxy.ca.tokens import make_token, new_secret
from proxy.certsource.ca import CaRefused, CaSource, CaUnavailable
from proxy.errors import CertError
from proxy.material import Material, load_material
from proxy.metrics import CERT_RENEWALS
from tests.harness import free_port

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"
DB = "spiffe://corp.example/ns/shop/sa/db"


def _free_port() -> int:
    return free_port()


def _cli(*argv: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "proxy.ca", *argv], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def _renewals(result: str) -> float:
    value = CERT_RENEWALS.labels(result=result)._value.get()
    return float(value)


class CaServer:
    """`python -m proxy.ca serve` in a subprocess, its log in a file."""

    def __init__(
        self,
        ca_dir: Path,
        log: Path,
        leaf_ttl: str,
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.ca_dir = ca_dir
        self.log_path = log
        self.leaf_ttl = leaf_ttl
        self.extra = extra  # more `ca serve` flags
        self.prefix = prefix  # a command wrapping the process (e.g. prlimit)
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "proxy.ca",
                    "serve",
                    "--dir",
                    str(self.ca_dir),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--leaf-ttl",
                    self.leaf_ttl,
                    *self.extra,
                ],
                stdout=log,
                stderr=log,
            )
        self._starts += 1
        deadline = time.monotonic() + 15
        while self.log().count("listening on") < self._starts:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def issued(self) -> int:
        return self.log().count(" issued serial=")


def _init_ca(tmp: Path) -> tuple[Path, str]:
    ca_dir = tmp / "ca"
    _cli("init", "--dir", str(ca_dir), "--trust-domain", TD)
    return ca_dir, fingerprint(CaDir.open(ca_dir).root(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaServer, str]]:
    tmp = tmp_path_factory.mktemp("served")
    ca_dir, fp = _init_ca(tmp)
    server = CaServer(ca_dir, tmp / "ca.log", leaf_ttl="4s")
    server.start()
    yield server, fp
    server.stop()


def _token(server: CaServer, identity: str, ttl: str = "10m") -> str:
    return _cli("token", "--dir", str(server.ca_dir), "--id", identity, "--ttl", ttl).strip()


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> Callable[[], Awaitable[None]]:
    async def waiter() -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    return waiter


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


async def _call(
    server: CaServer,
    method: str,
    path: str,
    body: bytes | dict[str, str] | None = None,
    *,
    client: tuple[bytes, bytes] | None = None,
) -> Answer:
    ctx = ssl.create_default_context(cadata=CaDir.open(server.ca_dir).bundle_pem().decode())
    if client:
        load_cert_chain_from_memory(ctx, *client)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.request(
            method,
            server.url + path,
            data=data,
            headers={"content-type": "application/json"},
        ) as resp,
    ):
        raw = await resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw.decode()}
        return Answer(resp.status, parsed if isinstance(parsed, dict) else {"raw": parsed})


def _csr_with(key: Any, sans: list[x509.GeneralName]) -> str:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


# -- enrolment and renewal ----------------------------------------------------------------


def test_enrol_then_renew_several_times(served: tuple[CaServer, str]) -> None:
    server, fp = served
    updates: list[Material] = []
    ok_before = _renewals("ok")

    async def scenario() -> None:
        source = CaSource(server.url, _token(server, WEB), fp, WEB, on_update=updates.append)
        first = await source.enroll()
        assert first.identity == WEB and len(first.roots) == 1
        task = asyncio.create_task(source.run(), name="ca-source")
        try:
            await _wait_for(lambda: len(updates) >= 4, 20, "three renewals")()
        finally:
            task.cancel()

    asyncio.run(scenario())
    serials = {m.serial_hex for m in updates}
    keys = {m.key_pem for m in updates}
    assert len(serials) == len(updates) and len(keys) == len(updates)  # new key every time
    assert all(m.identity == WEB for m in updates)
    # each renewal happened before the previous certificate expired
    for old, new in itertools.pairwise(updates):
        assert new.not_before <= old.not_after
    assert _renewals("ok") - ok_before >= 3
    assert server.log().count(f"identity={WEB}") >= 4 and "via=renew" in server.log()
    assert "requester=127.0.0.1" in server.log()


def test_wrong_fingerprint_is_refused(served: tuple[CaServer, str]) -> None:
    server, _ = served
    before = server.issued()
    source = CaSource(server.url, _token(server, WEB), "ab" * 32, WEB, on_update=lambda m: None)
    with pytest.raises(CaRefused, match="offers no root with fingerprint"):
        asyncio.run(source.enroll())
    assert server.issued() == before


def test_bad_enrolments_are_refused(served: tuple[CaServer, str]) -> None:
    server, _ = served
    secret = CaDir.open(server.ca_dir).token_secret()
    key = new_key()
    csr_web = make_csr(key, WEB).decode()
    token_db = _token(server, DB)
    cases: list[tuple[str, bytes | dict[str, str], int, str]] = [
        (
            "forged token",
            {"token": make_token(new_secret(), WEB, 600), "csr": csr_web},
            401,
            "signature is invalid",
        ),
        (
            "expired token",
            {"token": make_token(secret, WEB, 60, now=time.time() - 120), "csr": csr_web},
            401,
            "expired",
        ),
        ("token for another identity", {"token": token_db, "csr": csr_web}, 403, "only be for"),
        (
            "token outside the trust domain",
            {"token": make_token(secret, "spiffe://bank.example/x", 600), "csr": csr_web},
            403,
            "outside corp.example",
        ),
        (
            "extra SANs",
            {
                "token": token_db,
                "csr": _csr_with(
                    key, [x509.UniformResourceIdentifier(DB), x509.DNSName("evil.example")]
                ),
            },
            400,
            "exactly one SAN",
        ),
        (
            "weak key",
            {
                "token": token_db,
                "csr": _csr_with(
                    rsa.generate_private_key(public_exponent=65537, key_size=1024),
                    [x509.UniformResourceIdentifier(DB)],
                ),
            },
            400,
            "too weak",
        ),
        ("garbage csr", {"token": token_db, "csr": "hello"}, 400, "not a PEM"),
        ("malformed JSON", b"{not json", 400, "not JSON"),
        ("JSON array", b"[1, 2]", 400, "JSON object"),
        ("missing csr", {"token": token_db}, 400, "'csr'"),
        ("oversized body", b'{"token": "' + b"A" * 70_000 + b'"}', 413, "exceeds"),
    ]

    async def scenario() -> None:
        for name, body, status, words in cases:
            before = server.issued()
            answer = await _call(server, "POST", "/v1/enroll", body)
            assert answer.status == status, (name, answer)
            assert words in answer.body.get("error", ""), (name, answer)
            assert server.issued() == before, name
        # the refused attempts did not use up the DB token; now it works, once
        good = {"token": token_db, "csr": make_csr(key, DB).decode()}
        assert (await _call(server, "POST", "/v1/enroll", good)).status == 200
        before = server.issued()
        again = await _call(server, "POST", "/v1/enroll", good)
        assert again.status == 401 and "already used" in again.body["error"]
        assert server.issued() == before
        # wrong method and unknown path answer JSON too; the service keeps serving
        assert (await _call(server, "GET", "/v1/enroll")).status == 405
        assert (await _call(server, "GET", "/nope")).status == 404
        bundle = await _call(server, "GET", "/v1/bundle")
        assert bundle.status == 200 and "BEGIN CERTIFICATE" in bundle.body["raw"]

    asyncio.run(scenario())
    log = server.log()
    assert "refused POST /v1/enroll from 127.0.0.1: status=401 token signature is invalid" in log
    assert "status=413" in log and "Traceback" not in log


def test_bad_renewals_are_refused(served: tuple[CaServer, str]) -> None:
    server, _ = served
    ca = CaDir.open(server.ca_dir)
    issuer = ca.issuer()

    def leaf_for(identity: str, *, now: dt.datetime | None = None) -> tuple[bytes, bytes]:
        key = new_key()
        cert = issue_leaf(
            issuer, key.public_key(), spiffe_id=identity, ttl=dt.timedelta(seconds=30), now=now
        )
        return cert_pem(cert, issuer.cert), key_pem(key)

    current = leaf_for(WEB)
    expired = leaf_for(WEB, now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    other_root = make_root(TD, 7)
    other_inter = make_intermediate(TD, 7, other_root)
    fkey = new_key()
    foreign = (
        cert_pem(issue_leaf(other_inter, fkey.public_key(), spiffe_id=WEB), other_inter.cert),
        key_pem(fkey),
    )
    csr_web = {"csr": make_csr(new_key(), WEB).decode()}

    async def scenario() -> None:
        before = server.issued()
        cases: list[tuple[str, tuple[bytes, bytes] | None, dict[str, str], int, str]] = [
            ("no client cert", None, csr_web, 401, "needs the current certificate"),
            ("expired cert", expired, csr_web, 401, "expired at"),
            ("other identity", current, {"csr": make_csr(new_key(), DB).decode()}, 403, "only"),
            (
                "extra SAN",
                current,
                {
                    "csr": _csr_with(
                        new_key(),
                        [x509.UniformResourceIdentifier(WEB), x509.DNSName("x.example")],
                    )
                },
                400,
                "exactly one SAN",
            ),
        ]
        for name, client, body, status, words in cases:
            answer = await _call(server, "POST", "/v1/renew", body, client=client)
            assert answer.status == status, (name, answer)
            assert words in answer.body["error"], (name, answer)
        # a certificate of another CA does not get past the TLS handshake
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await _call(server, "POST", "/v1/renew", csr_web, client=foreign)
        assert server.issued() == before
        # the same request with the valid current certificate succeeds
        ok = await _call(server, "POST", "/v1/renew", csr_web, client=current)
        assert ok.status == 200 and server.issued() == before + 1
        chain = x509.load_pem_x509_certificates(ok.body["chain"].encode())
        assert chain[1] == issuer.cert
        # after rotate-intermediate, leaves of the previous intermediate still renew, and
        # get certificates of the new one
        _cli("rotate-intermediate", "--dir", str(server.ca_dir))
        new_inter = CaDir.open(server.ca_dir).intermediate(1)
        assert new_inter != issuer.cert
        again = await _call(server, "POST", "/v1/renew", csr_web, client=current)
        assert again.status == 200, again
        assert x509.load_pem_x509_certificates(again.body["chain"].encode())[1] == new_inter

    asyncio.run(scenario())


# -- outage ------------------------------------------------------------------------------


def test_ca_outage_then_recovery(tmp_path: Path) -> None:
    ca_dir, fp = _init_ca(tmp_path)
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="8s")
    server.start()
    updates: list[Material] = []
    errors_before = _renewals("error")

    async def scenario() -> None:
        source = CaSource(
            server.url, _token(server, WEB), fp, WEB, on_update=updates.append, backoff_cap=2.0
        )
        task = asyncio.create_task(source.run(), name="ca-source")
        try:
            await _wait_for(lambda: len(updates) == 1, 10, "enrolment")()
            server.stop()
            await _wait_for(lambda: _renewals("error") > errors_before, 10, "a failed renewal")()
            # the sidecar keeps its (still valid) certificate while the CA is away
            assert len(updates) == 1 and updates[0].not_after > dt.datetime.now(dt.UTC)
            await asyncio.to_thread(server.start)
            await _wait_for(lambda: len(updates) >= 2, 10, "renewal after the CA came back")()
        finally:
            task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert updates[1].not_before <= updates[0].not_after
    assert updates[1].serial_hex != updates[0].serial_hex


def test_retries_stop_at_expiry_and_a_used_token_is_retried_until_a_new_one(
    served: tuple[CaServer, str], tmp_path: Path
) -> None:
    """Renewal keeps failing: retries stay within the certificate's life; once it has
    expired the sidecar tries its token again. A used token is refused, counted and retried
    (the renewal task never dies): a new token written to the token file enrols."""
    server, fp = served
    attempts: list[float] = []
    updates: list[Material] = []
    errors_before = _renewals("error")
    token_file = tmp_path / "token"
    token_file.write_text(_token(server, WEB))

    async def scenario() -> Material:
        source = CaSource(
            server.url,
            token_file.read_text(),
            fp,
            WEB,
            on_update=updates.append,
            token_file=token_file,
            backoff_cap=1.0,
        )
        material = await source.enroll()

        async def failing_renew() -> Material:
            attempts.append(time.time())
            raise CaUnavailable("renewal: CA unreachable (simulated)")

        source.renew = failing_renew  # type: ignore[method-assign]
        task = asyncio.create_task(source.run(), name="ca-source")
        try:
            expiry = material.not_after.timestamp()
            await _wait_for(
                lambda: time.time() > expiry and _renewals("error") - errors_before >= 4,
                30,
                "refused re-enrolments after expiry",
            )()
            assert not task.done(), "the renewal task ended"
            seen = len(updates)
            token_file.write_text(_token(server, WEB))
            await _wait_for(lambda: len(updates) > seen, 10, "enrolment with the new token")()
        finally:
            task.cancel()
        return material

    material = asyncio.run(scenario())
    expiry = material.not_after.timestamp()
    assert len(attempts) >= 2
    assert all(t < expiry for t in attempts)
    assert updates[-1].serial_hex != material.serial_hex


# -- root rotation ------------------------------------------------------------------------


def _server_ctx(m: Material) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=m.bundle_pem.decode())
    load_cert_chain_from_memory(ctx, m.chain_pem, m.key_pem)
    return ctx


def _client_ctx(m: Material) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # peers are identified by SPIFFE ID, checked below
    ctx.load_verify_locations(cadata=m.bundle_pem.decode())
    load_cert_chain_from_memory(ctx, m.chain_pem, m.key_pem)
    return ctx


async def _mtls_exchange(server_m: Material, client_m: Material) -> None:
    """One real mTLS connection on loopback between two sidecars' current materials."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(4))
        writer.write(b"pong")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=_server_ctx(server_m))
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(client_m))
        writer.write(b"ping")
        assert await reader.read(4) == b"pong"
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()
    assert seen == [b"ping"]


def test_root_rotation_under_traffic(tmp_path: Path) -> None:
    ca_dir, fp1 = _init_ca(tmp_path)
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="4s")
    server.start()
    latest: dict[str, Material] = {}
    results = {"ok": 0, "failed": 0}
    per_stage: dict[str, int] = {}
    old_root_leaf: list[Material] = []
    failures: list[str] = []

    def issuer_gen(m: Material) -> str:
        return m.leaf.issuer.rfc4514_string()

    async def traffic(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for a, b in ((WEB, DB), (DB, WEB)):
                try:
                    await _mtls_exchange(latest[a], latest[b])
                    results["ok"] += 1
                except Exception as exc:
                    results["failed"] += 1
                    failures.append(f"{a}->{b}: {exc!r}")
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        sources = {
            ident: CaSource(
                server.url,
                _token(server, ident),
                fp1,
                ident,
                on_update=lambda m, i=ident: latest.__setitem__(i, m),  # type: ignore[misc]
                bundle_refresh=0.3,
            )
            for ident in (WEB, DB)
        }
        for s in sources.values():
            await s.enroll()
        tasks = [asyncio.create_task(s.run(), name=f"ca-source {i}") for i, s in sources.items()]
        stop = asyncio.Event()
        pump = asyncio.create_task(traffic(stop), name="traffic")

        def everyone(cond: Callable[[Material], bool]) -> Callable[[], bool]:
            return lambda: all(cond(m) for m in latest.values())

        async def settle(stage: str) -> None:
            # let traffic flow for a while in this state and count it
            before = results["ok"]
            await asyncio.sleep(1.0)
            per_stage[stage] = results["ok"] - before

        try:
            await settle("before")
            await asyncio.to_thread(_cli, "rotate-root", "--dir", str(ca_dir), "--stage", "add")
            await _wait_for(everyone(lambda m: len(m.roots) == 2), 5, "two-root bundle")()
            assert all("G1" in issuer_gen(m) for m in latest.values())
            await settle("added")
            await asyncio.to_thread(
                _cli, "rotate-root", "--dir", str(ca_dir), "--stage", "switch", "--wait", "0s"
            )
            # one sidecar may hold a G2 leaf while the other still has its G1 leaf
            await _wait_for(
                lambda: any("G2" in issuer_gen(m) for m in latest.values()), 10, "a G2 leaf"
            )()
            await _wait_for(everyone(lambda m: "G2" in issuer_gen(m)), 10, "G2 leaves")()
            await settle("switched")
            # a long-lived leaf of the old root: accepted now, must be refused after remove
            old = CaDir.open(ca_dir).issuer_for(1)
            key = new_key()
            leaf = issue_leaf(old, key.public_key(), spiffe_id=WEB, ttl=dt.timedelta(minutes=5))
            old_root_leaf.append(
                load_material(
                    cert_pem(leaf, old.cert), key_pem(key), latest[WEB].bundle_pem, "test"
                )
            )
            await _mtls_exchange(old_root_leaf[0], latest[DB])
            await asyncio.to_thread(
                _cli, "rotate-root", "--dir", str(ca_dir), "--stage", "remove", "--wait", "0s"
            )
            await _wait_for(everyone(lambda m: len(m.roots) == 1), 5, "one-root bundle")()
            serials = {i: m.serial_hex for i, m in latest.items()}
            # renewals keep working against the CA's new G2 service certificate
            await _wait_for(
                lambda: all(latest[i].serial_hex != s for i, s in serials.items()),
                10,
                "renewal after remove",
            )()
            await settle("removed")
        finally:
            stop.set()
            await pump
            for t in tasks:
                t.cancel()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert results["failed"] == 0, failures[:5]
    assert all(n >= 4 for n in per_stage.values()), per_stage
    assert len(per_stage) == 4
    # a valid leaf of the removed root is no longer accepted by the sidecars
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        asyncio.run(_mtls_exchange(old_root_leaf[0], latest[DB]))
    fp2 = fingerprint(CaDir.open(ca_dir).root(2))
    for m in latest.values():
        assert [fingerprint(r) for r in m.roots] == [fp2]

    # after removal, a new sidecar must be given the new root's fingerprint
    server.start()
    try:
        stale = CaSource(server.url, _token(server, WEB), fp1, WEB, on_update=lambda m: None)
        with pytest.raises(CertError, match="offers no root"):
            asyncio.run(stale.enroll())
        fresh = CaSource(server.url, _token(server, WEB), fp2, WEB, on_update=lambda m: None)
        assert "G2" in asyncio.run(fresh.enroll()).leaf.issuer.rfc4514_string()
    finally:
        server.stop()
