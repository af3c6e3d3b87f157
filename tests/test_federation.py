"""SPIFFE federation and the spiffe identity source, in process: bundle formats, which root
vouches for which trust domain, the settings, a Workload API response parsed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from spiffe._proto import workload_pb2

from proxy import __main__ as cli
from proxy.certsource.spiffe import parse_response
from proxy.config import load_settings
from proxy.config.parse import parse_federated_bundles, parse_spiffe_socket
from proxy.errors import CertError, ConfigError
from proxy.federation import (
    BundleError,
    roots_from_der,
    roots_from_file,
    roots_from_jwks,
    trust_domains,
)
from proxy.identity import parse_spiffe_id

from .pki import make_intermediate, make_leaf, make_root, pem
from .workload_api import der


def jwk(der_bytes: bytes, use: str = "x509-svid") -> dict[str, object]:
    return {"use": use, "kty": "EC", "x5c": [base64.b64encode(der_bytes).decode()]}


ROOT_A = make_root("A root")
ROOT_B = make_root("B root")
DER_A = ROOT_A.cert.public_bytes(Encoding.DER)
DER_B = ROOT_B.cert.public_bytes(Encoding.DER)


def test_spiffe_bundle_jwks() -> None:
    doc = {"keys": [jwk(DER_A), jwk(b"ignored", use="jwt-svid")], "spiffe_refresh_hint": 60}
    roots, hint = roots_from_jwks(json.dumps(doc).encode(), "b")
    assert [r.serial_number for r in roots] == [ROOT_A.cert.serial_number]
    assert hint == 60
    assert roots_from_file(json.dumps(doc).encode(), "b")[0] == ROOT_A.cert
    assert roots_from_file(pem(ROOT_A.cert), "b") == [ROOT_A.cert]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "not JSON"),
        (b'{"keys": 3}', '"keys" list'),
        (json.dumps({"keys": [jwk(b"x", use="jwt-svid")]}).encode(), 'no "x509-svid" key'),
        (
            json.dumps({"keys": [{"use": "x509-svid", "x5c": ["AA==", "AA=="]}]}).encode(),
            "exactly one x5c",
        ),
        (json.dumps({"keys": [jwk(b"not a cert")]}).encode(), "bad x5c certificate"),
    ],
)
def test_bad_spiffe_bundles(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        roots_from_file(data, "bundle of b.example")


def test_der_bundles() -> None:
    assert [c.serial_number for c in roots_from_der(DER_A + DER_B, "x")] == [
        ROOT_A.cert.serial_number,
        ROOT_B.cert.serial_number,
    ]
    for bad in (b"", b"\x30\x82\xff", DER_A[:-1], b"\x02\x01\x00"):
        with pytest.raises(BundleError):
            roots_from_der(bad, "x")


def test_each_root_vouches_only_for_its_own_trust_domain() -> None:
    strict = trust_domains("a.example", [ROOT_A.cert], {"b.example": [ROOT_B.cert]}, strict=True)
    a, b, c = (parse_spiffe_id(f"spiffe://{td}/x") for td in ("a.example", "b.example", "c.io"))
    assert strict.check(a, DER_A) is None
    assert strict.check(b, DER_B) is None
    assert "not in the trust bundle of b.example" in str(strict.check(b, DER_A))
    assert "not in the trust bundle of a.example" in str(strict.check(a, DER_B))
    assert "no trust bundle for trust domain c.io" in str(strict.check(c, DER_A))
    assert strict.check(None, DER_A) is None  # no SPIFFE ID: the identity checks refuse it
    # Without federation (one bundle for every domain, as before), the policy decides.
    legacy = trust_domains("a.example", [ROOT_A.cert], {}, strict=False)
    assert legacy.check(c, DER_A) is None
    assert legacy.check(c, DER_B) is not None
    # A federated bundle naming our own domain never widens our own bundle.
    own = trust_domains("a.example", [ROOT_A.cert], {"a.example": [ROOT_B.cert]}, strict=True)
    assert own.check(a, DER_B) is not None


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("unix:///run/spire/agent.sock", "/run/spire/agent.sock"),
        ("unix:/run/spire/agent.sock", "/run/spire/agent.sock"),
        (" /run/spire/agent.sock ", "/run/spire/agent.sock"),
    ],
)
def test_spiffe_socket_forms(text: str, path: str) -> None:
    assert parse_spiffe_socket(text) == Path(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp://127.0.0.1:8081", "only Unix socket"),
        ("unix://run/agent.sock", "absolute path"),
        ("agent.sock", "must be absolute"),
    ],
)
def test_bad_spiffe_sockets(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spiffe_socket(text)


def test_federated_bundles_setting() -> None:
    assert parse_federated_bundles("b.example=/etc/b.json, spiffe://c.io=https://c.io/bundle") == [
        ("b.example", "/etc/b.json"),
        ("c.io", "https://c.io/bundle"),
    ]
    for bad, message in [
        ("b.example", "TRUST_DOMAIN=PATH"),
        ("b.example=http://b/bundle", "https://"),
        ("b.example=/a,b.example=/b", "listed twice"),
        ("B_EXAMPLE=/a", "trust domain"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_federated_bundles(bad)


BASE = {"MTLS_IDENTITY_SOURCE": "spiffe", "MTLS_INBOUND": "127.0.0.1:18443=127.0.0.1:18080"}


def test_spiffe_settings() -> None:
    s = load_settings({**BASE, "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock"})
    assert s.spiffe_endpoint_socket == Path("/run/spire/agent.sock")
    s = load_settings(
        {
            **BASE,
            "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent.sock",
            "MTLS_SPIFFE_ENDPOINT_SOCKET": "/run/other.sock",
        }
    )
    assert s.spiffe_endpoint_socket == Path("/run/other.sock")


def test_spiffe_settings_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(
            {
                **BASE,
                "MTLS_CERT_FILE": "/etc/tls.crt",
                "MTLS_IDENTITY": "spiffe://a.example/web",
                "MTLS_FEDERATED_BUNDLES": f"a.example=/x.json,b.example={tmp_path}/none.json",
            }
        )
    problems: dict[str, str] = {}
    for p in err.value.problems:
        problems[p.var] = problems.get(p.var, "") + p.message + "\n"
    assert "SPIFFE_ENDPOINT_SOCKET" in problems["MTLS_SPIFFE_ENDPOINT_SOCKET"]
    assert "not used with MTLS_IDENTITY_SOURCE=spiffe" in problems["MTLS_CERT_FILE"]
    assert "own trust domain" in problems["MTLS_FEDERATED_BUNDLES"]
    assert "none.json does not exist" in problems["MTLS_FEDERATED_BUNDLES"]


def test_check_refuses_a_bad_bundle_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "b.json"
    bad.write_text('{"keys": []}')
    env = {
        **BASE,
        "MTLS_SPIFFE_ENDPOINT_SOCKET": "/run/spire/agent.sock",
        "MTLS_FEDERATED_BUNDLES": f"b.example={bad}",
    }
    assert cli.check(env) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"mtls-sidecar: MTLS_FEDERATED_BUNDLES: trust bundle file {bad} (b.example) holds "
        'no "x509-svid" key'
    ]
    bad.write_text(json.dumps({"keys": [jwk(DER_B)]}))
    assert cli.check(env) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["MTLS_FEDERATED_BUNDLES"] == f"b.example={bad}"


def test_workload_api_response() -> None:
    issuer = make_intermediate(ROOT_A)
    cert, key = make_leaf(issuer, "spiffe://a.example/web")
    from cryptography.hazmat.primitives import serialization

    key_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    def response(label: str, **federated: bytes) -> object:
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=label,
                    x509_svid=der([cert, issuer.cert]),
                    x509_svid_key=key_der,
                    bundle=DER_A,
                )
            ],
            federated_bundles={f"spiffe://{td}": d for td, d in federated.items()},
        )

    update = parse_response(response("spiffe://a.example/web", b=DER_B), "test", None)
    assert update.material.identity == "spiffe://a.example/web"
    assert update.federated == {"b": DER_B}
    with pytest.raises(CertError, match=r"labelled an SVID spiffe://a\.example/db"):
        parse_response(response("spiffe://a.example/db"), "test", None)
    with pytest.raises(CertError, match=r"no SVID for spiffe://a\.example/x"):
        parse_response(response("spiffe://a.example/web"), "test", "spiffe://a.example/x")
    with pytest.raises(CertError, match="federated bundle of b"):
        parse_response(response("spiffe://a.example/web", b=b"junk"), "test", None)
    with pytest.raises(CertError, match="no X509-SVID"):
        parse_response(workload_pb2.X509SVIDResponse(), "test", None)
