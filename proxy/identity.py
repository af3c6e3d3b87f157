"""SPIFFE identities: parse and print SPIFFE IDs, and read them out of certificates (no I/O)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from cryptography import x509

MAX_SPIFFE_ID_LENGTH = 2048
"""The SPIFFE ID spec caps the whole URI at 2048 bytes."""

MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_SCHEME = "spiffe://"


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path ('' or '/seg/seg...').

    Build one with `parse_spiffe_id`; `str()` gives the canonical 'spiffe://td/path' form.
    """

    trust_domain: str
    path: str = ""

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


def parse_trust_domain(text: str) -> str:
    """Check a bare trust domain name (e.g. 'corp.example') and return it.

    Raises ValueError saying what is wrong. Only lower-case letters, digits, '.', '-'
    and '_' are allowed, as the SPIFFE ID spec requires.
    """
    if not text:
        raise ValueError("the trust domain is empty")
    if text.lower().startswith(_SCHEME):
        raise ValueError(
            f"expected a bare trust domain like 'corp.example', not a SPIFFE ID ({text!r})"
        )
    if len(text) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(
            f"the trust domain is {len(text)} characters long; at most "
            f"{MAX_TRUST_DOMAIN_LENGTH} are allowed"
        )
    if ":" in text:
        raise ValueError(f"the trust domain {text!r} may not carry a port (no ':')")
    if "@" in text:
        raise ValueError(f"the trust domain {text!r} may not carry user info (no '@')")
    if not _TRUST_DOMAIN_RE.fullmatch(text):
        bad = _first_bad_char(text, _TRUST_DOMAIN_RE)
        hint = " (upper-case letters are not allowed)" if bad.isupper() else ""
        raise ValueError(
            f"the trust domain {text!r} contains {bad!r}{hint}; only lower-case letters, "
            "digits, '.', '-' and '_' are allowed"
        )
    return text


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse a SPIFFE ID such as 'spiffe://corp.example/ns/shop/sa/web'.

    Follows the SPIFFE ID spec: scheme 'spiffe' (any case), a lower-case trust domain,
    no port, user info, query or fragment, path segments that are non-empty, made of
    letters, digits, '.', '-' and '_', and not '.' or '..', no trailing slash, and at
    most 2048 bytes in all. Raises ValueError saying exactly what is wrong.
    """
    if not text:
        raise ValueError("the SPIFFE ID is empty")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_LENGTH:
        raise ValueError(
            f"the SPIFFE ID is longer than {MAX_SPIFFE_ID_LENGTH} bytes ({len(text)} characters)"
        )
    if text[: len(_SCHEME)].lower() != _SCHEME:
        if "://" in text:
            scheme = text.split("://", 1)[0]
            raise ValueError(
                f"{_short(text)} has scheme {scheme!r}; a SPIFFE ID starts with 'spiffe://'"
            )
        raise ValueError(f"{_short(text)} does not start with 'spiffe://'")
    rest = text[len(_SCHEME) :]
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise ValueError(f"{_short(text)} has {what} ({char!r}); SPIFFE IDs may not")
    if "%" in rest:
        raise ValueError(f"{_short(text)} is percent-encoded ('%'); SPIFFE IDs may not be")
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if not authority:
        raise ValueError(f"{_short(text)} has no trust domain after 'spiffe://'")
    try:
        parse_trust_domain(authority)
    except ValueError as exc:
        raise ValueError(f"{_short(text)}: {exc}") from None
    if path:
        _check_path(text, path)
    return SpiffeId(authority, path)


def _check_path(text: str, path: str) -> None:
    if path == "/":
        raise ValueError(f"{_short(text)} ends with '/'; drop the trailing slash")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                raise ValueError(f"{_short(text)} ends with '/'; drop the trailing slash")
            raise ValueError(f"{_short(text)} has an empty path segment ('//')")
        if segment in (".", ".."):
            raise ValueError(f"{_short(text)} has a {segment!r} path segment; it is not allowed")
        if not _SEGMENT_RE.fullmatch(segment):
            bad = _first_bad_char(segment, _SEGMENT_RE)
            raise ValueError(
                f"{_short(text)} has {bad!r} in path segment {segment!r}; only letters, "
                "digits, '.', '-' and '_' are allowed"
            )


def _first_bad_char(text: str, allowed: re.Pattern[str]) -> str:
    for char in text:
        if not allowed.fullmatch(char):
            return char
    return text[:1]  # pragma: no cover - only called when something did not match


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _certificate(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _is_spiffe(uri: str) -> bool:
    return uri[: len(_SCHEME)].lower() == _SCHEME


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def svid_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID leaf, judged by the X509-SVID rules.

    The certificate must carry exactly one URI SAN, that URI must be a valid SPIFFE ID
    (`parse_spiffe_id`), and it must not be a CA (basicConstraints CA:TRUE). Raises
    ValueError saying every rule it breaks, phrased to follow "certificate ...", e.g.
    "has 2 SPIFFE IDs (...); an X509-SVID has exactly one URI SAN". Validity dates are
    not judged here: they depend on the time (see material.py and the TLS handshake).
    """
    try:
        uris = _uri_sans(cert)
        is_ca = _is_ca(cert)
    except ValueError as exc:  # a malformed or duplicated extension
        raise ValueError(f"has extensions that cannot be parsed ({exc})") from None
    problems: list[str] = []
    sid: SpiffeId | None = None
    spiffe = [uri for uri in uris if _is_spiffe(uri)]
    others = [uri for uri in uris if not _is_spiffe(uri)]
    listed = ", ".join(_short(uri) for uri in uris)
    if not uris:
        problems.append("has no URI SAN, so no SPIFFE ID; an X509-SVID has exactly one URI SAN")
    elif len(spiffe) > 1:
        problems.append(
            f"has {len(spiffe)} SPIFFE IDs ({listed}); an X509-SVID has exactly one URI SAN"
        )
    elif not spiffe:
        problems.append(
            f"has no spiffe:// URI SAN, only {listed}; an X509-SVID has exactly one URI SAN, "
            "its SPIFFE ID"
        )
    elif others:
        problems.append(
            f"has URI SANs besides its SPIFFE ID ({listed}); an X509-SVID has exactly one URI SAN"
        )
    else:
        try:
            sid = parse_spiffe_id(spiffe[0])
        except ValueError as exc:
            problems.append(f"has an invalid SPIFFE ID: {exc}")
    if is_ca:
        problems.append("is a CA certificate (basicConstraints CA:TRUE); an X509-SVID leaf is not")
    if problems or sid is None:
        raise ValueError("; ".join(problems))
    return sid


