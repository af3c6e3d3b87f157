"""Identity material (certificate chain, key, trust bundle) loaded and checked as one unit."""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import CertError
from .federation import BundleError, TrustDomains, roots_from_file, to_pem, trust_domains
from .identity import parse_spiffe_id, svid_spiffe_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_pem_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertError(f"{what}: not a PEM certificate list ({exc})") from None
    if not certs:
        raise CertError(f"{what}: holds no certificate")
    return certs


def _public_bytes(key: object) -> bytes:
    if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise CertError(f"unsupported key type {type(key).__name__}")


def leaf_spiffe_id(cert: x509.Certificate) -> str | None:
    """The SPIFFE ID of an X509-SVID leaf (canonical text), or None when the certificate
    breaks an X509-SVID rule (see `identity.svid_spiffe_id`, which says which)."""
    try:
        return str(svid_spiffe_id(cert))
    except ValueError:
        return None


def _cert_name(origin: str, cert: x509.Certificate) -> str:
    """How messages name a certificate: where it came from, its subject and serial."""
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = "?"
    return f"{origin} certificate (subject {subject!r}, serial {cert.serial_number:x})"


@dataclass(frozen=True)
class Material:
    """A certificate chain (leaf first), its private key and the trust bundle, all PEM.

    Built only through `load_material`, which checks that the parts fit together.
    """

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes
    origin: str
    leaf: x509.Certificate = field(repr=False)
    roots: tuple[x509.Certificate, ...] = field(repr=False)
    identity: str
    # SPIFFE federation: other trust domains' bundles (PEM), each vouching only for its own
    # domain's peers; `domain_bound` makes that rule strict for every domain (see
    # federation.TrustDomains). Set through `with_federation`.
    federated: tuple[tuple[str, bytes], ...] = ()
    domain_bound: bool = False
    bundle_times: tuple[tuple[str, float], ...] = field(default=(), compare=False)

    @functools.cached_property
    def federated_roots(self) -> dict[str, tuple[x509.Certificate, ...]]:
        """{trust domain: its roots} of the federated bundles."""
        return {
            td: tuple(roots_from_file(pem, f"trust bundle of {td}")) for td, pem in self.federated
        }

    @functools.cached_property
    def trust_domain(self) -> str:
        """Our trust domain: the one of our own SPIFFE ID."""
        return parse_spiffe_id(self.identity).trust_domain

    @property
    def checks_domains(self) -> bool:
        """Must each peer's chain be checked against its own trust domain's roots? Only
        when there is more than our own bundle to tell apart (or it is made strict)."""
        return bool(self.federated) or self.domain_bound

    def roots_for(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        """The roots that may vouch for a peer of `trust_domain` (see `trust`): ours for
        our domain, a federated domain's own, none for other domains when `domain_bound`
        (ours, as before federation, otherwise)."""
        if trust_domain == self.trust_domain:
            return self.roots
        federated = self.federated_roots.get(trust_domain)
        if federated is not None:
            return federated
        return () if self.domain_bound else self.roots

    @functools.cached_property
    def trust(self) -> TrustDomains:
        """Which roots vouch for which trust domain's peers (checked on every handshake)."""
        return trust_domains(
            self.trust_domain, self.roots, self.federated_roots, strict=self.domain_bound
        )

    @functools.cached_property
    def leaf_der(self) -> bytes:
        """The leaf certificate in DER (computed once)."""
        return self.leaf.public_bytes(serialization.Encoding.DER)

    @functools.cached_property
    def issuers(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates whose CRLs we accept: the bundle's roots and the
        intermediates of our own chain."""
        chain = x509.load_pem_x509_certificates(self.chain_pem)
        return self.roots + tuple(chain[1:])

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    def describe(self) -> dict[str, object]:
        """What /status and `check` show: never the key."""
        return {
            "identity": self.identity,
            "serial": self.serial_hex,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issuer": self.leaf.issuer.rfc4514_string(),
            "trust_bundle_roots": len(self.roots),
            "origin": self.origin,
            **({"trust_domains": self.describe_domains()} if self.checks_domains else {}),
        }

    def describe_domains(self, now: float | None = None) -> dict[str, dict[str, object]]:
        """Each trust domain's bundle: its roots and, when known, when it last changed."""
        now = _now().timestamp() if now is None else now
        times = dict(self.bundle_times)
        out: dict[str, dict[str, object]] = {}
        for td, roots in [(self.trust_domain, self.roots), *self.federated_roots.items()]:
            entry: dict[str, object] = {"roots": len(roots), "own": td == self.trust_domain}
            if td in times:
                entry["updated"] = dt.datetime.fromtimestamp(times[td], dt.UTC).isoformat()
                entry["age_seconds"] = round(max(0.0, now - times[td]), 3)
            out[td] = entry
        return out


def with_federation(
    material: Material,
    bundles: Mapping[str, bytes],
    *,
    domain_bound: bool,
    times: Mapping[str, float] | None = None,
) -> Material:
    """`material` with these federated bundles (PEM or SPIFFE JSON per trust domain), all
    checked: raise CertError naming the bad one. Our own trust domain's entry is ignored
    (our bundle comes from the identity source only)."""
    own = parse_spiffe_id(material.identity).trust_domain
    federated: list[tuple[str, bytes]] = []
    for td in sorted(bundles):
        if td == own:
            continue
        try:
            pem = to_pem_bundle(bundles[td], f"trust bundle of {td}")
        except BundleError as exc:
            raise CertError(str(exc)) from None
        federated.append((td, pem))
    return replace(
        material,
        federated=tuple(federated),
        domain_bound=domain_bound,
        bundle_times=tuple(sorted((times or {}).items())),
    )


def to_pem_bundle(data: bytes, what: str) -> bytes:
    """A bundle (SPIFFE JSON or PEM) as PEM roots; raises BundleError."""
    return to_pem(roots_from_file(data, what))


def load_material(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, origin: str, *, allow_expired: bool = False
) -> Material:
    """Parse and cross-check the three parts; raise CertError saying which part is wrong.

    The leaf must be a valid X509-SVID (exactly one URI SAN, a valid SPIFFE ID, not a CA),
    within its validity period (not expired unless `allow_expired`, and not yet valid is
    refused too), and match the key; the bundle must hold a CA certificate.
    """
    chain = _load_pem_certs(chain_pem, f"{origin} certificate")
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{origin} key: not an unencrypted PEM private key ({exc})") from None
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise CertError(
            f"{origin} key does not match the certificate "
            f"(certificate subject {leaf.subject.rfc4514_string()!r})"
        )
    roots = tuple(_load_pem_certs(bundle_pem, f"{origin} trust bundle"))
    ca_roots = []
    for root in roots:
        try:
            bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                ca_roots.append(root)
        except x509.ExtensionNotFound:
            continue
    if not ca_roots:
        raise CertError(f"{origin} trust bundle holds no CA certificate")
    # The X509-SVID rules, the same ones every peer's certificate is judged by.
    try:
        identity = str(svid_spiffe_id(leaf))
    except ValueError as exc:
        raise CertError(f"{_cert_name(origin, leaf)} {exc}") from None
    now = _now()
    if not allow_expired and leaf.not_valid_after_utc <= now:
        raise CertError(
            f"{origin} certificate for {identity} expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    if leaf.not_valid_before_utc > now:
        # Peers would refuse it ("certificate is not yet valid") until then.
        raise CertError(
            f"{origin} certificate for {identity} (serial {leaf.serial_number:x}) is not valid "
            f"yet: notBefore is {leaf.not_valid_before_utc.isoformat()}, now is "
            f"{now.replace(microsecond=0).isoformat()} (is a clock wrong?)"
        )
    return Material(
        chain_pem=chain_pem,
        key_pem=key_pem,
        bundle_pem=bundle_pem,
        origin=origin,
        leaf=leaf,
        roots=tuple(ca_roots),
        identity=identity,
    )


def read_file(path: Path, what: str) -> bytes:
    """Read one input file, turning OS errors into a CertError that names the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} file {path} does not exist") from None
    except PermissionError:
        raise CertError(f"{what} file {path} is not readable by uid {os.getuid()}") from None
    except OSError as exc:
        raise CertError(f"{what} file {path}: {exc.strerror}") from None


def load_material_files(cert_file: Path, key_file: Path, bundle_file: Path) -> Material:
    """Load material from the three files named by MTLS_CERT_FILE, _KEY_FILE, _TRUST_BUNDLE_FILE."""
    parts = []
    for path, what in (
        (cert_file, "certificate"),
        (key_file, "key"),
        (bundle_file, "trust bundle"),
    ):
        data = read_file(path, what)
        if not data.strip():
            # Half-written or not mounted yet: say so rather than "not PEM (MalformedFraming)".
            raise CertError(f"{what} file {path} is empty")
        parts.append(data)
    return load_material(parts[0], parts[1], parts[2], origin="files")
