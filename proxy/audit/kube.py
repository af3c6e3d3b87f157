"""Attribution from the Kubernetes API, the I/O half: LIST every pod, then WATCH from the
list's resourceVersion, keeping a `pods.PodIndex` (address -> workload) the agent reads.

As in-cluster clients do: the API server at https://$KUBERNETES_SERVICE_HOST:
$KUBERNETES_SERVICE_PORT, verified against the service account's `ca.crt`, with its bearer
`token` read again on every (re)connect (projected tokens rotate, about hourly). Needs only
`get`, `list`, `watch` on `pods` (deploy/kubernetes/audit/).

Failures never empty the map: the last good one is kept while the watcher retries (0.5 s
doubling to 30 s, reset by a watch that delivered events: a server that answers the LIST
but fails every watch is not listed again in a tight loop). Each one is
counted by reason and logged once until it changes or the API answers again. A watch that
ends (the API server closes them every few minutes) or drops is resumed from the last
resourceVersion seen; a 410 Gone (that version is compacted away) means LIST again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .pods import (
    Expired,
    PodIndex,
    PodKey,
    WatchError,
    apply_event,
    list_items,
)
from .workloads import Workload

log = logging.getLogger("mtls.audit.kubernetes")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PODS_PATH = "/api/v1/pods"
PAGE_SIZE = 500
WATCH_SECONDS = 290
"""Asked of the API server per watch (`timeoutSeconds`); the stream is then resumed."""
LIST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
MAX_EVENT_BYTES = 16 << 20
BACKOFF = (0.5, 30.0)
REASONS = ("unauthorized", "forbidden", "http_error", "unreachable", "bad_response")
"""Label values of mtls_audit_kubernetes_errors_total."""


@dataclass(frozen=True)
class KubeSettings:
    api: str
    """https://host:port of the API server, no trailing slash."""
    token_file: Path
    ca_file: Path


class ApiFailure(Exception):
    """One failed exchange with the API server: `reason` is the metric label."""

    def __init__(self, reason: str, detail: str, key: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.key = key or f"{reason}: {detail}"
        """What makes two failures the same one (logged once)."""
        super().__init__(detail)


def read_token(path: Path) -> str:
    """The bearer token (OSError or ValueError when unreadable or empty)."""
    token = path.read_text().strip()
    if not token:
        raise ValueError("the token file is empty")
    return token


def ssl_context(ca_file: Path) -> ssl.SSLContext:
    """Verifies the API server against the cluster CA only (not the system's roots)."""
    return ssl.create_default_context(cafile=str(ca_file))


def settings_from(
    env: Mapping[str, str],
    *,
    api: str | None = None,
    token_file: Path | None = None,
    ca_file: Path | None = None,
) -> KubeSettings:
    """The in-cluster settings, each overridable; ValueError (naming the flag) when they are
    missing, malformed or unreadable, so `audit` fails at start rather than retrying forever."""
    if api is None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ValueError(
                "--kubernetes: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set "
                "(not in a pod?); give --kubernetes-api"
            )
        api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    try:
        url = urllib.parse.urlsplit(api)
        url.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        url = urllib.parse.urlsplit("")
    if url.scheme != "https" or not url.hostname or url.path not in ("", "/") or url.query:
        raise ValueError(
            f"--kubernetes-api {api!r}: expected the API server's https://HOST[:PORT] "
            "(TLS is always verified)"
        )
    settings = KubeSettings(
        api=api.rstrip("/"),
        token_file=token_file or SA_DIR / "token",
        ca_file=ca_file or SA_DIR / "ca.crt",
    )
    try:
        read_token(settings.token_file)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"--kubernetes-token-file {settings.token_file}: {why}") from None
    try:
        ssl_context(settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"--kubernetes-ca-file {settings.ca_file}: {why}") from None
    return settings


def _reason(status: int) -> str:
    """The metric label of a refusal by HTTP status (or a watch ERROR event's code)."""
    return {401: "unauthorized", 403: "forbidden"}.get(status, "http_error")


