"""Identity from the internal CA: enrol with a join token, renew over mTLS, follow the bundle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from ..ca.issuer import cert_pem, fingerprint, key_pem, make_csr, new_key, validate_spiffe_id
from ..ca.memcert import load_cert_chain_from_memory
from ..errors import CertError
from ..material import Material, load_material, read_file
from ..metrics import CERT_RENEWALS, CRL_RELOADS
from ..revocation import MAX_CRL_BYTES, too_big

log = logging.getLogger("mtls.certsource.ca")

_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
# Renew at 2/3 of the lifetime, spread by +-10% so a fleet started together does not renew
# together.
RENEW_FRACTION = 2 / 3
JITTER = 0.10
BACKOFF_BASE = 1.0


class CaRefused(CertError):
    """The CA answered and said no (HTTP 4xx), or could not be authenticated."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class CaTooBig(CertError):
    """The CA's answer is larger than we accept (a revocation list over MAX_CRL_BYTES)."""

    def __init__(self, size: int) -> None:
        self.size = size  # what it announced, or what was read before giving up
        super().__init__(f"an answer of at least {size} bytes")


class CaUnavailable(CertError):
    """The CA could not be reached or failed (connection error, timeout, 5xx): retry later."""


def normalize_fingerprint(text: str) -> str:
    """Accept 'AB:CD:..' or 'abcd..' forms of a sha256 fingerprint; return 64 lowercase hex."""
    fp = text.strip().lower().replace(":", "")
    if not _FINGERPRINT_RE.match(fp):
        raise CertError(f"CA fingerprint {text!r} is not a sha256 fingerprint (64 hex digits)")
    return fp


