"""Kernel messages the auditor reads, parsed: NFLOG netlink messages, the IP and TCP headers of
the packets they carry, and the lines of /proc/net/nf_conntrack. Also the NFLOG configuration
messages it sends.

Pure (no I/O). Everything here takes bytes (or text) the kernel wrote and a hostile or broken
sender could have shaped; every parser raises `Malformed` (and nothing else) on bad input.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NFNL_SUBSYS_ULOG: Final = 4
NFULNL_MSG_PACKET: Final = 0
NFULNL_MSG_CONFIG: Final = 1
NFULA_CFG_CMD: Final = 1
NFULA_CFG_MODE: Final = 2
NFULA_CFG_NLBUFSIZ: Final = 3
NFULA_CFG_TIMEOUT: Final = 4
NFULA_CFG_QTHRESH: Final = 5
NFULNL_CFG_CMD_BIND: Final = 1
NFULNL_CFG_CMD_UNBIND: Final = 2
NFULNL_COPY_PACKET: Final = 2
NFULA_PACKET_HDR: Final = 1
NFULA_PAYLOAD: Final = 9
NFULA_PREFIX: Final = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (network order)


class Malformed(ValueError):
    """Bytes that are not what the kernel would have sent."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(value), kind) + value
    return body + b"\0" * (_align(len(body)) - len(body))


def nflog_config(group: int, seq: int, *, cmd: int | None = None, copy_range: int | None = None,
                 qthresh: int | None = None, timeout_cs: int | None = None,
                 bufsize: int | None = None) -> bytes:  # fmt: skip
    """One NFULNL_MSG_CONFIG request for `group` (asks for an ACK)."""
    attrs = b""
    if cmd is not None:
        attrs += _attr(NFULA_CFG_CMD, bytes([cmd]))
    if copy_range is not None:
        attrs += _attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET))
    if bufsize is not None:
        attrs += _attr(NFULA_CFG_NLBUFSIZ, struct.pack("!I", bufsize))
    if timeout_cs is not None:
        attrs += _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", timeout_cs))
    if qthresh is not None:
        attrs += _attr(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))
    body = _NFGENMSG.pack(0, 0, group) + attrs
    kind = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
    )


@dataclass(frozen=True)
class NetlinkMessage:
    kind: int
    flags: int
    seq: int
    body: bytes


def messages(data: bytes) -> Iterator[NetlinkMessage]:
    """The netlink messages in one datagram."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise Malformed(f"netlink message length {length} at offset {pos} of {len(data)}")
        yield NetlinkMessage(kind, flags, seq, data[pos + _NLMSGHDR.size : pos + length])
        pos += _align(length)
    if pos < len(data) and any(data[pos:]):
        raise Malformed(f"{len(data) - pos} trailing bytes after the last netlink message")


def netlink_error(msg: NetlinkMessage) -> int:
    """The errno of an NLMSG_ERROR message (0: an ACK)."""
    if len(msg.body) < 4:
        raise Malformed("short NLMSG_ERROR")
    return -int(struct.unpack_from("=i", msg.body)[0])


def attributes(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type -> value; the nested flag bits dropped; a repeat: the last)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > len(data):
            raise Malformed(f"attribute length {length} at offset {pos} of {len(data)}")
        out[kind & 0x3FFF] = data[pos + 4 : pos + length]
        pos += _align(length)
    return out


@dataclass(frozen=True)
class LoggedPacket:
    """One packet NFLOG handed us: its group's prefix and the packet from its IP header on
    (truncated to the copy range)."""

    family: int
    prefix: str
    packet: bytes


def nflog_packet(msg: NetlinkMessage) -> LoggedPacket | None:
    """The packet in an NFLOG message (None for other netfilter messages)."""
    if msg.kind != (NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET):
        return None
    if len(msg.body) < _NFGENMSG.size:
        raise Malformed("NFLOG message without its nfgenmsg header")
    family, _version, _res = _NFGENMSG.unpack_from(msg.body)
    attrs = attributes(msg.body[_NFGENMSG.size :])
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None:
        raise Malformed("NFLOG message without a payload")
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    return LoggedPacket(family, prefix, payload)


@dataclass(frozen=True)
class TcpSegment:
    """The TCP facts the tracker needs from one packet."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    flags: int
    header_len: int
    """IP + TCP header bytes: what conntrack counts on top of the payload."""
    payload: bytes
    """As much of the payload as the copy range let through."""
    payload_len: int
    """The payload's full length, from the IP header."""

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)

    @property
    def ack(self) -> bool:
        return bool(self.flags & 0x10)


