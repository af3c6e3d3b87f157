"""Trust bundles per trust domain (SPIFFE federation): bundle formats, and which roots may
vouch for which peer. Pure: no I/O.

A SPIFFE trust bundle belongs to one trust domain. A peer certificate is accepted only when
its chain ends at a root of the bundle of the trust domain named by its own SPIFFE ID: a
partner's CA can never vouch for one of our identities, nor one partner's for another's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .identity import SpiffeId


class BundleError(ValueError):
    """A trust bundle that cannot be used; the message says which and why."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, hex: how roots are compared."""
    return hashlib.sha256(der).hexdigest()


def _ca_roots(certs: Iterable[x509.Certificate], what: str) -> list[x509.Certificate]:
    roots = []
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if bc.ca:
            roots.append(cert)
    if not roots:
        raise BundleError(f"{what} holds no CA certificate")
    return roots


def split_der(data: bytes, what: str) -> list[bytes]:
    """Split a concatenation of DER certificates (how the Workload API sends chains and
    bundles) by their ASN.1 headers. Raises BundleError."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        # Each certificate is a DER SEQUENCE: its length is in its header.
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise BundleError(f"{what}: not a list of DER certificates (at byte {pos})")
        first = data[pos + 1]
        if first < 0x80:
            size, head = first, 2
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + 2 + n > len(data):
                raise BundleError(f"{what}: bad DER length at byte {pos}")
            size, head = int.from_bytes(data[pos + 2 : pos + 2 + n], "big"), 2 + n
        end = pos + head + size
        if end > len(data):
            raise BundleError(f"{what}: truncated DER certificate at byte {pos}")
        out.append(data[pos:end])
        pos = end
    if not out:
        raise BundleError(f"{what} is empty")
    return out


def certs_from_der(data: bytes, what: str) -> list[x509.Certificate]:
    """The certificates of a DER concatenation. Raises BundleError."""
    certs = []
    for i, der in enumerate(split_der(data, what)):
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise BundleError(f"{what}: bad certificate {i} ({exc})") from None
    return certs


def roots_from_der(data: bytes, what: str) -> list[x509.Certificate]:
    """The CA certificates of a concatenation of DER certificates, as the Workload API sends
    bundles (X509SVIDResponse.bundle, federated_bundles). Raises BundleError."""
    return _ca_roots(certs_from_der(data, what), what)


def roots_from_jwks(data: bytes, what: str) -> tuple[list[x509.Certificate], int | None]:
    """The X.509 roots of a SPIFFE bundle (the JWKS document of the SPIFFE Trust Domain and
    Bundle spec): keys with "use": "x509-svid" and a one-certificate "x5c". Keys for other
    uses (jwt-svid) are skipped. Returns (roots, spiffe_refresh_hint or None).
    Raises BundleError."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise BundleError(f'{what}: not a SPIFFE bundle (a JSON object with a "keys" list)')
    certs: list[x509.Certificate] = []
    for i, key in enumerate(doc["keys"]):
        if not isinstance(key, dict) or key.get("use") != "x509-svid":
            continue
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise BundleError(f'{what}: key {i} ("x509-svid") must have exactly one x5c entry')
        try:
            der = base64.b64decode(x5c[0], validate=True)
            certs.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError) as exc:
            raise BundleError(f"{what}: key {i}: bad x5c certificate ({exc})") from None
    if not certs:
        raise BundleError(f'{what} holds no "x509-svid" key')
    hint = doc.get("spiffe_refresh_hint")
    refresh = hint if isinstance(hint, int) and not isinstance(hint, bool) and hint > 0 else None
    return _ca_roots(certs, what), refresh


def roots_from_file(data: bytes, what: str) -> list[x509.Certificate]:
    """A bundle file: the SPIFFE JWKS format, or PEM certificates (as many tools write
    them). Raises BundleError."""
    if data.lstrip().startswith(b"{"):
        return roots_from_jwks(data, what)[0]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(f"{what}: neither a SPIFFE bundle (JSON) nor PEM ({exc})") from None
    return _ca_roots(certs, what)


def to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as one PEM text."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class TrustDomains:
    """Which roots may vouch for the peers of which trust domain.

    `own` is our trust domain; `roots` maps a trust domain to the SHA-256 fingerprints of its
    bundle's roots (ours included). `strict`: a peer of a domain without a bundle is refused;
    when not strict (no federation configured, the pre-federation setup of one trust bundle
    for every domain), such a peer is judged by our own bundle, and the policy decides.
    """

    own: str
    roots: Mapping[str, frozenset[str]] = field(default_factory=dict)
    strict: bool = False

    def check(self, peer: SpiffeId | None, anchor_der: bytes | None) -> str | None:
        """Why the chain that ends at `anchor_der` may not vouch for `peer` (None: it may).

        A peer without a SPIFFE ID is left to the identity checks that follow.
        """
        if peer is None or anchor_der is None:
            return None
        td = peer.trust_domain
        allowed = self.roots.get(td)
        if allowed is None:
            if not self.strict:
                allowed = self.roots.get(self.own, frozenset())
            else:
                return f"presented {peer}, but we have no trust bundle for trust domain {td}"
        if fingerprint(anchor_der) not in allowed:
            return (
                f"presented {peer}, whose certificate chain ends at a root that is not in "
                f"the trust bundle of {td}"
            )
        return None


def trust_domains(
    own: str,
    own_roots: Iterable[x509.Certificate],
    federated: Mapping[str, Iterable[x509.Certificate]],
    *,
    strict: bool,
) -> TrustDomains:
    """Build the per-domain root sets (our own bundle never widened by a federated one)."""
    roots = {
        td: frozenset(fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in certs)
        for td, certs in federated.items()
        if td != own
    }
    roots[own] = frozenset(
        fingerprint(c.public_bytes(serialization.Encoding.DER)) for c in own_roots
    )
    return TrustDomains(own, roots, strict)
