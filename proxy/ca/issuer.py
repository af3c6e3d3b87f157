"""Certificate building for the internal CA: roots, intermediates, leaves, CSR checks; no I/O."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ProxyError
from ..identity import parse_spiffe_id

ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=365)
LEAF_TTL = dt.timedelta(hours=24)
SERVER_TTL = dt.timedelta(days=30)
# Clocks of sidecars drift a little; a leaf valid from "a moment ago" avoids "not yet valid".
MAX_BACKDATE = dt.timedelta(seconds=60)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_ALLOWED_CURVES = ("secp256r1", "secp384r1")
_MIN_RSA_BITS = 2048

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")


class CsrRejected(ProxyError):
    """A certificate signing request we will not sign; `status` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its private key: what signs the next certificate down."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def validate_spiffe_id(text: str) -> str:
    """Return the canonical text of `text` if it is a valid SPIFFE ID, else raise ValueError.

    The one grammar of `identity.parse_spiffe_id`, so the CA issues only identities that
    the sidecars accept.
    """
    try:
        return str(parse_spiffe_id(text))
    except ValueError as exc:
        raise ValueError(f"not a SPIFFE ID: {exc}") from None


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of a SPIFFE ID (the host part)."""
    return urlsplit(spiffe_id).netloc


def validate_trust_domain(td: str) -> str:
    """Return `td` if it is a valid SPIFFE trust domain name, else raise ValueError."""
    if not td or not _TRUST_DOMAIN_RE.match(td):
        raise ValueError(
            f"{td!r} is not a trust domain (lowercase letters, digits, '.', '-', '_'; "
            "example: corp.example)"
        )
    return td


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A random, positive 128-bit serial number."""
    return secrets.randbits(128) | 1


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER, lowercase hex: the value of MTLS_CA_FINGERPRINT."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM form of a private key."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    """The PEM form of one or more certificates, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _ca_extensions(
    builder: x509.CertificateBuilder,
    public_key: ec.EllipticCurvePublicKey,
    issuer_public_key: ec.EllipticCurvePublicKey,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
    )


def make_root(
    trust_domain: str,
    generation: int,
    *,
    now: dt.datetime | None = None,
    ttl: dt.timedelta = ROOT_TTL,
) -> Issuer:
    """A self-signed root CA for `trust_domain` (ECDSA P-256, 10 years by default)."""
    now = now or _now()
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root CA G{generation}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(now + ttl)
    )
    builder = _ca_extensions(builder, key.public_key(), key.public_key(), path_length=1)
    return Issuer(builder.sign(key, hashes.SHA256()), key)


def make_intermediate(
    trust_domain: str,
    generation: int,
    root: Issuer,
    *,
    now: dt.datetime | None = None,
    ttl: dt.timedelta = INTERMEDIATE_TTL,
    name_constraints: bool = True,
) -> Issuer:
    """The online issuing CA under `root`: pathlen 0, name-constrained to the trust domain.

    The name constraint permits only spiffe:// URIs of `trust_domain` (DNS and IP names are
    left unconstrained so the enrolment service and workloads can carry host names), so a
    stolen intermediate key cannot mint identities of another trust domain that verifiers
    honouring name constraints (OpenSSL, BoringSSL, Go) would accept. Some verifiers
    (rustls-webpki, Python cryptography's x509.verification) reject URI name constraints
    outright; `name_constraints=False` leaves them out for such peers.
    """
    now = now or _now()
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} issuing CA G{generation}"),
        ]
    )
    not_after = min(now + ttl, root.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(not_after)
    )
    builder = _ca_extensions(builder, key.public_key(), root.key.public_key(), path_length=0)
    if name_constraints:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    return Issuer(builder.sign(root.key, hashes.SHA256()), key)


def _leaf_builder(
    issuer: Issuer,
    public_key: PublicKey,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    ekus: list[x509.ObjectIdentifier],
    ttl: dt.timedelta,
    now: dt.datetime,
) -> x509.Certificate:
    if ttl <= dt.timedelta(0):
        raise ValueError("certificate lifetime must be positive")
    backdate = min(MAX_BACKDATE, ttl / 10)
    not_after = min(now + ttl, issuer.cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(
            f"the issuing CA expired at {issuer.cert.not_valid_after_utc.isoformat()}; "
            "rotate it before issuing"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # keyEncipherment only for RSA keys (TLS 1.2 RSA key exchange); never for EC.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )


def issue_leaf(
    issuer: Issuer,
    public_key: PublicKey,
    *,
    spiffe_id: str,
    dns_names: tuple[str, ...] = (),
    ttl: dt.timedelta = LEAF_TTL,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A workload certificate (X509-SVID): the SPIFFE ID as URI SAN, serverAuth+clientAuth.

    The lifetime is capped at the issuer's own expiry.
    """
    validate_spiffe_id(spiffe_id)
    check_public_key(public_key)
    td = trust_domain_of(spiffe_id)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(n) for n in dns_names]
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, td)])
    return _leaf_builder(
        issuer,
        public_key,
        subject,
        sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        ttl,
        now or _now(),
    )


def issue_server(
    issuer: Issuer,
    public_key: PublicKey,
    *,
    names: tuple[str, ...],
    ttl: dt.timedelta = SERVER_TTL,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The enrolment service's own TLS certificate: DNS/IP SANs, serverAuth only."""
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtls-sidecar CA service")])
    return _leaf_builder(
        issuer, public_key, subject, sans, [ExtendedKeyUsageOID.SERVER_AUTH], ttl, now or _now()
    )


def check_public_key(key: object) -> PublicKey:
    """Accept ECDSA P-256/P-384 and RSA >= 2048 keys; raise CsrRejected for anything else."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVES:
            raise CsrRejected(f"key curve {key.curve.name} is not allowed (use P-256 or P-384)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrRejected(
                f"RSA key of {key.key_size} bits is too weak (at least {_MIN_RSA_BITS})"
            )
        return key
    raise CsrRejected(
        f"key type {type(key).__name__} is not allowed (use ECDSA P-256/P-384 or RSA >= 2048)"
    )


def check_csr(csr_pem: str | bytes, expected_id: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR for `expected_id`; raise CsrRejected saying what is wrong.

    Rules: valid PEM, valid self-signature, an allowed key, and a SAN extension whose only
    name is the URI `expected_id` (403 when it names another identity). The CSR's subject and
    other extensions are ignored: we never copy anything from a CSR except its public key.
    """
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise CsrRejected(f"csr is not a PEM certificate request ({exc})") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported signature algorithms raise instead of returning False
        valid = False
    if not valid:
        raise CsrRejected("csr signature does not verify")
    try:
        key = csr.public_key()
    except Exception as exc:
        raise CsrRejected(f"csr public key cannot be read ({exc})") from None
    check_public_key(key)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected(f"csr has no subjectAltName; it must name {expected_id}") from None
    except ValueError as exc:
        raise CsrRejected(f"csr extensions cannot be parsed ({exc})") from None
    names = list(san)
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    others = [n for n in names if not isinstance(n, x509.UniformResourceIdentifier)]
    if others or len(uris) != 1:
        listed = ", ".join(str(getattr(n, "value", n)) for n in names)
        raise CsrRejected(
            f"csr must carry exactly one SAN, the URI {expected_id}; it has: {listed or 'none'}"
        )
    if uris[0] != expected_id:
        raise CsrRejected(
            f"csr asks for {uris[0]} but this request may only be for {expected_id}", status=403
        )
    return csr


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR for `spiffe_id` signed by `key` (what a sidecar sends to enrol or renew)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
