"""SO_ORIGINAL_DST decoding (and the real thing in a netns), TLS sniffing, loop detection."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.transparent import (
    IP6T_SO_ORIGINAL_DST,
    SO_ORIGINAL_DST,
    client_hello_max_version,
    decode_sockaddr_in,
    decode_sockaddr_in6,
    is_local_address,
    is_local_destination,
    local_addresses,
    original_dst,
    sniff,
)

REPO = Path(__file__).resolve().parent.parent


def sockaddr_in(addr: str, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(addr) + bytes(8)


def sockaddr_in6(
    addr: str, port: int, flowinfo: int = 0, scope: int = 0, family: int = socket.AF_INET6
) -> bytes:
    return (
        struct.pack("=H", family)
        + struct.pack("!HI", port, flowinfo)
        + socket.inet_pton(socket.AF_INET6, addr)
        + struct.pack("=I", scope)
    )


# --- sockaddr decoding ------------------------------------------------------------------------


def test_constants() -> None:
    assert SO_ORIGINAL_DST == 80 and IP6T_SO_ORIGINAL_DST == 80


def test_decode_sockaddr_in_hand_built() -> None:
    # AF_INET=2 little-endian on x86/arm64, port 8080 = 0x1f90 big-endian, 10.1.2.3, zero pad.
    family = struct.pack("=H", 2)
    raw = family + b"\x1f\x90" + bytes([10, 1, 2, 3]) + b"\x00" * 8
    assert decode_sockaddr_in(raw) == ("10.1.2.3", 8080)
    assert decode_sockaddr_in(sockaddr_in("255.255.255.255", 65535)) == ("255.255.255.255", 65535)


def test_decode_sockaddr_in6_hand_built() -> None:
    family = struct.pack("=H", int(socket.AF_INET6))
    addr = bytes.fromhex("fd000000000000000000000000000099")
    raw = family + b"\x20\xfb" + b"\x00\x00\x00\x07" + addr + struct.pack("=I", 3)
    assert decode_sockaddr_in6(raw) == ("fd00::99", 8443)
    mapped = sockaddr_in6("::ffff:10.0.0.1", 80)
    assert decode_sockaddr_in6(mapped) == ("::ffff:10.0.0.1", 80)


@pytest.mark.parametrize(
    "raw",
    [b"", bytes(15), bytes(17), bytes(28), sockaddr_in("1.2.3.4", 1, family=socket.AF_INET6)],
)
def test_decode_sockaddr_in_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError, match="sockaddr_in"):
        decode_sockaddr_in(raw)


@pytest.mark.parametrize(
    "raw", [b"", bytes(16), bytes(27), bytes(29), sockaddr_in6("::1", 1, family=socket.AF_INET)]
)
def test_decode_sockaddr_in6_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError, match="sockaddr_in6"):
        decode_sockaddr_in6(raw)


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_decode_sockaddr_in_round_trip(addr: ipaddress.IPv4Address, port: int) -> None:
    assert decode_sockaddr_in(sockaddr_in(str(addr), port)) == (str(addr), port)


@given(
    st.ip_addresses(v=6),
    st.integers(0, 65535),
    st.integers(0, 2**20 - 1),
    st.integers(0, 2**32 - 1),
)
def test_decode_sockaddr_in6_round_trip(
    addr: ipaddress.IPv6Address, port: int, flow: int, scope: int
) -> None:
    host, got_port = decode_sockaddr_in6(sockaddr_in6(str(addr), port, flow, scope))
    # Text as inet_ntop (and so the socket module) writes it, e.g. "::ffff:10.0.0.1".
    assert (ipaddress.IPv6Address(host), got_port) == (addr, port)
    assert host == socket.inet_ntop(socket.AF_INET6, addr.packed)


@given(st.binary(max_size=40))
def test_decode_never_raises_anything_but_value_error(raw: bytes) -> None:
    for decode in (decode_sockaddr_in, decode_sockaddr_in6):
        with contextlib.suppress(ValueError):
            decode(raw)


def test_original_dst_not_ip_socket() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="no original destination"):
        original_dst(a)


def test_original_dst_without_redirect() -> None:
    """Not redirected: ValueError, or (with conntrack loaded) the address it was accepted on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            with conn:
                try:
                    assert original_dst(conn) == ("127.0.0.1", port)
                except ValueError as exc:
                    assert "no original destination" in str(exc)
                    assert client.fileno() >= 0


