"""Benchmark certificates: root CA -> intermediate -> ECDSA P-256 client and server leaves."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "bench.test"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"


@dataclass(frozen=True)
class LeafFiles:
    """Files of one leaf identity, in the forms the proxies want them."""

    spiffe_id: str
    chain: Path  # leaf + intermediate, PEM
    key: Path  # PKCS#8 PEM, unencrypted
    combined: Path  # chain + key in one PEM (haproxy `crt`)


@dataclass(frozen=True)
class BenchCerts:
    """Everything every proxy of the benchmark is configured with."""

    root: Path  # trust bundle: the root CA only
    client: LeafFiles
    server: LeafFiles


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-sidecar bench"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int | None,
    now: dt.datetime,
) -> x509.Certificate:
    name = _name(subject)
    issuer_public = issuer_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _leaf_cert(
    spiffe_id: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(spiffe_id.rsplit("/", 1)[-1]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=24))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def make_certs(directory: Path) -> BenchCerts:
    """Create the benchmark CA and both leaves in `directory` and return their paths."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("bench root CA", root_key, None, root_key, 1, now)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert("bench intermediate CA", inter_key, root.subject, root_key, 0, now)

    root_path = _write(directory / "root.pem", _pem(root))
    leaves: list[LeafFiles] = []
    for name, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_cert(spiffe_id, key, inter, inter_key, now)
        chain = _pem(cert) + _pem(inter)
        key_pem = _key_pem(key)
        leaves.append(
            LeafFiles(
                spiffe_id=spiffe_id,
                chain=_write(directory / f"{name}.crt", chain),
                key=_write(directory / f"{name}.key", key_pem, 0o600),
                combined=_write(directory / f"{name}.pem", chain + key_pem, 0o600),
            )
        )
    return BenchCerts(root=root_path, client=leaves[0], server=leaves[1])
