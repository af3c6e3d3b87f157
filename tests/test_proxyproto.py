"""PROXY v2 codec: golden bytes, an independent parser (the proxy-protocol package), our strict
parser against our encoder and against mutations, certificate details, the setting parsers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import string
import struct

import proxyprotocol.checksum
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxyprotocol import ProxyProtocolChecksumError
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from proxy import proxyproto as pp
from proxy.proxyproto import CallerInfo, NeedMore, Parsed, ProxyHeaderError

from .pki import make_leaf, make_root

pytestmark = pytest.mark.unit  # in-process only: part of `make unit`

SIG = pp.SIGNATURE


# --- crc32c ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        # RFC 3720 appendix B.4 and the usual check value.
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"123456789", 0xE3069283),
        (b"", 0),
    ],
)
def test_crc32c_vectors(data: bytes, crc: int) -> None:
    assert pp.crc32c(data) == crc


# --- encoding: golden bytes --------------------------------------------------------------


def test_ipv4_header_bytes() -> None:
    got = pp.encode_v2(src=("192.0.2.1", 51000), dst=("198.51.100.2", 8080))
    want = (
        SIG
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 1, 198, 51, 100, 2])
        + struct.pack("!HH", 51000, 8080)
    )
    assert got == want


def test_ipv6_header_bytes() -> None:
    got = pp.encode_v2(src=("2001:db8::1", 1), dst=("::1", 65535))
    want = (
        SIG
        + b"\x21\x21\x00\x24"
        + ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("::1").packed
        + b"\x00\x01\xff\xff"
    )
    assert got == want


def test_mixed_families_go_as_v4_mapped_ipv6() -> None:
    got = pp.encode_v2(src=("203.0.113.7", 4000), dst=("::1", 80))
    assert got[13] == 0x21
    assert got[16:32] == ipaddress.IPv6Address("::ffff:203.0.113.7").packed
    parsed = pp.parse_v2(got)
    assert isinstance(parsed, Parsed)
    assert parsed.src == (str(ipaddress.IPv6Address("::ffff:203.0.113.7")), 4000)
    assert ipaddress.IPv6Address(parsed.src[0]).ipv4_mapped == ipaddress.IPv4Address("203.0.113.7")


def test_dual_stack_ipv4_callers_go_as_ipv4() -> None:
    """A dual-stack listener reports IPv4 callers as ::ffff:a.b.c.d: the app gets IPv4."""
    got = pp.encode_v2(src=("::ffff:192.0.2.1", 51000), dst=("::ffff:198.51.100.2", 8080))
    assert got == pp.encode_v2(src=("192.0.2.1", 51000), dst=("198.51.100.2", 8080))
    mixed = pp.parse_v2(pp.encode_v2(src=("::ffff:192.0.2.1", 1), dst=("2001:db8::2", 2)))
    assert isinstance(mixed, Parsed) and mixed.family == "inet6"
    assert mixed.src == (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 1)


def test_local_and_unknown_addresses() -> None:
    assert pp.encode_v2(command="LOCAL", src=None, dst=None) == SIG + b"\x20\x00\x00\x00"
    assert pp.encode_v2(src=None, dst=None) == SIG + b"\x21\x00\x00\x00"
    local = pp.parse_v2(SIG + b"\x20\x00\x00\x00" + b"payload")
    assert local == Parsed(16, "LOCAL", "unspec", None, None, ())


def test_tlvs_in_order_and_crc_filled_in() -> None:
    header = pp.encode_v2(
        src=("10.1.2.3", 1000),
        dst=("10.1.2.4", 2000),
        tlvs=[(0xE1, b"abc"), (pp.PP2_TYPE_CRC32C, b"\x00" * 4), (pp.PP2_TYPE_NOOP, b"")],
    )
    assert header[14:16] == struct.pack("!H", 12 + 6 + 7 + 3)
    body = header[28:]
    assert body[:6] == b"\xe1\x00\x03abc"
    assert body[6:9] == b"\x03\x00\x04"
    assert body[13:] == b"\x04\x00\x00"
    zeroed = header[:28] + body[:9] + b"\x00" * 4 + body[13:]
    assert int.from_bytes(body[9:13], "big") == pp.crc32c(zeroed) != 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"src": ("nothost", 1), "dst": ("127.0.0.1", 1)}, "'nothost' is not an IP address"),
        ({"src": ("127.1", 1), "dst": ("127.0.0.1", 1)}, "'127.1' is not an IP address"),
        ({"src": ("::1", 1), "dst": ("1.2.3.4%x", 1)}, "'1.2.3.4%x' is not an IP address"),
        ({"src": ("127.0.0.1", 70000), "dst": ("127.0.0.1", 1)}, "port 70000 is out of range"),
        ({"src": ("127.0.0.1", -1), "dst": ("127.0.0.1", 1)}, "port -1 is out of range"),
        ({"src": ("127.0.0.1", 1), "dst": None}, "give both src and dst, or neither"),
        (
            {"command": "LOCAL", "src": ("127.0.0.1", 1), "dst": ("127.0.0.1", 2)},
            "a LOCAL header carries no addresses",
        ),
        ({"command": "HEALTH", "src": None, "dst": None}, "command must be 'PROXY' or 'LOCAL'"),
        ({"src": None, "dst": None, "tlvs": [(256, b"")]}, "TLV type 256 is out of range"),
        ({"src": None, "dst": None, "tlvs": [(0xE0, bytes(65536))]}, "at most 65535 fit"),
        (
            {"src": None, "dst": None, "tlvs": [(0xE0, bytes(40000)), (0xE1, bytes(30000))]},
            "the header would be 70022 bytes; at most 65551 fit",
        ),
        ({"src": None, "dst": None, "tlvs": [(3, b"\0\0\0")]}, "PP2_TYPE_CRC32C must be 4 bytes"),
        (
            {"src": None, "dst": None, "tlvs": [(3, bytes(4)), (3, bytes(4))]},
            "more than one PP2_TYPE_CRC32C",
        ),
    ],
)
def test_encode_refuses(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pp.encode_v2(**kwargs)  # type: ignore[arg-type]


def test_largest_header_fits_exactly() -> None:
    header = pp.encode_v2(src=None, dst=None, tlvs=[(0xE0, bytes(0xFFFF - 3))])
    assert len(header) == pp.MAX_HEADER_LEN
    parsed = pp.parse_v2(header, max_len=pp.MAX_HEADER_LEN)
    assert isinstance(parsed, Parsed) and parsed.tlv(0xE0) == bytes(0xFFFF - 3)


# --- caller TLVs -------------------------------------------------------------------------

VERIFIED = CallerInfo(
    verified=True,
    tls_version="TLSv1.3",
    cipher="TLS_AES_128_GCM_SHA256",
    cn="web",
    spiffe_id="spiffe://corp.example/ns/default/sa/web",
    sig_alg="ecdsa-with-SHA256",
    key_alg="EC256",
)


def test_verified_caller_tlvs() -> None:
    tlvs = pp.caller_tlvs(VERIFIED)
    assert [k for k, _ in tlvs] == [0x20, 0xE0]
    ssl = pp.decode_ssl(tlvs[0][1])
    assert ssl.client == 0x07 and ssl.verify == 0 and ssl.verified
    assert ssl.subtlvs == (
        (0x21, b"TLSv1.3"),
        (0x22, b"web"),
        (0x23, b"TLS_AES_128_GCM_SHA256"),
        (0x24, b"ecdsa-with-SHA256"),
        (0x25, b"EC256"),
    )
    assert tlvs[1] == (0xE0, b"spiffe://corp.example/ns/default/sa/web")


def test_plaintext_caller_has_no_ssl_tlv() -> None:
    assert pp.caller_tlvs(CallerInfo(verified=None)) == []
    assert pp.caller_tlvs(CallerInfo(verified=None), crc=True) == [(3, bytes(4))]


def test_resumed_and_unverified_flags() -> None:
    resumed = pp.ssl_tlv(CallerInfo(verified=True, tls_version="TLSv1.3", resumed=True))
    assert resumed is not None and resumed[1][:5] == b"\x05\x00\x00\x00\x00"
    unverified = pp.ssl_tlv(CallerInfo(verified=False, tls_version="TLSv1.2"))
    assert unverified is not None and unverified[1][:5] == b"\x01\x00\x00\x00\x01"


def test_id_tlv_type_and_crc() -> None:
    tlvs = pp.caller_tlvs(VERIFIED, id_tlv=0xD0, crc=True)
    assert [k for k, _ in tlvs] == [0x03, 0x20, 0xD0]
    with pytest.raises(ValueError, match=r"TLV type 0x20 .* PP2_TYPE_SSL"):
        pp.caller_tlvs(VERIFIED, id_tlv=0x20)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"verified": None, "cipher": "x"}, "a plaintext caller .* has no TLS details"),
        ({"verified": None, "resumed": True}, "a plaintext caller"),
        ({"verified": False, "spiffe_id": "spiffe://a/b"}, "unverified peer's CN or SPIFFE ID"),
        ({"verified": False, "cn": "web"}, "unverified peer's CN or SPIFFE ID"),
    ],
)
def test_caller_info_refuses(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CallerInfo(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        (CallerInfo(verified=True, cipher="ÄES"), "cipher name 'ÄES' must be US-ASCII"),
        (CallerInfo(verified=True, spiffe_id="spiffe://x/" + "a" * 2048), "at most 2048"),
        (CallerInfo(verified=True, cn="x" * 3000), "certificate CN is 3000 bytes long"),
        (CallerInfo(verified=True, tls_version=""), "TLS version is empty"),
    ],
)
def test_caller_tlvs_refuse_absurd_values(peer: CallerInfo, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pp.caller_tlvs(peer)


def test_utf8_cn_is_sent_as_utf8() -> None:
    ssl = pp.ssl_tlv(CallerInfo(verified=True, cn="Zürich"))
    assert ssl is not None and pp.decode_ssl(ssl[1]).get(0x22) == "Zürich".encode()


# --- strategies ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoint = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 65535))
segment = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=20)
spiffe_ids = st.builds(
    lambda td, segs: "spiffe://" + td + "".join("/" + s for s in segs),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
    st.lists(segment, max_size=6),
)
printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
cns = st.one_of(st.none(), st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s))
verified_callers = st.builds(
    CallerInfo,
    verified=st.just(True),
    tls_version=st.sampled_from(["TLSv1.2", "TLSv1.3"]),
    cipher=st.one_of(st.none(), printable),
    cn=cns,
    spiffe_id=st.one_of(st.none(), spiffe_ids),
    sig_alg=st.one_of(st.none(), st.sampled_from(["ecdsa-with-SHA256", "RSA-SHA256"])),
    key_alg=st.one_of(st.none(), st.sampled_from(["EC256", "RSA2048"])),
    resumed=st.booleans(),
)
callers = st.one_of(verified_callers, st.just(CallerInfo(verified=None)))
id_types = st.sampled_from([0xE0, 0xE7, 0xEF, 0xD0])


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _expected_endpoints(
    src: tuple[str, int], dst: tuple[str, int]
) -> tuple[tuple[str, int], tuple[str, int]]:
    """What a reader must see: v4-mapped addresses count as IPv4, and IPv4 goes v4-mapped
    when the families differ."""
    a, b = _unmapped(src[0]), _unmapped(dst[0])
    if a.version == b.version:
        return (str(a), src[1]), (str(b), dst[1])

    def v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        return str(ipaddress.IPv6Address(f"::ffff:{ip}")) if ip.version == 4 else str(ip)

    return (v6(a), src[1]), (v6(b), dst[1])


# --- the independent reader: the proxy-protocol package --------------------------------


def test_independent_parser_checks_crc() -> None:
    """The package only verifies CRC32C with the crc32c module; make sure it does here."""
    assert proxyprotocol.checksum.crc32c is not None
    header = bytearray(pp.caller_header(("192.0.2.9", 9), ("127.0.0.1", 80), VERIFIED, crc=True))
    ProxyProtocolV2().unpack(bytes(header))
    header[20] ^= 0x01
    with pytest.raises(ProxyProtocolChecksumError):
        ProxyProtocolV2().unpack(bytes(header))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=endpoint, dst=endpoint, peer=callers, id_tlv=id_types, crc=st.booleans())
def test_proxy_protocol_package_reads_every_tlv(
    src: tuple[str, int], dst: tuple[str, int], peer: CallerInfo, id_tlv: int, crc: bool
) -> None:
    header = pp.caller_header(src, dst, peer, id_tlv=id_tlv, crc=crc)
    result = ProxyProtocolV2().unpack(header)  # raises on a bad CRC
    want_src, want_dst = _expected_endpoints(src, dst)
    assert isinstance(result, ProxyResultIPv4 | ProxyResultIPv6)
    assert (str(result.source[0]), result.source[1]) == want_src
    assert (str(result.dest[0]), result.dest[1]) == want_dst
    tlv = result.tlv
    assert (tlv.crc32c is not None) == crc
    if peer.verified is None:
        assert pp.PP2_TYPE_SSL not in tlv
    else:
        ssl = tlv.ssl
        assert ssl.has_ssl and ssl.verified
        assert ssl.has_cert_sess and ssl.has_cert_conn == (not peer.resumed)
        assert ssl.version == peer.tls_version
        assert ssl.cn == peer.cn
        assert ssl.cipher == peer.cipher
        assert ssl.sig_alg == peer.sig_alg
        assert ssl.key_alg == peer.key_alg
    if peer.spiffe_id is None:
        assert id_tlv not in tlv
    else:
        assert tlv[id_tlv].decode("ascii") == peer.spiffe_id
    assert set(tlv) <= {pp.PP2_TYPE_SSL, pp.PP2_TYPE_CRC32C, id_tlv}


def test_proxy_protocol_package_reads_local() -> None:
    result = ProxyProtocolV2().unpack(pp.encode_v2(command="LOCAL", src=None, dst=None))
    assert isinstance(result, ProxyResultLocal) and not result.proxied


# --- our parser ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(src=endpoint, dst=endpoint, peer=callers, id_tlv=id_types, crc=st.booleans())
def test_parser_round_trips_encoder(
    src: tuple[str, int], dst: tuple[str, int], peer: CallerInfo, id_tlv: int, crc: bool
) -> None:
    header = pp.caller_header(src, dst, peer, id_tlv=id_tlv, crc=crc)
    payload = b"GET / HTTP/1.1\r\n\r\n"
    parsed = pp.parse_v2(header + payload)
    assert isinstance(parsed, Parsed)
    assert parsed.header_len == len(header)
    assert (parsed.src, parsed.dst) == _expected_endpoints(src, dst)
    assert parsed.command == "PROXY"
    assert parsed.family == ("inet" if header[13] == 0x11 else "inet6")
    want = pp.caller_tlvs(peer, id_tlv, crc)
    assert [k for k, _ in parsed.tlvs] == [k for k, _ in want]
    for (_, got), (kind, value) in zip(parsed.tlvs, want, strict=True):
        if kind != pp.PP2_TYPE_CRC32C:
            assert got == value
    ssl = parsed.ssl()
    assert (ssl is None) == (peer.verified is None)
    if ssl is not None:
        assert ssl.verified and ssl.get(pp.PP2_SUBTYPE_SSL_CN) == (
            peer.cn.encode() if peer.cn else None
        )


@settings(max_examples=100, deadline=None)
@given(src=endpoint, dst=endpoint, peer=callers, crc=st.booleans())
def test_parser_asks_for_more_until_complete(
    src: tuple[str, int], dst: tuple[str, int], peer: CallerInfo, crc: bool
) -> None:
    header = pp.caller_header(src, dst, peer, crc=crc)
    for n in range(len(header)):
        result = pp.parse_v2(header[:n])
        assert isinstance(result, NeedMore)
        assert result.nbytes > 0 and n + result.nbytes <= len(header)


def _tlv_head_positions(header: bytes) -> set[int]:
    """Byte offsets of every TLV's type and length bytes (a change there re-frames the TLVs)."""
    at = 16 + (12 if header[13] >> 4 == 1 else 36)
    heads: set[int] = set()
    while at < len(header):
        heads |= {at, at + 1, at + 2}
        at += 3 + int.from_bytes(header[at + 1 : at + 3], "big")
    return heads


