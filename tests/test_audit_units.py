"""The auditor's pure parts below the classifier: NFLOG and packet parsing, conntrack lines,
the connection table, the workload map; and hostile input never crashing the agent."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit import netlink as nl
from proxy.audit.agent import Agent, AgentConfig, nft_rules
from proxy.audit.tracker import Limits, Tracker
from proxy.audit.workloads import LabelCap, MapError, Workload, counted_here, lookup, parse_map
from proxy.config.parse import Address

pytestmark = pytest.mark.unit

A, B = "10.1.0.1", "10.1.0.2"


def tcp_packet(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    seq: int,
    flags: int,
    payload: bytes = b"",
    v6: bool = False,
    opts: bytes = b"\x01" * 12,
) -> bytes:
    """An IPv4 or IPv6 packet with a TCP header (timestamps-sized options) and `payload`."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (20 + len(opts)) // 4 << 4, flags,
                      65535, 0, 0) + opts + payload  # fmt: skip
    if v6:
        return (struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64)
                + socket.inet_pton(socket.AF_INET6, src)
                + socket.inet_pton(socket.AF_INET6, dst) + tcp)  # fmt: skip
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0)
    return ip + socket.inet_aton(src) + socket.inet_aton(dst) + tcp


def nflog_datagram(*packets: bytes, prefix: bytes = b"") -> bytes:
    out = b""
    for pkt in packets:
        attrs = nl._attr(nl.NFULA_PACKET_HDR, b"\x08\x00\x00\x00") + nl._attr(nl.NFULA_PAYLOAD, pkt)
        if prefix:
            attrs += nl._attr(nl.NFULA_PREFIX, prefix + b"\0")
        body = struct.pack("!BBH", socket.AF_INET, 0, 27) + attrs
        out += struct.pack("=IHHII", 16 + len(body), nl.NFNL_SUBSYS_ULOG << 8, 0, 0, 0) + body
    return out


def test_nflog_round_trip() -> None:
    pkt = tcp_packet(A, 40000, B, 80, 7, 0x18, b"GET / HTTP/1.1\r\n")
    (msg,) = nl.messages(nflog_datagram(pkt, prefix=b"audit"))
    logged = nl.nflog_packet(msg)
    assert logged is not None and logged.prefix == "audit" and logged.packet == pkt
    seg = nl.tcp_segment(logged.packet)
    assert seg is not None
    assert (seg.src, seg.sport, seg.dst, seg.dport, seg.seq) == (A, 40000, B, 80, 7)
    assert seg.payload == b"GET / HTTP/1.1\r\n" and seg.header_len == 52
    v6 = nl.tcp_segment(tcp_packet("fd00::1", 1, "fd00::2", 2, 0, 0x10, b"x", v6=True))
    assert v6 is not None and v6.src == "fd00::1" and v6.header_len == 72 and v6.payload == b"x"


def test_nflog_config_message() -> None:
    (msg,) = nl.messages(nl.nflog_config(27, 5, cmd=nl.NFULNL_CFG_CMD_BIND, copy_range=300))
    assert msg.kind == nl.NFNL_SUBSYS_ULOG << 8 | nl.NFULNL_MSG_CONFIG and msg.seq == 5
    attrs = nl.attributes(msg.body[4:])
    assert attrs[nl.NFULA_CFG_CMD] == b"\x01"
    assert struct.unpack("!IB", attrs[nl.NFULA_CFG_MODE][:5]) == (300, nl.NFULNL_COPY_PACKET)


@given(st.binary(max_size=400))
@settings(max_examples=1000, deadline=None)
def test_parsers_raise_only_malformed(data: bytes) -> None:
    for parse in (
        lambda: list(nl.messages(data)),
        lambda: nl.attributes(data),
        lambda: nl.tcp_segment(data),
        lambda: [nl.nflog_packet(m) for m in nl.messages(nflog_datagram(data))],
    ):
        with contextlib.suppress(nl.Malformed):
            parse()


@given(st.binary(max_size=300), st.integers(0, 200))
@settings(max_examples=500, deadline=None)
def test_agent_survives_garbage(data: bytes, cut: int) -> None:
    """Hostile datagrams: counted as malformed, never an exception out of feed()."""
    agent = Agent(AgentConfig(listen=Address("127.0.0.1", 0)))
    good = nflog_datagram(tcp_packet(A, 1, B, 2, 0, 0x02))
    agent.feed(data, 0.0)
    agent.feed(good[:cut] + data, 0.0)
    agent.feed(nflog_datagram(data), 0.0)


