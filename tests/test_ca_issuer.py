"""The CA's pure parts: certificate profiles, chain verification, CSR rules, join tokens."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from proxy.ca.cli import parse_listen
from proxy.ca.issuer import (
    CsrRejected,
    Issuer,
    cert_pem,
    check_csr,
    fingerprint,
    issue_leaf,
    key_pem,
    make_csr,
    make_intermediate,
    make_root,
    new_key,
    validate_spiffe_id,
)
from proxy.ca.tokens import TokenRejected, make_token, new_secret, verify_token
from proxy.config import parse_duration
from proxy.material import load_material

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"


@pytest.fixture(scope="module")
def ca() -> tuple[Issuer, Issuer]:
    root = make_root(TD, 1)
    return root, make_intermediate(TD, 1, root)


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def _openssl_verify(tmp_path: Path, root: bytes, inter: bytes, leaf: bytes) -> str:
    (tmp_path / "root.pem").write_bytes(root)
    (tmp_path / "inter.pem").write_bytes(inter)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "inter.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    return out.stdout + out.stderr


def test_profiles(ca: tuple[Issuer, Issuer]) -> None:
    root, inter = ca
    key = new_key()
    leaf = issue_leaf(inter, key.public_key(), spiffe_id=WEB, dns_names=("web.local",))
    # root: self-signed CA, P-256, ~10 years
    assert root.cert.issuer == root.cert.subject
    assert isinstance(root.key, ec.EllipticCurvePrivateKey)
    assert root.key.curve.name == "secp256r1"
    root_life = root.cert.not_valid_after_utc - root.cert.not_valid_before_utc
    assert root_life >= dt.timedelta(days=3650)
    # intermediate: pathlen 0, name constraints to the trust domain, ~1 year
    bc = _ext(inter.cert, x509.BasicConstraints)
    assert bc.critical and isinstance(bc.value, x509.BasicConstraints)
    assert bc.value.ca and bc.value.path_length == 0
    nc = _ext(inter.cert, x509.NameConstraints).value
    assert isinstance(nc, x509.NameConstraints)
    assert nc.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    assert (
        dt.timedelta(days=364)
        < (inter.cert.not_valid_after_utc - inter.cert.not_valid_before_utc)
        <= dt.timedelta(days=366)
    )
    # leaf: SPIFFE URI + DNS, EKU server+client, digitalSignature, CA:false, AKI/SKI, 24h
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert san.get_values_for_type(x509.DNSName) == ["web.local"]
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = _ext(leaf, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    leaf_bc = _ext(leaf, x509.BasicConstraints).value
    assert isinstance(leaf_bc, x509.BasicConstraints) and not leaf_bc.ca
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    ski = _ext(inter.cert, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.digest
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=24) <= life <= dt.timedelta(hours=24, minutes=2)
    # serials are random and at most 128 bits
    serials = {issue_leaf(inter, key.public_key(), spiffe_id=WEB).serial_number for _ in range(5)}
    assert len(serials) == 5 and all(0 < s < 2**128 for s in serials)
    # the sidecar's own loader accepts what we issue
    mat = load_material(cert_pem(leaf, inter.cert), key_pem(key), cert_pem(root.cert), "test")
    assert mat.identity == WEB


def test_chain_verifies_with_cryptography_and_openssl(
    ca: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    root, inter = ca
    leaf = issue_leaf(inter, new_key().public_key(), spiffe_id=WEB)
    # OpenSSL (what the sidecar's TLS uses) honours the URI name constraint
    out = _openssl_verify(tmp_path, cert_pem(root.cert), cert_pem(inter.cert), cert_pem(leaf))
    assert "leaf.pem: OK" in out, out
    # cryptography's verifier rejects URI name constraints as unsupported: check each link
    # of the constrained chain by signature, and the full path on an unconstrained CA.
    leaf.verify_directly_issued_by(inter.cert)
    inter.cert.verify_directly_issued_by(root.cert)
    root.cert.verify_directly_issued_by(root.cert)
    plain_inter = make_intermediate(TD, 1, root, name_constraints=False)
    plain_leaf = issue_leaf(plain_inter, new_key().public_key(), spiffe_id=WEB)
    verifier = PolicyBuilder().store(Store([root.cert])).build_client_verifier()
    verified = verifier.verify(plain_leaf, [plain_inter.cert])
    assert verified.chain[-1] == root.cert
    assert verified.subjects == [x509.UniformResourceIdentifier(WEB)]
    # a leaf of another CA does not verify against our root
    other_root = make_root(TD, 9)
    other_inter = make_intermediate(TD, 9, other_root, name_constraints=False)
    foreign = issue_leaf(other_inter, new_key().public_key(), spiffe_id=WEB)
    with pytest.raises(VerificationError):
        verifier.verify(foreign, [other_inter.cert])
    assert ": OK" not in _openssl_verify(
        tmp_path, cert_pem(root.cert), cert_pem(other_inter.cert), cert_pem(foreign)
    )


def test_name_constraints_stop_other_trust_domains(
    ca: tuple[Issuer, Issuer], tmp_path: Path
) -> None:
    """A stolen intermediate key cannot mint identities of another trust domain."""
    root, inter = ca
    # issue_leaf itself refuses nothing about trust domains: build one by hand, as an
    # attacker holding the intermediate key would.
    evil = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(inter.cert.subject)
        .public_key(new_key().public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://bank.example/payments")]
            ),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(inter.key, hashes.SHA256())
    )
    out = _openssl_verify(tmp_path, cert_pem(root.cert), cert_pem(inter.cert), cert_pem(evil))
    assert ": OK" not in out and "permitted subtree violation" in out, out


def test_leaf_never_outlives_its_issuer(ca: tuple[Issuer, Issuer]) -> None:
    _, inter = ca
    leaf = issue_leaf(inter, new_key().public_key(), spiffe_id=WEB, ttl=dt.timedelta(days=4000))
    assert leaf.not_valid_after_utc == inter.cert.not_valid_after_utc


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, sans: list[x509.GeneralName]) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_csr_rules() -> None:
    key = new_key()
    good = make_csr(key, WEB)
    assert check_csr(good, WEB).public_key() == key.public_key()
    p384 = ec.generate_private_key(ec.SECP384R1())
    check_csr(_csr(p384, [x509.UniformResourceIdentifier(WEB)]), WEB)
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    check_csr(_csr(rsa2048, [x509.UniformResourceIdentifier(WEB)]), WEB)

    cases: list[tuple[str, int, str]] = [
        (_csr(key, [x509.UniformResourceIdentifier(WEB), x509.DNSName("x")]), 400, "exactly one"),
        (
            _csr(
                key,
                [x509.UniformResourceIdentifier(WEB), x509.UniformResourceIdentifier(WEB + "2")],
            ),
            400,
            "exactly one",
        ),
        (_csr(key, []), 400, "no subjectAltName"),
        (make_csr(key, "spiffe://corp.example/ns/shop/sa/db").decode(), 403, "may only be for"),
        (
            _csr(
                rsa.generate_private_key(public_exponent=65537, key_size=1024),
                [x509.UniformResourceIdentifier(WEB)],
            ),
            400,
            "too weak",
        ),
        (
            _csr(ec.generate_private_key(ec.SECP256K1()), [x509.UniformResourceIdentifier(WEB)]),
            400,
            "not allowed",
        ),
        ("not a csr", 400, "not a PEM"),
    ]
    for pem, status, words in cases:
        with pytest.raises(CsrRejected, match=words) as info:
            check_csr(pem, WEB)
        assert info.value.status == status

    # Ed25519: valid CSR, key type not allowed
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB)]), critical=False
        )
        .sign(ed, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrRejected, match="not allowed"):
        check_csr(ed_csr, WEB)

    # a CSR whose signature does not verify (one byte of the signature flipped)
    der = bytearray(x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature"):
        check_csr(tampered, WEB)


def test_spiffe_id_validation() -> None:
    assert validate_spiffe_id(WEB) == WEB
    for bad in (
        "https://corp.example/x",
        "spiffe://",
        "spiffe://Corp.example/x",
        "spiffe://corp.example:8443/x",
        "spiffe://corp.example/a//b",
        "spiffe://corp.example/a/../b",
        "spiffe://corp.example/a?x=1",
        "spiffe://u@corp.example/a",
    ):
        with pytest.raises(ValueError):
            validate_spiffe_id(bad)


def test_tokens() -> None:
    secret = new_secret()
    token = make_token(secret, WEB, 60, now=1000.0)
    claims = verify_token(secret, token, now=1010.0)
    assert claims.identity == WEB and claims.expires_at == 1060.0
    # expired
    with pytest.raises(TokenRejected, match="expired"):
        verify_token(secret, token, now=1061.0)
    # made with another CA's secret
    with pytest.raises(TokenRejected, match="signature"):
        verify_token(new_secret(), token, now=1010.0)
    # payload edited to another identity (MAC no longer matches)
    prefix, payload, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["id"] = "spiffe://corp.example/ns/shop/sa/admin"
    edited = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenRejected, match="signature"):
        verify_token(secret, f"{prefix}.{edited}.{mac}", now=1010.0)
    for garbage in ("", "x", "a.b.c", "mtlsjt1.@@.@@", "mtlsjt1." + "A" * 3000):
        with pytest.raises(TokenRejected):
            verify_token(secret, garbage, now=1010.0)
    # every token has its own nonce (the store claims it once: see test_ca_store.py)
    other = verify_token(secret, make_token(secret, WEB, 60, now=1000.0), now=1010.0)
    assert other.nonce != claims.nonce


def test_fingerprint_is_sha256_of_der(ca: tuple[Issuer, Issuer]) -> None:
    root, _ = ca
    der = root.cert.public_bytes(serialization.Encoding.DER)
    assert fingerprint(root.cert) == hashlib.sha256(der).hexdigest()


def test_duration_and_listen_parsing() -> None:
    # the CLI uses the settings module's duration parser
    assert parse_duration("1h30m") == 5400
    for bad in ("", "5x", "h", "-5s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_listen(":8443") == (None, 8443)
    assert parse_listen("127.0.0.1:9") == ("127.0.0.1", 9)
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    for bad in ("8443", "host:", "host:70000", "[::1:8443"):
        with pytest.raises(ValueError):
            parse_listen(bad)
