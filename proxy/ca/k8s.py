"""Kubernetes service-account tokens as enrolment credentials: verify the JWT, name the identity.

A pod's projected service-account token (audience `mtls-sidecar`) is checked with PyJWT
against the cluster's service-account issuer keys (a JWKS file, or the JWKS named by the
issuer's OpenID discovery document), then mapped to
`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. `verify_sa_token` is pure;
`JwksSource` and `SaVerifier` do the (cached) fetching.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import ProxyError
from .issuer import validate_spiffe_id
from .tokens import TOKEN_VERSION

log = logging.getLogger("mtls.ca.k8s")

AUDIENCE = "mtls-sidecar"
# Asymmetric algorithms only: an HMAC or "none" token proves nothing about the cluster.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
LEEWAY_SECONDS = 30  # clock skew between the API server and the CA
MIN_REFRESH_SECONDS = 10.0  # an unknown kid refetches the keys at most this often
MAX_KEYS_AGE_SECONDS = 3600.0  # keys fetched from the issuer are refreshed at least hourly
FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 256 * 1024

_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
_B64URL_PART = re.compile(r"^[A-Za-z0-9_-]+$")
# Namespaces are DNS labels; service-account names DNS subdomains (RFC 1123, lowercase).
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SA_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class SaTokenRejected(ProxyError):
    """A service-account token that does not allow enrolment; `status` is the HTTP answer."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        self.status = status
        super().__init__(message)


class UnknownKey(SaTokenRejected):
    """The token's key id is not among the keys we hold (they may need refreshing)."""


class KeysUnavailable(ProxyError):
    """The cluster's keys could not be read or fetched."""


@dataclass(frozen=True)
class SaClaims:
    """What a valid service-account token says."""

    identity: str
    namespace: str
    service_account: str
    pod: str | None
    jti: str | None
    expires_at: float

    def requester(self) -> str:
        """How the issuance log names this credential."""
        parts = [f"service account {self.namespace}/{self.service_account}"]
        if self.pod:
            parts.append(f"pod={self.pod}")
        if self.jti:
            parts.append(f"jti={self.jti}")
        return " ".join(parts)


def looks_like_jwt(token: str) -> bool:
    """True for three dot-separated base64url parts that are not one of our join tokens."""
    parts = token.strip().split(".")
    return (
        len(parts) == 3
        and parts[0] != TOKEN_VERSION
        and all(_B64URL_PART.match(p) for p in parts[:2])
        # an unsigned ("alg": "none") JWT has an empty third part: still a JWT, refused later
        and (parts[2] == "" or _B64URL_PART.match(parts[2]) is not None)
    )