@settings(max_examples=300, deadline=None)
@given(
    src=endpoint,
    dst=endpoint,
    peer=callers,
    where=st.integers(min_value=0),
    xor=st.integers(1, 255),
)
def test_parser_rejects_any_changed_byte_under_crc(
    src: tuple[str, int], dst: tuple[str, int], peer: CallerInfo, where: int, xor: int
) -> None:
    """With a CRC32C, changing any one byte of signature, version/command, addresses or a
    TLV value is refused (the length, family and TLV framing bytes are table-tested)."""
    header = pp.caller_header(src, dst, peer, crc=True)
    positions = sorted(set(range(13)) | (set(range(16, len(header))) - _tlv_head_positions(header)))
    at = positions[where % len(positions)]
    bad = bytearray(header)
    bad[at] ^= xor
    with pytest.raises(ProxyHeaderError):
        pp.parse_v2(bytes(bad) + b"payload")


GOOD = pp.encode_v2(src=("192.0.2.1", 1234), dst=("127.0.0.1", 80))


def _with(at: int, value: int, base: bytes = GOOD) -> bytes:
    b = bytearray(base)
    b[at] = value
    return bytes(b)


def _crc_header() -> bytes:
    return pp.encode_v2(
        src=("192.0.2.1", 1234), dst=("127.0.0.1", 80), tlvs=[(pp.PP2_TYPE_CRC32C, bytes(4))]
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n", "PROXY protocol v1 \\(text\\) header"),
        (b"PRO", "PROXY protocol v1"),
        (b"\x16\x03\x01\x02\x00\x01", "got a TLS handshake"),
        (b"GET / HTTP/1.1\r\n", "no PROXY v2 signature; the connection starts with 47 45 54"),
        (b"\r\n\r\n\x00\r\nQUIT!", "no PROXY v2 signature"),
        (_with(12, 0x11), "PROXY protocol version 1 is not supported"),
        (_with(12, 0x31), "PROXY protocol version 3 is not supported"),
        (_with(12, 0x22), "unknown PROXY v2 command 0x2"),
        (_with(13, 0x41), "unknown PROXY v2 address family 0x4"),
        (_with(13, 0x13), "unknown PROXY v2 transport 0x3"),
        (_with(13, 0x12), "UDP \\(datagram\\)"),
        (_with(13, 0x21), "inet6 address block needs 36 bytes, the header has 12"),
        (_with(15, 0x0B), "inet address block needs 12 bytes, the header has 11"),
        (SIG + b"\x21\x11\x10\x00", "PROXY v2 header is 4112 bytes long; at most 4096 accepted"),
        (SIG + b"\x21\x11\xff\xff", "65551 bytes long"),
        (_with(15, 13) + b"\xe0", "truncated TLV in the PROXY v2 header at byte 0: 1 left"),
        (_with(15, 17) + b"\xe0\x00\x05ab", "TLV 0xE0 in the PROXY v2 header says 5 bytes but 2"),
        (_with(15, 19) + b"\x03\x00\x04\x00\x00\x00\x01", "CRC32C mismatch: it says 0x00000001"),
        (_with(15, 18) + b"\x03\x00\x03\x00\x00\x00", "PP2_TYPE_CRC32C is 3 bytes; it must be 4"),
        (
            _with(15, 26) + b"\x03\x00\x04\x00\x00\x00\x00\x03\x00\x04\x00\x00\x00\x00",
            "more than one PP2_TYPE_CRC32C",
        ),
        (_with(18, 0xFF, _crc_header()), "CRC32C mismatch"),
    ],
)
def test_parser_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message) as err:
        pp.parse_v2(data)
    assert err.value.reason == "bad_proxy_header"
    assert "\n" not in str(err.value)


