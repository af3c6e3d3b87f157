"""The auditor's map from the Kubernetes API: pod objects -> workloads and watch events (pure),
then the watcher against a fake API server (HTTPS with its own CA, bearer tokens, a paginated
LIST, a chunked WATCH whose events the test pushes, 410s, dropped streams, failures), the
agent reading it under the static file, and the CLI refusing bad flags."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.audit.agent import Agent, AgentConfig
from proxy.audit.kube import KubeSettings, PodWatcher
from proxy.audit.pods import (
    BadObject,
    Expired,
    PodIndex,
    WatchError,
    apply_event,
    list_items,
    pod_entries,
)
from proxy.audit.workloads import Overlay, Workload, lookup
from proxy.config.parse import Address
from tests.pki import Issuer, key_pem, make_root, pem

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def pod(
    name: str,
    *ips: str,
    ns: str = "shop",
    sa: str | None = "cart",
    node: str | None = "worker-1",
    phase: str = "Running",
    host_network: bool = False,
    legacy: bool = False,
) -> dict[str, Any]:
    """A pod object as the API server serves it (the fields the auditor reads, and others)."""
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app:1"}]}
    if sa is not None:
        spec["serviceAccountName"] = sa
    if node is not None:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        if not legacy:
            status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": {"a": "b"}},
        "spec": spec,
        "status": status,
    }


def wl(name: str, ns: str = "shop", sa: str = "cart", node: str | None = "worker-1") -> Workload:
    return Workload(namespace=ns, pod=name, service_account=sa, node=node)


# --- pure: pod -> entries, events -> index -----------------------------------------------------


def test_pod_entries_name_every_address_of_a_running_pod() -> None:
    dual = pod("cart-1", "10.1.0.5", "fd00::0005")
    assert pod_entries(dual) == {"10.1.0.5": wl("cart-1"), "fd00::5": wl("cart-1")}
    # Before podIPs existed (or a client that strips it): status.podIP alone.
    assert pod_entries(pod("cart-2", "10.1.0.6", legacy=True)) == {"10.1.0.6": wl("cart-2")}
    # No service account named: the API server's default one.
    assert pod_entries(pod("x", "10.1.0.7", sa=None)) == {
        "10.1.0.7": Workload("shop", "x", "default", "worker-1")
    }
    assert pod_entries(pod("y", "10.1.0.8", node=None))["10.1.0.8"].node is None
    # Pending (no address yet) and garbage addresses: nothing.
    assert pod_entries(pod("pending", phase="Pending")) == {}
    assert pod_entries(pod("odd", "not-an-ip", "10.1.0.9")) == {"10.1.0.9": wl("odd")}


@pytest.mark.parametrize(
    "why, obj",
    [
        ("host network: the node's address", pod("kp", "192.168.1.10", host_network=True)),
        ("succeeded: the address goes back to the pool", pod("job", "10.1.0.5", phase="Succeeded")),
        ("failed", pod("crash", "10.1.0.5", phase="Failed")),
    ],
)
def test_pods_without_an_address_of_their_own_are_not_mapped(why: str, obj: dict[str, Any]) -> None:
    assert pod_entries(obj) == {}, why


def test_pod_without_a_name_is_a_bad_object() -> None:
    obj = pod("a", "10.1.0.5")
    del obj["metadata"]["namespace"]
    with pytest.raises(BadObject):
        pod_entries(obj)


def _event(kind: str, obj: dict[str, Any], rv: int) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["resourceVersion"] = str(rv)
    return {"type": kind, "object": obj}


def test_events_applied_to_the_index() -> None:
    index = PodIndex()
    assert apply_event(index, _event("ADDED", pod("a", "10.1.0.5"), 11)) == "11"
    assert dict(index) == {"10.1.0.5": wl("a")}
    # A new address: the old one is no longer this pod's.
    assert apply_event(index, _event("MODIFIED", pod("a", "10.1.0.6", sa="web"), 12)) == "12"
    assert dict(index) == {"10.1.0.6": wl("a", sa="web")}
    # Finished: its address leaves the map though the pod object stays.
    apply_event(index, _event("MODIFIED", pod("a", "10.1.0.6", phase="Succeeded"), 13))
    assert dict(index) == {} and index.pods == 0
    apply_event(index, _event("ADDED", pod("b", "10.1.0.7"), 14))
    bookmark = {
        "type": "BOOKMARK",
        "object": {"kind": "Pod", "metadata": {"resourceVersion": "20"}},
    }
    assert apply_event(index, bookmark) == "20"
    assert dict(index) == {"10.1.0.7": wl("b")}
    assert apply_event(index, _event("DELETED", pod("b", "10.1.0.7"), 21)) == "21"
    assert dict(index) == {}
    apply_event(index, _event("DELETED", pod("never-seen", "10.1.0.8"), 22))  # harmless


def test_error_events() -> None:
    index = PodIndex()
    gone = {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "code": 410,
            "reason": "Expired",
            "message": "too old resource version: 5 (90)",
        },
    }
    with pytest.raises(Expired, match="too old"):
        apply_event(index, gone)
    with pytest.raises(WatchError) as err:
        apply_event(index, {"type": "ERROR", "object": {"code": 500, "reason": "InternalError"}})
    assert err.value.code == 500 and err.value.reason == "InternalError"
    bad_events: list[Any] = [
        [],
        {"type": "ADDED"},
        {"type": "RENAMED", "object": pod("a", "1.2.3.4")},
    ]
    for bad in bad_events:
        with pytest.raises(BadObject):
            apply_event(index, bad)


def test_an_address_held_by_two_pods_goes_to_the_survivor() -> None:
    """A deleted pod keeps its IP in the API until its DELETED event, and the IP may already be
    a new pod's: whichever is removed, the other keeps the address."""
    index = PodIndex()
    index.put(("shop", "old"), {"10.1.0.5": wl("old")})
    index.put(("shop", "new"), {"10.1.0.5": wl("new")})
    assert index["10.1.0.5"] == wl("new")
    index.remove(("shop", "old"))
    assert index["10.1.0.5"] == wl("new")
    index.put(("shop", "old"), {"10.1.0.5": wl("old")})
    index.remove(("shop", "old"))
    assert index["10.1.0.5"] == wl("new")
    index.remove(("shop", "new"))
    assert "10.1.0.5" not in index and len(index) == 0