# --- sniffing ---------------------------------------------------------------------------------


def client_hello(
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    *,
    alpn: bool = False,
    sni: str = "db.internal",
) -> bytes:
    """The first bytes a real Python/OpenSSL TLS client sends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@functools.cache
def cached_hello() -> bytes:
    return client_hello()


@pytest.fixture
def hello13() -> bytes:
    return cached_hello()


def test_sniff_real_client_hellos(hello13: bytes) -> None:
    for hello in (hello13, client_hello(ssl.TLSVersion.TLSv1_2), client_hello(alpn=True)):
        assert sniff(hello) == "tls"
        assert sniff(hello[:6]) == "tls"
        for n in range(6):
            assert sniff(hello[:n]) == "need_more"


def test_sniff_over_a_real_socket(hello13: bytes) -> None:
    """The listener peeks (MSG_PEEK) without consuming; the bytes are still there after."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(hello13[:3])
        assert sniff(b.recv(64, socket.MSG_PEEK)) == "need_more"
        a.sendall(hello13[3:])
        assert sniff(b.recv(64, socket.MSG_PEEK)) == "tls"
        assert b.recv(len(hello13), socket.MSG_WAITALL) == hello13


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x02",  # SSL 2-ish version
        b"\x16\x03\x01\x00\x00",  # zero-length record
        b"\x16\x03\x01\x00\x03\x01",  # too short for a handshake header
        b"\x16\x03\x01\x40\x01\x01",  # longer than 2^14
        b"\x16\x03\x03\x00\x40\x02",  # ServerHello, not ClientHello
        b"\x17\x03\x03\x00\x40\x01",  # application data
        b"\x80\x2e\x01\x00\x02",  # SSLv2 ClientHello: treated as not TLS
    ],
)
def test_sniff_plaintext(data: bytes) -> None:
    assert sniff(data) == "plaintext"