def test_parser_max_len_is_adjustable() -> None:
    header = pp.encode_v2(src=None, dst=None, tlvs=[(0xE0, bytes(5000))])
    with pytest.raises(ProxyHeaderError, match="at most 4096"):
        pp.parse_v2(header[:16])
    assert isinstance(pp.parse_v2(header, max_len=8192), Parsed)


def test_ssl_tlv_must_be_well_formed() -> None:
    with pytest.raises(ProxyHeaderError, match="PP2_TYPE_SSL is 3 bytes"):
        pp.decode_ssl(b"\x01\x00\x00")
    with pytest.raises(ProxyHeaderError, match="truncated TLV inside PP2_TYPE_SSL"):
        pp.decode_ssl(b"\x01\x00\x00\x00\x00\x21\x00")


@pytest.mark.parametrize(
    ("fam", "addr_len", "family"), [(0x31, 216, "unix"), (0x01, 0, "unspec"), (0x10, 12, "inet")]
)
def test_parser_accepts_headers_without_usable_addresses(
    fam: int, addr_len: int, family: str
) -> None:
    data = SIG + bytes([0x21, fam]) + struct.pack("!H", addr_len + 4) + bytes(addr_len)
    data += b"\x04\x00\x01\x00"  # a NOOP TLV after the address block
    parsed = pp.parse_v2(data + b"rest")
    assert parsed == Parsed(16 + addr_len + 4, "PROXY", family, None, None, ((4, b"\x00"),))  # type: ignore[arg-type]


