"""The auditor's I/O: nftables rules that hand it the first packets of each connection over
NFLOG, the NFLOG socket, the conntrack poll, the metrics and logs, the admin port.

Run by `mtls-sidecar audit` (see `cli`). Needs CAP_NET_ADMIN in the node's network namespace
(rules, NFLOG, conntrack); nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from ..config.parse import Address
from ..errors import StartupError
from ..listen import bind_listener
from ..logs import RateLimit
from . import netlink as nl
from .kube import REASONS, KubeSettings, PodWatcher
from .pods import PodIndex
from .tracker import Counted, Limits, Tracker
from .workloads import UNKNOWN, LabelCap, Overlay, Workload, counted_here, lookup

log = logging.getLogger("mtls.audit")

TABLE = "mtls_audit"
CONNTRACK_FILE = Path("/proc/net/nf_conntrack")
HEX_BYTES = 32
"""First bytes of each direction a plaintext connection's log line shows, in hex."""


@dataclass(frozen=True)
class AgentConfig:
    listen: Address
    group: int = 27
    limits: Limits = field(default_factory=Limits)
    poll: float = 1.0
    workloads: Mapping[str, Workload] | None = None
    """The static map (--workloads); with `kubernetes`, its entries win for their addresses."""
    kubernetes: KubeSettings | None = None
    """Keep the map from the Kubernetes API too (--kubernetes)."""
    max_edges: int = 200
    max_ports: int = 64
    install_rules: bool = True
    node: str | None = None
    """This node's name (Kubernetes: spec.nodeName), for `workloads.counted_here`."""
    ignore_ports: frozenset[int] = frozenset()
    """Destination ports left out entirely (e.g. the sidecars' admin port, scraped in
    plaintext by Prometheus): never logged by the kernel, never counted."""


def nft_rules(
    group: int, budget: int, snaplen: int, ignore_ports: frozenset[int] = frozenset()
) -> str:
    """The nftables table: the first `budget` packets of each direction of every TCP
    connection crossing this network namespace (forwarded, bridged with br_netfilter, or to
    and from its own processes), to NFLOG `group`, cut to `snaplen` bytes. Loopback is left
    out (it never leaves the node). FINs and RSTs are logged whenever they come: their
    sequence numbers give a short connection's exact payload length."""
    log_stmt = f"log group {group} snaplen {snaplen} queue-threshold 64"
    skip = ""
    if ignore_ports:
        ports = ", ".join(str(p) for p in sorted(ignore_ports))
        skip = f"    meta l4proto tcp ct original proto-dst {{ {ports} }} return\n"
    rule = (
        f"tcp flags & (fin | rst) != 0 {log_stmt} accept\n"
        f"    meta l4proto tcp ct direction original ct original packets < {budget} {log_stmt}\n"
        f"    meta l4proto tcp ct direction reply ct reply packets < {budget} {log_stmt}"
    )
    return (
        f"table inet {TABLE} {{\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority -150; policy accept;\n"
        '    iifname "lo" return\n'
        f"{skip}"
        f"    {rule}\n"
        "  }\n"
        "  chain output {\n"
        "    type filter hook output priority -150; policy accept;\n"
        '    oifname "lo" return\n'
        f"{skip}"
        f"    {rule}\n"
        "  }\n"
        "}\n"
    )


def _nft(script: str) -> None:
    proc = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        raise StartupError(f"nft refused the audit rules: {proc.stderr.strip()}")


def install_rules(group: int, limits: Limits, ignore_ports: frozenset[int]) -> None:
    # Replaced as a whole, so a restart after a crash does not add a second copy.
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n"
    _nft(script + nft_rules(group, limits.budget, limits.head_bytes + 120, ignore_ports))


def remove_rules() -> None:
    subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, check=False)


def _local(e: nl.CtEntry) -> bool:
    """Loopback connections never cross the wire (the nft rules skip them too)."""
    return e.src.startswith("127.") or e.src == "::1" or e.dst.startswith("127.") or e.dst == "::1"


