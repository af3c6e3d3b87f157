"""Transparent-mode primitives: original destination (SO_ORIGINAL_DST), TLS sniffing, loops.

Everything here is on the per-connection hot path of the transparent listeners, so it is
plain indexing and struct unpacking: no allocation beyond the result, no I/O except the one
getsockopt in `original_dst`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
from pathlib import Path
from typing import Literal

from .addresses import is_local_address, is_unspecified

__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "SO_ORIGINAL_DST",
    "Sniff",
    "client_hello_max_version",
    "decode_sockaddr_in",
    "decode_sockaddr_in6",
    "is_local_address",
    "is_local_destination",
    "local_addresses",
    "original_dst",
    "sniff",
]

# <linux/netfilter_ipv4.h> SO_ORIGINAL_DST and <linux/netfilter_ipv6/ip6_tables.h>
# IP6T_SO_ORIGINAL_DST: both 80, at levels SOL_IP and SOL_IPV6 respectively.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28
# sa_family_t is host byte order; sin_port/sin6_port and sin6_flowinfo are network order.
_FAMILY = struct.Struct("=H")
_IN = struct.Struct("!H4s8x")  # after the family: port, address, zero padding
_IN6 = struct.Struct("!HI16s")  # after the family: port, flowinfo, address (scope id ignored)
_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)


def decode_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """Decode a `struct sockaddr_in` (16 bytes) into `(dotted address, port)`.

    Raises ValueError when the length or the address family is wrong.
    """
    if len(raw) != _SOCKADDR_IN_LEN:
        raise ValueError(f"sockaddr_in must be {_SOCKADDR_IN_LEN} bytes, got {len(raw)}")
    (family,) = _FAMILY.unpack_from(raw, 0)
    if family != _AF_INET:
        raise ValueError(f"sockaddr_in has address family {family}, expected AF_INET")
    (
        port,
        addr,
    ) = _IN.unpack_from(raw, 2)
    return socket.inet_ntop(socket.AF_INET, addr), port


def decode_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """Decode a `struct sockaddr_in6` (28 bytes) into `(compressed address, port)`.

    The flow info and scope id are dropped. Raises ValueError when the length or the
    address family is wrong.
    """
    if len(raw) != _SOCKADDR_IN6_LEN:
        raise ValueError(f"sockaddr_in6 must be {_SOCKADDR_IN6_LEN} bytes, got {len(raw)}")
    (family,) = _FAMILY.unpack_from(raw, 0)
    if family != _AF_INET6:
        raise ValueError(f"sockaddr_in6 has address family {family}, expected AF_INET6")
    port, _flowinfo, addr = _IN6.unpack_from(raw, 2)
    return socket.inet_ntop(socket.AF_INET6, addr), port


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client dialled before an iptables/nftables REDIRECT rewrote it.

    AF_INET sockets ask netfilter with `SO_ORIGINAL_DST`; AF_INET6 sockets with
    `IP6T_SO_ORIGINAL_DST`, except connections that arrived as IPv4-mapped addresses on a
    dual-stack socket, which are IPv4 conntrack entries and are asked the IPv4 way (the result
    is then the dotted IPv4 address). A connection that was not redirected still has a
    conntrack entry (if conntrack is loaded) and yields the address it was accepted on.

    Raises ValueError("no original destination ...") when the kernel has none to give.
    """
    try:
        if sock.family == socket.AF_INET:
            return decode_sockaddr_in(sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN))
        if sock.family == socket.AF_INET6:
            local = sock.getsockname()[0]
            if local.startswith("::ffff:") and "." in local:
                return decode_sockaddr_in(
                    sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
                )
            return decode_sockaddr_in6(
                sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
            )
    except OSError as exc:
        raise ValueError(
            f"no original destination for this connection ({exc.strerror or exc}); "
            "is it redirected by the mtls-sidecar iptables rules and is conntrack loaded?"
        ) from None
    raise ValueError(f"no original destination: socket family {sock.family!r} is not IP")


Sniff = Literal["tls", "plaintext", "need_more"]

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_MAX_PLAINTEXT_RECORD = 1 << 14  # RFC 8446 5.1: TLSPlaintext.length <= 2^14
_SNIFF_BYTES = 6  # record header (5) + handshake type (1)


def sniff(first: bytes) -> Sniff:
    """Classify the first bytes a client sent: a TLS ClientHello, plaintext, or too few bytes.

    'tls' needs a handshake record header (type 0x16, version 3.x, a plausible length) whose
    first handshake message is a ClientHello (0x01). Anything that cannot start a ClientHello
    is 'plaintext' as early as the first byte that rules it out; 'need_more' only when every
    byte so far fits a ClientHello and fewer than 6 arrived. Never raises.
    """
    n = len(first)
    if n == 0:
        return "need_more"
    if first[0] != _TLS_HANDSHAKE:
        return "plaintext"
    if n < 2:
        return "need_more"
    if first[1] != 3:
        return "plaintext"
    if n < 5:
        return "need_more"
    length = (first[3] << 8) | first[4]
    if length < 4 or length > _MAX_PLAINTEXT_RECORD:
        return "plaintext"
    if n < _SNIFF_BYTES:
        return "need_more"
    return "tls" if first[5] == _CLIENT_HELLO else "plaintext"