def test_parser_reads_a_local_header_with_addresses() -> None:
    # A LOCAL command with a family: the address block is skipped, TLVs are still read.
    data = SIG + b"\x20\x11\x00\x10" + bytes(12) + b"\xe0\x00\x01x"
    assert pp.parse_v2(data) == Parsed(32, "LOCAL", "inet", None, None, ((0xE0, b"x"),))


def test_parser_accepts_bytearray_and_memoryview() -> None:
    for buf in (bytearray(GOOD), memoryview(GOOD)):
        parsed = pp.parse_v2(buf)
        assert isinstance(parsed, Parsed) and parsed.src == ("192.0.2.1", 1234)


# --- certificate details ---------------------------------------------------------------


def _self_signed(kind: str, cn: str | None) -> bytes:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(65537, 2048)
    elif kind == "ec384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    algorithm = None if kind == "ed25519" else hashes.SHA384()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "t")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, algorithm)
    )
    return cert.public_bytes(Encoding.DER)


def test_cert_details_from_a_test_leaf() -> None:
    leaf, _ = make_leaf(make_root(), "spiffe://corp.example/web")
    der = leaf.public_bytes(Encoding.DER)
    assert pp.cert_algorithms(der) == ("ecdsa-with-SHA256", "EC256")
    assert pp.common_name(der) == "spiffe://corp.example/web"


