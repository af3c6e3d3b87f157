"""Join tokens: HMAC-signed, identity-bound, expiring; single use is kept by the store (db)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from ..errors import ProxyError
from .issuer import validate_spiffe_id

TOKEN_VERSION = "mtlsjt1"
MAX_TOKEN_LENGTH = 2048
_MAC_CONTEXT = b"mtls-sidecar join token v1\x00"


class TokenRejected(ProxyError):
    """A join token that does not allow enrolment; the message says why."""


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token says: who may enrol, until when, and its single-use nonce."""

    identity: str
    expires_at: float
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload_b64: str) -> bytes:
    return hmac.new(secret, _MAC_CONTEXT + payload_b64.encode("ascii"), hashlib.sha256).digest()


def new_secret() -> bytes:
    """A fresh 256-bit token-signing secret."""
    return secrets.token_bytes(32)


def make_token(secret: bytes, identity: str, ttl: float, *, now: float | None = None) -> str:
    """A token letting one workload enrol as `identity` within `ttl` seconds.

    Format: `mtlsjt1.<base64url JSON {id, exp, n}>.<base64url HMAC-SHA256>`.
    """
    validate_spiffe_id(identity)
    if ttl <= 0:
        raise ValueError("token lifetime must be positive")
    now = time.time() if now is None else now
    payload = {"id": identity, "exp": int(now + ttl), "n": secrets.token_hex(16)}
    payload_b64 = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{TOKEN_VERSION}.{payload_b64}.{_b64(_mac(secret, payload_b64))}"


def verify_token(secret: bytes, token: str, *, now: float | None = None) -> TokenClaims:
    """Check a token's MAC and expiry; return its claims or raise TokenRejected."""
    if not isinstance(token, str) or not token:
        raise TokenRejected("token is missing")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected("token is too long")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise TokenRejected(f"token is not a {TOKEN_VERSION} join token")
    _, payload_b64, mac_b64 = parts
    try:
        mac = _unb64(mac_b64)
        expected = _mac(secret, payload_b64)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise TokenRejected("token is malformed") from None
    if not hmac.compare_digest(mac, expected):
        raise TokenRejected("token signature is invalid (forged, or made by another CA)")
    try:
        payload = json.loads(_unb64(payload_b64))
        identity = payload["id"]
        expires_at = float(payload["exp"])
        nonce = payload["n"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise TokenRejected("token payload is malformed") from None
    if not isinstance(identity, str) or not isinstance(nonce, str):
        raise TokenRejected("token payload is malformed")
    # float() takes "nan", "inf" and huge numbers: a NaN expiry would never expire, and
    # gmtime() of an out-of-range one raises. Only a real Unix time is an expiry.
    if not isinstance(payload["exp"], int | float) or not 0 <= expires_at < 1e11:
        raise TokenRejected("token payload is malformed")
    try:
        validate_spiffe_id(identity)
    except ValueError as exc:
        raise TokenRejected(f"token names an invalid identity: {exc}") from None
    now = time.time() if now is None else now
    if expires_at <= now:
        expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        raise TokenRejected(f"token for {identity} expired at {expired}")
    return TokenClaims(identity=identity, expires_at=expires_at, nonce=nonce)