def test_agent_counts_malformed() -> None:
    agent = Agent(AgentConfig(listen=Address("127.0.0.1", 0)))
    agent.feed(nflog_datagram(b"\x45\x00"), 0.0)
    agent.feed(b"\xff" * 40, 0.0)
    samples = agent.metrics.registry.get_sample_value
    assert samples("mtls_audit_malformed_total", {"what": "packet"}) == 1
    assert samples("mtls_audit_malformed_total", {"what": "netlink"}) == 1


CT = (
    "ipv4     2 tcp      6 119 TIME_WAIT src=10.1.0.1 dst=10.1.0.2 sport=40000 dport=80 "
    "packets=27 bytes=1001430 src=10.1.0.2 dst=10.1.0.1 sport=80 dport=40000 packets=23 "
    "bytes=1223 [ASSURED] mark=0 zone=0 use=2"
)


def test_conntrack_line() -> None:
    e = nl.conntrack_line(CT)
    assert e is not None and e.key == (A, 40000, B, 80) and e.state == "TIME_WAIT"
    assert (e.orig_packets, e.orig_bytes, e.reply_packets, e.reply_bytes) == (27, 1001430, 23, 1223)
    assert nl.conntrack_line("ipv4 2 udp 17 20 src=1.1.1.1 dst=2.2.2.2 sport=1 dport=2") is None
    no_acct = CT.replace(" packets=27 bytes=1001430", "").replace(" packets=23 bytes=1223", "")
    assert nl.conntrack_line(no_acct) is None
    v6 = CT.replace("ipv4     2", "ipv6     10").replace("10.1.0.1", "fd00:0::1")
    e6 = nl.conntrack_line(v6)
    assert e6 is not None and e6.src == "fd00::1"


@given(st.text(max_size=300))
@settings(max_examples=500, deadline=None)
def test_conntrack_garbage(line: str) -> None:
    with contextlib.suppress(nl.Malformed):
        nl.conntrack_line(line)


def _seg(*args: object, **kw: object) -> nl.TcpSegment:
    seg = nl.tcp_segment(tcp_packet(*args, **kw))  # type: ignore[arg-type]
    assert seg is not None
    return seg


def _entry(state: str, ob: int, op: int, rb: int, rp: int) -> nl.CtEntry:
    return nl.CtEntry(A, 40000, B, 80, state, op, ob, rp, rb)


def test_tracker_classifies_and_counts_payload() -> None:
    t = Tracker(Limits(settle=0.5, hold=0))
    t.packet(_seg(A, 40000, B, 80, 100, 0x02, opts=b"\x01" * 20), 0.0)  # SYN: 60 bytes
    t.packet(_seg(B, 80, A, 40000, 500, 0x12, opts=b"\x01" * 20), 0.0)
    t.packet(_seg(A, 40000, B, 80, 101, 0x10), 0.0)
    # Out of order: the second segment first; then the first; then a retransmission.
    t.packet(_seg(A, 40000, B, 80, 104, 0x18, b" / HTTP/1.1\r\n"), 0.0)
    t.packet(_seg(A, 40000, B, 80, 101, 0x18, b"GET"), 0.0)
    t.packet(_seg(A, 40000, B, 80, 101, 0x18, b"GET"), 0.0)
    assert bytes(t.conns[(A, 40000, B, 80)].sides[0].head) == b"GET / HTTP/1.1\r\n"
    # Nothing yet from the server and its budget not used: not classified yet.
    # (Conntrack counts the retransmission too: 19 payload bytes in 5 packets.)
    orig = 60 + 52 * 4 + 19
    assert t.snapshot([_entry("ESTABLISHED", orig, 5, 60 + 52, 2)], 0.1) == []
    t.packet(_seg(B, 80, A, 40000, 501, 0x18, b"HTTP/1.1 200 OK\r\n"), 0.2)
    (c,) = t.snapshot([_entry("ESTABLISHED", orig, 5, 60 + 52 * 2 + 17, 3)], 0.3)
    assert c.new and c.verdict.klass == "plaintext" and c.verdict.protocol == "http1"
    assert (c.client_bytes, c.server_bytes) == (19, 17)
    assert c.client_head == b"GET / HTTP/1.1\r\n" and c.server_head == b"HTTP/1.1 200 OK\r\n"
    # Named: the first bytes are dropped, and later packets are not collected.
    t.packet(_seg(A, 40000, B, 80, 120, 0x18, b"more"), 0.35)
    assert all(not side.head for side in t.conns[(A, 40000, B, 80)].sides)
    # Later snapshots add what the counters grew by.
    (c,) = t.snapshot([_entry("ESTABLISHED", orig + 52 + 1000, 6, 60 + 52 * 2 + 17, 3)], 0.4)
    assert not c.new and (c.client_bytes, c.server_bytes) == (1000, 0)
    assert t.snapshot([], 0.5) == [] and not t.conns


