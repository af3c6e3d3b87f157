"""`mtls-sidecar injector`: `inject` as a mutating admission webhook (AdmissionReview v1, HTTPS)."""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch
from aiohttp import web

from ..config import parse_duration
from ..httpguard import ConnectionGuard, Limits, positive_int, start_guarded
from ..listen import raise_nofile_limit
from .cli import MAX_DEPTH, add_option_flags, options_from
from .inject import InjectError, Options, describe, inject_report

log = logging.getLogger("mtls.injector")

# etcd stores objects of at most 1.5 MiB; a review wraps one (twice for UPDATE).
MAX_BODY = 4 * 1024 * 1024
REVIEW_API = "admission.k8s.io/v1"
DEFAULT_LIMITS = Limits()


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# Brackets become +1 / -1 (as signed bytes); everything else is deleted.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting(body: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (strings are skipped).

    Counted before json.loads, which recurses once per level: deep input is refused with a
    reason, not by a RecursionError (or a slow deepcopy of a legal but absurd object)."""
    brackets = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(itertools.accumulate(array.array("b", brackets)), default=0)


class BadReview(ValueError):
    """The request is not an AdmissionReview we can answer (HTTP 400, the message says why)."""


@dataclass(frozen=True)
class Answer:
    """An AdmissionReview response and what to log about it."""

    review: dict[str, Any]
    summary: str


def parse_review(body: bytes) -> dict[str, Any]:
    """The `request` of an AdmissionReview v1; BadReview says what is wrong with it."""
    if json_nesting(body) > MAX_DEPTH:
        raise BadReview(f"nested more than {MAX_DEPTH} levels deep")
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadReview(f"body is not JSON ({exc})") from None
    except RecursionError:  # not reached after the check above; kept as a backstop
        raise BadReview(f"nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(review, dict):
        raise BadReview("body is not a JSON object")
    if review.get("apiVersion") != REVIEW_API or review.get("kind") != "AdmissionReview":
        raise BadReview(
            f"expected apiVersion {REVIEW_API} kind AdmissionReview, got "
            f"{review.get('apiVersion')!r} {review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReview("no request in the AdmissionReview")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("request.uid is missing")
    if not isinstance(request.get("object"), dict):
        raise BadReview("request.object is missing (the webhook handles CREATE of pods)")
    return request


def review_answer(request: dict[str, Any], options: Options) -> Answer:
    """Answer one admission request: a JSONPatch that injects the pod, no patch for pods that
    are skipped, or a denial naming the bad annotation. Pure: the server only does I/O."""
    uid = request["uid"]
    pod = request["object"]
    namespace = request.get("namespace") or None
    where = describe(pod, namespace)
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if pod.get("kind", "Pod") != "Pod" or request.get("operation", "CREATE") != "CREATE":
        summary = f"{where}: not a pod CREATE, allowed unchanged"
    else:
        try:
            result = inject_report(pod, options, namespace=namespace)
        except InjectError as exc:
            response.update(allowed=False, status={"code": 400, "message": str(exc)})
            summary = f"denied: {exc}"
        else:
            patch = jsonpatch.make_patch(pod, result.obj).patch
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
            if result.notes:
                response["warnings"] = result.notes
            summary = f"{where}: " + ("injected" if patch else "; ".join(result.notes))
    return Answer(
        {"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": response}, summary
    )


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """The request body, refused (BadReview) once it grows past MAX_BODY or takes longer than
    `timeout` seconds to arrive."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadReview(f"body of {request.content_length} bytes is over {MAX_BODY}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_BODY:
                    raise BadReview(f"body is over {MAX_BODY} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BadReview(f"body not received within {timeout:g}s") from None
    return b"".join(chunks)


def make_app(
    options: Options, limits: Limits = DEFAULT_LIMITS, guard: ConnectionGuard | None = None
) -> web.Application:
    """The webhook's routes: POST /inject, GET /live, GET /ready; with `guard`, its header
    deadline around every request."""

    async def inject_handler(request: web.Request) -> web.Response:
        try:
            body = await _read_body(request, limits.body_timeout)
            answer = review_answer(parse_review(body), options)
        except BadReview as exc:
            log.warning("bad admission review: %s", exc)
            return web.json_response({"error": f"bad AdmissionReview: {exc}"}, status=400)
        log.info("%s", answer.summary)
        return web.json_response(answer.review)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    # The body is read by _read_body, whose limit answers 400 with a reason.
    app = web.Application(middlewares=[guard.middleware] if guard is not None else [])
    app.router.add_post("/inject", inject_handler)
    app.router.add_get("/live", ok)
    app.router.add_get("/ready", ok)
    return app


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, :PORT or [V6]:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class _CertReloader:
    """Serves the certificate files' current content: when they change (cert-manager renews
    them) a new context is built, and only if it loads does it replace the old one, so a
    half-written or mismatched renewal keeps the old certificate in service."""

    def __init__(self, cert: str, key: str, interval: float) -> None:
        self.cert, self.key, self.interval = cert, key, interval
        self.stamp = self._stamp()
        self.current = _server_context(cert, key)
        # The context the listener holds: each handshake switches to the current one.
        # (OpenSSL calls this for every ClientHello, with or without SNI.)
        self.listener = _server_context(cert, key)
        self.listener.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        # Secret volumes swap a symlink: a new inode, even within one mtime tick.
        return tuple(
            (s.st_mtime_ns, s.st_ino, s.st_size) for s in map(os.stat, (self.cert, self.key))
        )

    async def watch(self) -> None:
        """Check the files every `interval` seconds, forever."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                stamp = self._stamp()
                if stamp == self.stamp:
                    continue
                self.current = _server_context(self.cert, self.key)
                self.stamp = stamp
                log.info("serving certificate reloaded from %s", self.cert)
            except (OSError, ssl.SSLError) as exc:
                log.warning("serving certificate not reloaded, keeping the old one: %s", exc)


async def _serve(
    host: str, port: int, reloader: _CertReloader, options: Options, limits: Limits
) -> int:
    raise_nofile_limit(limits.max_connections + 64, "--max-connections", "")
    guard = ConnectionGuard(limits, log)
    try:
        runner, server = await start_guarded(
            make_app(options, limits, guard),
            guard,
            host=host,
            port=port,
            ssl_context=reloader.listener,
        )
    except OSError as exc:
        print(f"mtls-sidecar injector: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    for sock in server.sockets:
        addr = sock.getsockname()
        bound = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        print(f"mtls-sidecar injector: listening on https://{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(reloader.watch(), name="injector-cert-reload")
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        server.close()
        await runner.cleanup()
    return 0


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The injector's flags: where it listens, its certificate, and what it injects."""
    parser = argparse.ArgumentParser(
        prog="mtls-sidecar injector", description="The sidecar injector as an admission webhook"
    )
    parser.add_argument("--listen", default="0.0.0.0:9443", help="HOST:PORT (%(default)s)")
    parser.add_argument("--cert", required=True, help="PEM serving certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key of the certificate")
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often to look for a renewed certificate (%(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    d = DEFAULT_LIMITS
    parser.add_argument(
        "--header-timeout",
        type=_duration,
        default=d.header_timeout,
        metavar="DURATION",
        help="TLS handshake, and each request's headers (default 10s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=_duration,
        default=d.body_timeout,
        metavar="DURATION",
        help="to receive a request's body (default 10s)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=d.max_connections,
        metavar="N",
        help="open connections; more are closed at once (%(default)s)",
    )
    add_option_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`mtls-sidecar injector --listen ADDR --cert FILE --key FILE [inject flags]`."""
    args = build_parser().parse_args(list(argv))
    from ..logs import setup_logging

    setup_logging(args.log_level, "json")
    try:
        host, port = _listen(args.listen)
        options = options_from(args)
        # Fail at start, not on the first pod, when the flags make an invalid sidecar.
        inject_report(
            {"kind": "Pod", "metadata": {"name": "probe"}, "spec": {"containers": []}},
            options,
            namespace="default",
        )
    except (ValueError, InjectError) as exc:
        print(f"mtls-sidecar injector: error: {exc}", file=sys.stderr)
        return 2
    try:
        reloader = _CertReloader(args.cert, args.key, max(0.05, args.reload_interval))
    except (OSError, ssl.SSLError) as exc:
        print(
            f"mtls-sidecar injector: error: cannot load --cert {args.cert} / --key {args.key}: "
            f"{exc}",
            file=sys.stderr,
        )
        return 2
    limits = Limits(
        header_timeout=args.header_timeout,
        handshake_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
    )
    return asyncio.run(_serve(host, port, reloader, options, limits))