def test_list_pages_and_replace() -> None:
    page = {
        "kind": "PodList",
        "metadata": {"resourceVersion": "7", "continue": "tok"},
        "items": [pod("a", "10.1.0.5"), pod("h", "192.168.1.1", host_network=True)],
    }
    items, token, rv = list_items(page)
    assert token == "tok" and rv == "7"
    assert items == [(("shop", "a"), {"10.1.0.5": wl("a")}), (("shop", "h"), {})]
    index = PodIndex()
    index.put(("shop", "gone"), {"10.1.0.9": wl("gone")})
    index.replace(items)
    assert dict(index) == {"10.1.0.5": wl("a")} and index.pods == 1
    bad_pages: list[Any] = [{"items": []}, {"metadata": {"resourceVersion": "1"}}, "x"]
    for bad in bad_pages:
        with pytest.raises(BadObject):
            list_items(bad)


def test_overlay_puts_the_file_first() -> None:
    static = {"10.1.0.5": wl("from-file", sa="vm")}
    index = PodIndex()
    index.put(("shop", "a"), {"10.1.0.5": wl("a"), "10.1.0.6": wl("a")})
    both = Overlay(static, index)
    assert lookup(both, "10.1.0.5") == wl("from-file", sa="vm")
    assert lookup(both, "::ffff:10.1.0.6") == wl("a")
    assert lookup(both, "10.1.0.7") is None
    assert sorted(both) == ["10.1.0.5", "10.1.0.6"] and len(both) == 2
    index.remove(("shop", "a"))  # read live
    assert lookup(both, "10.1.0.6") is None and len(both) == 1


# --- the fake API server ----------------------------------------------------------------------


