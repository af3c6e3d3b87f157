"""The auditor's connection table: logged packets and conntrack snapshots in, counts out.

Pure (no I/O, the clock passed in). Packets (the first few of each direction, from NFLOG)
give each connection its first payload bytes; conntrack snapshots give its packet and byte
counters and its TCP state. A connection is classified once both directions are "done"
(sent payload, or used up the kernel's packet budget, or the connection is closing), and from
then on every snapshot adds the bytes it grew by.

Bytes: a connection that ends within `hold` seconds (30 by default) is counted exactly from
the sequence numbers of its SYN and FIN in each direction (the kernel logs FINs too). Longer
ones are counted as they go from conntrack's accounting: IP packets, headers included, so the
payload is that minus one IP+TCP header per counted packet (GSO super-packets are counted
once, with one header), the header length taken from the connection's own packets (SYNs
carry 8 more option bytes); retransmitted bytes are in that count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from .classify import Verdict, classify
from .netlink import CtEntry, TcpSegment

FlowKey = tuple[str, int, str, int]
CLOSING: Final = frozenset({"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE"})
UNKNOWN: Final = Verdict(klass="unknown", protocol="unknown")


def _reverse(key: FlowKey) -> FlowKey:
    return (key[2], key[3], key[0], key[1])


@dataclass
class _Side:
    """One direction of a connection."""

    base: int | None = None
    """The sequence number of its first payload byte (ISN + 1), once its SYN was seen."""
    head: bytearray = field(default_factory=bytearray)
    complete: bool = True
    """False once a truncated packet (or a start not seen) means `head` cannot grow."""
    pending: dict[int, bytes] = field(default_factory=dict)
    """Segments that arrived ahead of a gap, by offset, until the gap is filled."""
    header_len: int | None = None
    syn_header_len: int | None = None
    packets_seen: int = 0
    counted: int = 0
    """Payload bytes already reported."""
    fin_end: int | None = None
    """Exact payload length of this direction, from its FIN's sequence number."""

    def payload_estimate(self, packets: int, ip_bytes: int, v6: bool) -> int:
        hdr = self.header_len or (72 if v6 else 52)
        syn_extra = max(0, self.syn_header_len - hdr) if self.syn_header_len else 0
        return max(0, ip_bytes - packets * hdr - syn_extra)


@dataclass
class Conn:
    key: FlowKey
    """(client address, client port, server address, server port)."""
    first_seen: float
    saw_start: bool
    sides: tuple[_Side, _Side] = field(default_factory=lambda: (_Side(), _Side()))
    verdict: Verdict | None = None
    closing_since: float | None = None
    last_ct: float | None = None
    reset: bool = False
    ct_packets: int = 0
    """Conntrack's packet count (both directions) at the last snapshot."""

    @property
    def v6(self) -> bool:
        return ":" in self.key[0]


@dataclass(frozen=True)
class Counted:
    """What one snapshot adds for one connection. `new`: it was just classified."""

    key: FlowKey
    verdict: Verdict
    new: bool
    client_bytes: int
    server_bytes: int
    client_head: bytes = b""
    server_head: bytes = b""


@dataclass(frozen=True)
class Limits:
    budget: int = 8
    """Packets per direction the kernel logs (the nft rule's `ct ... packets < budget`)."""
    head_bytes: int = 2048
    """First payload bytes kept per direction: what classification needs and no more."""
    settle: float = 0.5
    """How long a closing connection waits for its last logged packets before it is named."""
    stale: float = 30.0
    """A connection seen in packets but never in conntrack is forgotten after this long."""
    max_conns: int = 262144
    hold: float = 30.0
    """Bytes of a connection younger than this wait for its FINs, whose sequence numbers give
    them exactly (conntrack's counters include retransmissions)."""


@dataclass
class Stats:
    packets: int = 0
    table_full: int = 0