@functools.lru_cache(maxsize=4096)
def spiffe_id_from_der(der: bytes) -> SpiffeId | None:
    """The SPIFFE ID of a DER certificate (a peer's), by the X509-SVID rules.

    None when the certificate cannot be parsed or is not a valid X509-SVID leaf (see
    `svid_spiffe_id`: not exactly one URI SAN, an invalid SPIFFE ID, or CA:TRUE), so the
    peer has no identity and is refused. Results are cached (bounded LRU), since this
    runs once per connection.
    """
    cert = _certificate(der)
    if cert is None:
        return None
    try:
        return svid_spiffe_id(cert)
    except ValueError:
        return None


def describe_cert_der(der: bytes) -> str:
    """One human line about a DER certificate, for log messages.

    E.g. "certificate for spiffe://x/y issued by 'CN=Other CA', valid until
    2026-01-01T00:00:00+00:00", or for one that is no valid X509-SVID "certificate for
    subject 'CN=web' (has no URI SAN, ...) issued by ...". Never raises.
    """
    cert = _certificate(der)
    if cert is None:
        return f"unparseable certificate ({len(der)} bytes)"
    try:
        who = str(svid_spiffe_id(cert))
    except ValueError as exc:
        who = f"subject {_rfc4514(cert, issuer=False)!r} ({exc})"
    until = cert.not_valid_after_utc.isoformat()
    return f"certificate for {who} issued by {_rfc4514(cert, issuer=True)!r}, valid until {until}"


def _rfc4514(cert: x509.Certificate, *, issuer: bool) -> str:
    try:
        return (cert.issuer if issuer else cert.subject).rfc4514_string()
    except ValueError:
        return "?"
