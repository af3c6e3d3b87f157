"""Revocation lists for the sidecar: parse CRLs, check signatures, answer "revoked?"; pure.

`load_crls(pem, trusted_issuers)` takes PEM text holding one or more CRLs, optionally followed
by the intermediate certificates that signed them (the CA service's `/v1/crl` and `crl.pem`
have that shape), and returns a RevocationList, all or nothing: if any CRL fails its check
the whole input is refused with CrlRejected saying which and why, so the caller keeps the
last good list. A CRL past its nextUpdate is accepted but marked stale (`stale`), so an
outage of the CA does not turn into refusing everyone; the caller alerts on it.

`merge(current, new, ...)` then decides, issuer by issuer, what replaces what: a CRL never
goes backwards (a lower CRL number, or the same number with other content), and the CRL of
an issuer we still trust never disappears; in both cases the last accepted CRL is kept and
the refusal is reported.

The workers do not parse CRLs: the master sends them the revoked serials in a compact binary
form (`compact`), which `from_compact` turns back into a RevocationList a slice at a time, so
a worker's event loop is never held for long by a big list.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
from collections.abc import Generator, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .errors import CertError

# A CRL dated slightly in the future is clock skew, not an attack.
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_CRLS = 64
# Bigger input is refused before it is parsed: 64 MiB holds about two million entries (a
# 600,000-entry CRL is 18-28 MB), and the sidecar keeps one copy per process.
MAX_CRL_BYTES = 64 * 1024 * 1024
# Serials turned into a set per step of `from_compact` (about 5 ms of one core).
COMPACT_STEP = 20_000

_PEM_HEAD = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n")


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
    issuer_der: bytes = field(default=b"", repr=False)
    signer_key: bytes = field(default=b"", repr=False)  # SHA-256 of the signer's public key
    digest: bytes = field(default=b"", repr=False)  # SHA-256 of what was signed
    signer: x509.Certificate | None = field(default=None, repr=False, compare=False)
    serials: frozenset[int] = field(default=frozenset(), repr=False, compare=False)

    @property
    def key(self) -> tuple[bytes, bytes]:
        """Which CA this is the CRL of: its name and its key."""
        return self.issuer_der, self.signer_key


@dataclass(frozen=True)
class RevocationList:
    """Revoked serials per issuer, from CRLs whose signatures were checked."""

    crls: tuple[CrlInfo, ...]
    _index: Mapping[bytes, Set[int]] = field(repr=False)  # issuer name (DER) -> serials

    @classmethod
    def of(cls, crls: Iterable[CrlInfo]) -> RevocationList:
        """The list made of these CRLs (their entries looked up by issuer name)."""
        infos = tuple(crls)
        index: dict[bytes, Set[int]] = {}
        for c in infos:
            have = index.get(c.issuer_der)
            index[c.issuer_der] = c.serials if have is None else have | c.serials
        return cls(crls=infos, _index=index)

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
        return serial in self._index.get(issuer.public_bytes(), ())

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
        """True when any CRL is past its nextUpdate (now, not when it was loaded: the same
        list fetched again is not parsed again)."""
        nxt = self.next_update
        return any(c.stale for c in self.crls) or (
            nxt is not None and nxt < dt.datetime.now(dt.UTC)
        )

    def __len__(self) -> int:
        return sum(len(s) for s in self._index.values())


EMPTY = RevocationList(crls=(), _index={})


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


def _pem_blocks(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    """(kind, block) of each PEM block; text between blocks is skipped. Found with
    bytes.find (memchr) rather than one regex over the whole input, which took 0.3 s on a
    28 MB CRL; the regex only checks each block's first line."""
    pos = 0
    while (begin := data.find(b"-----BEGIN ", pos)) >= 0:
        head = _PEM_HEAD.match(data, begin)
        if head is None:
            pos = begin + 1
            continue
        kind = head.group(1)
        end_marker = b"-----END " + kind + b"-----"
        end = data.find(end_marker, head.end())
        if end < 0:
            pos = begin + 1
            continue
        pos = end + len(end_marker)
        yield kind, data[begin:pos]