def parse_jwks(data: bytes | str, where: str) -> list[jwt.PyJWK]:
    """The usable signing keys of a JWKS document, or KeysUnavailable saying what is wrong."""
    try:
        raw: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeysUnavailable(f"{where} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise KeysUnavailable(f'{where} is not a JWKS (expected {{"keys": [...]}})')
    keys = []
    for item in raw["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        if item.get("kty") not in ("RSA", "EC"):
            continue  # a symmetric ("oct") key would let anyone holding it sign tokens
        # Only the public half is ever needed; a published private member is ignored.
        public = {k: v for k, v in item.items() if k not in _PRIVATE_MEMBERS}
        try:
            keys.append(jwt.PyJWK(public))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue  # a key type we cannot use is skipped, as OIDC clients do
    if not keys:
        raise KeysUnavailable(f"{where} holds no usable signing key")
    return keys


def _when(ts: float) -> str:
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()
    except (ValueError, OverflowError, OSError):  # an absurd claim from an untrusted token
        return repr(ts)


def verify_sa_token(
    token: str,
    keys: Sequence[jwt.PyJWK],
    *,
    issuer: str,
    trust_domain: str,
    audience: str = AUDIENCE,
) -> SaClaims:
    """Check signature, issuer, audience, expiry and the service-account claims of `token`.

    Raises UnknownKey when no key of `keys` has the token's key id, and SaTokenRejected
    (401, or 403 for a valid token naming an unusable identity) for everything else.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:  # DecodeError, or a bad "crit"/"b64" header
        raise SaTokenRejected(f"service-account token is malformed ({exc})") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise SaTokenRejected(
            f"service-account token algorithm {alg!r} is not accepted "
            f"(one of {', '.join(ALGORITHMS)})"
        )
    kid = header.get("kid")
    candidates = [k for k in keys if kid is None or k.key_id == kid]
    if not candidates:
        raise UnknownKey(
            f"service-account token is signed with key id {kid!r}, which is not among the "
            "cluster's service-account issuer keys"
        )
    family = rsa.RSAPublicKey if alg[0] in "RP" else ec.EllipticCurvePublicKey
    candidates = [k for k in candidates if isinstance(k.key, family)]
    if not candidates:
        raise SaTokenRejected(
            f"service-account token algorithm {alg} does not fit the type of the cluster's "
            f"key {kid!r}"
        )
    payload: dict[str, Any] | None = None
    last: Exception | None = None
    for key in candidates:
        try:
            payload = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
            break
        except jwt.InvalidSignatureError as exc:
            last = exc  # try the next key with this kid (or without one)
        except jwt.ExpiredSignatureError:
            exp = _unverified(token).get("exp")
            when = _when(float(exp)) if isinstance(exp, int | float) else "?"
            raise SaTokenRejected(f"service-account token expired at {when}") from None
        except jwt.ImmatureSignatureError:
            raise SaTokenRejected("service-account token is not valid yet (nbf/iat)") from None
        except jwt.InvalidAudienceError:
            aud = _unverified(token).get("aud")
            raise SaTokenRejected(
                f"service-account token audience is {aud!r}, not {audience!r} "
                f"(project the token with audience: {audience})"
            ) from None
        except jwt.InvalidIssuerError:
            iss = _unverified(token).get("iss")
            raise SaTokenRejected(
                f"service-account token issuer {iss!r} is not this cluster's {issuer!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise SaTokenRejected(f"service-account token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
            last = exc  # e.g. an ES384 token for a P-256 key
        except jwt.InvalidTokenError as exc:
            raise SaTokenRejected(f"service-account token is invalid ({exc})") from None
    if payload is None:
        raise SaTokenRejected(
            "service-account token signature does not verify with the cluster's key "
            f"{kid!r} ({type(last).__name__})"
        )
    return _claims(payload, trust_domain)


def _unverified(token: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return data


def _claims(payload: dict[str, Any], trust_domain: str) -> SaClaims:
    k8s = payload.get("kubernetes.io")
    sub = payload.get("sub")
    ns = sa = None
    pod: str | None = None
    if isinstance(k8s, dict):
        ns = k8s.get("namespace")
        account = k8s.get("serviceaccount")
        sa = account.get("name") if isinstance(account, dict) else None
        pod_claim = k8s.get("pod")
        if isinstance(pod_claim, dict) and isinstance(pod_claim.get("name"), str):
            pod = pod_claim["name"]
    if ns is None and sa is None and isinstance(sub, str):
        fields = sub.split(":")
        if len(fields) == 4 and fields[:2] == ["system", "serviceaccount"]:
            ns, sa = fields[2], fields[3]
    if not isinstance(ns, str) or not isinstance(sa, str):
        raise SaTokenRejected(
            "service-account token names no namespace and service account "
            "(claims kubernetes.io.namespace/serviceaccount.name or sub)",
            status=403,
        )
    if sub is not None and sub != f"system:serviceaccount:{ns}:{sa}":
        raise SaTokenRejected(
            f"service-account token claims disagree: sub {sub!r} but kubernetes.io names {ns}/{sa}",
            status=403,
        )
    if not _NAMESPACE.match(ns) or not _SA_NAME.match(sa):
        raise SaTokenRejected(
            f"service-account token names an invalid namespace or account {ns!r}/{sa!r}",
            status=403,
        )
    identity = f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
    try:
        validate_spiffe_id(identity)
    except ValueError as exc:
        raise SaTokenRejected(
            f"service account gives no valid identity: {exc}", status=403
        ) from None
    jti = payload.get("jti")
    return SaClaims(
        identity=identity,
        namespace=ns,
        service_account=sa,
        pod=pod,
        jti=jti if isinstance(jti, str) else None,
        expires_at=float(payload["exp"]),
    )


class JwksSource:
    """The cluster's service-account keys: from a file (re-read when it changes) or from the
    issuer's discovery document (cached; refetched on an unknown key id, at most every
    MIN_REFRESH_SECONDS, and at least every MAX_KEYS_AGE_SECONDS)."""

    def __init__(
        self,
        *,
        issuer: str,
        jwks_file: Path | None = None,
        ca_file: Path | None = None,
        bearer_file: Path | None = None,
        min_refresh: float = MIN_REFRESH_SECONDS,
    ) -> None:
        self.issuer = issuer
        self.min_refresh = min_refresh
        self.jwks_file = jwks_file
        self.ca_file = ca_file
        self.bearer_file = bearer_file
        self._keys: list[jwt.PyJWK] = []
        self._stamp: tuple[int, int] | None = None
        self._fetched = -float("inf")  # monotonic time of the last fetch attempt
        self._fetched_ok = -float("inf")
        self._lock = asyncio.Lock()
        if jwks_file is not None:
            self._read_file()  # a bad file fails `ca serve` at start

    def _read_file(self) -> None:
        assert self.jwks_file is not None
        path = self.jwks_file
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp == self._stamp:
                return
            data = path.read_bytes()
        except OSError as exc:
            raise KeysUnavailable(f"--k8s-jwks {path}: {exc.strerror or exc}") from None
        self._keys = parse_jwks(data, f"--k8s-jwks {path}")
        self._stamp = stamp
        log.info("service-account keys read from %s: %d key(s)", path, len(self._keys))

    async def keys(self, *, refresh: bool = False) -> list[jwt.PyJWK]:
        """The keys to verify with; `refresh` asks for a new copy (an unknown kid was seen)."""
        if self.jwks_file is not None:
            try:
                self._read_file()
            except KeysUnavailable as exc:
                if not self._keys:
                    raise
                log.error("%s; keeping the keys read before", exc)
            return self._keys
        async with self._lock:
            now = time.monotonic()
            stale = not self._keys or now - self._fetched_ok > MAX_KEYS_AGE_SECONDS
            due = (refresh or stale) and now - self._fetched >= self.min_refresh
            if due or not self._keys:
                self._fetched = now
                try:
                    self._keys = await self._fetch()
                    self._fetched_ok = now
                except KeysUnavailable as exc:
                    if not self._keys:
                        raise
                    log.error("%s; keeping the keys fetched before", exc)
            return self._keys

    async def _fetch(self) -> list[jwt.PyJWK]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        headers = {}
        if self.bearer_file is not None:
            try:
                headers["Authorization"] = "Bearer " + self.bearer_file.read_text().strip()
            except OSError as exc:
                raise KeysUnavailable(f"--k8s-token-file: {exc.strerror or exc}") from None
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        discovery = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
                doc = await _get_json(session, discovery, ctx)
                if doc.get("issuer") != self.issuer:
                    raise KeysUnavailable(
                        f"{discovery} names issuer {doc.get('issuer')!r}, not {self.issuer!r}"
                    )
                uri = doc.get("jwks_uri")
                if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                    raise KeysUnavailable(f"{discovery} has no usable jwks_uri")
                async with session.get(uri, ssl=ctx) as resp:
                    if resp.status != 200:
                        raise KeysUnavailable(f"{uri} answered HTTP {resp.status}")
                    data = await resp.content.read(MAX_JWKS_BYTES + 1)
                    if len(data) > MAX_JWKS_BYTES:
                        raise KeysUnavailable(f"{uri} is larger than {MAX_JWKS_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise KeysUnavailable(
                f"cannot fetch the service-account keys of {self.issuer}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        keys = parse_jwks(data, uri)
        log.info("service-account keys fetched from %s: %d key(s)", uri, len(keys))
        return keys


async def _get_json(
    session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext
) -> dict[str, Any]:
    async with session.get(url, ssl=ctx) as resp:
        if resp.status != 200:
            raise KeysUnavailable(f"{url} answered HTTP {resp.status}")
        data = await resp.content.read(MAX_JWKS_BYTES + 1)
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeysUnavailable(f"{url} is not JSON") from None
    if not isinstance(doc, dict):
        raise KeysUnavailable(f"{url} is not a JSON object")
    return doc


class SaVerifier:
    """Verifies service-account tokens for one trust domain with keys from a JwksSource."""

    def __init__(self, source: JwksSource, *, trust_domain: str, audience: str = AUDIENCE):
        self.source = source
        self.trust_domain = trust_domain
        self.audience = audience

    async def verify(self, token: str) -> SaClaims:
        """The token's claims, or SaTokenRejected (503 when the keys cannot be had)."""
        try:
            keys = await self.source.keys()
        except KeysUnavailable as exc:
            raise SaTokenRejected(str(exc), status=503) from None
        args = {"issuer": self.source.issuer, "trust_domain": self.trust_domain}
        try:
            return verify_sa_token(token, keys, audience=self.audience, **args)
        except UnknownKey:
            # The cluster may have rotated its signing key since we fetched: look again.
            try:
                keys = await self.source.keys(refresh=True)
            except KeysUnavailable as exc:
                raise SaTokenRejected(str(exc), status=503) from None
            return verify_sa_token(token, keys, audience=self.audience, **args)
