"""The admin port: /live, /ready, /status, /metrics and POST /drain (aiohttp, in the master)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from aiohttp import web

from . import __version__, metrics
from .addresses import is_loopback
from .config import Address, Settings
from .errors import StartupError
from .listen import bind_listener
from .logs import BadRequestFilter
from .material import Material
from .revocation import RevocationList
from .routes import Route
from .shared import ConnectionCounts


class WorkerView(Protocol):
    """One worker process slot as /status shows it (proxy.server.WorkerProc)."""

    @property
    def slot(self) -> int: ...

    @property
    def proc(self) -> asyncio.subprocess.Process | None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def restarts(self) -> int: ...


class Master(Protocol):
    """What the admin port reads from and asks of the master (proxy.server.Master)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def started(self) -> float: ...

    @property
    def draining(self) -> bool: ...

    @property
    def admin_address(self) -> Address: ...

    @property
    def material(self) -> Material | None: ...

    @property
    def revocations(self) -> RevocationList | None: ...

    @property
    def routes(self) -> Sequence[Route]: ...

    @property
    def workers(self) -> Sequence[WorkerView]: ...

    @property
    def counts(self) -> ConnectionCounts: ...

    def readiness(self) -> tuple[bool, str]: ...

    def request_drain(self, why: str) -> None: ...


MASTER_KEY = web.AppKey("master", object)

log = logging.getLogger("mtls.admin")


def _master(request: web.Request) -> Master:
    return request.app[MASTER_KEY]  # type: ignore[return-value]


async def live(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def ready(request: web.Request) -> web.Response:
    ok, why = _master(request).readiness()
    return web.Response(status=200 if ok else 503, text=why + "\n")


async def status(request: web.Request) -> web.Response:
    m = _master(request)
    ok, why = m.readiness()
    t = metrics.totals()
    body = {
        "version": __version__,
        "ready": ok,
        "ready_reason": why,
        "draining": m.draining,
        "uptime_seconds": round(time.time() - m.started, 1),
        "identity_source": m.settings.identity_source,
        "admin_listen": str(m.admin_address),
        "certificate": m.material.describe() if m.material is not None else None,
        "revocation": _revocation(m),
        "routes": [
            {
                "direction": r.direction,
                "name": r.name,
                "listen": str(r.listen),
                "target": f"{r.target[0]}:{r.target[1]}" if r.target else "original-dst",
                "mode": r.mode,
                "expected_peer": r.expected_peer,
            }
            for r in m.routes
        ],
        "workers": [
            {
                "slot": w.slot,
                "pid": w.proc.pid if w.proc else None,
                "ready": w.ready,
                "restarts": w.restarts,
            }
            for w in m.workers
        ],
        "counts": {
            "open": m.counts.total(),
            "max": m.settings.max_connections,
            "connections": t.get("mtls_connections_total", 0),
            "active": t.get("mtls_connections_active", 0),
            "rejected": t.get("mtls_connections_rejected_total", 0),
            "upstream_failures": t.get("mtls_upstream_connect_failures_total", 0),
            "bytes": t.get("mtls_bytes_total", 0),
        },
    }
    return web.json_response(body)


def _revocation(m: Master) -> dict[str, object] | None:
    rl = m.revocations
    if rl is None:
        return None
    return {
        "crls": len(rl.crls),
        "revoked_certificates": len(rl),
        "this_update": rl.this_update.isoformat() if rl.this_update else None,
        "next_update": rl.next_update.isoformat() if rl.next_update else None,
        "stale": rl.stale,
    }


async def metrics_view(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def drain(request: web.Request) -> web.Response:
    m = _master(request)
    if not m.settings.admin_allow_remote_drain and not is_loopback(request.remote):
        return web.Response(
            status=403,
            text="POST /drain is only accepted from loopback "
            "(set MTLS_ADMIN_ALLOW_REMOTE_DRAIN=true to allow it from elsewhere)\n",
        )
    m.request_drain(f"POST /drain from {request.remote}")
    return web.Response(status=202, text="draining\n")


async def start_admin(master: Master) -> tuple[web.AppRunner, Address]:
    """Serve the admin port; returns the runner and the address actually bound (port 0)."""
    app = web.Application()
    app[MASTER_KEY] = master
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_post("/drain", drain)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter("admin port"))
    addr = master.settings.admin_listen
    try:
        # Bound like the routes' listeners: '[::]' and ':port' are dual-stack there too.
        (sock,) = bind_listener(addr, 1)
    except StartupError as exc:
        raise StartupError(f"MTLS_ADMIN_LISTEN: {exc}") from None
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        sock.close()
        raise StartupError(f"cannot listen on MTLS_ADMIN_LISTEN={addr}: {exc.strerror}") from None
    bound = Address(addr.host, sock.getsockname()[1])  # port 0: the one the kernel picked
    log.info(
        "admin listening",
        extra={"fields": {"event": "admin_listening", "listen": str(bound)}},
    )
    return runner, bound