class Tracker:
    """The table of connections in progress; see the module docstring."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.conns: dict[FlowKey, Conn] = {}
        self.stats = Stats()
        self._retired: list[Counted] = []
        self.finished: dict[FlowKey, int] = {}
        """Connections counted to the end (both FINs, or a reset) whose conntrack entries
        linger in TIME_WAIT or CLOSE: their key and packet count only, not the whole state."""

    def _new(self, key: FlowKey, now: float, saw_start: bool) -> Conn | None:
        if len(self.conns) >= self.limits.max_conns:
            self.stats.table_full += 1
            return None
        conn = Conn(key, now, saw_start)
        self.conns[key] = conn
        return conn

    def packet(self, seg: TcpSegment, now: float) -> None:
        """One logged packet."""
        self.stats.packets += 1
        key: FlowKey = (seg.src, seg.sport, seg.dst, seg.dport)
        conn = self.conns.get(key)
        if conn is not None and seg.syn and not seg.ack and self._reused(conn, seg):
            self._retire(conn, now)
            conn = None
        direction = 0
        if conn is None:
            conn = self.conns.get(_reverse(key))
            direction = 1
        if conn is None:
            if seg.syn and seg.ack:  # a SYN-ACK first: its SYN was not logged
                made = self._new(_reverse(key), now, saw_start=False)
                direction = 1
            else:
                made = self._new(key, now, saw_start=seg.syn)
                direction = 0
            if made is None:
                return
            conn = made
        side = conn.sides[direction]
        side.packets_seen += 1
        if seg.syn:
            if direction == 0 and not seg.ack:
                conn.saw_start = True
            side.base = (seg.seq + 1) & 0xFFFFFFFF
            side.syn_header_len = seg.header_len
            return
        if seg.flags & 0x04:  # RST
            conn.reset = True
        if seg.flags & 0x01 and side.base is not None:  # FIN
            side.fin_end = (seg.seq + seg.payload_len - side.base) & 0xFFFFFFFF
        if side.header_len is None and not seg.flags & 0x05:
            side.header_len = seg.header_len
        if not seg.payload_len or not side.complete:
            return
        if side.base is None:
            side.complete = False  # joined in the middle: no start to read
            return
        offset = (seg.seq - side.base) & 0xFFFFFFFF
        limit = self.limits.head_bytes
        if offset >= limit or len(side.head) >= limit:
            return
        payload = seg.payload
        if len(payload) < seg.payload_len:
            # The copy range cut this packet short: nothing after it can be placed.
            limit = min(limit, offset + len(payload))
        if offset > len(side.head):
            if len(side.pending) < 16:
                side.pending[offset] = payload
            return
        self._append(side, offset, payload, limit)
        while side.pending:
            ready = [o for o in side.pending if o <= len(side.head)]
            if not ready:
                break
            for o in sorted(ready):
                self._append(side, o, side.pending.pop(o), limit)
        if limit < self.limits.head_bytes and len(side.head) >= limit:
            side.complete = False

    def _append(self, side: _Side, offset: int, payload: bytes, limit: int) -> None:
        have = len(side.head)
        new = payload[have - offset :]
        side.head += new[: max(0, limit - have)]

    @staticmethod
    def _reused(conn: Conn, seg: TcpSegment) -> bool:
        """A new SYN on the address pair of a connection that ended (the client reused its
        port while the old connection sat in TIME_WAIT): a new connection, which conntrack
        too starts afresh. A retransmitted SYN has the same sequence number."""
        base = conn.sides[0].base
        ended = (
            conn.closing_since is not None
            or conn.reset
            or any(side.fin_end is not None for side in conn.sides)
        )
        return ended and base is not None and (seg.seq + 1) & 0xFFFFFFFF != base

    def _retire(self, conn: Conn, now: float) -> None:
        """Count what is left of a connection whose address pair a new one takes over."""
        del self.conns[conn.key]
        c, s = conn.sides
        new = conn.verdict is None
        verdict = conn.verdict or classify(bytes(c.head), bytes(s.head))
        cb = c.fin_end if c.fin_end is not None else c.counted
        sb = s.fin_end if s.fin_end is not None else s.counted
        heads = (bytes(c.head), bytes(s.head)) if new else (b"", b"")
        dc, ds = max(0, cb - c.counted), max(0, sb - s.counted)
        if new or dc or ds:
            self._retired.append(Counted(conn.key, verdict, new, dc, ds, *heads))

    def _done(self, conn: Conn, direction: int, packets: int, now: float) -> bool:
        side = conn.sides[direction]
        if side.head:
            return True
        if packets >= self.limits.budget:
            return True
        return conn.closing_since is not None and now - conn.closing_since >= self.limits.settle

    def snapshot(self, entries: Iterable[CtEntry], now: float) -> list[Counted]:
        """One conntrack snapshot (every TCP entry with accounting): what to count."""
        out, self._retired = self._retired, []
        seen: set[FlowKey] = set()
        for e in entries:
            done = self.finished.get(e.key)
            if done is not None:
                if e.key not in self.conns and e.orig_packets + e.reply_packets >= done:
                    seen.add(e.key)
                    continue
                del self.finished[e.key]  # the address pair is in use again
            conn = self.conns.get(e.key)
            if conn is None and _reverse(e.key) in self.conns:
                # We guessed the direction from a packet; conntrack knows it.
                conn = self.conns.pop(_reverse(e.key))
                conn.key = e.key
                conn.sides = (conn.sides[1], conn.sides[0])
                self.conns[e.key] = conn
            if conn is not None and e.orig_packets + e.reply_packets < conn.ct_packets:
                # Conntrack started the entry afresh: a new connection on the same address
                # pair whose SYN we did not see.
                self._retire(conn, now)
                out += self._retired
                self._retired = []
                conn = None
            if conn is None:
                made = self._new(e.key, now, saw_start=False)
                if made is None:
                    continue
                conn = made
            conn.ct_packets = e.orig_packets + e.reply_packets
            seen.add(conn.key)
            conn.last_ct = now
            if e.state in CLOSING and conn.closing_since is None:
                conn.closing_since = now
            new = False
            if conn.verdict is None:
                if not conn.saw_start and not (conn.sides[0].head or conn.sides[1].head):
                    # Older than the agent, or its first packets were lost: bytes only.
                    waited = now - conn.first_seen >= self.limits.settle
                    if waited and (
                        e.orig_packets >= self.limits.budget or conn.closing_since is not None
                    ):
                        conn.verdict = UNKNOWN
                elif self._done(conn, 0, e.orig_packets, now) and self._done(
                    conn, 1, e.reply_packets, now
                ):
                    c, s = conn.sides
                    conn.verdict = classify(bytes(c.head), bytes(s.head))
                if conn.verdict is None:
                    continue
                new = True
            c, s = conn.sides
            exact = False
            cb = c.payload_estimate(e.orig_packets, e.orig_bytes, conn.v6)
            sb = s.payload_estimate(e.reply_packets, e.reply_bytes, conn.v6)
            if (
                c.fin_end is not None
                and s.fin_end is not None
                and (
                    # Conntrack's count (retransmissions in) bounds the exact one from above; a
                    # FIN beyond it belongs to a connection whose SYN we missed.
                    c.fin_end <= cb + 64 and s.fin_end <= sb + 64
                )
            ):
                cb, sb = c.fin_end, s.fin_end
                exact = True
            elif now - conn.first_seen < self.limits.hold and conn.closing_since is None:
                cb, sb = c.counted, s.counted
            dc, ds = max(0, cb - c.counted), max(0, sb - s.counted)
            c.counted, s.counted = max(c.counted, cb), max(s.counted, sb)
            if new or dc or ds:
                heads = (bytes(c.head), bytes(s.head)) if new else (b"", b"")
                out.append(Counted(conn.key, conn.verdict, new, dc, ds, *heads))
            if new:
                # Named: its first bytes are no longer needed, nor kept (memory, and the
                # threat model: nothing of the payload stays beyond classification).
                for side in conn.sides:
                    side.head = bytearray()
                    side.pending.clear()
                    side.complete = False
            if conn.closing_since is not None and (exact or conn.reset):
                del self.conns[conn.key]
                self.finished[conn.key] = conn.ct_packets
        self._forget(seen, now)
        return out

    def _forget(self, seen: set[FlowKey], now: float) -> None:
        """Drop what conntrack no longer lists, and packet-only entries gone stale."""
        for key in [k for k in self.finished if k not in seen]:
            del self.finished[key]
        for key in [k for k in self.conns if k not in seen]:
            conn = self.conns[key]
            if conn.last_ct is not None or now - conn.first_seen > self.limits.stale:
                del self.conns[key]