@pytest.mark.parametrize(
    ("kind", "cn", "algs"),
    [
        ("rsa", "rsa-host", ("RSA-SHA384", "RSA2048")),
        ("ec384", None, ("ecdsa-with-SHA384", "EC384")),
        ("ed25519", "ed", ("ED25519", "ED25519")),
    ],
)
def test_cert_details(kind: str, cn: str | None, algs: tuple[str, str]) -> None:
    der = _self_signed(kind, cn)
    assert pp.cert_algorithms(der) == algs
    assert pp.common_name(der) == cn


def test_cert_details_of_garbage() -> None:
    assert pp.cert_algorithms(b"not a cert") == (None, None)
    assert pp.common_name(b"not a cert") is None


def test_caller_from_tls() -> None:
    root = make_root()
    peer, _ = make_leaf(root, "spiffe://corp.example/ns/shop/sa/web")
    own, _ = make_leaf(root, "spiffe://corp.example/ns/shop/sa/api")
    peer_der, own_der = peer.public_bytes(Encoding.DER), own.public_bytes(Encoding.DER)
    info = pp.caller_from_tls(
        verified=True,
        version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        peer_der=peer_der,
        own_der=own_der,
        resumed=True,
    )
    assert info == CallerInfo(
        verified=True,
        tls_version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
        cn="spiffe://corp.example/ns/shop/sa/web",
        spiffe_id="spiffe://corp.example/ns/shop/sa/web",
        sig_alg="ecdsa-with-SHA256",
        key_alg="EC256",
        resumed=True,
    )
    unverified = pp.caller_from_tls(
        verified=False, version="TLSv1.3", cipher=None, peer_der=peer_der
    )
    assert unverified.cn is None and unverified.spiffe_id is None
    garbage = pp.caller_from_tls(verified=True, version=None, cipher=None, peer_der=b"junk")
    assert garbage == CallerInfo(verified=True)


