"""`ca serve` processes on one CA directory: single-use tokens across restarts and processes,
revocation reaching /v1/crl and refusing renewal, and the limits a client without
credentials meets (nesting, slow headers, the open-file limit)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from proxy.ca.issuer import cert_pem, issue_leaf, key_pem, make_csr, new_key
from proxy.ca.store import CaDir
from proxy.revocation import load_crls
from tests.test_ca_service import TD, CaServer, _call, _cli, _init_ca, _token

WEB = "spiffe://corp.example/ns/shop/sa/web"
DB = "spiffe://corp.example/ns/shop/sa/db"


def _issued_rows(ca_dir: Path) -> list[str]:
    store = CaDir.open(ca_dir).store()
    try:
        return [r.spiffe_id for r in store.issued()]
    finally:
        store.close()


def _enrol_body(token: str, identity: str) -> dict[str, str]:
    return {"token": token, "csr": make_csr(new_key(), identity).decode()}


def test_a_used_token_is_refused_after_a_restart(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    # a directory from before the store: `ca serve` creates it on first start
    for p in ca_dir.glob("ca.db*"):
        p.unlink()
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="1h")
    server.start()
    try:
        assert "created the CA store" in server.log()
        token = _token(server, WEB)
        assert (
            asyncio.run(_call(server, "POST", "/v1/enroll", _enrol_body(token, WEB))).status == 200
        )
        server.stop()
        server.start()
        again = asyncio.run(_call(server, "POST", "/v1/enroll", _enrol_body(token, WEB)))
        assert again.status == 401 and "already used" in again.body["error"], again
    finally:
        server.stop()
    assert _issued_rows(ca_dir) == [WEB]
    assert "Traceback" not in server.log()


def test_two_services_on_one_directory_issue_one_certificate_per_token(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    servers = [CaServer(ca_dir, tmp_path / f"ca{i}.log", leaf_ttl="1h") for i in range(2)]
    for s in servers:
        s.start()
    try:
        token = _token(servers[0], WEB)

        async def race() -> list[int]:
            calls = [
                _call(servers[i % 2], "POST", "/v1/enroll", _enrol_body(token, WEB))
                for i in range(12)
            ]
            return [a.status for a in await asyncio.gather(*calls)]

        statuses = asyncio.run(race())
    finally:
        for s in servers:
            s.stop()
    assert statuses.count(200) == 1 and statuses.count(401) == 11, statuses
    assert sum(s.issued() for s in servers) == 1
    assert _issued_rows(ca_dir) == [WEB]


def test_revocation_reaches_the_crl_and_refuses_renewal_and_enrolment(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="1h")
    server.start()
    d = str(ca_dir)

    async def enrol(identity: str) -> tuple[bytes, bytes]:
        key = new_key()
        body = {"token": _token(server, identity), "csr": make_csr(key, identity).decode()}
        answer = await _call(server, "POST", "/v1/enroll", body)
        assert answer.status == 200, answer
        return answer.body["chain"].encode(), key_pem(key)

    async def renew(client: tuple[bytes, bytes], identity: str) -> tuple[int, str]:
        body = {"csr": make_csr(new_key(), identity).decode()}
        answer = await _call(server, "POST", "/v1/renew", body, client=client)
        return answer.status, answer.body.get("error", "")

    async def crl() -> bytes:
        answer = await _call(server, "GET", "/v1/crl")
        assert answer.status == 200
        return str(answer.body["raw"]).encode()

    async def scenario() -> float:
        web, db = await enrol(WEB), await enrol(DB)
        web_cert = x509.load_pem_x509_certificates(web[0])[0]
        roots = CaDir.open(ca_dir).roots()
        assert not load_crls(await crl(), roots).is_revoked(web_cert)
        # revoke WEB's certificate by serial from the CLI while the service runs
        t0 = time.monotonic()
        await asyncio.to_thread(
            _cli, "revoke", "--dir", d, "--serial", f"{web_cert.serial_number:x}"
        )
        rl = load_crls(await crl(), roots)
        elapsed = time.monotonic() - t0
        assert rl.is_revoked(web_cert) and len(rl) == 1
        status, error = await renew(web, WEB)
        assert status == 403 and "is revoked" in error
        # DB still renews; then revoking the identity stops renewal and enrolment
        assert (await renew(db, DB))[0] == 200
        await asyncio.to_thread(_cli, "revoke", "--dir", d, "--id", DB, "--reason", "superseded")
        status, error = await renew(db, DB)
        assert status == 403 and f"identity {DB} is revoked (superseded" in error
        body = _enrol_body(_token(server, DB), DB)
        refused = await _call(server, "POST", "/v1/enroll", body)
        assert refused.status == 403 and "ca unrevoke" in refused.body["error"]
        # every unexpired DB certificate (the first and the renewed one) is on the CRL
        assert len(load_crls(await crl(), roots)) == 3
        await asyncio.to_thread(_cli, "unrevoke", "--dir", d, "--id", DB)
        assert (await _call(server, "POST", "/v1/enroll", body)).status == 200
        return elapsed

    try:
        elapsed = asyncio.run(scenario())
    finally:
        server.stop()
    assert elapsed < 5.0
    # the service's own periodic refresh keeps crl.pem the same as /v1/crl
    assert b"BEGIN X509 CRL" in (ca_dir / "crl.pem").read_bytes()
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaServer]:
    tmp = tmp_path_factory.mktemp("guarded")
    ca_dir, _ = _init_ca(tmp)
    server = CaServer(
        ca_dir,
        tmp / "ca.log",
        leaf_ttl="1h",
        extra=("--header-timeout", "1s", "--body-timeout", "1s", "--max-connections", "8"),
    )
    server.start()
    yield server
    server.stop()


def test_deeply_nested_json_is_a_400(guarded: CaServer) -> None:
    async def scenario() -> None:
        for body in (b"[" * 32000 + b"]" * 32000, b'{"token": ' + b"{" * 30000):
            answer = await _call(guarded, "POST", "/v1/enroll", body)
            assert answer.status == 400 and "flat JSON object" in answer.body["error"]

    asyncio.run(scenario())
    assert "Traceback" not in guarded.log() and "RecursionError" not in guarded.log()


def _tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _closed_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t0: float
) -> float:
    """Send one header byte every 0.2 s until the server closes; return how long it was open
    after the TLS handshake (done at `t0`)."""
    writer.write(b"POST /v1/enroll HTTP/1.1\r\n")
    while True:
        try:
            writer.write(b"X")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(1024), 0.2)
            if not data:
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            return time.monotonic() - t0
        if time.monotonic() - t0 > 15:
            raise AssertionError("slow connection still open after 15 s")


def test_slow_clients_are_closed_after_the_header_timeout(guarded: CaServer) -> None:
    async def scenario() -> tuple[list[float], float]:
        conns = []
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", guarded.port, ssl=_tls_client())
            conns.append((r, w, time.monotonic()))
        times = await asyncio.gather(*(_closed_after(r, w, t) for r, w, t in conns))
        for _, w, _ in conns:
            w.close()
        # a connection that never starts TLS is closed after the same timeout
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        return list(times), time.monotonic() - t0

    times, raw = asyncio.run(scenario())
    assert all(0.8 <= t < 6 for t in times), times
    assert 0.8 <= raw < 6, raw
    assert "no complete request within 1s" in guarded.log()
    # the service still answers
    assert asyncio.run(_call(guarded, "GET", "/v1/bundle")).status == 200


def test_connections_over_the_limit_are_closed(guarded: CaServer) -> None:
    async def scenario() -> None:
        held = [
            await asyncio.open_connection("127.0.0.1", guarded.port, ssl=_tls_client())
            for _ in range(8)
        ]
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port, ssl=_tls_client())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for _, w in held:
            w.close()
            await w.wait_closed()

    asyncio.run(scenario())
    assert "connection limit 8 reached" in guarded.log()

    async def answered() -> int:
        deadline = time.monotonic() + 10
        while True:  # the held connections are released as their close reaches the server
            try:
                return (await _call(guarded, "GET", "/v1/bundle")).status
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    assert asyncio.run(answered()) == 200


def test_at_the_open_file_limit_the_log_stays_small_and_enrolment_recovers(
    tmp_path: Path,
) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    server = CaServer(
        ca_dir,
        tmp_path / "ca.log",
        leaf_ttl="1h",
        extra=("--header-timeout", "30s"),
        prefix=("prlimit", "--nofile=48:48", "--"),
    )
    server.start()
    socks: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        # many more connections than descriptors: the kernel queues them, accept() fails
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            socks.append(s)
        deadline = time.monotonic() + 10
        while "cannot accept connections" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        # stay at the limit for a while (observable: the log line repeats, at most 1/s)
        while server.log().count("cannot accept connections") < 3:
            assert time.monotonic() < deadline + 10, server.log()[-2000:]
            time.sleep(0.1)
        at_limit = time.monotonic() - t0
        for s in socks:
            s.close()
        socks.clear()
        token = _token(server, WEB)

        async def enrol_eventually() -> int:
            end = time.monotonic() + 30
            while True:
                try:
                    answer = await _call(server, "POST", "/v1/enroll", _enrol_body(token, WEB))
                    return answer.status
                except Exception:
                    if time.monotonic() > end:
                        raise
                    await asyncio.sleep(0.2)

        assert asyncio.run(enrol_eventually()) == 200
    finally:
        for s in socks:
            s.close()
        server.stop()
    log = server.log()
    lines = log.count("cannot accept connections")
    assert lines <= at_limit + 3, (lines, at_limit)
    assert "Traceback" not in log and len(log) < 20_000, len(log)


def test_bad_serve_arguments_print_one_line_and_exit_2(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    for argv, words in [
        (["--log-level", "bogus"], "is not a log level"),
        (["--dns", "bücher.example"], "xn--bcher-kva.example"),
    ]:
        res = subprocess.run(
            [sys.executable, "-m", "proxy.ca", "serve", "--dir", str(ca_dir), *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 2 and words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_renewal_of_a_certificate_from_before_the_store_still_works(tmp_path: Path) -> None:
    """Leaves issued before the migration are not in the log: they renew (unless their
    identity is revoked), and the new certificate is recorded."""
    ca_dir, _ = _init_ca(tmp_path)
    ca = CaDir.open(ca_dir)
    issuer = ca.issuer()
    key = new_key()
    old = issue_leaf(issuer, key.public_key(), spiffe_id=WEB, ttl=dt.timedelta(minutes=5))
    server = CaServer(ca_dir, tmp_path / "ca.log", leaf_ttl="1h")
    server.start()
    try:
        body = {"csr": make_csr(new_key(), WEB).decode()}
        client = (cert_pem(old, issuer.cert), key_pem(key))
        answer = asyncio.run(_call(server, "POST", "/v1/renew", body, client=client))
        assert answer.status == 200, answer
    finally:
        server.stop()
    store = ca.store()
    (row,) = store.issued()
    store.close()
    assert row.requester == f"renewal of serial={old.serial_number:x}"
    assert json.dumps(row.to_json())  # serialisable for `ca list --json`
    assert TD in row.spiffe_id