def test_tracker_port_reused_after_close_is_a_new_connection() -> None:
    """The client reuses its port while the old connection is in TIME_WAIT: two connections,
    the first one's exact bytes kept."""
    t = Tracker(Limits(settle=0.0, hold=5.0))
    for isn, payload in ((1000, b"GET /one HTTP/1.1\r\n"), (9000, b"\x16\x03\x01\x00\x05hello")):
        t.packet(_seg(A, 40000, B, 80, isn, 0x02), 0.0)
        t.packet(_seg(A, 40000, B, 80, isn, 0x02), 0.0)  # a retransmitted SYN: the same one
        t.packet(_seg(B, 80, A, 40000, 77, 0x12), 0.0)
        t.packet(_seg(A, 40000, B, 80, isn + 1, 0x18, payload), 0.0)
        t.packet(_seg(B, 80, A, 40000, 78, 0x11), 0.0)
        t.packet(_seg(A, 40000, B, 80, isn + 1 + len(payload), 0x11), 0.0)
    got = t.snapshot([_entry("TIME_WAIT", 500, 5, 300, 4)], 1.0)
    assert [(c.verdict.klass, c.client_bytes) for c in got] == [("plaintext", 19), ("tls", 10)]


def test_tracker_empty_connection_waits_for_close() -> None:
    t = Tracker(Limits(settle=0.5))
    t.packet(_seg(A, 40000, B, 80, 100, 0x02), 0.0)
    t.packet(_seg(B, 80, A, 40000, 500, 0x12), 0.0)
    assert t.snapshot([_entry("ESTABLISHED", 104, 2, 52, 1)], 1.0) == []
    assert t.snapshot([_entry("TIME_WAIT", 208, 4, 104, 2)], 2.0) == []  # settling
    (c,) = t.snapshot([_entry("TIME_WAIT", 208, 4, 104, 2)], 2.6)
    assert c.verdict.klass == "empty" and c.client_bytes == c.server_bytes == 0


def test_tracker_connection_older_than_the_agent_is_unknown() -> None:
    t = Tracker(Limits(settle=0.5, budget=8))
    assert t.snapshot([_entry("ESTABLISHED", 10_052, 20, 520, 10)], 0.0) == []
    (c,) = t.snapshot([_entry("ESTABLISHED", 10_052, 20, 520, 10)], 1.0)
    assert c.verdict.klass == "unknown"


def test_tracker_bounded() -> None:
    t = Tracker(Limits(max_conns=2))
    for port in range(5):
        t.packet(_seg(A, 1000 + port, B, 80, 1, 0x02), 0.0)
    assert len(t.conns) == 2 and t.stats.table_full == 3


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 2**32 - 1),
            st.sampled_from([0x02, 0x12, 0x10, 0x18, 0x11]),
            st.binary(max_size=64),
        ),
        max_size=40,
    )
)
@settings(max_examples=300, deadline=None)
def test_tracker_any_packet_order(packets: list[tuple[int, int, int, bytes]]) -> None:
    t = Tracker(Limits(head_bytes=100))
    for who, seq, flags, payload in packets:
        src, dst = (A, B) if who % 2 == 0 else (B, A)
        sport, dport = (40000, 80) if who % 2 == 0 else (80, 40000)
        t.packet(_seg(src, sport, dst, dport, seq, flags, payload), 0.0)
    for conn in t.conns.values():
        assert all(len(s.head) <= 100 for s in conn.sides)
    t.snapshot([_entry("TIME_WAIT", 10_000, 20, 10_000, 20)], 10.0)


