"""Attribution: an IP address -> the workload behind it, and label values kept bounded.

Pure (no I/O: the map file's text comes in). The map is a static file (YAML or JSON):

    workloads:
      - ip: 10.0.3.17            # or ips: [10.0.3.17, "fd00::17"]
        namespace: shop
        pod: cart-7d9f
        service_account: cart
        node: worker-1           # optional: see `counted_here`

With `--kubernetes` the map comes from the API too (`pods`, `kube`); `Overlay` puts this
file's entries first. An address not in the map is `unknown`. Metric edge labels are
`namespace/service_account` (stable while pods come and go); logs carry the pod too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from ..addresses import ip_of

UNKNOWN = "unknown"
OTHER = "other"


@dataclass(frozen=True)
class Workload:
    namespace: str
    pod: str
    service_account: str
    node: str | None = None

    @property
    def edge(self) -> str:
        return f"{self.namespace}/{self.service_account}"

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod}"


class MapError(ValueError):
    """A workload map that cannot be used (every problem listed)."""


def parse_map(text: str) -> dict[str, Workload]:
    """The map file's text -> {normalised address: workload}."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise MapError(f"not YAML: {exc}") from None
    items = doc.get("workloads") if isinstance(doc, Mapping) else None
    if not isinstance(items, list):
        raise MapError("expected a top-level `workloads:` list")
    out: dict[str, Workload] = {}
    problems: list[str] = []
    for n, item in enumerate(items):
        where = f"workloads[{n}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: not a mapping")
            continue
        ips: Any = item.get("ips", [item["ip"]] if "ip" in item else [])
        fields = {k: item.get(k) for k in ("namespace", "pod", "service_account")}
        missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
        if missing or not isinstance(ips, list) or not ips:
            problems.append(f"{where}: needs ip/ips, namespace, pod, service_account")
            continue
        node = item.get("node")
        if node is not None and not isinstance(node, str):
            problems.append(f"{where}: node must be a string")
            continue
        wl = Workload(
            str(fields["namespace"]), str(fields["pod"]), str(fields["service_account"]), node
        )
        for ip in ips:
            try:
                addr = str(ipaddress.ip_address(str(ip)))
            except ValueError:
                problems.append(f"{where}: {ip!r} is not an IP address")
                continue
            if addr in out and out[addr] != wl:
                problems.append(f"{where}: {addr} is already {out[addr].name}")
            out[addr] = wl
    if problems:
        raise MapError("; ".join(problems))
    return out


class Overlay(Mapping[str, Workload]):
    """Two maps read as one, `first` winning for the addresses it has: the static file over
    the map kept from the Kubernetes API (a hand-written entry is a deliberate correction,
    e.g. a VM's address or a host-network process the API cannot name). Both are read live,
    so changes to either show at once."""

    def __init__(self, first: Mapping[str, Workload], second: Mapping[str, Workload]) -> None:
        self.first = first
        self.second = second

    def __getitem__(self, addr: str) -> Workload:
        wl = self.first.get(addr)
        return wl if wl is not None else self.second[addr]

    def get(self, addr: str, default: Any = None) -> Any:
        wl = self.first.get(addr)
        return wl if wl is not None else self.second.get(addr, default)

    def __iter__(self) -> Iterator[str]:
        yield from self.first
        yield from (a for a in self.second if a not in self.first)

    def __len__(self) -> int:
        return len(self.first) + sum(1 for a in self.second if a not in self.first)


def lookup(workloads: Mapping[str, Workload], ip: str) -> Workload | None:
    """The workload at `ip` (normalised as `addresses.ip_of` does: IPv4-mapped IPv6
    addresses as their IPv4 form)."""
    addr = ip_of(ip)
    return None if addr is None else workloads.get(str(addr))


def counted_here(src: Workload | None, dst: Workload | None, node: str | None) -> bool:
    """Whether the auditor on `node` counts a connection between these workloads.

    A connection between pods on two nodes crosses both, and both auditors see it; counted
    twice, it would outnumber what the sidecars counted. So when the map says which node a
    pod runs on, the connection is counted on its client's node, or on its server's node when
    the client is not a known pod. Without `node` (one node, a VM) everything is counted.
    """
    if node is None:
        return True
    if src is not None and src.node is not None:
        return src.node == node
    if dst is not None and dst.node is not None:
        return dst.node == node
    return True


class LabelCap:
    """The first `limit` distinct values pass; later new ones become `other` (series stay
    bounded whatever the traffic)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.values: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.values:
            return value
        if len(self.values) >= self.limit:
            return OTHER
        self.values.add(value)
        return value
