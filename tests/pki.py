"""Throwaway PKI for tests: roots, intermediates and SPIFFE leaves made with `cryptography`."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Issuer:
    cert: x509.Certificate
    key: Key
    chain: list[x509.Certificate]  # intermediates above `cert`, without the root


def make_root(cn: str = "Test Root CA") -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key, [])


def make_intermediate(root: Issuer, cn: str = "Test Intermediate CA") -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False
        )
        .sign(root.key, hashes.SHA256())
    )
    return Issuer(cert, key, [cert])


def make_leaf(
    issuer: Issuer,
    spiffe_id: str | None,
    *,
    dns: tuple[str, ...] = ("localhost",),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    extra_uris: tuple[str, ...] = (),
    ca: bool = False,
) -> tuple[x509.Certificate, Key]:
    """A leaf for `spiffe_id` (no URI SAN when None); `extra_uris` are more URI SANs and
    `ca` sets basicConstraints CA:TRUE, to make certificates that break X509-SVID rules."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    if spiffe_id:
        sans.append(x509.UniformResourceIdentifier(spiffe_id))
    sans += [x509.UniformResourceIdentifier(uri) for uri in extra_uris]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(spiffe_id or "no-spiffe"))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(hours=24))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Identity:
    """Paths of one workload's files."""

    cert: Path
    key: Path
    bundle: Path
    spiffe_id: str | None


def write_identity(
    directory: Path,
    name: str,
    issuer: Issuer,
    bundle: list[x509.Certificate],
    spiffe_id: str | None,
    **leaf_kw: object,
) -> Identity:
    cert, key = make_leaf(issuer, spiffe_id, **leaf_kw)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    bundle_path = directory / f"{name}.bundle.pem"
    cert_path.write_bytes(pem(cert) + b"".join(pem(c) for c in issuer.chain))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    bundle_path.write_bytes(b"".join(pem(c) for c in bundle))
    return Identity(cert_path, key_path, bundle_path, spiffe_id)


def copy_identity(src: Identity, d: Path) -> Identity:
    d.mkdir(parents=True, exist_ok=True)
    dst = Identity(d / "tls.crt", d / "tls.key", d / "ca.pem", src.spiffe_id)
    replace_identity(src, dst)
    return dst


def replace_identity(src: Identity, dst: Identity) -> None:
    """Atomic per file, as cert-manager and kubelet write them."""
    for a, b in ((src.cert, dst.cert), (src.key, dst.key), (src.bundle, dst.bundle)):
        tmp = b.with_suffix(".tmp")
        shutil.copyfile(a, tmp)
        os.replace(tmp, b)


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _der_children(der: bytes) -> list[bytes]:
    """The TLVs inside the constructed DER value `der` (its own tag and length skipped)."""
    i = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    out = []
    while i < len(der):
        length, j = der[i + 1], i + 2
        if length & 0x80:
            k = length & 0x7F
            length, j = int.from_bytes(der[j : j + k], "big"), j + k
        out.append(der[i : j + length])
        i = j + length
    return out


def big_crl(
    issuer: Issuer,
    serials: list[int],
    *,
    number: int = 1,
    this_update: dt.datetime | None = None,
) -> bytes:
    """A signed PEM CRL of `issuer` listing `serials`, built in about a second for 600,000
    entries (cryptography's builder copies its list at each entry: quadratic). A one-entry
    CRL from the builder gives the frame; its entry list is replaced and the TBS re-signed."""
    now = this_update or _now() - dt.timedelta(minutes=1)
    small = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(1).revocation_date(now).build()
        )
        .sign(issuer.key, hashes.SHA256())
    )
    tbs, alg, _ = _der_children(small.public_bytes(serialization.Encoding.DER))
    parts = _der_children(tbs)
    date = _der_children(_der_children(parts[5])[0])[1]  # the entry's revocationDate
    entries = b"".join(
        _tlv(0x30, _tlv(0x02, s.to_bytes(s.bit_length() // 8 + 1, "big")) + date) for s in serials
    )
    parts[5] = _tlv(0x30, entries)
    new_tbs = _tlv(0x30, b"".join(parts))
    signature = issuer.key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, new_tbs + alg + _tlv(0x03, b"\0" + signature))
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
