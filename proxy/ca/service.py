"""The enrolment service (`ca serve`): signs CSRs for join tokens, renews over mTLS, serves roots.

Endpoints (HTTPS; clients pin the root by its sha256 fingerprint):
  POST /v1/enroll  {"token": ..., "csr": PEM}  -> {"chain": PEM leaf+intermediate, "bundle": PEM}
  POST /v1/renew   {"csr": PEM}, over mTLS with the current certificate  -> same
  GET  /v1/bundle  -> the trusted roots, PEM
Every refusal is one log line and a JSON {"error": ...} with a meaningful status; every
issuance is one log line with serial, identity, expiry and requester address.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from ..material import leaf_spiffe_id
from .issuer import (
    LEAF_TTL,
    CsrRejected,
    Issuer,
    cert_pem,
    check_csr,
    check_public_key,
    issue_leaf,
    issue_server,
    key_pem,
    new_key,
    trust_domain_of,
)
from .memcert import load_cert_chain_from_memory
from .store import CaDir
from .tokens import NonceLedger, TokenRejected, verify_token

log = logging.getLogger("mtls.ca")

MAX_BODY = 64 * 1024
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the TLS layer lets an expired client certificate
# through so that /v1/renew can refuse it with a clear HTTP answer instead of a TLS alert.
# The handler checks validity times itself; no other endpoint uses client certificates.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_RECHECK_SECONDS = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A request we refuse: HTTP status and the reason given to the client and the log."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EnrolmentService:
    """The CA's online half: holds the issuing key and the nonce ledger of used tokens.

    It re-reads the CA directory when ca.json changes (root rotation), all or nothing: if the
    new state cannot be loaded, it keeps serving with the old one and logs why.
    """

    def __init__(
        self,
        ca_path: Path,
        *,
        leaf_ttl: dt.timedelta = LEAF_TTL,
        server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
    ) -> None:
        self.ca_path = ca_path
        self.leaf_ttl = leaf_ttl
        self.server_names = tuple(dict.fromkeys(server_names))
        self.ledger = NonceLedger()
        ca = CaDir.open(ca_path)
        self._stamp = ca.state_stamp()
        self._load(ca)
        self.ssl_context = self._new_ssl_context()
        self._server_cert: x509.Certificate | None = None
        self._server_gen = 0
        self._install_server_cert()

    # -- material -------------------------------------------------------------------------

    def _load(self, ca: CaDir) -> None:
        """Take the issuer, roots and token secret from `ca`; all or nothing."""
        issuer = ca.issuer()
        bundle = ca.bundle_pem()
        intermediates = ca.trusted_intermediates()
        secret = ca.token_secret()
        # Everything read: only now replace the state in use.
        self.ca = ca
        self.issuer: Issuer = issuer
        self.bundle_pem: bytes = bundle
        self.trusted_intermediates: list[x509.Certificate] = intermediates
        self.token_secret: bytes = secret
        self.trust_domain: str = ca.state.trust_domain

    def _new_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags = ssl.VerifyFlags(ctx.verify_flags | _X509_V_FLAG_NO_CHECK_TIME)
        ctx.load_verify_locations(cadata=self.bundle_pem.decode("ascii"))
        return ctx

    def _install_server_cert(self) -> None:
        """(Re)issue our TLS certificate from the intermediate of the OLDEST trusted root.

        Sidecars pin one root by fingerprint on first contact; chaining to the oldest root
        keeps the fingerprint they were given valid until rotation removes that root.
        """
        gen = self.ca.state.bundle[0]
        issuer = self.ca.issuer_for(gen)
        key = new_key()
        cert = issue_server(issuer, key.public_key(), names=self.server_names)
        load_cert_chain_from_memory(self.ssl_context, cert_pem(cert, issuer.cert), key_pem(key))
        self._server_cert = cert
        self._server_gen = gen
        log.info(
            "service certificate serial=%x names=%s issuer=G%d not_after=%s",
            cert.serial_number,
            ",".join(self.server_names),
            gen,
            cert.not_valid_after_utc.isoformat(),
        )

    def maybe_reload(self) -> None:
        """Pick up a changed ca.json (rotation) and renew our TLS cert when due."""
        try:
            stamp = self.ca.state_stamp()
        except OSError as exc:
            log.error(
                "cannot stat CA state in %s: %s; keeping the current state", self.ca_path, exc
            )
            return
        if stamp != self._stamp:
            try:
                self._load(CaDir.open(self.ca_path))
            except Exception as exc:
                log.error("reloading the CA directory failed (%s); keeping the current state", exc)
                return
            self._stamp = stamp
            # New roots join the TLS store; removed ones linger there until restart, which is
            # harmless: /v1/renew authorises against the current state, not the TLS store.
            self.ssl_context.load_verify_locations(cadata=self.bundle_pem.decode("ascii"))
            log.info(
                "CA state reloaded: bundle=%s issuer=G%d stage=%s",
                ",".join(f"G{g}" for g in self.ca.state.bundle),
                self.ca.state.issuer,
                self.ca.state.stage,
            )
        cert = self._server_cert
        due = cert is None or self._server_gen != self.ca.state.bundle[0]
        if cert is not None and not due:
            life = cert.not_valid_after_utc - cert.not_valid_before_utc
            due = _now() >= cert.not_valid_before_utc + life * 2 / 3
        if due:
            try:
                self._install_server_cert()
            except Exception as exc:
                log.error("renewing the service certificate failed: %s", exc)

    # -- issuing --------------------------------------------------------------------------

    def _answer(
        self, request: web.Request, csr: x509.CertificateSigningRequest, identity: str, via: str
    ) -> web.Response:
        """Sign `csr` for `identity`, log the issuance, answer chain + bundle."""
        public_key = check_public_key(csr.public_key())
        leaf = issue_leaf(self.issuer, public_key, spiffe_id=identity, ttl=self.leaf_ttl)
        log.info(
            "issued serial=%x identity=%s not_after=%s requester=%s via=%s",
            leaf.serial_number,
            identity,
            leaf.not_valid_after_utc.isoformat(),
            request.remote,
            via,
        )
        return web.json_response(
            {
                "chain": cert_pem(leaf, self.issuer.cert).decode("ascii"),
                "bundle": self.bundle_pem.decode("ascii"),
            }
        )

    # -- HTTP -----------------------------------------------------------------------------

    async def _read_json(self, request: web.Request, fields: tuple[str, ...]) -> dict[str, str]:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Refused(413, f"request body of {request.content_length} bytes exceeds {MAX_BODY}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"request body exceeds {MAX_BODY} bytes") from None
        try:
            data: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(400, f"body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise Refused(400, "body must be a JSON object")
        out: dict[str, str] = {}
        for name in fields:
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise Refused(400, f"field {name!r} (a string) is required")
            out[name] = value
        return out

    def _check_csr(self, pem: str, identity: str) -> x509.CertificateSigningRequest:
        try:
            return check_csr(pem, identity)
        except CsrRejected as exc:
            raise Refused(exc.status, str(exc)) from None

    async def enroll(self, request: web.Request) -> web.Response:
        self.maybe_reload()
        body = await self._read_json(request, ("token", "csr"))
        try:
            claims = verify_token(self.token_secret, body["token"])
        except TokenRejected as exc:
            raise Refused(401, str(exc)) from None
        if trust_domain_of(claims.identity) != self.trust_domain:
            raise Refused(403, f"token names {claims.identity}, outside {self.trust_domain}")
        if self.ledger.is_used(claims.nonce):
            raise Refused(401, f"token for {claims.identity} was already used")
        csr = self._check_csr(body["csr"], claims.identity)
        # No await between the ledger check and here: two requests cannot both use one token.
        response = self._answer(request, csr, claims.identity, "enroll")
        self.ledger.mark_used(claims)
        return response

    def _renewing_identity(self, request: web.Request) -> str:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise Refused(401, "renewal needs the current certificate as TLS client certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise Refused(401, "client certificate cannot be parsed") from None
        if not any(_signed_by(cert, i) for i in self.trusted_intermediates):
            raise Refused(
                401,
                f"client certificate (issuer {cert.issuer.rfc4514_string()!r}) was not issued "
                "by a trusted intermediate of this CA",
            )
        now = _now()
        if cert.not_valid_after_utc <= now:
            raise Refused(
                401,
                f"client certificate serial={cert.serial_number:x} expired at "
                f"{cert.not_valid_after_utc.isoformat()}; enrol again with a new token",
            )
        if cert.not_valid_before_utc > now:
            raise Refused(401, "client certificate is not valid yet")
        identity = leaf_spiffe_id(cert)
        if identity is None:
            raise Refused(401, "client certificate has no single spiffe:// URI SAN")
        if trust_domain_of(identity) != self.trust_domain:
            raise Refused(403, f"client identity {identity} is outside {self.trust_domain}")
        return identity

    async def renew(self, request: web.Request) -> web.Response:
        self.maybe_reload()
        identity = self._renewing_identity(request)
        body = await self._read_json(request, ("csr",))
        csr = self._check_csr(body["csr"], identity)
        return self._answer(request, csr, identity, "renew")

    async def bundle(self, request: web.Request) -> web.Response:
        self.maybe_reload()
        return web.Response(body=self.bundle_pem, content_type="application/x-pem-file")

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as exc:
            status, message = exc.status, exc.message
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, message = exc.status, exc.reason
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            return web.json_response({"error": "internal error"}, status=500)
        log.warning(
            "refused %s %s from %s: status=%d %s",
            request.method,
            request.path,
            request.remote,
            status,
            message,
        )
        return web.json_response({"error": message}, status=status)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_post("/v1/enroll", self.enroll)
        app.router.add_post("/v1/renew", self.renew)
        app.router.add_get("/v1/bundle", self.bundle)
        return app


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError (names), InvalidSignature, TypeError (key types)
        return False
    return True


async def serve(
    ca_path: Path,
    *,
    host: str | None,
    port: int,
    leaf_ttl: dt.timedelta = LEAF_TTL,
    server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
    stop: asyncio.Event,
) -> None:
    """Run the service until `stop` is set."""
    service = EnrolmentService(ca_path, leaf_ttl=leaf_ttl, server_names=server_names)
    runner = web.AppRunner(service.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=service.ssl_context)
    await site.start()

    async def recheck() -> None:
        while True:
            await asyncio.sleep(_RECHECK_SECONDS)
            service.maybe_reload()

    task = asyncio.create_task(recheck(), name="ca-service-recheck")
    log.info(
        "CA service for %s listening on %s:%d (https); leaf TTL %ss\n%s",
        service.trust_domain,
        host or "*",
        port,
        int(leaf_ttl.total_seconds()),
        service.ca.describe(),
    )
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