class PodWatcher:
    """Keeps `index` equal to the API server's pods (see the module docstring)."""

    def __init__(
        self,
        settings: KubeSettings,
        index: PodIndex | None = None,
        *,
        on_error: Callable[[str], None] | None = None,
        page_size: int = PAGE_SIZE,
        backoff: tuple[float, float] = BACKOFF,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.settings = settings
        self.index = index if index is not None else PodIndex()
        self.on_error = on_error or (lambda reason: None)
        self.page_size = page_size
        self.backoff = backoff
        self.watch_seconds = watch_seconds
        self.state = "starting"
        """starting, listing, watching, or retrying (after a failure, waiting to LIST)."""
        self.synced = False
        """A complete LIST has been applied at least once."""
        self.resource_version: str | None = None
        self.last_error: str | None = None
        """The last failure, until the API answers again."""
        self._last_key: str | None = None
        self._delay = backoff[0]

    async def run(self) -> None:
        """LIST, WATCH, and again on failure, until cancelled."""
        while True:
            try:
                await self._cycle()
            except Expired as exc:
                log.info(
                    "pod watch expired; listing again",
                    extra={"fields": {"event": "audit_kubernetes_expired", "detail": str(exc)}},
                )
            except ApiFailure as exc:
                self._fail(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A bug of ours must not stop the map from being kept up to date in silence:
                # its traceback is logged, it is counted, and the watcher starts over.
                log.exception(
                    "pod watcher failed; listing again",
                    extra={"fields": {"event": "audit_kubernetes_internal_error"}},
                )
                self._fail(ApiFailure("bad_response", f"internal error: {exc!r}"))
            self.state = "retrying"
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self.backoff[1])

    async def _cycle(self) -> None:
        """One LIST, then watches resumed from the last resourceVersion until one fails."""
        try:
            ctx = ssl_context(self.settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ApiFailure("unreachable", f"cannot read {self.settings.ca_file}: {exc}") from None
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await self._list(session, ctx)
            while True:
                if await self._watch(session, ctx):
                    self._delay = self.backoff[0]
                else:  # a stream that ends before saying anything: do not spin on it
                    await asyncio.sleep(self._delay)
                    self._delay = min(self._delay * 2, self.backoff[1])

    def _headers(self) -> dict[str, str]:
        try:
            token = read_token(self.settings.token_file)  # again each time: it rotates
        except (OSError, ValueError) as exc:
            raise ApiFailure(
                "unauthorized", f"cannot read the token {self.settings.token_file}: {exc}"
            ) from None
        return {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": "mtls-sidecar-audit",
        }

    async def _open(
        self,
        session: aiohttp.ClientSession,
        ctx: ssl.SSLContext,
        params: dict[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """GET /api/v1/pods with `params`: a 200 response, or ApiFailure / Expired."""
        what = "watch" if "watch" in params else "list"
        headers = self._headers()
        url = self.settings.api + PODS_PATH
        try:
            resp = await session.get(url, params=params, headers=headers, ssl=ctx, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiFailure(
                "unreachable",
                f"{what} pods at {self.settings.api}: {type(exc).__name__}: {exc}",
                key=f"unreachable: {type(exc).__name__}",
            ) from None
        if resp.status == 200:
            return resp
        try:
            body = await resp.content.read(4096)
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            resp.release()
        message = ""
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("message"), str):
                message = doc["message"][:300]
        except ValueError:
            pass
        status = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
        if resp.status == 410:
            raise Expired(f"{what}: {status} {message}".rstrip())
        raise ApiFailure(
            _reason(resp.status),
            f"{what} pods: {status}{': ' + message if message else ''}",
            key=status,
        )

    async def _list(self, session: aiohttp.ClientSession, ctx: ssl.SSLContext) -> None:
        """Every pod, page by page, into the index at once; the watch resumes from its RV."""
        self.state = "listing"
        pods: list[tuple[PodKey, dict[str, Workload]]] = []
        token: str | None = None
        timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT)
        while True:
            params = {"limit": str(self.page_size)}
            if token is not None:
                params["continue"] = token
            resp = await self._open(session, ctx, params, timeout)
            async with resp:
                try:
                    data = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise ApiFailure(
                        "unreachable",
                        f"list pods: {type(exc).__name__}: {exc}",
                        key=f"unreachable: {type(exc).__name__}",
                    ) from None
            try:
                # A page of 500 pods is megabytes of JSON: parsed off the event loop.
                page = await asyncio.to_thread(json.loads, data)
                items, token, rv = list_items(page)
            except ValueError as exc:  # not JSON, or BadObject: not a PodList
                raise ApiFailure(
                    "bad_response", f"list pods: {exc}", key="bad_response: list"
                ) from None
            pods.extend(items)
            if token is None:
                break
        self.index.replace(pods)
        self.resource_version = rv
        first = not self.synced
        self.synced = True
        if self._last_key is not None:
            log.info(
                "the Kubernetes API answers again",
                extra={"fields": {"event": "audit_kubernetes_recovered"}},
            )
            self.last_error = self._last_key = None
        (log.info if first else log.debug)(
            "pods listed",
            extra={"fields": {"event": "audit_kubernetes_listed", "pods": self.index.pods,
                              "addresses": len(self.index), "resource_version": rv}},
        )  # fmt: skip

    async def _watch(self, session: aiohttp.ClientSession, ctx: ssl.SSLContext) -> int:
        """One watch stream, applied event by event; returns how many events it delivered.
        Ends quietly when the stream ends or drops (resumed by the caller)."""
        assert self.resource_version is not None
        params = {
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_seconds),
        }
        # No total: the stream lasts minutes. A silent one (no bookmark either) is dead.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT, sock_read=self.watch_seconds + 30
        )
        resp = await self._open(session, ctx, params, timeout)
        self.state = "watching"
        delivered = 0
        buf = bytearray()
        async with resp:
            try:
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    if b"\n" not in chunk:
                        if len(buf) > MAX_EVENT_BYTES:
                            raise ApiFailure(
                                "bad_response",
                                f"watch pods: an event over {MAX_EVENT_BYTES} bytes",
                                key="bad_response: watch",
                            )
                        continue
                    *lines, rest = bytes(buf).split(b"\n")
                    buf = bytearray(rest)
                    for line in lines:
                        if line.strip():
                            self._event(line)
                            delivered += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug(
                    "pod watch dropped; resuming",
                    extra={"fields": {"event": "audit_kubernetes_watch_dropped",
                                      "error": f"{type(exc).__name__}: {exc}"}},
                )  # fmt: skip
        return delivered

    def _event(self, line: bytes) -> None:
        try:
            rv = apply_event(self.index, json.loads(line))
        except ValueError as exc:  # not JSON, or BadObject: not an event
            raise ApiFailure(
                "bad_response", f"watch pods: {exc}", key="bad_response: watch"
            ) from None
        except WatchError as exc:
            raise ApiFailure(
                _reason(exc.code), f"watch pods: {exc}", key=f"watch {exc.code}"
            ) from None
        if rv is not None:
            self.resource_version = rv

    def _fail(self, exc: ApiFailure) -> None:
        self.on_error(exc.reason)
        if exc.key != self._last_key:
            log.warning(
                "Kubernetes API: %s (keeping the last map: %d addresses)",
                exc.detail,
                len(self.index),
                extra={"fields": {"event": "audit_kubernetes_error", "reason": exc.reason}},
            )
        self.last_error, self._last_key = exc.detail, exc.key