def _server_cert(root: Issuer) -> tuple[bytes, bytes]:
    """A serving certificate for 127.0.0.1 (an IP SAN, as the API server's ClusterIP has)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return pem(cert), key_pem(key)


class FakeApi:
    """GET /api/v1/pods as the API server answers it: a bearer token required, LIST with
    limit/continue (one snapshot across pages), WATCH from a resourceVersion (everything after
    it, then what the test pushes; ERROR 410 for a version compacted away; bookmarks)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.rv = 100
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.log: list[tuple[int, bytes]] = []
        self.compacted = 0
        self.requests: list[dict[str, str]] = []
        self.rejected = 0
        self.fail: tuple[int, str] | None = None
        """(status, body) answered to every authorised request while set."""
        self.watching = 0
        self.closed = False
        self._drops = 0
        self._tick = asyncio.Event()

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def seed(self, *objs: dict[str, Any]) -> None:
        for obj in objs:
            self.pods[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def push(self, kind: str, obj: dict[str, Any]) -> int:
        """An event: the list's state changes with it, and open watches are sent it."""
        self.rv += 1
        event = _event(kind, obj, self.rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = event["object"]
        self.log.append((self.rv, json.dumps(event).encode()))
        self._wake()
        return self.rv

    def bookmark(self) -> int:
        self.rv += 1
        obj = {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}
        self.log.append((self.rv, json.dumps({"type": "BOOKMARK", "object": obj}).encode()))
        self._wake()
        return self.rv

    def compact(self) -> None:
        """The store moves on and everything so far is compacted away: watches from before
        now get ERROR 410."""
        self.rv += 1
        self.compacted = self.rv
        self._wake()

    def drop(self) -> None:
        """Open watch streams are cut mid-stream (no final chunk)."""
        self._drops += 1
        self._wake()

    def lists(self) -> list[dict[str, str]]:
        return [r for r in self.requests if "watch" not in r]

    def watches(self) -> list[dict[str, str]]:
        return [r for r in self.requests if "watch" in r]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.rejected += 1
            return _status(401, "Unauthorized", "Unauthorized")
        params = dict(request.query)
        self.requests.append(params)
        if self.fail is not None:
            status, body = self.fail
            return web.Response(status=status, text=body, content_type="application/json")
        if params.get("watch") in ("1", "true"):
            return await self._watch(request, int(params["resourceVersion"]))
        limit = int(params.get("limit", "0")) or len(self.pods)
        start = int(params.get("continue", "0"))
        keys = sorted(self.pods)
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if start + limit < len(keys):
            meta["continue"] = str(start + limit)
        items = [self.pods[k] for k in keys[start : start + limit]]
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": meta,
                                  "items": items})  # fmt: skip

    async def _watch(self, request: web.Request, since: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        drops = self._drops
        sent = since
        self.watching += 1
        try:
            while True:
                if self.closed:
                    return resp
                if self._drops != drops:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if since < self.compacted:
                    gone = {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since}",
                        },
                    }
                    await resp.write(json.dumps(gone).encode() + b"\n")
                    await resp.write_eof()
                    return resp
                tick = self._tick
                for rv, line in self.log:
                    if rv > sent:
                        await resp.write(line + b"\n")
                        sent = rv
                await tick.wait()
        finally:
            self.watching -= 1


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
    return web.json_response(body, status=code)


