"""`mtls-sidecar ca` commands: files, modes, exit codes and messages; no service."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.ca.cli import main
from proxy.ca.issuer import fingerprint
from proxy.ca.store import CaDir
from proxy.ca.tokens import verify_token
from proxy.material import load_material_files

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "ca"
    code, _, err = run(capsys, "init", "--dir", str(d), "--trust-domain", TD)
    assert code == 0, err
    return d


def test_init_layout_modes_and_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "new" / "ca"
    code, out, _ = run(capsys, "init", "--dir", str(d), "--trust-domain", TD)
    assert code == 0
    assert _mode(d) == 0o700
    for name in ("root-1.key", "intermediate-1.key", "token_secret"):
        assert _mode(d / name) == 0o600, name
    root = x509.load_pem_x509_certificate((d / "root-1.crt").read_bytes())
    assert fingerprint(root) in out
    state = json.loads((d / "ca.json").read_text())
    assert state["trust_domain"] == TD and state["bundle"] == [1] and state["issuer"] == 1


def test_init_refuses_to_overwrite_unless_forced(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ca_dir / "root-1.crt").read_bytes()
    code, _, err = run(capsys, "init", "--dir", str(ca_dir), "--trust-domain", TD)
    assert code == 1 and "refusing to overwrite" in err and "--force" in err
    assert (ca_dir / "root-1.crt").read_bytes() == before
    code, _, _ = run(capsys, "init", "--dir", str(ca_dir), "--trust-domain", TD, "--force")
    assert code == 0 and (ca_dir / "root-1.crt").read_bytes() != before


def test_issue_writes_a_verifiable_chain(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "out" / "web"
    code, _, err = run(
        capsys,
        "issue",
        "--dir",
        str(ca_dir),
        "--id",
        WEB,
        "--dns",
        "web.local",
        "--dns",
        "web",
        "--ttl",
        "2h",
        "--out",
        str(prefix),
    )
    assert code == 0, err
    crt, key, bundle = (Path(f"{prefix}{s}") for s in (".crt", ".key", ".bundle.pem"))
    assert _mode(key) == 0o600
    chain = x509.load_pem_x509_certificates(crt.read_bytes())
    assert len(chain) == 2
    leaf, inter = chain
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 7200 <= life.total_seconds() <= 7200 + 61
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.local", "web"]
    # the sidecar's files source accepts them as they are
    mat = load_material_files(crt, key, bundle)
    assert mat.identity == WEB
    # and OpenSSL agrees: leaf -> intermediate -> root in the bundle
    (tmp_path / "inter.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", "inter.pem", str(crt)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip().endswith(": OK"), res.stdout + res.stderr


def test_token_prints_a_valid_token(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "token", "--dir", str(ca_dir), "--id", WEB, "--ttl", "15m")
    assert code == 0
    claims = verify_token(CaDir.open(ca_dir).token_secret(), out.strip())
    assert claims.identity == WEB


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["token", "--id", "https://x/y"], "not a SPIFFE ID"),
        (["token", "--id", "spiffe://bank.example/x"], "not in this CA's trust domain"),
        (["token", "--id", WEB, "--ttl", "soon"], "not a duration"),
        (["token", "--id", WEB, "--ttl", "90d"], "--ttl must be"),
        (["issue", "--id", WEB, "--out", "x", "--ttl", "1s"], "--ttl must be"),
        (["serve", "--listen", "8443"], "host:port"),
        (["rotate-root", "--stage", "later"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["token"], "required"),
    ],
)
def test_bad_input_exits_2(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    if argv[0] != "frobnicate":
        argv = [argv[0], "--dir", str(ca_dir), *argv[1:]]
    code, out, err = run(capsys, *argv)
    assert code == 2 and words in err and not out
    assert err.startswith("error: ")


def test_unsafe_permissions_are_refused(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ca_dir / "intermediate-1.key"
    os.chmod(key, 0o640)
    for cmd in (["token", "--id", WEB], ["serve", "--listen", "127.0.0.1:1"], ["info"]):
        code, _, err = run(capsys, cmd[0], "--dir", str(ca_dir), *cmd[1:])
        assert code == 1, cmd
        assert f"chmod 600 {key}" in err and "mode 0640" in err
    os.chmod(key, 0o600)
    os.chmod(ca_dir, 0o777)
    code, _, err = run(capsys, "token", "--dir", str(ca_dir), "--id", WEB)
    assert code == 1 and f"chmod 700 {ca_dir}" in err
    os.chmod(ca_dir, 0o700)
    code, _, err = run(capsys, "token", "--dir", str(ca_dir.parent / "nope"), "--id", WEB)
    assert code == 1 and "does not exist" in err


def test_root_key_can_live_offline(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Day-to-day commands never need the root key; only rotation steps that sign with it."""
    (ca_dir / "root-1.key").unlink()
    assert run(capsys, "token", "--dir", str(ca_dir), "--id", WEB)[0] == 0
    out = str(ca_dir / "w")
    assert run(capsys, "issue", "--dir", str(ca_dir), "--id", WEB, "--out", out)[0] == 0
    assert run(capsys, "info", "--dir", str(ca_dir))[0] == 0


