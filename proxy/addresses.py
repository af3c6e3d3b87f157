"""The one place that judges an IP address as loopback, unspecified or this host's; pure.

Every loopback/local decision in the sidecar (loop detection in `check` and in transparent
mode, where a pooled stream may lead, who may `POST /drain`) asks here, so the same
address is never judged two ways. An address is normalised first:

- the scope id is dropped (`fe80::1%eth0` is `fe80::1`);
- an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is the IPv4 address it carries: that
  is how a dual-stack socket shows an IPv4 peer, and dialling it reaches the IPv4
  address. Python's `ipaddress` does not unwrap it (`is_loopback` is False for
  `::ffff:127.0.0.1` on Python 3.11).

Other embeddings are left alone on purpose: 6to4 (`2002:7f00:1::`), NAT64 (`64:ff9b::/96`),
IPv4-compatible (`::127.0.0.1`, deprecated) and IPv4-translated (`::ffff:0:0/96`) addresses
are routed off this host (to a relay or translator), so they never reach our loopback.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_of(host: str) -> IPAddress | None:
    """The address `host` names, normalised (see the module docstring); None for a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize(host: str) -> str:
    """Canonical text of an IP address (IPv4-mapped -> IPv4, no scope id, compressed IPv6);
    a name is returned lower-cased."""
    ip = ip_of(host)
    return str(ip) if ip is not None else host.lower()


def is_loopback(host: str | None) -> bool:
    """Is `host` this machine's loopback: 127.0.0.0/8, ::1 or one of them IPv4-mapped; also
    the names `localhost` and `*.localhost` (RFC 6761)."""
    if not host:
        return False
    ip = ip_of(host)
    if ip is None:
        name = host.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")
    return ip.is_loopback


def is_unspecified(host: str) -> bool:
    """Is `host` 0.0.0.0, :: or ::ffff:0.0.0.0 (dialling it reaches this host)."""
    ip = ip_of(host)
    return ip is not None and ip.is_unspecified


def is_local_address(host: str, local_addrs: Collection[str]) -> bool:
    """True when `host` is an address of this machine (loopback included, the unspecified
    address not: nobody dials it). `local_addrs` may hold any textual form."""
    ip = ip_of(host)
    if ip is None or ip.is_unspecified:
        return False  # a name, or nobody's address
    if ip.is_loopback or host in local_addrs:
        return True
    norm = str(ip)
    return norm in local_addrs or norm in {normalize(a) for a in local_addrs}