def test_workload_map() -> None:
    m = parse_map(
        "workloads:\n  - {ip: 10.0.0.1, namespace: shop, pod: cart-1, service_account: cart}\n"
        "  - {ips: ['fd00::1', 10.0.0.2], namespace: shop, pod: db-0, service_account: db}\n"
    )
    wl = lookup(m, "::ffff:10.0.0.1")
    assert wl is not None and wl.edge == "shop/cart" and wl.name == "shop/cart-1"
    assert lookup(m, "fd00:0::1") == lookup(m, "10.0.0.2")
    assert lookup(m, "10.9.9.9") is None and lookup(m, "nonsense") is None
    with pytest.raises(MapError, match=r"workloads\[0\]"):
        parse_map("workloads:\n  - {ip: nope, namespace: a, pod: b, service_account: c}\n")
    with pytest.raises(MapError):
        parse_map("[1, 2]")


def test_counted_on_one_node_only() -> None:
    """A connection between pods on nodes n1 and n2 crosses both: counted on the client's."""
    p1, p2 = Workload("a", "p1", "sa", "n1"), Workload("a", "p2", "sa", "n2")
    nowhere = Workload("a", "p3", "sa")
    assert [counted_here(p1, p2, n) for n in ("n1", "n2")] == [True, False]
    assert [counted_here(None, p2, n) for n in ("n1", "n2")] == [False, True]
    assert counted_here(None, None, "n1") and counted_here(nowhere, nowhere, "n1")
    assert counted_here(p1, p2, None)


def test_label_cap() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]


def test_nft_rules_shape() -> None:
    text = nft_rules(27, 8, 2168)
    assert "ct original packets < 8 log group 27 snaplen 2168" in text
    assert text.count("log group 27") == 6 and 'iifname "lo" return' in text
    assert (
        "tcp flags & (fin | rst) != 0 log group 27 snaplen 2168 queue-threshold 64 accept" in text
    )


def test_tracker_exact_bytes_from_fins() -> None:
    """A short connection: its bytes from SYN and FIN sequence numbers, retransmissions (in
    conntrack's counters) left out."""
    t = Tracker(Limits(settle=0.0, hold=5.0))
    t.packet(_seg(A, 40000, B, 80, 2**32 - 1, 0x02), 0.0)  # the sequence space wraps
    t.packet(_seg(B, 80, A, 40000, 500, 0x12), 0.0)
    t.packet(_seg(A, 40000, B, 80, 0, 0x18, b"hello"), 0.0)
    t.packet(_seg(B, 80, A, 40000, 501, 0x18, b"HELLO"), 0.0)
    t.packet(_seg(A, 40000, B, 80, 5 + 70_000, 0x11), 0.1)  # FIN after 70,005 bytes
    t.packet(_seg(B, 80, A, 40000, 501 + 5, 0x11), 0.1)
    (c,) = t.snapshot([_entry("TIME_WAIT", 999_999, 60, 99_999, 30)], 0.2)
    assert c.new and c.verdict.klass == "plaintext"
    assert (c.client_bytes, c.server_bytes) == (70_005, 5)
    # Counted to the end: only its key is kept while conntrack lists it (TIME_WAIT)...
    key = (A, 40000, B, 80)
    assert key not in t.conns and key in t.finished
    assert t.snapshot([_entry("TIME_WAIT", 999_999, 60, 99_999, 30)], 1.0) == []
    assert key not in t.conns
    # ...and a new connection on the same address pair is a new one.
    t.packet(_seg(A, 40000, B, 80, 5000, 0x02), 2.0)
    t.packet(_seg(B, 80, A, 40000, 9000, 0x12), 2.0)
    t.packet(_seg(A, 40000, B, 80, 5001, 0x18, b"GET / HTTP/1.1\r\n"), 2.0)
    t.packet(_seg(B, 80, A, 40000, 9001, 0x18, b"HTTP/1.1 200 OK\r\n"), 2.0)
    (c,) = t.snapshot([_entry("ESTABLISHED", 400, 4, 300, 3)], 2.1)
    assert c.new and c.verdict.protocol == "http1" and key not in t.finished
    assert t.snapshot([], 3.0) == [] and not t.conns and not t.finished
