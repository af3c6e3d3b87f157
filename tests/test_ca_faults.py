"""The CA under storage faults, as real processes: a write lock held by another process, a
full disk and a read-only store. Reads (`/v1/bundle`, `/v1/crl`) are never held up by the
store; what needs the store answers 503 with Retry-After; the CLI says what is wrong in one
line; everything works again once the fault is gone."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from proxy.ca.issuer import make_csr, new_key
from proxy.ca.store import CaDir
from tests.test_ca_service import TD, CaServer, _init_ca, _token

WEB = f"spiffe://{TD}/ns/shop/sa/web"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: dict[str, str]
    seconds: float


_BUNDLES: dict[Path, str] = {}  # read once: the store's filesystem may be full or read-only


async def _request(
    server: CaServer, method: str, path: str, body: dict[str, str] | None = None
) -> Reply:
    ctx = ssl.create_default_context(cadata=_BUNDLES[server.ca_dir])
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.request(
            method,
            server.url + path,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp,
    ):
        raw = await resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw.decode()}
        return Reply(resp.status, dict(resp.headers), parsed, time.monotonic() - t0)


def _enrol_body(server: CaServer, identity: str = WEB) -> dict[str, str]:
    return {"token": _token(server, identity), "csr": make_csr(new_key(), identity).decode()}


def _ca(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.ca", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def _start(ca_dir: Path, log: Path) -> CaServer:
    server = CaServer(ca_dir, log, leaf_ttl="1h")
    _BUNDLES[ca_dir] = CaDir.open(ca_dir).bundle_pem().decode()
    server.start()
    return server


def _serial(reply: Reply) -> str:
    """The serial of the certificate an enrolment answered."""
    leaf = x509.load_pem_x509_certificates(reply.body["chain"].encode())[0]
    return f"{leaf.serial_number:x}"


def _unavailable(reply: Reply, cause: str) -> None:
    assert reply.status == 503, reply
    assert int(reply.headers["Retry-After"]) >= 1, reply.headers
    assert cause in reply.body["error"], reply.body


# --- a write lock held by another process -----------------------------------------------------


def test_a_held_write_lock_blocks_no_reader_and_enrolment_gets_503(tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(tmp_path)
    server = _start(ca_dir, tmp_path / "ca.log")
    try:
        body = _enrol_body(server)
        with contextlib.closing(
            sqlite3.connect(ca_dir / "ca.db", timeout=0, isolation_level=None)
        ) as holder:
            holder.execute("BEGIN EXCLUSIVE")

            async def scenario() -> tuple[Reply, list[Reply]]:
                enrol = asyncio.create_task(_request(server, "POST", "/v1/enroll", body))
                reads: list[Reply] = []
                while not enrol.done():  # reads all the while the enrolment waits for the lock
                    for path in ("/v1/bundle", "/v1/crl"):
                        reads.append(await _request(server, "GET", path))
                return await enrol, reads

            enrolled, reads = asyncio.run(scenario())
            _unavailable(enrolled, "write lock")
            assert enrolled.seconds < 20, enrolled
            assert len(reads) >= 4 and all(r.status == 200 for r in reads), reads
            slowest = max(r.seconds for r in reads)
            assert slowest < 1.5, [round(r.seconds, 2) for r in reads]
            # The CLI waits as long, then says so in one line.
            revoked = _ca("revoke", "--dir", str(ca_dir), "--id", WEB)
            _assert_one_line_failure(revoked, "write lock")
            holder.execute("ROLLBACK")
        # The lock gone, the same token works: nothing was consumed by the refusal.
        assert asyncio.run(_request(server, "POST", "/v1/enroll", body)).status == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log()


# --- a full disk and a read-only store (a small tmpfs of the test's own) ----------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    """Fill the filesystem of `where` to the last byte."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    assert os.statvfs(where).f_bavail == 0
    return filler


def test_a_full_disk_is_a_503_then_recovers(disk: Path, tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(disk)
    server = _start(ca_dir, tmp_path / "ca.log")
    try:
        first = asyncio.run(_request(server, "POST", "/v1/enroll", _enrol_body(server)))
        assert first.status == 200, first
        filler = _fill(disk)

        async def until_refused() -> Reply:
            for _ in range(40):  # SQLite may still have room in pages it holds
                reply = await _request(server, "POST", "/v1/enroll", _enrol_body(server))
                if reply.status != 200:
                    return reply
            raise AssertionError("enrolment never failed on a full disk")

        refused = asyncio.run(until_refused())
        _unavailable(refused, "disk is full")
        for path in ("/v1/bundle", "/v1/crl"):
            assert asyncio.run(_request(server, "GET", path)).status == 200
        # Either the store or crl.pem has no room: one line either way. (Fill again: the
        # service may have freed a page since, removing a CRL it could not finish.)
        _fill(disk)
        revoked = _ca("revoke", "--dir", str(ca_dir), "--serial", _serial(first))
        _assert_one_line_failure(revoked, "disk is full")
        filler.unlink()
        again = asyncio.run(_request(server, "POST", "/v1/enroll", _enrol_body(server)))
        assert again.status == 200, again
        revoked = _ca("revoke", "--dir", str(ca_dir), "--serial", _serial(again))
        assert revoked.returncode == 0, revoked.stderr
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log and " 500" not in log, log[-3000:]


def test_a_read_only_store_serves_reads_and_503s_then_recovers(disk: Path, tmp_path: Path) -> None:
    ca_dir, _ = _init_ca(disk)
    crl_on_disk = (ca_dir / "crl.pem").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(OSError) as raised:
        (disk / "probe").write_bytes(b"")
    assert raised.value.errno == errno.EROFS
    server = _start(ca_dir, tmp_path / "ca.log")
    try:
        bundle = asyncio.run(_request(server, "GET", "/v1/bundle"))
        assert bundle.status == 200
        crl = asyncio.run(_request(server, "GET", "/v1/crl"))
        assert crl.status == 200 and crl.body["raw"].encode() == crl_on_disk
        refused = asyncio.run(_request(server, "POST", "/v1/enroll", _enrol_body(server)))
        _unavailable(refused, "read-only")
        _assert_one_line_failure(_ca("revoke", "--dir", str(ca_dir), "--id", WEB), "read-only")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        again = asyncio.run(_request(server, "POST", "/v1/enroll", _enrol_body(server)))
        assert again.status == 200, again
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "read-only" in log