def tcp_segment(packet: bytes) -> TcpSegment | None:
    """The TCP segment in an IPv4/IPv6 packet (None: not TCP, or a later fragment)."""
    if not packet:
        raise Malformed("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise Malformed("short IPv4 header")
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        frag = struct.unpack_from("!H", packet, 6)[0]
        if ihl < 20 or len(packet) < ihl:
            raise Malformed(f"IPv4 header length {ihl}")
        if packet[9] != 6 or frag & 0x1FFF:
            return None
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        l4, l4_total = ihl, max(total, len(packet))
        if total:  # 0 on GSO super-packets: then the captured length is all we know
            l4_total = total
    elif version == 6:
        if len(packet) < 40:
            raise Malformed("short IPv6 header")
        if packet[6] != 6:  # extension headers: not on the connections we audit
            return None
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        plen = struct.unpack_from("!H", packet, 4)[0]
        l4, l4_total = 40, 40 + plen if plen else len(packet)
    else:
        raise Malformed(f"IP version {version}")
    if len(packet) < l4 + 20:
        raise Malformed("short TCP header")
    sport, dport, seq = struct.unpack_from("!HHI", packet, l4)
    doff = (packet[l4 + 12] >> 4) * 4
    if doff < 20:
        raise Malformed(f"TCP data offset {doff}")
    start = l4 + doff
    return TcpSegment(
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        seq=seq,
        flags=packet[l4 + 13],
        header_len=start,
        payload=packet[start:l4_total] if start <= len(packet) else b"",
        payload_len=max(0, l4_total - start),
    )


@dataclass(frozen=True)
class CtEntry:
    """One TCP connection as conntrack accounts for it (the original direction's tuple)."""

    src: str
    sport: int
    dst: str
    dport: int
    state: str
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)


def _addr(text: str) -> str:
    """An address as `ipaddress` writes it (the kernel writes IPv6 uncompressed)."""
    if ":" in text:
        return str(ipaddress.IPv6Address(text))
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 and str(int(p)) == p for p in parts):
        raise ValueError(f"not an IPv4 address: {text!r}")
    return text


def conntrack_line(line: str) -> CtEntry | None:
    """One line of /proc/net/nf_conntrack (None: not TCP, or no accounting on the entry).

    `ipv4 2 tcp 6 117 TIME_WAIT src=A dst=B sport=P dport=Q packets=N bytes=M src=B dst=A
    sport=Q dport=P packets=N bytes=M [ASSURED] mark=0 use=2`
    """
    fields = line.split()
    if len(fields) < 6 or fields[2] != "tcp":
        return None
    state = fields[5]
    kv = [f.partition("=") for f in fields[6:]]
    starts = [i for i, (k, sep, _) in enumerate(kv) if k == "src" and sep]
    if len(starts) < 2:
        raise Malformed(f"conntrack line without two tuples: {line[:200]!r}")
    orig = {k: v for k, sep, v in kv[starts[0] : starts[1]] if sep}
    reply = {k: v for k, sep, v in kv[starts[1] :] if sep}
    try:
        if "bytes" not in orig or "bytes" not in reply:
            return None
        return CtEntry(
            _addr(orig["src"]), int(orig["sport"]), _addr(orig["dst"]), int(orig["dport"]),
            state, int(orig["packets"]), int(orig["bytes"]), int(reply["packets"]),
            int(reply["bytes"]),
        )  # fmt: skip
    except (KeyError, ValueError) as exc:
        raise Malformed(f"conntrack line: {exc}: {line[:200]!r}") from None