def test_rotate_root_stages(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(ca_dir)
    fp1 = fingerprint(x509.load_pem_x509_certificate((ca_dir / "root-1.crt").read_bytes()))
    # out of order
    code, _, err = run(capsys, "rotate-root", "--dir", d, "--stage", "switch")
    assert code == 1 and "switch follows add" in err
    code, out, _ = run(capsys, "rotate-root", "--dir", d, "--stage", "add")
    assert code == 0 and "G2" in out
    ca = CaDir.open(ca_dir)
    assert ca.state.bundle == (1, 2) and ca.state.issuer == 1
    assert fingerprint(ca.roots()[0]) == fp1
    assert _mode(ca_dir / "root-2.key") == 0o600
    assert run(capsys, "rotate-root", "--dir", d, "--stage", "add")[0] == 1
    # too early without --wait: sidecars may not have the new root yet
    code, _, err = run(capsys, "rotate-root", "--dir", d, "--stage", "switch")
    assert code == 1 and "may not have the new root" in err
    code, _, _ = run(capsys, "rotate-root", "--dir", d, "--stage", "switch", "--wait", "0s")
    assert code == 0 and CaDir.open(ca_dir).state.issuer == 2
    code, _, err = run(capsys, "rotate-root", "--dir", d, "--stage", "remove")
    assert code == 1 and "may still be valid" in err
    code, out, _ = run(capsys, "rotate-root", "--dir", d, "--stage", "remove", "--wait", "0s")
    assert code == 0
    ca = CaDir.open(ca_dir)
    assert ca.state.bundle == (2,) and ca.state.stage == "stable"
    fp2 = fingerprint(ca.root(2))
    assert f"MTLS_CA_FINGERPRINT={fp2}" in out
    assert not (ca_dir / "intermediate-1.key").exists() and not (ca_dir / "root-1.key").exists()
    code, out, _ = run(capsys, "info", "--dir", d)
    assert fp2 in out and fp1 not in out


def test_module_entry_point(ca_dir: Path) -> None:
    """`python -m proxy.ca` is the same command line, with real exit codes."""
    res = subprocess.run(
        [sys.executable, "-m", "proxy.ca", "token", "--dir", str(ca_dir), "--id", "bad"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "not a SPIFFE ID" in res.stderr and "Traceback" not in res.stderr


def test_rotate_intermediate_keeps_old_leaves_valid(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(ca_dir)
    prefix = str(tmp_path / "old")
    assert run(capsys, "issue", "--dir", d, "--id", WEB, "--out", prefix)[0] == 0
    old_inter = (ca_dir / "intermediate-1.crt").read_bytes()
    code, out, _ = run(capsys, "rotate-intermediate", "--dir", d)
    assert code == 0 and "new issuing intermediate" in out
    assert (ca_dir / "intermediate-1.crt").read_bytes() != old_inter
    assert (ca_dir / "intermediate-1.prev.crt").read_bytes() == old_inter
    assert _mode(ca_dir / "intermediate-1.key") == 0o600
    ca = CaDir.open(ca_dir)
    assert len(ca.trusted_intermediates()) == 2
    # a leaf of the old intermediate still verifies under the (unchanged) root
    crt = f"{prefix}.crt"
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", f"{prefix}.bundle.pem", "-untrusted", crt, crt],
        capture_output=True,
        text=True,
    )
    assert res.stdout.strip().endswith(": OK"), res.stdout + res.stderr
    # without the root key it cannot be done, and says why
    (ca_dir / "root-1.key").unlink()
    code, _, err = run(capsys, "rotate-intermediate", "--dir", d)
    assert code == 1 and "moved offline" in err