def test_header_reader_in_chunks() -> None:
    header = pp.caller_header(("2001:db8::5", 5555), ("::1", 80), VERIFIED, crc=True)
    data = header + b"payload after the header"
    reader = pp.HeaderReader()
    at, result = 0, None
    while result is None:
        assert at < len(data), "never completed"
        result = reader.feed(data[at : at + 7])
        at += 7
    parsed, rest = result
    assert at - 7 < len(header) <= at  # completed by the chunk holding its last byte
    assert parsed.src == ("2001:db8::5", 5555) and parsed.header_len == len(header)
    assert header + rest == data[:at]
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_header_reader_refuses_early_and_bounded() -> None:
    with pytest.raises(ProxyHeaderError, match="v1"):
        pp.HeaderReader().feed(b"PROXY TCP4 ")
    reader = pp.HeaderReader(max_len=64)
    with pytest.raises(ProxyHeaderError, match="at most 64"):
        reader.feed(SIG + b"\x21\x11\x01\x00")


def test_zoned_ipv6_is_sent_without_its_zone() -> None:
    parsed = pp.parse_v2(pp.encode_v2(src=("fe80::1%eth0", 1), dst=("fe80::2", 2)))
    assert isinstance(parsed, Parsed) and parsed.src == ("fe80::1", 1)


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("off", "off"),
        ("", "off"),
        ("  OFF ", "off"),
        ("all", "all"),
        ("All", "all"),
        ("web", frozenset({"web"})),
        ("web, api ,8443", frozenset({"web", "api", "8443"})),
        ("a_b-c", frozenset({"a_b-c"})),
        ("x" * 32, frozenset({"x" * 32})),
    ],
)
def test_parse_proxy_protocol(text: str, want: object) -> None:
    assert pp.parse_proxy_protocol(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web,,api", "empty route name in 'web,,api'"),
        ("web,", "empty route name"),
        ("web,all", "'all' cannot be mixed with route names"),
        ("Web", "route name 'Web' must be 1-32 of lower-case letters"),
        ("x" * 33, "must be 1-32"),
        ("web api", "route name 'web api'"),
        ("web,web", "route 'web' is listed twice"),
    ],
)
def test_parse_proxy_protocol_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pp.parse_proxy_protocol(text)