@pytest.mark.parametrize("data", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02"])
def test_sniff_need_more(data: bytes) -> None:
    assert sniff(data) == "need_more"


def test_sniff_decides_on_the_first_impossible_byte() -> None:
    assert sniff(b"G") == "plaintext"
    assert sniff(b"\x16\x04") == "plaintext"


@given(st.binary(max_size=64))
def test_sniff_never_raises(data: bytes) -> None:
    assert sniff(data) in ("tls", "plaintext", "need_more")


@given(st.binary(max_size=32), st.binary(max_size=32))
def test_sniff_decision_is_final(first: bytes, more: bytes) -> None:
    """Once sniff decided, more bytes never change the answer (the listener stops reading)."""
    verdict = sniff(first)
    if verdict != "need_more":
        assert sniff(first + more) == verdict


@given(st.binary(max_size=64), st.integers(0, 200))
def test_sniff_real_hello_prefixes_never_plaintext(garbage: bytes, n: int) -> None:
    hello = cached_hello()
    assert sniff(hello[:n]) in ("tls", "need_more")
    assert sniff(hello + garbage) == "tls"


def test_client_hello_max_version(hello13: bytes) -> None:
    assert client_hello_max_version(hello13) == "TLSv1.3"
    assert client_hello_max_version(client_hello(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    assert client_hello_max_version(client_hello(alpn=True)) == "TLSv1.3"
    assert client_hello_max_version(hello13[:40]) is None
    assert client_hello_max_version(b"GET / HTTP/1.1\r\n") is None


def test_client_hello_max_version_legacy_without_extensions() -> None:
    body = b"\x03\x02" + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
    assert client_hello_max_version(record) == "TLSv1.1"


def test_client_hello_max_version_ignores_grease() -> None:
    versions = b"\x0a\x0a\x03\x04\x03\x03"
    ext = b"\x00\x2b" + (len(versions) + 1).to_bytes(2, "big") + bytes([len(versions)]) + versions
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(ext).to_bytes(2, "big") + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
    assert client_hello_max_version(record) == "TLSv1.3"


@given(st.binary(max_size=300))
def test_client_hello_max_version_never_raises(data: bytes) -> None:
    client_hello_max_version(data)
    client_hello_max_version(b"\x16\x03\x01\x00\xff\x01" + data)


@given(st.integers(0, 600), st.binary(min_size=1, max_size=1))
def test_client_hello_max_version_corrupted_real_hello(pos: int, byte: bytes) -> None:
    hello = bytearray(cached_hello())
    pos %= len(hello)
    hello[pos] = byte[0]
    assert client_hello_max_version(bytes(hello)) in (None, "TLSv1.2", "TLSv1.3", "TLSv1")


# --- loop detection -------------------------------------------------------------------------


OWN = {15001, 15006, 15000}


@pytest.mark.parametrize(
    ("host", "port", "local", "expected"),
    [
        ("10.0.0.5", 15006, {"10.0.0.5"}, True),
        ("10.0.0.5", 8080, {"10.0.0.5"}, False),
        ("10.0.0.6", 15006, {"10.0.0.5"}, False),
        ("127.0.0.1", 15001, set(), True),
        ("127.0.0.53", 15001, set(), True),
        ("::1", 15006, set(), True),
        ("0.0.0.0", 15006, set(), True),
        ("::ffff:10.0.0.5", 15006, {"10.0.0.5"}, True),
        ("10.0.0.5", 15006, {"::ffff:10.0.0.5"}, True),
        ("fd00:0:0:0:0:0:0:5", 15001, {"fd00::5"}, True),
        ("fd00::5", 15001, {"FD00:0::5"}, True),
        ("fe80::1%eth0", 15001, {"fe80::1"}, True),
        ("fd00::6", 15001, {"fd00::5"}, False),
        ("not-an-ip", 15001, {"not-an-ip"}, True),
        ("not-an-ip", 15001, set(), False),
    ],
)
def test_is_local_destination(host: str, port: int, local: set[str], expected: bool) -> None:
    assert is_local_destination(host, port, OWN, local) is expected


def test_local_addresses_from_proc(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     +-- 10.244.1.0/24 2 0 2\n        |-- 10.244.1.7\n           /32 host LOCAL\n"
        "        |-- 10.244.1.255\n           /32 link BROADCAST\n"
    )
    (tmp_path / "if_inet6").write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd000000000000990000000000000001 02 40 00 80     eth0\n"
    )
    assert local_addresses(tmp_path) == {"127.0.0.1", "::1", "10.244.1.7", "fd00:0:0:99::1"}
    assert local_addresses(tmp_path / "missing") == {"127.0.0.1", "::1"}


def test_local_addresses_real() -> None:
    assert {"127.0.0.1", "::1"} <= local_addresses()


# --- the real SO_ORIGINAL_DST in a network namespace ----------------------------------------


def netns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "iptables", "ip6tables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with lo up and a veth pair whose both ends stay inside it.

    v0 holds 10.99.0.1/24 and fd00:99::1/64; 10.99.0.2 and fd00:99::2 are routed out of v0
    to v1, which has no address: nothing answers them and nothing leaves the namespace.
    """
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"NETNS TEST SKIPPED (real SO_ORIGINAL_DST not tested): {reason}")
    name = f"mtlstest-odst-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"NETNS TEST SKIPPED: ip netns add failed: {made.stderr.strip()}")
    try:
        for cmd in (
            "link set lo up",
            "link add v0 type veth peer name v1",
            "addr add 10.99.0.1/24 dev v0",
            "-6 addr add fd00:99::1/64 dev v0 nodad",
            "link set v0 up",
            "link set v1 up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# Runs inside the namespace: applies the real rules with `main(['--apply'])`, listens on the
# outbound capture port, dials addresses that exist only in the namespace and reports what
# original_dst says on the accepted side.
NS_SCRIPT = r"""
import json, os, socket, sys
from proxy.iptables import main
from proxy.transparent import original_dst, is_local_destination, local_addresses

env = {"PATH": os.environ["PATH"], "MTLS_EXCLUDE_OUTBOUND_PORTS": "9999"}
extra = sys.argv[1:]  # backend flags: [], ["--nft"] or ["--backend", "legacy"]
assert main(["--apply", *extra], env) == 0
result = {}

def listener(family, host, v6only=True):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
    s.bind((host, 15001))
    s.listen(8)
    s.settimeout(0.3)
    return s

def dial(listeners, family, addr, uid=None):
    if uid is not None:
        os.seteuid(uid)  # the socket's owner is fixed at creation; that is what -m owner sees
    try:
        c = socket.socket(family, socket.SOCK_STREAM)
    finally:
        os.seteuid(0)
    c.settimeout(0.5)
    try:
        c.connect(addr)
    except OSError as exc:
        c.close()
        return {"connected": False, "error": type(exc).__name__}
    for s in listeners:
        try:
            conn, _ = s.accept()
        except socket.timeout:
            continue
        with conn:
            c.close()
            return {"connected": True, "original_dst": list(original_dst(conn)),
                    "sockname": list(conn.getsockname()[:2])}
    c.close()
    return {"connected": True, "accepted": False}

l4 = listener(socket.AF_INET, "0.0.0.0")
l6 = listener(socket.AF_INET6, "::")
both = [l4, l6]
result["v4"] = dial(both, socket.AF_INET, ("10.99.0.2", 8080))
result["v6"] = dial(both, socket.AF_INET6, ("fd00:99::2", 8443))
result["v4_proxy_uid"] = dial(both, socket.AF_INET, ("10.99.0.2", 8080), uid=1337)
result["v4_excluded_port"] = dial(both, socket.AF_INET, ("10.99.0.2", 9999))
result["v6_excluded_port"] = dial(both, socket.AF_INET6, ("fd00:99::2", 9999))
direct = dial(both, socket.AF_INET, ("10.99.0.1", 15001))
result["direct"] = direct
host, port = direct["original_dst"]
result["direct_is_loop"] = is_local_destination(host, port, {15001, 15006}, local_addresses())
l4.close(); l6.close()

dual = listener(socket.AF_INET6, "::", v6only=False)
result["dual_v4"] = dial([dual], socket.AF_INET, ("10.99.0.2", 8080))
result["dual_v6"] = dial([dual], socket.AF_INET6, ("fd00:99::2", 8443))
dual.close()
assert main(["--clean", *extra], env) == 0
print(json.dumps(result))
"""


@pytest.mark.netns
@pytest.mark.parametrize(
    "backend", [[], ["--nft"], ["--backend", "legacy"]], ids=["iptables-nft", "nft", "legacy"]
)
def test_original_dst_real_redirect_in_netns(netns: str, backend: list[str]) -> None:
    tool = {"--nft": "nft", "--backend": "iptables-legacy"}.get(backend[0] if backend else "")
    if tool and shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", NS_SCRIPT, *backend],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["v4"]["original_dst"] == ["10.99.0.2", 8080]
    assert result["v4"]["sockname"] == ["127.0.0.1", 15001]  # REDIRECT in OUTPUT -> loopback
    assert result["v6"]["original_dst"] == ["fd00:99::2", 8443]
    assert result["v6"]["sockname"] == ["::1", 15001]
    # The proxy's own UID and excluded ports go straight out (to nobody: they time out).
    for case in ("v4_proxy_uid", "v4_excluded_port", "v6_excluded_port"):
        assert result[case] == {"connected": False, "error": "TimeoutError"}, case
    # A client dialling the capture port itself: not redirected, and recognised as a loop.
    assert result["direct"]["original_dst"] == ["10.99.0.1", 15001]
    assert result["direct_is_loop"] is True
    # Dual-stack listener: IPv4 arrives IPv4-mapped and is asked the IPv4 way.
    assert result["dual_v4"]["sockname"] == ["::ffff:127.0.0.1", 15001]
    assert result["dual_v4"]["original_dst"] == ["10.99.0.2", 8080]
    assert result["dual_v6"]["original_dst"] == ["fd00:99::2", 8443]


@pytest.mark.parametrize(
    ("host", "local", "expected"),
    [
        ("10.0.0.5", {"10.0.0.5"}, True),
        ("10.0.0.6", {"10.0.0.5"}, False),
        ("127.0.0.1", set(), True),
        ("::1", set(), True),
        ("0.0.0.0", set(), False),  # nobody dials it: a stream naming it is refused
        ("::", set(), False),
        ("::ffff:10.0.0.5", {"10.0.0.5"}, True),
        ("fd00:0:0:0:0:0:0:5", {"fd00::5"}, True),
        ("fd00::6", {"fd00::5"}, False),
        ("not-an-ip", {"not-an-ip"}, False),  # a stream must name an address
        ("192.0.2.10", set(), False),
    ],
)
def test_is_local_address(host: str, local: set[str], expected: bool) -> None:
    """Where a pooled stream may lead in transparent mode: this host's own addresses."""
    assert is_local_address(host, local) is expected