_VERSION_NAMES = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}
_EXT_SUPPORTED_VERSIONS = 0x002B


def _is_grease(v: int) -> bool:
    # RFC 8701 GREASE values: 0x0A0A, 0x1A1A, ... 0xFAFA.
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _client_hello(first: bytes) -> tuple[int, bytes, list[tuple[int, int, int]] | None] | None:
    """Parse a ClientHello in the first record: (legacy version, hello body, extensions).

    Extensions are (type, offset in body, length); None when they do not all fit in `first`,
    [] when there are none. None overall when `first` is not a ClientHello record.
    """
    if sniff(first) != "tls":
        return None
    record_len = (first[3] << 8) | first[4]
    body = first[5 : 5 + record_len]
    if len(body) < record_len or len(body) < 4:
        return None
    hs_len = int.from_bytes(body[1:4], "big")
    hello = body[4 : 4 + hs_len]
    if len(hello) < hs_len or hs_len < 38:
        return None
    legacy = (hello[0] << 8) | hello[1]
    pos = 34  # client_version (2) + random (32)
    try:
        pos += 1 + hello[pos]  # session id
        pos += 2 + ((hello[pos] << 8) | hello[pos + 1])  # cipher suites
        pos += 1 + hello[pos]  # compression methods
        if pos + 2 > len(hello):
            return legacy, hello, []  # no extensions at all
        end = pos + 2 + ((hello[pos] << 8) | hello[pos + 1])
        pos += 2
        if end > len(hello):
            return legacy, hello, None
        exts: list[tuple[int, int, int]] = []
        while pos + 4 <= end:
            ext_type = (hello[pos] << 8) | hello[pos + 1]
            ext_len = (hello[pos + 2] << 8) | hello[pos + 3]
            pos += 4
            if pos + ext_len > end:
                return legacy, hello, None
            exts.append((ext_type, pos, ext_len))
            pos += ext_len
    except IndexError:
        return None
    return legacy, hello, exts


def client_hello_max_version(first: bytes) -> str | None:
    """The highest TLS version a ClientHello offers ("TLSv1.3", "TLSv1.2", ...), or None.

    Reads the supported_versions extension when present (TLS 1.3 clients), else the legacy
    client_version. None when `first` is not a complete ClientHello in its first record or
    the version is unknown. Used to label `tls_version` rejections; never raises.
    """
    parsed = _client_hello(first)
    if parsed is None:
        return None
    legacy, hello, exts = parsed
    if exts is None:
        return None
    for ext_type, pos, ext_len in exts:
        if ext_type == _EXT_SUPPORTED_VERSIONS and ext_len >= 1:
            list_len = hello[pos]
            offered = [
                (hello[i] << 8) | hello[i + 1]
                for i in range(pos + 1, min(pos + 1 + list_len, pos + ext_len) - 1, 2)
            ]
            known = [v for v in offered if not _is_grease(v) and v in _VERSION_NAMES]
            return _VERSION_NAMES[max(known)] if known else None
    return _VERSION_NAMES.get(legacy)


_EXT_PRE_SHARED_KEY = 41


def is_local_destination(host: str, port: int, own_ports: set[int], local_addrs: set[str]) -> bool:
    """True when (host, port) is the sidecar itself: one of its own ports on a local address.

    A transparent listener must refuse such a connection, or it would dial itself forever
    (for example a client that dialled a capture port directly). Loopback and unspecified
    addresses always count as local; `local_addrs` may hold any textual form (IPv4-mapped,
    uncompressed IPv6), it is compared after normalisation (proxy/addresses.py). Cheap when
    the port is not one of `own_ports`, which is the common case.
    """
    if port not in own_ports:
        return False
    if host in local_addrs or is_local_address(host, local_addrs):
        return True
    return is_unspecified(host)  # 0.0.0.0 reaches us too


def _hex_ipv6(text: str) -> str:
    return str(ipaddress.IPv6Address(bytes.fromhex(text)))


def local_addresses(proc: Path = Path("/proc/net")) -> set[str]:
    """Every address assigned to this network namespace (IPv4 and IPv6), for loop detection.

    Read from /proc/net/fib_trie (local IPv4 routes) and /proc/net/if_inet6; Linux only.
    Returns just the loopback addresses when those files are unreadable.
    """
    addrs = {"127.0.0.1", "::1"}
    if not sys.platform.startswith("linux"):
        return addrs
    try:
        lines = (proc / "fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    last = ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(("|--", "+--")):
            last = stripped.split()[1]
        elif stripped == "/32 host LOCAL" and last:
            addrs.add(last)
    try:
        for line in (proc / "if_inet6").read_text().splitlines():
            fields = line.split()
            if fields:
                addrs.add(_hex_ipv6(fields[0]))
    except (OSError, ValueError):
        pass
    return addrs
