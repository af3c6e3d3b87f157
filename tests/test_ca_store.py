"""The CA store (ca.db) and the commands on it: issuance log, single-use nonces, revocation,
CRLs that the real openssl accepts, `ca list/revoke/unrevoke`; no service."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from proxy.ca.cli import main
from proxy.ca.db import (
    DB_FILE,
    REASONS,
    CaStore,
    NonceUsed,
    StoreError,
    parse_serial,
    validate_reason,
)
from proxy.ca.issuer import issue_leaf, new_key
from proxy.ca.service import EnrolmentService, is_flat_json_object
from proxy.ca.store import CaDir, CaDirError
from proxy.logs import RateLimit
from proxy.revocation import load_crls

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"
DB = "spiffe://corp.example/ns/shop/sa/db"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "ca"
    assert run(capsys, "init", "--dir", str(d), "--trust-domain", TD)[0] == 0
    return d


def _issue(ca: CaDir, store: CaStore, identity: str, nonce: tuple[str, float] | None = None) -> str:
    issuer = ca.issuer()
    cert = store.issue(
        lambda: issue_leaf(issuer, new_key().public_key(), spiffe_id=identity),
        requester="test",
        issuer_gen=ca.state.issuer,
        issuer=issuer.cert,
        nonce=nonce,
    )
    return f"{cert.serial_number:x}"


def test_store_is_private_wal_and_created_for_an_old_directory(ca_dir: Path) -> None:
    db = ca_dir / DB_FILE
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    # a directory from before the store: no ca.db until a command needs it
    for p in ca_dir.glob(f"{DB_FILE}*"):
        p.unlink()
    ca = CaDir.open(ca_dir)
    store = ca.store()
    assert store.created and store.issued() == []
    _issue(ca, store, WEB)
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    for p in ca_dir.glob(f"{DB_FILE}*"):  # ca.db, ca.db-wal, ca.db-shm
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    store.close()
    again = CaStore.for_dir(ca_dir)
    assert not again.created and [r.spiffe_id for r in again.issued()] == [WEB]
    again.close()
    # a readable store is refused like a readable key
    db.chmod(0o644)
    with pytest.raises(CaDirError, match=f"chmod 600 {db}"):
        CaDir.open(ca_dir)


def test_a_nonce_is_claimed_once_across_connections_and_restarts(ca_dir: Path) -> None:
    ca = CaDir.open(ca_dir)
    stores = [CaStore.for_dir(ca_dir) for _ in range(8)]
    nonce = ("n-1", time.time() + 600)
    results: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(store: CaStore) -> None:
        barrier.wait()
        try:
            results.append(_issue(ca, store, WEB, nonce))
        except NonceUsed:
            results.append("used")

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("used") == len(stores) - 1, results
    for s in stores:
        s.close()
    # a fresh connection (a restarted CA) still knows the nonce
    store = CaStore.for_dir(ca_dir)
    with pytest.raises(NonceUsed):
        _issue(ca, store, WEB, nonce)
    assert len(store.issued()) == 1 and store.used_nonces() == 1
    # a claimed nonce is forgotten once its token has expired
    _issue(ca, store, WEB, ("n-2", time.time() + 0.5))
    time.sleep(0.6)  # let the token expire: the expiry is the observable state here
    _issue(ca, store, WEB, ("n-3", time.time() + 600))
    assert store.used_nonces() == 2  # n-1 and n-3; n-2 was pruned
    store.close()


def test_revoke_by_serial_and_identity(ca_dir: Path) -> None:
    ca = CaDir.open(ca_dir)
    store = ca.store()
    web1, web2, db1 = _issue(ca, store, WEB), _issue(ca, store, WEB), _issue(ca, store, DB)
    rev0 = store.revision()
    row = store.revoke_serial(db1, "keyCompromise")
    assert row.revoked and row.reason == "keyCompromise" and store.revision() == rev0 + 1
    with pytest.raises(StoreError, match="already revoked"):
        store.revoke_serial(db1, "superseded")
    with pytest.raises(StoreError, match="no certificate with serial"):
        store.revoke_serial("abc", "superseded")
    revoked = store.revoke_identity(WEB, "cessationOfOperation")
    assert {r.serial for r in revoked} == {web1, web2}
    assert store.identity_revocation(WEB) is not None
    with pytest.raises(StoreError, match="is revoked"):
        _issue(ca, store, WEB)  # refused inside the transaction: nothing recorded
    assert len(store.issued()) == 3
    with pytest.raises(StoreError, match="already revoked"):
        store.revoke_identity(WEB, "superseded")
    store.unrevoke_identity(WEB)
    with pytest.raises(StoreError, match="not revoked"):
        store.unrevoke_identity(WEB)
    assert store.is_serial_revoked(web1)  # certificates stay revoked
    _issue(ca, store, WEB)
    store.close()


def test_crl_is_accepted_by_openssl_and_our_loader(ca_dir: Path, tmp_path: Path) -> None:
    ca = CaDir.open(ca_dir)
    store = ca.store()
    serial = _issue(ca, store, WEB)
    _issue(ca, store, DB)
    store.revoke_serial(serial, "keyCompromise")
    pem = ca.write_crl(store)
    store.close()
    crl_file = ca_dir / "crl.pem"
    assert crl_file.read_bytes() == pem
    res = subprocess.run(
        [
            "openssl",
            "crl",
            "-verify",
            "-CAfile",
            str(ca_dir / "intermediate-1.crt"),
            "-in",
            str(crl_file),
            "-noout",
            "-text",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "verify OK" in res.stdout + res.stderr, res.stderr
    assert f"Serial Number: {serial.upper().zfill(len(serial) + len(serial) % 2)}" in res.stdout
    assert "Key Compromise" in res.stdout and "X509v3 CRL Number" in res.stdout
    assert "X509v3 Authority Key Identifier" in res.stdout and "Next Update" in res.stdout
    # another CA's intermediate does not verify it
    other = tmp_path / "other"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-out", str(other) + ".key"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-key", str(other) + ".key", "-subj",
         "/O=corp.example/CN=corp.example issuing CA G1", "-out", str(other) + ".crt"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    bad = subprocess.run(
        ["openssl", "crl", "-verify", "-CAfile", f"{other}.crt", "-in", str(crl_file), "-noout"],
        capture_output=True,
        text=True,
    )
    assert "verify OK" not in bad.stdout + bad.stderr
    # the sidecar's loader: checked against the root only, with the intermediate included
    rl = load_crls(pem, CaDir.open(ca_dir).roots())
    assert rl.is_revoked(int(serial, 16), ca.intermediate(1).subject) and len(rl) == 1


def test_cli_list_revoke_unrevoke(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(ca_dir)
    assert run(capsys, "issue", "--dir", d, "--id", WEB, "--out", str(tmp_path / "w"))[0] == 0
    assert run(capsys, "issue", "--dir", d, "--id", DB, "--out", str(tmp_path / "d"))[0] == 0
    web_cert = x509.load_pem_x509_certificates((tmp_path / "w.crt").read_bytes())[0]
    serial = f"{web_cert.serial_number:x}"
    code, out, _ = run(capsys, "list", "--dir", d)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SERIAL", "IDENTITY", "NOT", "AFTER", "REQUESTER", "REVOKED"]
    assert any(serial in line and WEB in line and "offline ca issue" in line for line in lines)
    # revoke by serial, with colons and upper case as openssl prints it
    typed = ":".join(serial.upper().zfill(32)[i : i + 2] for i in range(0, 32, 2))
    code, out, _ = run(capsys, "revoke", "--dir", d, "--serial", typed, "--reason", "keycompromise")
    assert code == 0 and f"revoked serial={serial}" in out and "keyCompromise" in out
    code, out, _ = run(capsys, "list", "--dir", d, "--json")
    rows = {r["serial"]: r for r in json.loads(out)}
    assert rows[serial]["reason"] == "keyCompromise" and rows[serial]["revoked_at"]
    assert rows[serial]["requester"] == "offline ca issue"
    assert load_crls((ca_dir / "crl.pem").read_bytes(), CaDir.open(ca_dir).roots()).is_revoked(
        web_cert
    )
    # revoke an identity: every unexpired certificate, and offline issuance refused
    code, out, _ = run(capsys, "revoke", "--dir", d, "--id", DB, "--reason", "superseded")
    assert code == 0 and "1 unexpired certificate(s)" in out
    code, _, err = run(capsys, "issue", "--dir", d, "--id", DB, "--out", str(tmp_path / "d2"))
    assert code == 1 and "is revoked" in err and "unrevoke" in err
    code, out, _ = run(capsys, "list", "--dir", d)
    assert f"identity revoked (no enrolment or renewal): {DB}" in out
    assert run(capsys, "unrevoke", "--dir", d, "--id", DB)[0] == 0
    assert run(capsys, "issue", "--dir", d, "--id", DB, "--out", str(tmp_path / "d2"))[0] == 0
    code, _, err = run(capsys, "unrevoke", "--dir", d, "--id", DB)
    assert code == 1 and "is not revoked" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["revoke", "--serial", "12", "--reason", "bored"], "unknown revocation reason 'bored'"),
        (["revoke", "--serial", "12", "--reason", "certificateHold"], "unknown revocation"),
        (["revoke", "--serial", "xyz"], "not a hexadecimal serial"),
        (["revoke"], "one of the arguments --serial --id is required"),
        (["revoke", "--serial", "12", "--id", WEB], "not allowed with argument"),
        (["revoke", "--id", "web"], "not a SPIFFE ID"),
        (["revoke", "--id", "spiffe://bank.example/x"], "not in this CA's trust domain"),
        (["unrevoke"], "required"),
        (["serve", "--log-level", "bogus"], "'bogus' is not a log level"),
        (["serve", "--dns", "bücher.example"], "write it as xn--bcher-kva.example"),
        (["serve", "--dns=-bad-.example"], "not a DNS name"),
        (["issue", "--id", WEB, "--out", "x", "--dns", "a b"], "not a DNS name"),
        (["serve", "--max-connections", "0"], "must be at least 1"),
        (["serve", "--header-timeout", "0s"], "--header-timeout must be positive"),
        (["serve", "--k8s-jwks", "/nonexistent"], "--k8s-jwks needs --k8s-issuer"),
        (["serve", "--k8s-issuer", "kubernetes"], "not an issuer URL"),
        (
            ["serve", "--k8s-issuer", "https://k8s.example", "--k8s-jwks", "/nonexistent"],
            "--k8s-jwks /nonexistent",
        ),
    ],
)
def test_bad_input_exits_2(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    code, out, err = run(capsys, argv[0], "--dir", str(ca_dir), *argv[1:])
    assert code == 2 and words in err and not out, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_bad_jwks_file_exits_2(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for content, words in [("{not json", "is not JSON"), ('{"keys": []}', "no usable signing key")]:
        f = tmp_path / "jwks.json"
        f.write_text(content)
        argv = ["serve", "--dir", str(ca_dir), "--k8s-issuer", "https://k.example", "--k8s-jwks"]
        code, _, err = run(capsys, *argv, str(f))
        assert code == 2 and words in err


def test_reason_and_serial_parsing() -> None:
    assert validate_reason("KEYCOMPROMISE") == "keyCompromise"
    assert all(validate_reason(r) == r for r in REASONS)
    for bad in ("", "removeFromCRL", "certificateHold", "compromised"):
        with pytest.raises(ValueError):
            validate_reason(bad)
    assert parse_serial("0x00Ab:cd") == "abcd" and parse_serial(" FF ") == "ff"
    for bad in ("", "0", "-1", "zz", "0x"):
        with pytest.raises(ValueError):
            parse_serial(bad)


@pytest.mark.parametrize(
    ("body", "flat"),
    [
        (b'{"token": "a", "csr": "b"}', True),
        (b'{"token": "{[{[", "csr": "]}"}', True),  # brackets inside strings do not count
        (b'{"token": "a\\"{[", "csr": "b"}', True),  # nor after an escaped quote
        (b"{}", True),
        (b'{"a": {"b": "c"}}', False),
        (b'{"a": ["b"]}', False),
        (b"[" * 32000 + b"]" * 32000, False),
        (b'{"a": ' + b"[" * 32000, False),
    ],
)
def test_flat_json_check(body: bytes, flat: bool) -> None:
    assert is_flat_json_object(body) is flat


def test_rate_limited_log() -> None:
    limiter = RateLimit(interval=1.0)
    # (time, what ready() answers): a line, then held back, then a line reporting how many
    table = [(0.0, 0), (0.1, None), (0.5, None), (0.99, None), (1.0, 3), (1.5, None), (5.0, 1)]
    for now, expected in table:
        assert limiter.allow(now) == expected, now


def test_the_replaced_intermediate_still_signs_the_crl_of_its_leaves(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CaDir.open(ca_dir)
    store = ca.store()
    old_serial = _issue(ca, store, WEB)
    old_inter = ca.intermediate(1)
    assert run(capsys, "rotate-intermediate", "--dir", str(ca_dir))[0] == 0
    ca = CaDir.open(ca_dir)
    assert stat.S_IMODE((ca_dir / "intermediate-1.prev.key").stat().st_mode) == 0o600
    new_serial = _issue(ca, store, WEB)
    store.revoke_identity(WEB, "keyCompromise")
    pem = ca.write_crl(store)
    store.close()
    rl = load_crls(pem, ca.roots())
    assert len(rl.crls) == 2  # one per intermediate, each signed by its own key
    assert rl.is_revoked(int(old_serial, 16), old_inter.subject)
    assert rl.is_revoked(int(new_serial, 16), ca.intermediate(1).subject)
    # openssl reads the first CRL of the file: the current intermediate's
    res = subprocess.run(
        ["openssl", "crl", "-verify", "-CAfile", str(ca_dir / "intermediate-1.crt"), "-noout",
         "-in", str(ca_dir / "crl.pem")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert "verify OK" in res.stdout + res.stderr, res.stderr


def test_the_service_keeps_its_last_crl_when_making_one_fails(
    ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = EnrolmentService(ca_dir)
    first = service.refresh_crl()
    assert b"BEGIN X509 CRL" in first
    (ca_dir / "crl.pem").unlink()
    (ca_dir / "crl.pem").mkdir()  # crl.pem cannot be replaced now
    store = CaDir.open(ca_dir).store()
    _issue(CaDir.open(ca_dir), store, WEB)
    store.revoke_identity(WEB, "keyCompromise")
    store.close()
    assert service.refresh_crl() == first  # the last good one
    assert "making the CRL failed" in caplog.text
    (ca_dir / "crl.pem").rmdir()
    fresh = service.refresh_crl()
    assert fresh != first and len(load_crls(fresh, CaDir.open(ca_dir).roots())) == 1
    service.store.close()
