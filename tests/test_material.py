"""Our own identity material: the X509-SVID rules, validity and key match, judged alike by
`load_material`, `mtls-sidecar check` and `mtls-sidecar run` (before anything listens)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import __main__ as cli
from proxy.certsource.files import FileSource
from proxy.errors import CertError
from proxy.material import leaf_spiffe_id, load_material
from proxy.tls import build_tls_state

from .conftest import TD, Pki
from .harness import ROOT, base_env, identity_env
from .pki import key_pem, make_leaf, pem, write_identity

NOW = dt.datetime.now(dt.UTC)

# (leaf keyword arguments, fragment of the message after the certificate's name)
BAD_LEAVES: list[tuple[str, dict[str, object], str]] = [
    (
        "upper-case trust domain",
        {"spiffe_id": "spiffe://Corp.Example/svc"},
        "has an invalid SPIFFE ID: 'spiffe://Corp.Example/svc': the trust domain "
        "'Corp.Example' contains 'C' (upper-case letters are not allowed)",
    ),
    (
        "trailing slash",
        {"spiffe_id": "spiffe://td.example/ns/api/sa/api/"},
        "has an invalid SPIFFE ID: 'spiffe://td.example/ns/api/sa/api/' ends with '/'",
    ),
    (
        "two SPIFFE IDs",
        {"spiffe_id": f"{TD}/a", "extra_uris": (f"{TD}/b",)},
        f"has 2 SPIFFE IDs ('{TD}/a', '{TD}/b'); an X509-SVID has exactly one URI SAN",
    ),
    (
        "an extra non-SPIFFE URI",
        {"spiffe_id": f"{TD}/a", "extra_uris": ("https://a.example/",)},
        f"has URI SANs besides its SPIFFE ID ('{TD}/a', 'https://a.example/')",
    ),
    (
        "no URI SAN",
        {"spiffe_id": None},
        "has no URI SAN, so no SPIFFE ID; an X509-SVID has exactly one URI SAN",
    ),
    (
        "a CA certificate",
        {"spiffe_id": f"{TD}/a", "ca": True},
        "is a CA certificate (basicConstraints CA:TRUE); an X509-SVID leaf is not",
    ),
]


def _leaf(pki: Pki, spiffe_id: str | None, **kw: object) -> tuple[bytes, bytes, bytes]:
    cert, key = make_leaf(pki.inter, spiffe_id, **kw)  # type: ignore[arg-type]
    return pem(cert) + pem(pki.inter.cert), key_pem(key), pem(pki.root.cert)


@pytest.mark.parametrize(("why", "kw", "fragment"), BAD_LEAVES, ids=[c[0] for c in BAD_LEAVES])
def test_svid_rules_name_the_certificate(
    pki: Pki, why: str, kw: dict[str, object], fragment: str
) -> None:
    chain, key, bundle = _leaf(pki, **kw)  # type: ignore[arg-type]
    with pytest.raises(CertError) as info:
        load_material(chain, key, bundle, "files")
    message = str(info.value)
    assert message.startswith("files certificate (subject 'CN="), message
    assert ", serial " in message and fragment in message
    assert "has no SPIFFE ID" not in message


def test_not_yet_valid_is_refused_with_the_time(pki: Pki) -> None:
    start = (NOW + dt.timedelta(hours=2)).replace(microsecond=0)
    chain, key, bundle = _leaf(pki, f"{TD}/later", not_before=start)
    with pytest.raises(CertError) as info:
        load_material(chain, key, bundle, "files")
    assert f"files certificate for {TD}/later (serial " in str(info.value)
    assert f"is not valid yet: notBefore is {start.isoformat()}, now is " in str(info.value)


def test_expired_and_key_mismatch(pki: Pki) -> None:
    chain, key, bundle = _leaf(
        pki, f"{TD}/old", not_before=NOW - dt.timedelta(days=2), not_after=NOW
    )
    with pytest.raises(CertError, match=f"files certificate for {TD}/old expired at "):
        load_material(chain, key, bundle, "files")
    other_key = _leaf(pki, f"{TD}/x")[1]
    with pytest.raises(CertError, match="files key does not match the certificate"):
        load_material(_leaf(pki, f"{TD}/x")[0], other_key, bundle, "files")


def test_good_leaf_and_service_helper(pki: Pki) -> None:
    chain, key, bundle = _leaf(pki, "SPIFFE://test.example/ns/a/sa/b")
    material = load_material(chain, key, bundle, "files")
    assert material.identity == "spiffe://test.example/ns/a/sa/b"  # canonical text
    assert leaf_spiffe_id(material.leaf) == material.identity
    bad, _ = make_leaf(pki.inter, f"{TD}/a", ca=True)
    assert leaf_spiffe_id(bad) is None


def _bad_identity(pki: Pki, tmp_path: Path, kw: dict[str, object]) -> dict[str, str]:
    spiffe_id = kw.pop("spiffe_id") if "spiffe_id" in kw else None
    ident = write_identity(tmp_path, "bad", pki.inter, [pki.root.cert], spiffe_id, **kw)  # type: ignore[arg-type]
    return {**identity_env(ident), "MTLS_INBOUND": "127.0.0.1:0=127.0.0.1:1"}


@pytest.mark.parametrize(("why", "kw", "fragment"), BAD_LEAVES, ids=[c[0] for c in BAD_LEAVES])
def test_check_exits_2_with_the_message(
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    why: str,
    kw: dict[str, object],
    fragment: str,
) -> None:
    env = _bad_identity(pki, tmp_path, dict(kw))
    for key in list(os.environ):
        if key.startswith("MTLS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtls-sidecar: invalid identity files: files certificate (subject ")
    assert fragment in err and err.count("\n") == 1
    # The reader run starts from says the same.
    files = FileSource(
        Path(env["MTLS_CERT_FILE"]),
        Path(env["MTLS_KEY_FILE"]),
        Path(env["MTLS_TRUST_BUNDLE_FILE"]),
        validate=build_tls_state,
        on_update=lambda material: None,
    )
    with pytest.raises(CertError) as info:
        files.load()
    assert str(info.value) in err


@pytest.mark.parametrize("command", ["check", "run"])
def test_real_process_refuses_upper_case_trust_domain(
    pki: Pki, tmp_path: Path, command: str
) -> None:
    """Issue case: `check` said 0 and `run` hung 30 s; now both exit 2 at once, saying why."""
    env = {**base_env(), **_bad_identity(pki, tmp_path, {"spiffe_id": "spiffe://Corp.Example/svc"})}
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", command],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'Corp.Example' contains 'C' (upper-case letters are not allowed)" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stderr
