"""Revocation lists for the sidecar: parse CRLs, check signatures, answer "revoked?"; pure.

`load_crls(pem, trusted_issuers)` takes PEM text holding one or more CRLs, optionally followed
by the intermediate certificates that signed them (the CA service's `/v1/crl` and `crl.pem`
have that shape), and returns a RevocationList, all or nothing: if any CRL fails its check
the whole input is refused with CrlRejected saying which and why, so the caller keeps the
last good list. A CRL past its nextUpdate is accepted but marked stale (`stale`), so an
outage of the CA does not turn into refusing everyone; the caller alerts on it.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CertError

# A CRL dated slightly in the future is clock skew, not an attack.
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_CRLS = 64

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class CrlRejected(CertError):
    """A CRL input that cannot be used; the message names the CRL and the reason."""


@dataclass(frozen=True)
class CrlInfo:
    """What was loaded from one CRL."""

    issuer: str  # RFC 4514 name
    number: int | None
    this_update: dt.datetime
    next_update: dt.datetime | None
    revoked: int  # how many entries
    stale: bool  # past its nextUpdate when loaded


@dataclass(frozen=True)
class RevocationList:
    """Revoked (issuer, serial) pairs from CRLs whose signatures were checked."""

    crls: tuple[CrlInfo, ...]
    _revoked: frozenset[tuple[bytes, int]] = field(repr=False)

    def is_revoked(
        self, cert_or_serial: x509.Certificate | int, issuer: x509.Name | None = None
    ) -> bool:
        """Is this certificate (or serial number issued by `issuer`) on one of the CRLs?"""
        if isinstance(cert_or_serial, x509.Certificate):
            serial = cert_or_serial.serial_number
            issuer = cert_or_serial.issuer
        else:
            serial = cert_or_serial
            if issuer is None:
                raise TypeError("is_revoked(serial) needs the issuer's name")
        return (issuer.public_bytes(), serial) in self._revoked

    @property
    def this_update(self) -> dt.datetime | None:
        """The oldest thisUpdate: how old the least fresh CRL is."""
        return min((c.this_update for c in self.crls), default=None)

    @property
    def next_update(self) -> dt.datetime | None:
        """The earliest nextUpdate: when a fresh fetch is due at the latest."""
        return min((c.next_update for c in self.crls if c.next_update), default=None)

    @property
    def stale(self) -> bool:
        """True when any CRL was past its nextUpdate when loaded."""
        return any(c.stale for c in self.crls)

    def __len__(self) -> int:
        return len(self._revoked)


EMPTY = RevocationList(crls=(), _revoked=frozenset())


def _signed_by(
    obj: x509.Certificate | x509.CertificateRevocationList, ca: x509.Certificate
) -> bool:
    if isinstance(obj, x509.Certificate):
        try:
            obj.verify_directly_issued_by(ca)
        except Exception:  # ValueError (names), InvalidSignature, TypeError (key types)
            return False
        return True
    key = ca.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    try:
        return obj.is_signature_valid(key)
    except Exception:
        return False


def _is_ca(cert: x509.Certificate, *, for_crl: bool) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.crl_sign if for_crl else ku.key_cert_sign


def _blocks(pem: bytes) -> tuple[list[bytes], list[bytes]]:
    crls, certs = [], []
    for m in _PEM_BLOCK.finditer(pem):
        kind = m.group(1)
        if kind == b"X509 CRL":
            crls.append(m.group(0))
        elif kind == b"CERTIFICATE":
            certs.append(m.group(0))
        else:
            raise CrlRejected(f"unexpected PEM block {kind.decode()!r} among the CRLs")
    return crls, certs


def load_crls(
    pem: bytes | str,
    trusted_issuers: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> RevocationList:
    """Check and load every CRL in `pem`; all or nothing (CrlRejected names the first bad one).

    A CRL is accepted when its signature verifies with a CA certificate of `trusted_issuers`
    (roots or intermediates we trust) whose subject is the CRL's issuer, or with an
    intermediate included in `pem` that is itself directly signed by a trusted issuer and
    valid now. The signer must be a CA allowed to sign CRLs (keyUsage cRLSign).
    """
    now = now or dt.datetime.now(dt.UTC)
    data = pem.encode() if isinstance(pem, str) else pem
    crl_blocks, cert_blocks = _blocks(data)
    if not crl_blocks:
        raise CrlRejected("no CRL found (expected PEM blocks 'BEGIN X509 CRL')")
    if len(crl_blocks) > MAX_CRLS:
        raise CrlRejected(f"{len(crl_blocks)} CRLs is more than the {MAX_CRLS} accepted")
    trusted = [c for c in trusted_issuers if _is_ca(c, for_crl=False) or _is_ca(c, for_crl=True)]
    signers = list(trusted)
    for i, block in enumerate(cert_blocks, 1):
        try:
            signers.append(_check_intermediate(block, trusted, now))
        except CrlRejected:
            raise
        except (ValueError, TypeError, x509.InvalidVersion) as exc:  # lazily parsed fields
            raise CrlRejected(f"certificate {i} beside the CRLs cannot be parsed ({exc})") from None
    infos: list[CrlInfo] = []
    revoked: set[tuple[bytes, int]] = set()
    for i, block in enumerate(crl_blocks, 1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except (ValueError, x509.InvalidVersion) as exc:
            raise CrlRejected(f"CRL {i} cannot be parsed ({exc})") from None
        try:
            info, entries = _check_one(crl, i, signers, now)
        except CrlRejected:
            raise
        except (ValueError, TypeError) as exc:  # cryptography parses fields lazily
            raise CrlRejected(f"CRL {i} cannot be parsed ({exc})") from None
        infos.append(info)
        revoked |= entries
    return RevocationList(crls=tuple(infos), _revoked=frozenset(revoked))


def _check_intermediate(
    block: bytes, trusted: Sequence[x509.Certificate], now: dt.datetime
) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(block)
    name = cert.subject.rfc4514_string()
    if not _is_ca(cert, for_crl=True):
        raise CrlRejected(f"certificate {name!r} beside the CRLs is not a CA that signs CRLs")
    if not any(_signed_by(cert, t) for t in trusted):
        raise CrlRejected(f"intermediate {name!r} beside the CRLs is not signed by a trusted root")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CrlRejected(f"intermediate {name!r} beside the CRLs is not valid now")
    return cert


def _check_one(
    crl: x509.CertificateRevocationList,
    index: int,
    signers: Iterable[x509.Certificate],
    now: dt.datetime,
) -> tuple[CrlInfo, set[tuple[bytes, int]]]:
    name = crl.issuer.rfc4514_string()
    where = f"CRL {index} (issuer {name!r})"
    candidates = [s for s in signers if s.subject == crl.issuer and _is_ca(s, for_crl=True)]
    if not candidates:
        raise CrlRejected(f"{where} is not from an issuer we trust")
    if not any(_signed_by(crl, s) for s in candidates):
        raise CrlRejected(f"{where}: signature does not verify (forged, or signed by another key)")
    try:
        delta = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        delta = None
    except ValueError as exc:
        raise CrlRejected(f"{where}: extensions cannot be parsed ({exc})") from None
    if delta is not None:
        raise CrlRejected(f"{where} is a delta CRL, which is not supported")
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        idp = None
    if idp is not None and idp.indirect_crl:
        # Entries of an indirect CRL may name other issuers; we key entries by CRL issuer.
        raise CrlRejected(f"{where} is an indirect CRL, which is not supported")
    this_update = crl.last_update_utc
    if this_update > now + MAX_CLOCK_SKEW:
        raise CrlRejected(f"{where} is dated in the future ({this_update.isoformat()})")
    next_update = crl.next_update_utc
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    issuer_der = crl.issuer.public_bytes()
    try:
        entries = {(issuer_der, r.serial_number) for r in crl}
    except ValueError as exc:
        raise CrlRejected(f"{where}: an entry cannot be parsed ({exc})") from None
    info = CrlInfo(
        issuer=name,
        number=number,
        this_update=this_update,
        next_update=next_update,
        revoked=len(entries),
        stale=next_update is not None and next_update < now,
    )
    return info, entries


@dataclass(frozen=True)
class PeerCert:
    """What revocation and expiry checks need of a peer certificate, parsed once."""

    serial: int
    issuer: bytes  # DER of the issuer's name
    not_after: float  # unix time
    serial_hex: str


@functools.lru_cache(maxsize=4096)
def peer_cert(der: bytes) -> PeerCert | None:
    """The facts of a DER certificate (cached: this runs once per connection); None if it
    cannot be parsed."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return PeerCert(
            cert.serial_number,
            cert.issuer.public_bytes(),
            cert.not_valid_after_utc.timestamp(),
            format(cert.serial_number, "x"),
        )
    except (ValueError, x509.InvalidVersion):
        return None


def is_peer_revoked(rl: RevocationList, peer: PeerCert) -> bool:
    """Is this peer certificate on one of the CRLs?"""
    return (peer.issuer, peer.serial) in rl._revoked