@asynccontextmanager
async def serving(api: FakeApi, tmp: Path) -> AsyncIterator[KubeSettings]:
    """The fake API on https://127.0.0.1:<port>, and the settings of a client that trusts it
    (its CA in ca.crt, its token in token)."""
    root = make_root("Test Kubernetes CA")
    cert, key = _server_cert(root)
    (tmp / "server.crt").write_bytes(cert)
    (tmp / "server.key").write_bytes(key)
    (tmp / "ca.crt").write_bytes(pem(root.cert))
    (tmp / "token").write_text(api.token + "\n")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "server.crt", tmp / "server.key")
    app = web.Application()
    app.router.add_get("/api/v1/pods", api.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield KubeSettings(f"https://127.0.0.1:{port}", tmp / "token", tmp / "ca.crt")
    finally:
        api.closed = True
        api._wake()
        await runner.cleanup()


async def until(what: str, cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def watching(watcher: PodWatcher) -> AsyncIterator[PodWatcher]:
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        assert task.cancelled(), "the watcher ended on its own (it must retry forever)"


FAST = (0.02, 0.2)


def _counter() -> tuple[dict[str, int], Callable[[str], None]]:
    counts: dict[str, int] = {}

    def on_error(reason: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    return counts, on_error


@asynccontextmanager
async def watched(
    api: FakeApi, tmp: Path, **options: Any
) -> AsyncIterator[tuple[PodWatcher, dict[str, int]]]:
    """The fake API served and a watcher running against it (FAST backoff unless `options`
    say otherwise), with the watcher's failures counted by reason."""
    counts, on_error = _counter()
    async with serving(api, tmp) as settings:
        w = PodWatcher(settings, on_error=on_error, **{"backoff": FAST, **options})
        async with watching(w):
            yield w, counts


# --- the watcher against the fake API ---------------------------------------------------------


def test_list_then_watch_every_kind_of_event(tmp_path: Path) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(
            pod("a", "10.1.0.1"), pod("b", "10.1.0.2", "fd00::2"), pod("c", "10.1.0.3"),
            pod("kube-proxy", "192.168.1.10", host_network=True),
            pod("job", "10.1.0.4", phase="Succeeded"),
        )  # fmt: skip
        async with watched(api, tmp_path, page_size=2) as (w, counts):
            await until("the first watch", lambda: w.state == "watching")
            # Three pages of two: one snapshot, resumed from the list's resourceVersion.
            assert [r.get("continue") for r in api.lists()] == [None, "2", "4"]
            assert {r["limit"] for r in api.lists()} == {"2"}
            (first,) = api.watches()
            assert first["resourceVersion"] == "100"
            assert first["allowWatchBookmarks"] == "true"
            assert w.synced and dict(w.index) == {
                "10.1.0.1": wl("a"), "10.1.0.2": wl("b"), "fd00::2": wl("b"),
                "10.1.0.3": wl("c"),
            }  # fmt: skip

            api.push("ADDED", pod("d", "10.1.0.9", ns="pay", sa="ledger", node="worker-2"))
            await until("ADDED", lambda: "10.1.0.9" in w.index)
            assert w.index["10.1.0.9"] == wl("d", ns="pay", sa="ledger", node="worker-2")

            api.push("MODIFIED", pod("a", "10.1.0.11"))
            await until("MODIFIED", lambda: "10.1.0.11" in w.index)
            assert "10.1.0.1" not in w.index

            api.push("DELETED", pod("b", "10.1.0.2", "fd00::2"))
            await until("DELETED", lambda: "fd00::2" not in w.index)
            assert "10.1.0.2" not in w.index

            api.push("MODIFIED", pod("c", "10.1.0.3", phase="Failed"))
            api.push("ADDED", pod("hn", "192.168.1.11", host_network=True))
            rv = api.bookmark()
            await until("the bookmark", lambda: w.resource_version == str(rv))
            assert dict(w.index) == {"10.1.0.11": wl("a"),
                                     "10.1.0.9": wl("d", ns="pay", sa="ledger",
                                                    node="worker-2")}  # fmt: skip
            assert len(api.watches()) == 1 and counts == {}
            assert w.state == "watching" and w.index.pods == 2

    asyncio.run(main())


def test_410_lists_again_and_a_dropped_stream_is_resumed(tmp_path: Path) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"))
        async with watched(api, tmp_path) as (w, counts):
            await until("the first watch", lambda: api.watching == 1)
            rv = api.push("ADDED", pod("b", "10.1.0.2"))
            await until("ADDED", lambda: "10.1.0.2" in w.index)

            # Cut mid-stream; what happens meanwhile is sent to the resumed watch (the
            # stream is cut before it could send the DELETED pushed right after).
            api.drop()
            api.push("DELETED", pod("a", "10.1.0.1"))
            await until("the second watch", lambda: len(api.watches()) == 2)
            assert api.watches()[1]["resourceVersion"] == str(rv)
            await until("DELETED after the drop", lambda: "10.1.0.1" not in w.index)
            assert len(api.lists()) == 1 and counts == {}

            # The watched version is compacted away: ERROR 410, then a fresh LIST (which
            # also finds what happened while nobody watched).
            api.pods[("shop", "c")] = pod("c", "10.1.0.3")
            api.rv += 1
            api.compact()
            await until("the second list", lambda: len(api.lists()) == 2)
            await until("the third watch", lambda: len(api.watches()) == 3)
            assert api.watches()[2]["resourceVersion"] == str(api.rv)
            assert dict(w.index) == {"10.1.0.2": wl("b"), "10.1.0.3": wl("c")}
            assert counts == {}, "a 410 is routine, not an error"

    asyncio.run(main())


def test_token_is_read_again_on_every_reconnect(tmp_path: Path) -> None:
    async def main(caplog_records: list[logging.LogRecord]) -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"))
        async with watched(api, tmp_path) as (w, counts):
            await until("the first watch", lambda: api.watching == 1)
            # The token rotates on the server first: reconnecting with the old one fails,
            # again and again (logged once), the map kept.
            api.token = "token-2"
            api.drop()
            await until("several refusals", lambda: counts.get("unauthorized", 0) >= 3)
            assert dict(w.index) == {"10.1.0.1": wl("a")} and w.state != "watching"
            assert "401" in (w.last_error or "")
            # kubelet writes the new token: the next attempt reads it.
            w.settings.token_file.write_text("token-2\n")
            await until("the watch again", lambda: w.state == "watching")
            assert api.watching == 1 and w.last_error is None
            api.push("ADDED", pod("b", "10.1.0.2"))
            await until("an event with the new token", lambda: "10.1.0.2" in w.index)
        assert set(counts) == {"unauthorized"}
        warned = [r for r in caplog_records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "401" in warned[0].getMessage(), warned

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("mtls.audit.kubernetes")
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        asyncio.run(main(records))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize(
    "status, body, reason",
    [
        (403, json.dumps({"kind": "Status", "code": 403, "reason": "Forbidden",
                          "message": 'pods is forbidden: cannot list resource "pods"'}),
         "forbidden"),
        (500, json.dumps({"kind": "Status", "code": 500, "message": "etcd"}), "http_error"),
        (200, "this is not JSON", "bad_response"),
        (200, json.dumps({"kind": "Status", "items": "nope"}), "bad_response"),
    ],
)  # fmt: skip
def test_api_failures_are_counted_and_the_map_kept(
    tmp_path: Path, status: int, body: str, reason: str
) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"))
        async with watched(api, tmp_path) as (w, counts):
            await until("the first watch", lambda: api.watching == 1)
            api.fail = (status, body)
            api.compact()  # the watch ends: LIST again, which now fails
            await until("two failures", lambda: counts.get(reason, 0) >= 2)
            assert set(counts) == {reason}
            assert dict(w.index) == {"10.1.0.1": wl("a")}, "the last good map is kept"
            assert w.state != "watching" and w.last_error
            if status == 403:
                assert "403" in w.last_error and "forbidden" in w.last_error
            api.fail = None
            api.seed(pod("b", "10.1.0.2"))
            await until("recovered", lambda: "10.1.0.2" in w.index)
            assert w.last_error is None

    asyncio.run(main())


def test_a_bug_in_the_watcher_is_logged_counted_and_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception (a bug of ours) does not end the watcher in silence: it is
    logged with its traceback, counted, and the watcher lists again."""
    real_list = PodWatcher._list
    calls = {"n": 0}

    async def flaky_list(self: PodWatcher, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return await real_list(self, *args)

    monkeypatch.setattr(PodWatcher, "_list", flaky_list)

    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"))
        async with watched(api, tmp_path) as (w, counts):
            await until("listed after the bug", lambda: "10.1.0.1" in w.index)
        assert counts == {"bad_response": 1}

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert any("RuntimeError: boom" in (r.exc_text or "") for r in caplog.records)


def test_an_unreachable_api_backs_off(tmp_path: Path) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        async with serving(api, tmp_path) as settings:
            pass  # the port is closed again: nothing answers there
        counts, on_error = _counter()
        w = PodWatcher(settings, on_error=on_error, backoff=(0.05, 0.4))
        started = time.monotonic()
        async with watching(w):
            await until("four failures", lambda: counts.get("unreachable", 0) >= 4)
        # 0.05 + 0.1 + 0.2 between the first four attempts: doubling, not spinning.
        assert time.monotonic() - started >= 0.3
        assert set(counts) == {"unreachable"} and not w.synced and len(w.index) == 0

    asyncio.run(main())


def test_a_server_the_ca_does_not_vouch_for_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"))
        counts, on_error = _counter()
        async with serving(api, tmp_path) as settings:
            (tmp_path / "other-ca.crt").write_bytes(pem(make_root("Someone Else").cert))
            other = KubeSettings(settings.api, settings.token_file, tmp_path / "other-ca.crt")
            w = PodWatcher(other, on_error=on_error, backoff=FAST)
            async with watching(w):
                await until("a refusal", lambda: counts.get("unreachable", 0) >= 1)
            assert api.requests == [] and len(w.index) == 0
            assert "certificate" in (w.last_error or "").lower()

    asyncio.run(main())


# --- the agent: the file over the API, metrics ------------------------------------------------


def test_agent_reads_the_api_map_under_the_static_file(tmp_path: Path) -> None:
    async def main() -> None:
        api = FakeApi("token-1")
        api.seed(pod("a", "10.1.0.1"), pod("b", "10.1.0.2"))
        async with serving(api, tmp_path) as settings:
            static = {"10.1.0.2": Workload("legacy", "billing-vm", "billing", None),
                      "192.168.10.5": Workload("legacy", "db-vm", "db", None)}  # fmt: skip
            agent = Agent(
                AgentConfig(listen=Address("127.0.0.1", 0), workloads=static, kubernetes=settings)
            )
            assert agent.watcher is not None
            agent.watcher.backoff = FAST
            sample = agent.metrics.registry.get_sample_value
            assert sample("mtls_audit_workloads", {"source": "file"}) == 2
            assert sample("mtls_audit_kubernetes_errors_total", {"reason": "forbidden"}) == 0
            assert agent._who("10.1.0.1") == ("unknown", "10.1.0.1")
            async with watching(agent.watcher):
                await until("the list", lambda: agent.watcher is not None and agent.watcher.synced)
                assert agent._who("10.1.0.1") == ("shop/cart", "shop/a")
                assert agent._who("10.1.0.2") == ("legacy/billing", "legacy/billing-vm")
                assert agent._who("192.168.10.5") == ("legacy/db", "legacy/db-vm")
                assert sample("mtls_audit_workloads", {"source": "kubernetes"}) == 2
                api.push("ADDED", pod("c", "10.1.0.3", ns="pay", sa="ledger"))
                await until("ADDED", lambda: lookup(agent.workloads, "10.1.0.3") is not None)
                assert agent._who("10.1.0.3") == ("pay/ledger", "pay/c")
                assert sample("mtls_audit_workloads", {"source": "kubernetes"}) == 3
                api.fail = (403, "{}")
                api.compact()
                await until(
                    "a counted failure",
                    lambda: sample("mtls_audit_kubernetes_errors_total", {"reason": "forbidden"}),
                )
                assert agent._who("10.1.0.3") == ("pay/ledger", "pay/c")

    asyncio.run(main())


# --- the CLI: bad flags are exit 2 ------------------------------------------------------------


def _audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "--listen", "127.0.0.1:0", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env or {"PATH": "/usr/bin"},
    )  # fmt: skip


def test_cli_refuses_bad_kubernetes_flags(tmp_path: Path) -> None:
    token, ca, junk = tmp_path / "token", tmp_path / "ca.crt", tmp_path / "junk.crt"
    token.write_text("t\n")
    ca.write_bytes(pem(make_root().cert))
    junk.write_text("not a certificate\n")
    (tmp_path / "empty").write_text("\n")
    files = ["--kubernetes-token-file", str(token), "--kubernetes-ca-file", str(ca)]
    cases = [
        (["--kubernetes", *files], "KUBERNETES_SERVICE_HOST"),
        (["--kubernetes", "--kubernetes-api", "http://10.96.0.1", *files], "https://"),
        (["--kubernetes", "--kubernetes-api", "https://10.96.0.1:99999", *files], "https://"),
        (["--kubernetes-api", "https://10.96.0.1"], "without --kubernetes"),
        (["--kubernetes", "--kubernetes-api", "https://10.96.0.1", "--kubernetes-token-file",
          str(tmp_path / "missing"), "--kubernetes-ca-file", str(ca)], "--kubernetes-token-file"),
        (["--kubernetes", "--kubernetes-api", "https://10.96.0.1", "--kubernetes-token-file",
          str(tmp_path / "empty"), "--kubernetes-ca-file", str(ca)], "empty"),
        (["--kubernetes", "--kubernetes-api", "https://10.96.0.1", "--kubernetes-token-file",
          str(token), "--kubernetes-ca-file", str(junk)], "--kubernetes-ca-file"),
    ]  # fmt: skip
    for args, says in cases:
        proc = _audit(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, proc.stderr)
        assert lines[0].startswith("mtls-sidecar audit: ")
