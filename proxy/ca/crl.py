"""Signed X.509 CRLs for the CA's issuing intermediates; pure (no I/O).

Each intermediate signs its own CRL (CRL number, authority key identifier, nextUpdate
CRL_VALIDITY after thisUpdate); what the service serves at /v1/crl and writes to crl.pem is
every CRL followed by the intermediates that signed them, so a sidecar holding only the
roots can check each CRL (see proxy/revocation.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .issuer import Issuer

# A CRL is good for a day; the service issues a fresh one every CRL_REFRESH (and at once after
# a revocation), so a sidecar fetching every 5 minutes never holds one near its nextUpdate.
CRL_VALIDITY = dt.timedelta(hours=24)
CRL_REFRESH = dt.timedelta(hours=1)
CRL_BACKDATE = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Revoked:
    """One CRL entry."""

    serial: int
    revoked_at: dt.datetime
    reason: str  # an RFC 5280 reason name; "unspecified" leaves the reason code out


def build_crl(
    issuer: Issuer,
    revoked: Iterable[Revoked],
    *,
    number: int,
    now: dt.datetime,
    validity: dt.timedelta = CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """The CRL of `issuer` listing `revoked`, numbered `number`, valid from `now`."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now - CRL_BACKDATE)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason != "unspecified":
            # RFC 5280 5.3.1: the code "unspecified" SHOULD be left out rather than sent.
            item = item.add_extension(x509.CRLReason(x509.ReasonFlags(entry.reason)), False)
        builder = builder.add_revoked_certificate(item.build())
    return builder.sign(issuer.key, hashes.SHA256())


def crl_bundle_pem(
    crls: Iterable[x509.CertificateRevocationList], issuers: Iterable[x509.Certificate]
) -> bytes:
    """Every CRL (PEM), then the certificates of the intermediates that signed them."""
    out = [c.public_bytes(serialization.Encoding.PEM) for c in crls]
    out += [c.public_bytes(serialization.Encoding.PEM) for c in issuers]
    return b"".join(out)