def _blocks(pem: bytes) -> tuple[list[bytes], list[bytes]]:
    crls, certs = [], []
    for kind, block in _pem_blocks(pem):
        if kind == b"X509 CRL":
            crls.append(block)
        elif kind == b"CERTIFICATE":
            certs.append(block)
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
    if len(data) > MAX_CRL_BYTES:
        raise CrlRejected(too_big(len(data)))
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
    seen: dict[tuple[bytes, bytes], int] = {}
    for i, block in enumerate(crl_blocks, 1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except (ValueError, x509.InvalidVersion) as exc:
            raise CrlRejected(f"CRL {i} cannot be parsed ({exc})") from None
        try:
            info = _check_one(crl, i, signers, now)
        except CrlRejected:
            raise
        except (ValueError, TypeError) as exc:  # cryptography parses fields lazily
            raise CrlRejected(f"CRL {i} cannot be parsed ({exc})") from None
        if (first := seen.setdefault(info.key, i)) != i:
            # Which of the two is the list of that CA? One CRL per CA keeps "newer" decidable.
            raise CrlRejected(
                f"CRL {first} and CRL {i} are both from issuer {info.issuer!r} (same key): "
                "give one CRL per issuer (partitioned CRLs are not supported)"
            )
        infos.append(info)
    return RevocationList.of(infos)


def too_big(size: int) -> str:
    """Why a revocation list of `size` bytes is refused before it is read."""
    return (
        f"it is {size / 1048576:.1f} MiB, more than the {MAX_CRL_BYTES // 1048576} MiB "
        "accepted (split the CA, or shorten the certificates' lifetime so fewer stay listed)"
    )


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
) -> CrlInfo:
    name = crl.issuer.rfc4514_string()
    where = f"CRL {index} (issuer {name!r})"
    candidates = [s for s in signers if s.subject == crl.issuer and _is_ca(s, for_crl=True)]
    if not candidates:
        raise CrlRejected(f"{where} is not from an issuer we trust")
    signer = next((s for s in candidates if _signed_by(crl, s)), None)
    if signer is None:
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
    try:
        serials = frozenset(r.serial_number for r in crl)
    except ValueError as exc:
        raise CrlRejected(f"{where}: an entry cannot be parsed ({exc})") from None
    return CrlInfo(
        issuer=name,
        number=number,
        this_update=this_update,
        next_update=next_update,
        revoked=len(serials),
        stale=next_update is not None and next_update < now,
        issuer_der=crl.issuer.public_bytes(),
        signer_key=_key_id(signer),
        digest=hashlib.sha256(crl.tbs_certlist_bytes).digest(),
        signer=signer,
        serials=serials,
    )