def _client_context(cadata: bytes | None) -> ssl.SSLContext:
    if cadata is None:
        # First contact only, and only to read the roots: what we read is trusted solely
        # if one of them has the pinned fingerprint.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cadata=cadata.decode("ascii"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class CaSource:
    """The sidecar's certificate, obtained from and renewed by the `ca serve` service.

    The private key is generated in memory for each certificate and never written to disk.
    The CA is trusted on first contact only through `fingerprint` (sha256 of a root's DER);
    afterwards through the trust bundle the CA served over that authenticated channel, so a
    root rotation carries over. Each new Material is handed to `on_update`.
    """

    def __init__(
        self,
        url: str,
        token: str,
        fingerprint: str,
        identity: str,
        *,
        on_update: Callable[[Material], None],
        on_crl: Callable[[bytes], None] | None = None,
        token_file: Path | None = None,
        bundle_refresh: float = 300.0,
        backoff_cap: float = 60.0,
        request_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if not url.startswith("https://"):
            raise CertError(f"CA URL {url!r} must start with https://")
        try:
            validate_spiffe_id(identity)
        except ValueError as exc:
            raise CertError(str(exc)) from None
        self.url = url.rstrip("/")
        self.identity = identity
        self._token = token.strip()
        self._fingerprint = normalize_fingerprint(fingerprint)
        self._on_update = on_update
        self._on_crl = on_crl
        self._token_file = token_file
        self._wake = asyncio.Event()
        self._bundle_refresh = bundle_refresh
        self._backoff_cap = backoff_cap
        self._timeout = request_timeout
        self._rng = rng or random.Random()
        self._ca_roots: bytes | None = None  # PEM roots we verify the CA service against
        self._material: Material | None = None

    def set_token(self, token: str) -> None:
        """Use another join token for the next enrolment (a refreshed token file)."""
        self._token = token.strip()

    @property
    def material(self) -> Material | None:
        """The current certificate, key and bundle, or None before enrolment."""
        return self._material

    # -- HTTP -----------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        ctx: ssl.SSLContext,
        what: str,
        body: dict[str, str] | None = None,
        limit: int | None = None,
    ) -> bytes:
        """The body of a 200 answer; CaUnavailable/CaRefused otherwise. A body over `limit`
        bytes is refused (CaTooBig) without being read to its end."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                session.request(method, self.url + path, json=body) as resp,
            ):
                status = resp.status
                if limit is None or status != 200:
                    data = await resp.read()
                else:
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        buf += chunk
                        if len(buf) > limit:
                            raise CaTooBig(max(resp.content_length or 0, len(buf)))
                    data = bytes(buf)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CaRefused(
                0, f"{what}: the CA at {self.url} failed TLS verification ({exc.certificate_error})"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise CaUnavailable(f"{what}: CA at {self.url} unreachable ({detail})") from None
        if status == 200:
            return data
        try:
            message = str(json.loads(data)["error"])
        except (ValueError, KeyError, TypeError):
            message = data[:200].decode("utf-8", "replace")
        if status >= 500:
            raise CaUnavailable(f"{what}: CA at {self.url} failed ({status}): {message}")
        raise CaRefused(status, f"{what}: CA at {self.url} refused ({status}): {message}")

    async def _pin(self) -> bytes:
        """The roots to verify the CA against, pinned through the fingerprint on first use."""
        if self._ca_roots is not None:
            return self._ca_roots
        offered = self._parse_roots(
            await self._request("GET", "/v1/bundle", _client_context(None), "reading CA roots"),
            "first-contact bundle",
        )
        pinned = [r for r in offered if fingerprint(r) == self._fingerprint]
        if not pinned:
            raise CaRefused(
                0,
                f"the CA at {self.url} offers no root with fingerprint {self._fingerprint} "
                f"(it offers: {', '.join(fingerprint(r) for r in offered)}); "
                "check MTLS_CA_FINGERPRINT",
            )
        # Now over TLS verified against the pinned root alone: this copy is authentic.
        bundle = await self._request(
            "GET", "/v1/bundle", _client_context(cert_pem(pinned[0])), "fetching the trust bundle"
        )
        self._parse_roots(bundle, "trust bundle")
        self._ca_roots = bundle
        return bundle

    def _parse_roots(self, data: bytes, what: str) -> list[x509.Certificate]:
        try:
            roots = x509.load_pem_x509_certificates(data)
        except ValueError:
            roots = []
        if not roots:
            raise CaRefused(0, f"the CA at {self.url} sent a {what} without certificates")
        return roots

    def _accept(self, data: bytes, key_pem_bytes: bytes, what: str) -> Material:
        try:
            answer: Any = json.loads(data)
            chain = str(answer["chain"]).encode("ascii")
            bundle = str(answer["bundle"]).encode("ascii")
        except (ValueError, KeyError, TypeError, UnicodeEncodeError):
            raise CaUnavailable(f"{what}: CA at {self.url} sent a malformed answer") from None
        material = load_material(chain, key_pem_bytes, bundle, origin=f"ca {self.url}")
        if material.identity != self.identity:
            raise CertError(
                f"{what}: CA at {self.url} issued {material.identity}, not {self.identity}"
            )
        self._set(material)
        return material

    def _set(self, material: Material) -> None:
        self._material = material
        self._ca_roots = material.bundle_pem
        try:
            self._on_update(material)
        except Exception as exc:
            raise CertError(f"applying the certificate from {self.url} failed: {exc}") from exc

    # -- operations -----------------------------------------------------------------------

    async def enroll(self) -> Material:
        """Get the first certificate with the join token (or service-account token).

        With a token file, the file is read again first: Kubernetes refreshes a projected
        service-account token in place, and a used join token is fixed by writing a new one.
        """
        if self._token_file is not None:
            try:
                self.set_token(read_file(self._token_file, "token").decode())
            except CertError as exc:
                log.warning("cannot read the token file, using the last token read: %s", exc)
        roots = await self._pin()
        key = new_key()
        body = {"token": self._token, "csr": make_csr(key, self.identity).decode("ascii")}
        data = await self._request("POST", "/v1/enroll", _client_context(roots), "enrolment", body)
        material = self._accept(data, key_pem(key), "enrolment")
        log.info(
            "enrolled as %s with %s: serial=%s not_after=%s",
            self.identity,
            self.url,
            material.serial_hex,
            material.not_after.isoformat(),
        )
        return material

    async def renew(self) -> Material:
        """Get a new certificate (with a new key), authenticating with the current one."""
        current = self._material
        if current is None:
            raise CertError("cannot renew before enrolment")
        ctx = _client_context(await self._pin())
        load_cert_chain_from_memory(ctx, current.chain_pem, current.key_pem)
        key = new_key()
        body = {"csr": make_csr(key, self.identity).decode("ascii")}
        data = await self._request("POST", "/v1/renew", ctx, "renewal", body)
        material = self._accept(data, key_pem(key), "renewal")
        log.info(
            "renewed %s: serial=%s not_after=%s",
            self.identity,
            material.serial_hex,
            material.not_after.isoformat(),
        )
        return material

    async def refresh_bundle(self) -> bool:
        """Fetch the trust bundle; on a change pass new Material on. True if it changed."""
        current = self._material
        roots = await self._pin()
        bundle = await self._request(
            "GET", "/v1/bundle", _client_context(roots), "refreshing the trust bundle"
        )
        self._parse_roots(bundle, "trust bundle")
        if current is None or bundle == current.bundle_pem:
            return False
        material = load_material(current.chain_pem, current.key_pem, bundle, origin=current.origin)
        self._set(material)
        log.info("trust bundle from %s changed: %d root(s)", self.url, len(material.roots))
        return True

    async def refresh_crl(self) -> bool:
        """Fetch the CRLs (GET /v1/crl) and hand them on; False while the CA has none yet.

        Checking them (signatures, all or nothing) is the receiver's job: a bad set is
        refused there and the last good one kept.
        """
        if self._on_crl is None:
            return False
        roots = await self._pin()
        try:
            data = await self._request(
                "GET",
                "/v1/crl",
                _client_context(roots),
                "fetching the revocation list",
                limit=MAX_CRL_BYTES,
            )
        except CaTooBig as exc:
            CRL_RELOADS.labels("error").inc()
            raise CaRefused(
                0, f"the revocation list from {self.url} is refused: {too_big(exc.size)}"
            ) from None
        except CaUnavailable as exc:
            if "(503)" in str(exc):
                return False  # the CA could not make a CRL yet
            raise
        self._on_crl(data)
        return True

    def refresh_now(self) -> None:
        """Fetch the bundle and the CRL now rather than at the next MTLS_BUNDLE_REFRESH."""
        self._wake.set()

    async def _sleep_until(self, when: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, when - time.time()))

    def renew_at(self, material: Material) -> float:
        """Unix time at which to renew: 2/3 of the lifetime, +-10% jitter."""
        start = material.not_before.timestamp()
        life = material.not_after.timestamp() - start
        return start + life * RENEW_FRACTION * self._rng.uniform(1 - JITTER, 1 + JITTER)

    async def _enroll_until_done(self) -> Material:
        failures = 0
        while True:
            try:
                material = await self.enroll()
            except CaUnavailable as exc:
                CERT_RENEWALS.labels(result="error").inc()
                failures += 1
                delay = min(self._backoff_cap, BACKOFF_BASE * 2 ** (failures - 1))
                log.warning("enrolment failed: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            except CertError as exc:
                # Refused (a used join token, a token for another identity...): the sidecar
                # stays up, not ready with its expired certificate, and tries again; a token
                # file is read again at each attempt (Kubernetes refreshes projected tokens,
                # and an operator fixes a used join token by writing a new one).
                CERT_RENEWALS.labels(result="error").inc()
                failures += 1
                delay = min(self._backoff_cap, BACKOFF_BASE * 2 ** (failures - 1))
                log.error(
                    "enrolment of %s refused: %s; the sidecar needs a new token; retrying in %.1fs",
                    self.identity,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            CERT_RENEWALS.labels(result="ok").inc()
            return material

    async def run(self) -> None:
        """Enrol if needed, then renew and refresh the bundle forever.

        Renewal failures are retried with exponential backoff (capped at `backoff_cap`), but
        never scheduled past the current certificate's expiry. Once it has expired, the
        sidecar enrols again with its token; if the CA refuses (a used token), that is logged
        and retried with the same backoff (the sidecar needs a new token: a token file is read
        again at each attempt), never a dead renewal task.
        """
        material = self._material or await self._enroll_until_done()
        renew_at = self.renew_at(material)
        refresh_at = time.time() + self._bundle_refresh
        failures = 0
        while True:
            await self._sleep_until(min(renew_at, refresh_at))
            if self._wake.is_set():
                self._wake.clear()
                refresh_at = 0.0  # SIGHUP: bundle and CRL now
            now = time.time()
            material = self._material or material
            expiry = material.not_after.timestamp()
            if now >= renew_at:
                if now >= expiry:
                    log.error(
                        "certificate for %s expired at %s without renewal; enrolling again",
                        self.identity,
                        material.not_after.isoformat(),
                    )
                    material = await self._enroll_until_done()
                    failures = 0
                    renew_at = self.renew_at(material)
                    continue
                try:
                    material = await self.renew()
                except CertError as exc:
                    CERT_RENEWALS.labels(result="error").inc()
                    failures += 1
                    delay = min(self._backoff_cap, BACKOFF_BASE * 2 ** (failures - 1))
                    retry = now + delay
                    if retry >= expiry:
                        # Keep trying in the time left rather than give up early.
                        retry = now + max(0.1, (expiry - now) / 2) if expiry - now > 0.2 else expiry
                    log.warning(
                        "renewal of %s failed (attempt %d): %s; retrying in %.1fs; "
                        "the current certificate expires at %s",
                        self.identity,
                        failures,
                        exc,
                        retry - now,
                        material.not_after.isoformat(),
                    )
                    renew_at = retry
                    continue
                CERT_RENEWALS.labels(result="ok").inc()
                failures = 0
                renew_at = self.renew_at(material)
                refresh_at = time.time() + self._bundle_refresh
            elif now >= refresh_at:
                try:
                    await self.refresh_bundle()
                except CertError as exc:
                    log.warning("refreshing the trust bundle failed: %s", exc)
                try:
                    await self.refresh_crl()
                except CertError as exc:
                    log.warning("fetching the revocation list failed: %s", exc)
                refresh_at = time.time() + self._bundle_refresh
