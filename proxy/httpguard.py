"""Limits for our small aiohttp HTTPS services (`ca serve`, `injector`): a connection cap, a
deadline for each request's headers, and quiet handling of running out of file descriptors
and of malformed requests.

aiohttp has no header timeout of its own: without one, a client sending a byte every few
seconds holds a connection (and a file descriptor) for ever.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .logs import BadRequestFilter, RateLimit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class Limits:
    """What a client without credentials can hold of a service."""

    header_timeout: float = 10.0  # from connection (or end of last response) to full headers
    body_timeout: float = 10.0  # to read a whole request body
    handshake_timeout: float = 10.0  # TLS handshake
    max_connections: int = 512  # open TLS connections; more are closed at once


def positive_int(text: str) -> int:
    """The argparse type of `--max-connections` (ca serve, the injector): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


class ConnectionGuard:
    """Per-connection limits around aiohttp's protocol: a connection limit, and a deadline
    for each request's headers (from connection, or from the end of the previous request).

    Wrap the server's protocol factory with `wrap`, and put `middleware` first in the app's
    middlewares (it stops the deadline while a request is handled)."""

    def __init__(self, limits: Limits, log: logging.Logger) -> None:
        self.limits = limits
        self.log = log
        self.active = 0
        self.closed_slow = 0
        self.refused_over_limit = 0
        self._timers: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._slow_log = RateLimit()
        self._limit_log = RateLimit()

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for create_server: aiohttp's protocols, guarded."""
        return lambda: _GuardedProtocol(self, factory())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Headers are in: stop the header deadline; restart it once the answer is made."""
        transport = request.transport
        if transport is not None:
            self.request_started(transport)
        try:
            return await handler(request)
        finally:
            if transport is not None:
                self.request_done(transport)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection and start its header deadline; False when over the limit."""
        if self.active >= self.limits.max_connections:
            self.refused_over_limit += 1
            held = self._limit_log.allow(time.monotonic())
            if held is not None:
                self.log.warning(
                    "connection limit %d reached: closing new connections%s",
                    self.limits.max_connections,
                    f" ({held} more since the last line)" if held else "",
                )
            return False
        self.active += 1
        self._arm(transport)
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        """A connection admitted before has closed."""
        self.active -= 1
        self._disarm(transport)

    def request_started(self, transport: asyncio.BaseTransport) -> None:
        """Headers are in: the body has its own timeout (in the handler)."""
        self._disarm(transport)

    def request_done(self, transport: asyncio.BaseTransport) -> None:
        """The next request's headers are due within the header timeout."""
        if not transport.is_closing():
            self._arm(transport)

    def _arm(self, transport: asyncio.BaseTransport) -> None:
        self._disarm(transport)
        loop = asyncio.get_running_loop()
        self._timers[transport] = loop.call_later(
            self.limits.header_timeout, self._expire, transport
        )

    def _disarm(self, transport: asyncio.BaseTransport) -> None:
        timer = self._timers.pop(transport, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        self._timers.pop(transport, None)
        self.closed_slow += 1
        held = self._slow_log.allow(time.monotonic())
        if held is not None:
            peer = transport.get_extra_info("peername")
            self.log.warning(
                "closed a connection from %s: no complete request within %gs%s",
                peer[0] if peer else "?",
                self.limits.header_timeout,
                f" ({held} more since the last line)" if held else "",
            )
        if isinstance(transport, asyncio.Transport):
            transport.abort()


class _GuardedProtocol(asyncio.Protocol):
    """Passes every event to aiohttp's protocol, after ConnectionGuard's checks."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused over the limit: aiohttp never saw it
        self.guard.release(self.transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def resource_error_handler(
    limiter: RateLimit, log: logging.Logger
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler: running out of file descriptors (EMFILE on accept)
    is one warning line per second, not a traceback per failed accept."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        callback = getattr(context.get("handle"), "_callback", None)
        if isinstance(exc, ValueError) and getattr(callback, "__name__", "") == "_start_serving":
            # After EMFILE, asyncio retries accept() from a timer that outlives server.close():
            # at shutdown it finds the listening socket closed. Nothing is lost.
            log.debug("accept retry after the listener was closed: %s", exc)
            return
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            held = limiter.allow(time.monotonic())
            if held is not None:
                log.warning(
                    "cannot accept connections: %s%s",
                    exc.strerror or exc,
                    f" ({held} more since the last line)" if held else "",
                )
            return
        loop.default_exception_handler(context)

    return handler


async def start_guarded(
    app: web.Application,
    guard: ConnectionGuard,
    *,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext,
    backlog: int = 256,
) -> tuple[web.AppRunner, asyncio.Server]:
    """Serve `app` over HTTPS on host:port with `guard`'s limits (its middleware must be in
    the app). The caller closes the server and cleans up the runner."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(resource_error_handler(RateLimit(), guard.log))
    # Malformed requests (garbage, oversized headers): one warning line a second, no traceback.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter(guard.log.name))
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=2.0,
        keepalive_timeout=guard.limits.header_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    try:
        server = await loop.create_server(
            guard.wrap(runner.server),
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=guard.limits.handshake_timeout,
            backlog=backlog,
        )
    except BaseException:
        await runner.cleanup()
        raise
    return runner, server