def _key_id(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


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
    """Is this peer certificate on one of the CRLs? (a dict and a set lookup)"""
    return peer.serial in rl._index.get(peer.issuer, ())


# --- replacing a list: never backwards -------------------------------------------------------


@dataclass(frozen=True)
class Merged:
    """What `merge` decided: the list to use now, and each refusal (empty: all taken)."""

    result: RevocationList
    refused: tuple[str, ...]
    changed: bool  # `result` differs from the list in use


def _backwards(new: CrlInfo, cur: CrlInfo) -> str | None:
    """Why `new` may not replace `cur`, the CRL in use of the same CA (None: it may)."""
    if new.digest == cur.digest:
        return None
    if new.number is not None and cur.number is not None:
        if new.number < cur.number:
            return (
                f"it is older: CRL number {new.number} is lower than {cur.number} of the list "
                "in use"
            )
        if new.number == cur.number:
            return f"it has the CRL number {cur.number} of the list in use, but other content"
    elif new.this_update < cur.this_update:
        return (
            f"it is older (thisUpdate {new.this_update.isoformat()}) than the list in use "
            f"({cur.this_update.isoformat()})"
        )
    if new.stale and not cur.stale:
        return "it is past its nextUpdate, and the list in use is not"
    return None


def _still_trusted(
    crl: CrlInfo, trusted_issuers: Sequence[x509.Certificate], now: dt.datetime
) -> bool:
    """Would a CRL of this CA still be accepted: its signer valid now and trusted (itself, or
    signed by a trusted CA)? An expired intermediate's CRL may go: so did its certificates."""
    signer = crl.signer
    if signer is None:
        return True
    if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
        return False
    return signer in trusted_issuers or any(
        _signed_by(signer, t) for t in trusted_issuers if _is_ca(t, for_crl=False)
    )


def merge(
    current: RevocationList | None,
    new: RevocationList,
    trusted_issuers: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> Merged:
    """The list to use after `new` arrived, compared CA by CA (issuer name and key) with
    `current`: a CRL that goes backwards is refused and the one in use kept; a CA of
    `current` missing from `new` keeps its last CRL while it is still trusted."""
    now = now or dt.datetime.now(dt.UTC)
    if current is None:
        return Merged(new, (), True)
    in_use = {c.key: c for c in current.crls}
    keep: list[CrlInfo] = []
    refused: list[str] = []
    for crl in new.crls:
        cur = in_use.pop(crl.key, None)
        why = _backwards(crl, cur) if cur is not None else None
        if cur is not None and why is not None:
            refused.append(f"the CRL of {crl.issuer!r}: {why}; keeping the one in use")
            keep.append(cur)
        else:
            keep.append(crl)
    for cur in in_use.values():
        if _still_trusted(cur, trusted_issuers, now):
            number = f"CRL number {cur.number}" if cur.number is not None else "the last one"
            refused.append(
                f"the CRL of {cur.issuer!r}, an issuer still trusted, is missing from the new "
                f"list; keeping the last accepted one ({number})"
            )
            keep.append(cur)
    changed = [c.digest for c in keep] != [c.digest for c in current.crls]
    return Merged(RevocationList.of(keep) if changed else current, tuple(refused), changed)


# --- to the workers: serials only ------------------------------------------------------------


def compact(rl: RevocationList) -> tuple[list[dict[str, str | int]], bytes]:
    """The revoked serials for a worker: one header per issuer name (its DER in hex, the
    serial width in bytes, how many) and the serials as fixed-width big-endian integers."""
    headers: list[dict[str, str | int]] = []
    parts: list[bytes] = []
    for issuer, serials in rl._index.items():
        width = max((s.bit_length() + 7) // 8 for s in serials) if serials else 1
        headers.append({"issuer": issuer.hex(), "width": width, "count": len(serials)})
        parts.append(b"".join(s.to_bytes(width, "big") for s in serials))
    return headers, b"".join(parts)


def from_compact(
    headers: Sequence[object], payload: bytes, step: int = COMPACT_STEP
) -> Generator[None, None, RevocationList]:
    """Rebuild what `compact` made, `step` serials at a time: the caller resumes the
    generator from its event loop until it returns the list (ValueError on a bad form)."""
    index: dict[bytes, Set[int]] = {}
    view = memoryview(payload)
    at = 0
    from_bytes = int.from_bytes
    for h in headers:
        if not isinstance(h, Mapping):
            raise ValueError("malformed revocation list header")
        issuer, width, count = h.get("issuer"), h.get("width"), h.get("count")
        if not (isinstance(issuer, str) and isinstance(width, int) and isinstance(count, int)):
            raise ValueError("malformed revocation list header")
        if width < 1 or count < 0 or at + width * count > len(payload):
            raise ValueError("revocation list payload shorter than its headers say")
        serials: set[int] = set()
        for first in range(0, count, step):
            stop = at + width * min(count, first + step)
            start = at + width * first
            serials.update(from_bytes(view[i : i + width]) for i in range(start, stop, width))
            yield
        at += width * count
        index[bytes.fromhex(issuer)] = serials
    if at != len(payload):
        raise ValueError("revocation list payload longer than its headers say")
    return RevocationList(crls=(), _index=index)