class Metrics:
    """The auditor's own collectors (a process of its own: its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        edge = ["class", "src", "dst", "dst_port"]
        self.connections = Counter(
            "mtls_audit_connections_total",
            "TCP connections seen on the wire, by class (tls/plaintext/empty/unknown)",
            [*edge, "protocol", "tls_version"],
            registry=r,
        )
        self.bytes = Counter(
            "mtls_audit_bytes_total",
            "TCP payload bytes seen on the wire (both directions, from conntrack), by class",
            edge,
            registry=r,
        )
        self.groups = Counter(
            "mtls_audit_tls_key_exchange_total",
            "TLS connections by key-exchange group (the server's choice, else the client's "
            "first key share)",
            ["group"],
            registry=r,
        )
        self.packets = Counter(
            "mtls_audit_packets_total", "Packets the kernel handed the auditor (NFLOG)", registry=r
        )
        self.malformed = Counter(
            "mtls_audit_malformed_total", "Kernel messages that could not be parsed", ["what"],
            registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "mtls_audit_dropped_total", "Things the auditor could not keep up with", ["reason"],
            registry=r,
        )  # fmt: skip
        self.tracked = Gauge(
            "mtls_audit_tracked_connections", "Connections in the auditor's table", registry=r
        )
        self.workloads = Gauge(
            "mtls_audit_workloads",
            "Addresses the auditor can attribute to a workload, by source (file, kubernetes)",
            ["source"],
            registry=r,
        )
        self.kubernetes_errors = Counter(
            "mtls_audit_kubernetes_errors_total",
            "Failed exchanges with the Kubernetes API (the last good map is kept), by reason",
            ["reason"],
            registry=r,
        )


class Agent:
    """One auditor: see the module docstring."""

    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tracker = Tracker(config.limits)
        self.metrics = Metrics()
        static = config.workloads or {}
        self.metrics.workloads.labels("file").set(len(static))
        self.workloads: Mapping[str, Workload] = static
        """Read on every connection counted; with --kubernetes an Overlay over the watcher's
        index, which the watcher updates in place: a new pod is named from its first connection."""
        self.watcher: PodWatcher | None = None
        if config.kubernetes is not None:
            index = PodIndex()
            errors = self.metrics.kubernetes_errors
            for reason in REASONS:  # every reason at 0, so rate() and alerts see the first one
                errors.labels(reason)
            self.watcher = PodWatcher(
                config.kubernetes, index, on_error=lambda reason: errors.labels(reason).inc()
            )
            self.metrics.workloads.labels("kubernetes").set_function(lambda: len(index))
            self.workloads = Overlay(static, index)
        self.edges = LabelCap(config.max_edges)
        self.ports = LabelCap(config.max_ports)
        self.groups = LabelCap(32)
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.ready = False
        self.sock: socket.socket | None = None
        self._bad_log = RateLimit(1.0)
        self._seq = 0
        self._ct_cache: dict[str, nl.CtEntry | None] = {}

    # --- NFLOG ----------------------------------------------------------------------------

    def open_nflog(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
        with contextlib.suppress(OSError):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        sock.bind((0, 0))
        g, lim = self.config.group, self.config.limits
        self._config(sock, nl.nflog_config(g, self._next(), cmd=nl.NFULNL_CFG_CMD_BIND))
        copy = lim.head_bytes + 120  # the payload plus the largest IP + TCP headers
        self._config(
            sock,
            nl.nflog_config(
                g, self._next(), copy_range=copy, qthresh=64, timeout_cs=10, bufsize=131072
            ),
        )
        sock.setblocking(False)
        return sock

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _config(self, sock: socket.socket, msg: bytes) -> None:
        sock.send(msg)
        sock.settimeout(5)
        for m in nl.messages(sock.recv(65536)):
            if m.kind == nl.NLMSG_ERROR and (err := nl.netlink_error(m)):
                raise StartupError(
                    f"NFLOG group {self.config.group}: {errno.errorcode.get(err, err)} "
                    "(another process bound to it?)"
                )

    def on_readable(self) -> None:
        assert self.sock is not None
        now = self.clock()
        for _ in range(256):  # then let the loop breathe
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.metrics.dropped.labels("nflog_overrun").inc()
                    self._bad("nflog_overrun", "NFLOG messages lost: the socket buffer overran")
                    continue
                self._bad("nflog", f"reading the NFLOG socket: {exc}")
                return
            self.feed(data, now)

    def feed(self, data: bytes, now: float) -> None:
        """One NFLOG datagram: every packet in it to the tracker; garbage counted, logged."""
        try:
            msgs = list(nl.messages(data))
        except nl.Malformed as exc:
            self._malformed("netlink", exc)
            return
        for m in msgs:
            try:
                pkt = nl.nflog_packet(m)
                if pkt is None:
                    continue
                seg = nl.tcp_segment(pkt.packet)
            except nl.Malformed as exc:
                self._malformed("packet", exc)
                continue
            self.metrics.packets.inc()
            if seg is not None:
                self.tracker.packet(seg, now)

    def _malformed(self, what: str, exc: Exception) -> None:
        self.metrics.malformed.labels(what).inc()
        self._bad(what, f"malformed {what}: {exc}")

    def _bad(self, what: str, msg: str) -> None:
        held = self._bad_log.allow()
        if held is not None:
            extra = f" ({held} more held back)" if held else ""
            log.warning(msg + extra, extra={"fields": {"event": "audit_bad_input", "what": what}})

    # --- conntrack ------------------------------------------------------------------------

    async def read_conntrack(self) -> list[nl.CtEntry]:
        """The TCP entries of /proc/net/nf_conntrack, loopback and ignored ports left out.

        A line is parsed once: from one poll to the next only its timeout changes (the entries
        of finished connections stay for minutes in TIME_WAIT), so entries are cached by the
        rest of the line, and the cache keeps only what the last poll listed."""
        entries = []
        try:
            text = CONNTRACK_FILE.read_text()
        except OSError as exc:
            self._bad("conntrack", f"cannot read {CONNTRACK_FILE}: {exc}")
            return []
        cache: dict[str, nl.CtEntry | None] = {}
        old = self._ct_cache
        for n, line in enumerate(text.splitlines()):
            if n % 2000 == 1999:
                await asyncio.sleep(0)  # let the NFLOG reader drain its socket
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[2] != "tcp":
                continue
            rest = parts[5]
            if rest in old:
                e = old[rest]
            else:
                try:
                    e = nl.conntrack_line(line)
                except nl.Malformed as exc:
                    self._malformed("conntrack", exc)
                    continue
                if e is not None and (e.dport in self.config.ignore_ports or _local(e)):
                    e = None
            cache[rest] = e
            if e is not None:
                entries.append(e)
        self._ct_cache = cache
        return entries

    async def poll_once(self) -> None:
        entries = await self.read_conntrack()
        for counted in self.tracker.snapshot(entries, self.clock()):
            self.count(counted)
        self.metrics.tracked.set(len(self.tracker.conns))
        if self.tracker.stats.table_full:
            self.metrics.dropped.labels("table_full").inc(self.tracker.stats.table_full)
            self.tracker.stats.table_full = 0

    def _who(self, ip: str) -> tuple[str, str]:
        """(edge label, name for logs) of an address."""
        wl = lookup(self.workloads, ip)
        if wl is None:
            return UNKNOWN, ip
        return self.edges(wl.edge), wl.name

    def count(self, c: Counted) -> None:
        src, sport, dst, dport = c.key
        if not counted_here(
            lookup(self.workloads, src), lookup(self.workloads, dst), self.config.node
        ):
            return
        src_edge, src_name = self._who(src)
        dst_edge, dst_name = self._who(dst)
        v = c.verdict
        labels = (v.klass, src_edge, dst_edge, self.ports(str(dport)))
        if c.new:
            self.metrics.connections.labels(*labels, v.protocol, v.tls_version or "").inc()
            group = v.selected_group or (v.key_shares[0] if v.key_shares else None)
            if v.klass == "tls" and group:
                self.metrics.groups.labels(self.groups(group)).inc()
            event: dict[str, Any] = {
                "src": f"{src}:{sport}" if ":" not in src else f"[{src}]:{sport}",
                "dst": f"{dst}:{dport}" if ":" not in dst else f"[{dst}]:{dport}",
                "src_workload": src_name,
                "dst_workload": dst_name,
                "class": v.klass,
                "protocol": v.protocol,
                "tls_version": v.tls_version,
                "offered_groups": list(v.offered_groups) or None,
                "selected_group": v.selected_group,
            }
            if v.klass == "plaintext":
                # In the log only: /connections (on a port reachable from the network) carries
                # no payload bytes at all.
                heads = {
                    "client_head": c.client_head[:HEX_BYTES].hex(),
                    "server_head": c.server_head[:HEX_BYTES].hex(),
                }
                log.warning(
                    "plaintext connection on the wire",
                    extra={"fields": {"event": "audit_plaintext", **event, **heads}},
                )
            else:
                log.debug("connection", extra={"fields": {"event": "audit_connection", **event}})
            event["key"] = list(c.key)
            event["bytes"] = 0
            self.recent.append(event)
        if c.client_bytes or c.server_bytes:
            self.metrics.bytes.labels(*labels).inc(c.client_bytes + c.server_bytes)
            for event in reversed(self.recent):
                if event["key"] == list(c.key):
                    event["bytes"] += c.client_bytes + c.server_bytes
                    break

    # --- admin ----------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text="ok\n")

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _connections(self, request: web.Request) -> web.Response:
        """The last classified connections (at most 1000), newest last."""
        return web.json_response(list(self.recent))

    async def start_admin(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/live", self._live)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/connections", self._connections)
        (sock,) = bind_listener(self.config.listen, 1)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner, int(sock.getsockname()[1])

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner, port = await self.start_admin()
        watching: asyncio.Task[None] | None = None
        if self.watcher is not None:
            watching = asyncio.create_task(self.watcher.run(), name="audit-kubernetes")
        try:
            # The socket first: packets logged before anyone listens are lost.
            self.sock = self.open_nflog()
            if self.config.install_rules:
                install_rules(self.config.group, self.config.limits, self.config.ignore_ports)
            loop.add_reader(self.sock.fileno(), self.on_readable)
            self.ready = True
            log.info(
                "auditing",
                extra={"fields": {"event": "audit_started", "admin_port": port,
                                  "group": self.config.group, "workloads": len(self.workloads),
                                  "kubernetes": self.watcher is not None}},
            )  # fmt: skip
            while not stop.is_set():
                await self.poll_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.poll)
        finally:
            self.ready = False
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            if self.sock is not None:
                loop.remove_reader(self.sock.fileno())
                self.sock.close()
            if self.config.install_rules:
                remove_rules()
            await runner.cleanup()
        log.info("stopped", extra={"fields": {"event": "audit_stopped"}})
        return 0