def test_selected_routes() -> None:
    sel = pp.parse_proxy_protocol("web,api")
    pp.check_proxy_protocol_routes(sel, ["web", "api", "admin"])
    pp.check_proxy_protocol_routes("all", [])
    with pytest.raises(ValueError, match=r"no inbound route named api \(inbound routes: web\)"):
        pp.check_proxy_protocol_routes(sel, ["web"])
    assert pp.sends_proxy_header(sel, "web") and not pp.sends_proxy_header(sel, "admin")
    assert pp.sends_proxy_header("all", "x") and not pp.sends_proxy_header("off", "x")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0xE0", 0xE0),
        ("0xe5", 0xE5),
        ("0XEF", 0xEF),
        ("224", 0xE0),
        ("208", 0xD0),
        ("0xD0", 0xD0),
        (" 239 ", 0xEF),
        ("", 0xE0),
    ],
)
def test_parse_tlv_type(text: str, want: int) -> None:
    assert pp.parse_tlv_type(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0x20", "TLV type 0x20 \\(32\\) cannot carry the SPIFFE ID: it is PP2_TYPE_SSL"),
        ("3", "it is PP2_TYPE_CRC32C"),
        ("0xF0", "reserved for experiments"),
        ("0xFF", "reserved for future protocol use"),
        ("0xD1", "outside the custom range"),
        ("300", "a TLV type is one byte"),
        ("0x100", "expected a TLV type like 0xE0 or 224, got '0x100'"),
        ("E0", "expected a TLV type like 0xE0"),
        ("-1", "expected a TLV type"),
        ("0xE0 ,", "expected a TLV type"),
    ],
)
def test_parse_tlv_type_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pp.parse_tlv_type(text)
