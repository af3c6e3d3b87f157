"""May this peer connect? SPIFFE ID patterns and the inbound/outbound identity checks (pure)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import PolicyDenied
from .identity import SpiffeId, parse_spiffe_id

# What a certificate without an identity (None from identity.spiffe_id_from_der) lacks.
NOT_SVID = "is not a valid X509-SVID (that is: exactly one URI SAN, a valid SPIFFE ID, not a CA)"

_ONE = "*"
_REST = "**"


def _compile(text: str) -> tuple[str, str, re.Pattern[str]]:
    """Validate a pattern; return (canonical text, trust domain, regex over the ID's path)."""
    if not text:
        raise ValueError("the SPIFFE ID pattern is empty")
    scheme, sep, rest = text.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "*" in authority:
        raise ValueError(
            f"pattern {text!r}: the trust domain may not be a wildcard; "
            "'*' and '**' only stand for path segments"
        )
    segments = path.split("/") if slash else []
    for index, segment in enumerate(segments):
        if segment == _REST and index != len(segments) - 1:
            raise ValueError(f"pattern {text!r}: '**' may only be the last path segment")
        if "*" in segment and segment not in (_ONE, _REST):
            raise ValueError(
                f"pattern {text!r}: segment {segment!r} mixes '*' with other characters; "
                "'*' must be a whole path segment"
            )
    # Wildcards replaced by a valid segment, so the SPIFFE ID parser checks everything else.
    literal = "".join("/" + ("x" if "*" in s else s) for s in segments)
    try:
        base = parse_spiffe_id(scheme + sep + authority + literal if sep else text)
    except ValueError as exc:
        raise ValueError(f"pattern {text!r}: {exc}") from None
    parts: list[str] = []
    for segment in segments:
        if segment == _ONE:
            parts.append("/[^/]+")
        elif segment == _REST:
            parts.append("(?:/.*)?")
        else:
            parts.append(re.escape("/" + segment))
    canonical = str(SpiffeId(base.trust_domain, "".join("/" + s for s in segments)))
    return canonical, base.trust_domain, re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True)
class SpiffePattern:
    """A SPIFFE ID pattern: a SPIFFE ID whose path segments may be '*' (exactly one
    segment) and whose last segment may be '**' (any rest, including nothing).

    'spiffe://td/**' matches 'spiffe://td' and 'spiffe://td/a/b'. Construction validates
    and precompiles the pattern (ValueError if invalid); `parse_pattern` is the usual way.
    """

    text: str
    _trust_domain: str = field(init=False, repr=False, compare=False)
    _path_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        canonical, trust_domain, path_re = _compile(self.text)
        object.__setattr__(self, "text", canonical)
        object.__setattr__(self, "_trust_domain", trust_domain)
        object.__setattr__(self, "_path_re", path_re)

    def __str__(self) -> str:
        return self.text

    @property
    def trust_domain(self) -> str:
        """The (literal) trust domain this pattern applies to."""
        return self._trust_domain

    def matches(self, sid: SpiffeId) -> bool:
        """Whether `sid` is one of the identities this pattern stands for."""
        return sid.trust_domain == self._trust_domain and (
            self._path_re.fullmatch(sid.path) is not None
        )


def parse_pattern(text: str) -> SpiffePattern:
    """Parse a SPIFFE ID pattern such as 'spiffe://corp.example/ns/shop/*/**'.

    Raises ValueError saying what is wrong: '**' only as the last segment, no wildcard
    trust domain, '*' only as a whole segment, and the SPIFFE ID rules for the rest.
    """
    return SpiffePattern(text)


def parse_patterns(text: str) -> list[SpiffePattern]:
    """Parse a comma-separated list of patterns (whitespace around items ignored)."""
    items = [item.strip() for item in text.split(",")]
    return [parse_pattern(item) for item in items if item]


class InboundPolicy:
    """Decides whether an authenticated inbound peer may connect.

    With no patterns, any identity of `trust_domain` may connect; otherwise the peer
    must match at least one pattern (MTLS_ALLOW_PEERS).
    """

    def __init__(self, patterns: Sequence[SpiffePattern], trust_domain: str) -> None:
        self.patterns = tuple(patterns)
        self.trust_domain = trust_domain
        # One alternation per trust domain: a single regex call per connection.
        by_domain: dict[str, list[str]] = {}
        for pattern in self.patterns:
            by_domain.setdefault(pattern.trust_domain, []).append(pattern._path_re.pattern)
        self._by_domain = {
            domain: re.compile("|".join(f"(?:{p})" for p in regexes), re.DOTALL)
            for domain, regexes in by_domain.items()
        }

    def allows(self, peer: SpiffeId) -> bool:
        """Whether `peer` may connect (no exception, for callers that only count)."""
        if not self.patterns:
            return peer.trust_domain == self.trust_domain
        regex = self._by_domain.get(peer.trust_domain)
        return regex is not None and regex.fullmatch(peer.path) is not None

    def check(self, peer: SpiffeId | None) -> None:
        """Return if `peer` may connect; raise PolicyDenied otherwise.

        reason 'bad_cert' when the certificate is no valid X509-SVID (`peer` None),
        'peer_not_allowed' when the identity is not allowed.
        """
        if peer is None:
            raise PolicyDenied("bad_cert", f"peer certificate {NOT_SVID}")
        if self.allows(peer):
            return
        if self.patterns:
            allowed = ", ".join(p.text for p in self.patterns)
            message = f"peer identity {peer} is not in MTLS_ALLOW_PEERS ({allowed})"
        else:
            message = (
                f"peer identity {peer} is not in trust domain {self.trust_domain} "
                "(MTLS_ALLOW_PEERS is empty, so only that trust domain is allowed)"
            )
        raise PolicyDenied("peer_not_allowed", message)


def check_outbound(peer: SpiffeId | None, expected: SpiffeId | None, trust_domain: str) -> None:
    """Check the identity a remote presented on an outbound connection.

    If `expected` is given the peer must be exactly that identity, otherwise any identity
    of `trust_domain`. Raises PolicyDenied('identity_mismatch', ...) when it is not, and
    PolicyDenied('bad_cert', ...) when the certificate is no valid X509-SVID (`peer` None).
    """
    if peer is None:
        wanted = str(expected) if expected is not None else f"an identity of {trust_domain}"
        raise PolicyDenied("bad_cert", f"remote certificate {NOT_SVID}, but {wanted} was expected")
    if expected is not None:
        if peer != expected:
            raise PolicyDenied(
                "identity_mismatch", f"remote presented {peer} but {expected} was expected"
            )
    elif peer.trust_domain != trust_domain:
        raise PolicyDenied(
            "identity_mismatch",
            f"remote presented {peer} but an identity of trust domain {trust_domain} was expected",
        )
