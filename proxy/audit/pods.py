"""Attribution from the Kubernetes API, the pure half: a pod object -> the workloads at its
addresses, and watch events applied to the map the auditor reads.

No I/O here (the HTTP side is `kube`): pod objects come in as parsed JSON, so every rule
about which pods count and what a watch event does is testable without an API server.

A pod counts when it has addresses of its own: not `spec.hostNetwork` (its IP is the node's,
shared with every other host-network process) and not finished (phase Succeeded or Failed:
its IP goes back to the pool and may be handed to the next pod). Its workload is
namespace/name, `spec.serviceAccountName` ("default" when unset, as the API server defaults
it) and `spec.nodeName` (so `workloads.counted_here` counts a cross-node connection once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..addresses import ip_of
from .workloads import Workload

PodKey = tuple[str, str]
"""(namespace, name): a pod's identity across its watch events."""

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


class BadObject(ValueError):
    """A list item or watch event that is not what the API server sends."""


class Expired(Exception):
    """The resource version we watch from is gone (HTTP 410): list again."""


class WatchError(Exception):
    """An ERROR event other than 410 (the API server's Status: code, reason, message)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")


def _field(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def pod_key(pod: Mapping[str, Any]) -> PodKey:
    """(namespace, name) of a pod object; BadObject without them."""
    meta = _field(pod, "metadata")
    ns, name = meta.get("namespace"), meta.get("name")
    if not isinstance(ns, str) or not ns or not isinstance(name, str) or not name:
        raise BadObject("a pod without metadata.namespace and metadata.name")
    return ns, name


def resource_version(obj: Mapping[str, Any]) -> str | None:
    """metadata.resourceVersion of an object or a list, when it has one."""
    rv = _field(obj, "metadata").get("resourceVersion")
    return rv if isinstance(rv, str) and rv else None


def _addresses(status: Mapping[str, Any]) -> list[str]:
    """status.podIPs (dual stack: one per family), else the older status.podIP; normalised,
    anything that is not an address skipped."""
    raw: list[Any] = []
    ips = status.get("podIPs")
    if isinstance(ips, list):
        raw = [item.get("ip") for item in ips if isinstance(item, Mapping)]
    if not raw:
        raw = [status.get("podIP")]
    out: list[str] = []
    for ip in raw:
        addr = ip_of(ip) if isinstance(ip, str) else None
        if addr is not None and str(addr) not in out:
            out.append(str(addr))
    return out


def pod_entries(pod: Mapping[str, Any]) -> dict[str, Workload]:
    """{normalised address: workload} for one pod object: empty for host-network pods,
    finished pods and pods without an address yet. BadObject when it names no pod."""
    ns, name = pod_key(pod)
    spec, status = _field(pod, "spec"), _field(pod, "status")
    if spec.get("hostNetwork") is True or status.get("phase") in FINISHED_PHASES:
        return {}
    sa = spec.get("serviceAccountName")
    node = spec.get("nodeName")
    wl = Workload(
        namespace=ns,
        pod=name,
        service_account=sa if isinstance(sa, str) and sa else "default",
        node=node if isinstance(node, str) and node else None,
    )
    return dict.fromkeys(_addresses(status), wl)


class PodIndex(Mapping[str, Workload]):
    """The address -> workload map kept from the API: the one object the agent reads, updated
    in place (so a change applies to the next connection counted), never swapped.

    Two pods can hold one address for a while (a pod being deleted keeps its IP in the API
    until its DELETED event, and the address may already belong to a new pod): each address
    keeps all its claimants, the latest one answering, so removing either pod leaves the
    address to the other.
    """

    def __init__(self) -> None:
        self._pods: dict[PodKey, dict[str, Workload]] = {}
        self._claims: dict[str, dict[PodKey, Workload]] = {}
        self._now: dict[str, Workload] = {}

    # Mapping: what the agent's `lookup` uses.
    def __getitem__(self, addr: str) -> Workload:
        return self._now[addr]

    def get(self, addr: str, default: Any = None) -> Any:
        return self._now.get(addr, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._now)

    def __len__(self) -> int:
        return len(self._now)

    @property
    def pods(self) -> int:
        """Pods with at least one address in the map."""
        return len(self._pods)

    def put(self, key: PodKey, entries: Mapping[str, Workload]) -> None:
        """The pod's addresses are now `entries` (empty: it has none we count)."""
        self.remove(key)
        if not entries:
            return
        self._pods[key] = dict(entries)
        for addr, wl in entries.items():
            claims = self._claims.setdefault(addr, {})
            claims[key] = wl
            self._now[addr] = wl

    def remove(self, key: PodKey) -> None:
        """The pod is gone: its addresses go to their earlier claimants, if any."""
        old = self._pods.pop(key, None)
        if old is None:
            return
        for addr in old:
            claims = self._claims.get(addr)
            if claims is None:
                continue
            claims.pop(key, None)
            if claims:
                self._now[addr] = next(reversed(claims.values()))
            else:
                del self._claims[addr]
                self._now.pop(addr, None)

    def replace(self, pods: Iterable[tuple[PodKey, Mapping[str, Workload]]]) -> None:
        """Everything at once, from a complete LIST: pods not in it are forgotten."""
        fresh = PodIndex()
        for key, entries in pods:
            fresh.put(key, entries)
        self._pods, self._claims, self._now = fresh._pods, fresh._claims, fresh._now


def list_items(page: Any) -> tuple[list[tuple[PodKey, dict[str, Workload]]], str | None, str]:
    """One page of a pod LIST -> (its pods' entries, the continue token or None, its
    resourceVersion). BadObject when the page is not a PodList."""
    if not isinstance(page, Mapping) or not isinstance(page.get("items"), list):
        raise BadObject("not a list (no `items`)")
    rv = resource_version(page)
    if rv is None:
        raise BadObject("a list without metadata.resourceVersion")
    out: list[tuple[PodKey, dict[str, Workload]]] = []
    for item in page["items"]:
        if not isinstance(item, Mapping):
            raise BadObject("a list item that is not an object")
        out.append((pod_key(item), pod_entries(item)))
    token = _field(page, "metadata").get("continue")
    return out, token if isinstance(token, str) and token else None, rv


def apply_event(index: PodIndex, event: Any) -> str | None:
    """One watch event applied to `index`; returns the resourceVersion to resume from (None
    when the event carries none).

    ADDED and MODIFIED set the pod's addresses (a pod that got a new IP, or finished, loses
    its old ones), DELETED removes them, BOOKMARK only moves the resourceVersion on. An ERROR
    event raises Expired for 410 (list again) and WatchError otherwise; anything else that
    is not an event raises BadObject.
    """
    if not isinstance(event, Mapping):
        raise BadObject("a watch event that is not an object")
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(obj, Mapping):
        raise BadObject(f"a {kind} event without an object")
    if kind == "ERROR":
        code = obj.get("code")
        reason, message = obj.get("reason"), obj.get("message")
        if code == 410:
            raise Expired(str(message or "resource version too old"))
        raise WatchError(
            code if isinstance(code, int) else 0,
            reason if isinstance(reason, str) else "Unknown",
            message if isinstance(message, str) else "",
        )
    if kind == "BOOKMARK":
        return resource_version(obj)
    if kind in ("ADDED", "MODIFIED"):
        index.put(pod_key(obj), pod_entries(obj))
    elif kind == "DELETED":
        index.remove(pod_key(obj))
    else:
        raise BadObject(f"unknown watch event type {kind!r}")
    return resource_version(obj)
