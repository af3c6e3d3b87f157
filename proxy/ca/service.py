"""The enrolment service (`ca serve`): signs CSRs for join or service-account tokens, renews
over mTLS, serves roots and CRLs.

Endpoints (HTTPS; clients pin the root by its sha256 fingerprint):
  POST /v1/enroll  {"token": ..., "csr": PEM}  -> {"chain": PEM leaf+intermediate, "bundle": PEM}
                   (token: a join token, or a Kubernetes service-account JWT when enabled)
  POST /v1/renew   {"csr": PEM}, over mTLS with the current certificate  -> same
  GET  /v1/bundle  -> the trusted roots, PEM
  GET  /v1/crl     -> the CRL of every issuing intermediate, then those intermediates, PEM
Every refusal is one log line and a JSON {"error": ...} with a meaningful status; every
issuance is recorded in the store (ca.db) and is one log line with serial, identity, expiry
and requester. Slow or excess connections are closed (header/body timeouts, a limit).
Store calls run in a thread pool, never in the event loop; a storage fault is a 503 with
Retry-After, and /v1/bundle and /v1/crl never wait for the store's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509

from ..httpguard import ConnectionGuard, Handler, Limits, start_guarded
from ..listen import raise_nofile_limit
from ..logs import RateLimit
from ..material import leaf_spiffe_id
from .crl import CRL_REFRESH
from .db import CaStore, IdentityRevoked, NonceUsed, StoreUnavailable, serial_hex
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
from .k8s import SaTokenRejected, SaVerifier, looks_like_jwt
from .memcert import load_cert_chain_from_memory
from .store import CaDir, CaDirError
from .tokens import TokenRejected, verify_token

log = logging.getLogger("mtls.ca")
T = TypeVar("T")

MAX_BODY = 64 * 1024
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the TLS layer lets an expired client certificate
# through so that /v1/renew can refuse it with a clear HTTP answer instead of a TLS alert.
# The handler checks validity times itself; no other endpoint uses client certificates.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_RECHECK_SECONDS = 30.0
DEFAULT_LIMITS = Limits()
# SQLite has one writer at a time: two threads let a read go by a write that waits for the lock.
STORE_THREADS = 2
# A store call that has not started within this is refused (503): with the store stuck, a
# queue of waiting requests must not grow without end.
STORE_QUEUE_WAIT = 5.0
CRL_WAIT = 1.0  # GET /v1/crl waits this long for a fresh CRL, then serves the last one
RETRY_AFTER = 5  # seconds, in the Retry-After of every 503
_CRL_RECHECK_SECONDS = 2.0  # how often a `ca revoke` from another process is looked for


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def is_flat_json_object(body: bytes) -> bool:
    """True when `body` has no nesting deeper than one object (strings blanked out first).

    Checked before json.loads so that deeply nested input is refused cheaply, not by
    RecursionError; our requests are flat objects of strings.
    """
    rest = _STRING.sub(b'""', body)
    return rest.count(b"{") <= 1 and rest.count(b"[") == 0


class Refused(Exception):
    """A request we refuse: HTTP status and the reason given to the client and the log."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class EnrolmentService:
    """The CA's online half: holds the issuing key; records issuance and used tokens in the
    store, which it shares with the CLI and other `ca serve` processes on the directory.

    It re-reads the CA directory when ca.json changes (root rotation), all or nothing: if the
    new state cannot be loaded, it keeps serving with the old one and logs why. It makes new
    CRLs when the store's revocations change and every CRL_REFRESH.
    """

    def __init__(
        self,
        ca_path: Path,
        *,
        leaf_ttl: dt.timedelta = LEAF_TTL,
        server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
        sa_verifier: SaVerifier | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.ca_path = ca_path
        self.leaf_ttl = leaf_ttl
        self.server_names = tuple(dict.fromkeys(server_names))
        self.sa_verifier = sa_verifier
        self.limits = limits
        ca = CaDir.open(ca_path)
        # Store calls run in these threads (each with its own SQLite connection), never in
        # the event loop: a writer holding the lock, or a slow disk, holds up only them.
        self._executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="ca-store")
        self.store = CaStore.for_dir(ca_path, connect=False)
        try:
            self.store.ensure_open()
        except StoreUnavailable as exc:
            log.error(
                "%s; enrolment and renewal answer 503 until it can be used, /v1/bundle and "
                "/v1/crl are served",
                exc,
            )
        else:
            if self.store.created:
                log.info(
                    "created the CA store %s (issuance log, revocations, used tokens)", ca_path
                )
        self._crl_pem = b""
        self._crl_revision = -1
        self._crl_made = 0.0
        self._crl_error: str | None = None
        self._crl_job: asyncio.Future[bytes] | None = None
        self._fault_log = RateLimit()
        self._stamp = ca.state_stamp()
        self._load(ca)
        self.ssl_context = self._new_ssl_context()
        self._server_cert: x509.Certificate | None = None
        self._server_gen = 0
        self._install_server_cert()
        self.refresh_crl()
        if not self._crl_pem:
            try:
                self._crl_pem = ca.crl_pem()
            except CaDirError as exc:
                log.error("no CRL to serve until one can be made: %s", exc)
            else:
                log.warning("serving the CRL last written to crl.pem until a new one can be made")
        self.store.release()  # from here on, only the store's threads use it

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
            self._crl_revision = -1  # other intermediates: new CRLs
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

    def refresh_crl(self, *, force: bool = False) -> bytes:
        """The current CRL PEM; made anew (and written to crl.pem) when revocations changed,
        the CA state was reloaded, or it is CRL_REFRESH old. On failure the last one stays."""
        try:
            revision = self.store.revision()
            age = time.monotonic() - self._crl_made
            if force or revision != self._crl_revision or age >= CRL_REFRESH.total_seconds():
                self._crl_pem = self.ca.write_crl(self.store)
                self._crl_revision = revision
                self._crl_made = time.monotonic()
                log.info("CRL updated (store revision %d)", revision)
        except Exception as exc:
            # Retried every few seconds: say it once per distinct failure, and when it ends.
            if str(exc) != self._crl_error:
                log.error("making the CRL failed (%s); serving the previous one", exc)
            self._crl_error = str(exc)
        else:
            if self._crl_error is not None:
                log.info("making the CRL works again")
            self._crl_error = None
        return self._crl_pem

    async def refresh_crl_async(self, *, wait: float | None = None) -> bytes:
        """refresh_crl in the store's threads, one at a time; wait for it at most `wait`
        seconds (None: until done), then answer the newest CRL there is."""
        job = self._crl_job
        if job is None or job.done():
            loop = asyncio.get_running_loop()
            job = self._crl_job = loop.run_in_executor(self._executor, self.refresh_crl)
        if wait is None:
            await asyncio.shield(job)
        else:
            await asyncio.wait({job}, timeout=wait)
        return self._crl_pem

    async def _in_store(self, call: Callable[[], T]) -> T:
        """Run `call` (store work) in the store's threads. A call still waiting for a thread
        after STORE_QUEUE_WAIT is refused (StoreUnavailable) without touching the store."""
        deadline = time.monotonic() + STORE_QUEUE_WAIT

        def job() -> T:
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    self.store.path, f"too many requests waited over {STORE_QUEUE_WAIT:g}s for it"
                )
            return call()

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    def close(self) -> None:
        """Wait for running store calls, then close the store's connections."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    # -- issuing --------------------------------------------------------------------------

    async def _check_not_revoked(self, identity: str) -> None:
        found = await self._in_store(lambda: self.store.identity_revocation(identity))
        if found is not None:
            when = dt.datetime.fromtimestamp(found[0], dt.UTC).isoformat()
            raise Refused(
                403,
                f"identity {identity} is revoked ({found[1]}, since {when}); "
                "ca unrevoke lets it enrol again",
            )

    async def _answer(
        self,
        request: web.Request,
        csr: x509.CertificateSigningRequest,
        identity: str,
        via: str,
        requester: str,
        nonce: tuple[str, float] | None = None,
    ) -> web.Response:
        """Sign `csr` for `identity`, record and log the issuance, answer chain + bundle."""
        public_key = check_public_key(csr.public_key())
        issuer = self.issuer
        try:
            leaf = await self._in_store(
                functools.partial(
                    self.store.issue,
                    lambda: issue_leaf(issuer, public_key, spiffe_id=identity, ttl=self.leaf_ttl),
                    requester=requester,
                    issuer_gen=self.ca.state.issuer,
                    issuer=issuer.cert,
                    nonce=nonce,
                )
            )
        except NonceUsed:
            raise Refused(401, f"token for {identity} was already used") from None
        except IdentityRevoked as exc:  # revoked between the check above and now
            raise Refused(403, str(exc)) from None
        log.info(
            "issued serial=%x identity=%s not_after=%s requester=%s via=%s (%s)",
            leaf.serial_number,
            identity,
            leaf.not_valid_after_utc.isoformat(),
            request.remote,
            via,
            requester,
        )
        return web.json_response(
            {
                "chain": cert_pem(leaf, issuer.cert).decode("ascii"),
                "bundle": self.bundle_pem.decode("ascii"),
            }
        )

    # -- HTTP -----------------------------------------------------------------------------

    async def _read_json(self, request: web.Request, fields: tuple[str, ...]) -> dict[str, str]:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise Refused(413, f"request body of {request.content_length} bytes exceeds {MAX_BODY}")
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"request body exceeds {MAX_BODY} bytes") from None
        except TimeoutError:
            raise Refused(
                408, f"request body not received within {self.limits.body_timeout:g}s"
            ) from None
        if not is_flat_json_object(body):
            raise Refused(400, "body must be a flat JSON object of strings (no nesting)")
        try:
            data: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
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
        if looks_like_jwt(body["token"]):
            return await self._enroll_service_account(request, body)
        try:
            claims = verify_token(self.token_secret, body["token"])
        except TokenRejected as exc:
            raise Refused(401, str(exc)) from None
        if trust_domain_of(claims.identity) != self.trust_domain:
            raise Refused(403, f"token names {claims.identity}, outside {self.trust_domain}")
        csr = self._check_csr(body["csr"], claims.identity)
        await self._check_not_revoked(claims.identity)
        # The store claims the nonce in the transaction that records the certificate: one
        # token, one certificate, across restarts and across processes.
        return await self._answer(
            request,
            csr,
            claims.identity,
            "enroll",
            f"join token nonce={claims.nonce}",
            nonce=(claims.nonce, claims.expires_at),
        )

    async def _enroll_service_account(
        self, request: web.Request, body: dict[str, str]
    ) -> web.Response:
        if self.sa_verifier is None:
            raise Refused(
                401,
                "service-account tokens are not accepted here (ca serve runs without "
                "--k8s-issuer/--k8s-jwks); use a join token",
            )
        try:
            claims = await self.sa_verifier.verify(body["token"])
        except SaTokenRejected as exc:
            raise Refused(exc.status, str(exc)) from None
        csr = self._check_csr(body["csr"], claims.identity)
        await self._check_not_revoked(claims.identity)
        # Not single-use: kubelet hands the same projected token to a restarted container.
        return await self._answer(request, csr, claims.identity, "enroll", claims.requester())

    async def _renewing_identity(self, request: web.Request) -> tuple[str, str]:
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
        await self._check_not_revoked(identity)
        serial = serial_hex(cert.serial_number)
        if await self._in_store(lambda: self.store.is_serial_revoked(serial)):
            raise Refused(403, f"client certificate serial={serial} ({identity}) is revoked")
        return identity, serial

    async def renew(self, request: web.Request) -> web.Response:
        self.maybe_reload()
        identity, serial = await self._renewing_identity(request)
        body = await self._read_json(request, ("csr",))
        csr = self._check_csr(body["csr"], identity)
        return await self._answer(request, csr, identity, "renew", f"renewal of serial={serial}")

    async def bundle(self, request: web.Request) -> web.Response:
        self.maybe_reload()
        return web.Response(body=self.bundle_pem, content_type="application/x-pem-file")

    async def crl(self, request: web.Request) -> web.Response:
        """GET /v1/crl: every intermediate's CRL, then the intermediates, PEM."""
        self.maybe_reload()
        # A fresh CRL when it can be had at once (a revocation just made shows at once);
        # else, the last one: a writer holding the store's lock never holds up this answer.
        pem = await self.refresh_crl_async(wait=CRL_WAIT)
        if not pem:
            raise Refused(503, "no CRL could be made yet (the CA log says why)")
        return web.Response(body=pem, content_type="application/x-pem-file")

    @web.middleware
    async def _handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            return self._store_fault(request, exc)
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
        headers = {"Retry-After": str(RETRY_AFTER)} if status == 503 else None
        return web.json_response({"error": message}, status=status, headers=headers)

    def _store_fault(self, request: web.Request, exc: StoreUnavailable) -> web.Response:
        """503 + Retry-After; one log line a second at most (every client meets the fault)."""
        held = self._fault_log.allow(time.monotonic())
        if held is not None:
            log.warning(
                "refused %s %s from %s: status=503 %s%s",
                request.method,
                request.path,
                request.remote,
                exc,
                f" ({held} more since the last line)" if held else "",
            )
        return web.json_response(
            {"error": f"the CA cannot use its store now: {exc.cause}; retry later"},
            status=503,
            headers={"Retry-After": str(RETRY_AFTER)},
        )

    def app(self, guard: ConnectionGuard | None = None) -> web.Application:
        """The service's routes; with `guard`, its header deadline around every request."""
        middlewares = [guard.middleware] if guard is not None else []
        app = web.Application(client_max_size=MAX_BODY, middlewares=[*middlewares, self._handle])
        app.router.add_post("/v1/enroll", self.enroll)
        app.router.add_post("/v1/renew", self.renew)
        app.router.add_get("/v1/bundle", self.bundle)
        app.router.add_get("/v1/crl", self.crl)
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
    sa_verifier: SaVerifier | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Run the service until `stop` is set."""
    raise_nofile_limit(limits.max_connections + 64, "--max-connections", "")
    service = EnrolmentService(
        ca_path,
        leaf_ttl=leaf_ttl,
        server_names=server_names,
        sa_verifier=sa_verifier,
        limits=limits,
    )
    guard = ConnectionGuard(limits, log)
    runner, server = await start_guarded(
        service.app(guard), guard, host=host, port=port, ssl_context=service.ssl_context
    )

    async def recheck() -> None:
        ticks = 0
        while True:
            await asyncio.sleep(_CRL_RECHECK_SECONDS)
            ticks += 1
            if ticks * _CRL_RECHECK_SECONDS >= _RECHECK_SECONDS:
                ticks = 0
                service.maybe_reload()
            await service.refresh_crl_async()

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
        server.close()
        await runner.cleanup()
        await asyncio.to_thread(service.close)
