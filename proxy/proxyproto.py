"""PROXY protocol v2: encode the header we send to the app, parse the one a load balancer sends us.

Pure (no I/O). The format is haproxy's doc/proxy-protocol.txt, section 2.2:

    12-byte signature, version|command, family|transport, 2-byte length,
    address block (IPv4 12 bytes, IPv6 36), then TLVs (type, 2-byte length, value).

The sidecar writes one header at the start of each connection to the app (`caller_header`):
the caller's address and port, the address it called, a PP2_TYPE_SSL TLV describing the mTLS
session (left out for a plaintext caller, so the app can tell), the caller's SPIFFE ID as a
URI in a custom TLV, and optionally a CRC32C. On listeners behind a load balancer the sidecar
reads one header with `parse_v2`, strictly: anything but a valid v2 header is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import google_crc32c
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from .errors import ProxyError
from .identity import spiffe_id_from_der

SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every v2 header starts with."""

HEADER_FIXED_LEN: Final = 16
MAX_HEADER_LEN: Final = HEADER_FIXED_LEN + 0xFFFF
"""The protocol's own bound: the length field is 16 bits."""

DEFAULT_MAX_PARSE_LEN: Final = 4096
"""What `parse_v2` accepts unless told otherwise: load balancers send well under 1 KB
(addresses plus a few TLVs), so a longer header is a broken or hostile peer."""

MAX_TLV_TEXT: Final = 2048
"""Longest string `caller_tlvs` puts in one TLV: the SPIFFE ID spec's cap on a whole ID.
A certificate CN or cipher name longer than that is not something to forward."""

# Registered TLV types (section 2.2).
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

DEFAULT_ID_TLV: Final = 0xE0
"""The first of the custom range 0xE0-0xEF, which the spec reserves for applications."""

ZTUNNEL_ID_TLV: Final = 0xD0
"""The type Istio's ztunnel writes the caller's SPIFFE ID with (outside the reserved ranges)."""

_REGISTERED_TYPES: Final = {
    PP2_TYPE_ALPN: "PP2_TYPE_ALPN",
    PP2_TYPE_AUTHORITY: "PP2_TYPE_AUTHORITY",
    PP2_TYPE_CRC32C: "PP2_TYPE_CRC32C",
    PP2_TYPE_NOOP: "PP2_TYPE_NOOP",
    PP2_TYPE_UNIQUE_ID: "PP2_TYPE_UNIQUE_ID",
    PP2_TYPE_SSL: "PP2_TYPE_SSL",
    PP2_SUBTYPE_SSL_VERSION: "PP2_SUBTYPE_SSL_VERSION",
    PP2_SUBTYPE_SSL_CN: "PP2_SUBTYPE_SSL_CN",
    PP2_SUBTYPE_SSL_CIPHER: "PP2_SUBTYPE_SSL_CIPHER",
    PP2_SUBTYPE_SSL_SIG_ALG: "PP2_SUBTYPE_SSL_SIG_ALG",
    PP2_SUBTYPE_SSL_KEY_ALG: "PP2_SUBTYPE_SSL_KEY_ALG",
    PP2_TYPE_NETNS: "PP2_TYPE_NETNS",
}

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_VERSION_2: Final = 0x2
_FAM_UNSPEC: Final = 0x0
_FAM_INET: Final = 0x1
_FAM_INET6: Final = 0x2
_FAM_UNIX: Final = 0x3
_PROTO_UNSPEC: Final = 0x0
_PROTO_STREAM: Final = 0x1
_PROTO_DGRAM: Final = 0x2
_ADDR_LEN: Final = {_FAM_UNSPEC: 0, _FAM_INET: 12, _FAM_INET6: 36, _FAM_UNIX: 216}
_FAMILY_NAME: Final = {
    _FAM_UNSPEC: "unspec",
    _FAM_INET: "inet",
    _FAM_INET6: "inet6",
    _FAM_UNIX: "unix",
}

_FIXED = struct.Struct("!12sBBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_TLV_HEAD = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")

Tlv: TypeAlias = tuple[int, bytes]
"""One TLV: its type (0-255) and its value."""

Command: TypeAlias = Literal["PROXY", "LOCAL"]
Family: TypeAlias = Literal["unspec", "inet", "inet6", "unix"]
Endpoint: TypeAlias = tuple[str, int]


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B) of `data`, as an unsigned 32-bit number."""
    return int(google_crc32c.value(bytes(data)))


# ---------------------------------------------------------------------------
# Encoding


_V4_MAPPED: Final = b"\x00" * 10 + b"\xff\xff"


def _packed(host: str) -> bytes:
    """4 bytes for an IPv4 literal, 16 for IPv6 (a %zone is dropped); inet_pton is strict
    (no short IPv4 forms) and several times faster than ipaddress here.

    A v4-mapped IPv6 address (an IPv4 caller on a dual-stack listener) counts as the IPv4
    address it is, so such callers reach the app as plain IPv4."""
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, ValueError):
        raise ValueError(f"{host!r} is not an IP address") from None
    return packed[12:] if packed.startswith(_V4_MAPPED) else packed


def _port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return port


def _address_block(src: Endpoint, dst: Endpoint) -> tuple[int, bytes]:
    s, d = _packed(src[0]), _packed(dst[0])
    sport, dport = _port(src[1]), _port(dst[1])
    if len(s) == 4 and len(d) == 4:
        return _FAM_INET, _INET.pack(s, d, sport, dport)
    # One side IPv6: both go as IPv6, an IPv4 side as its v4-mapped form (::ffff:a.b.c.d),
    # as haproxy does, so the receiver still sees the real IPv4 address.
    s = _V4_MAPPED + s if len(s) == 4 else s
    d = _V4_MAPPED + d if len(d) == 4 else d
    return _FAM_INET6, _INET6.pack(s, d, sport, dport)


def _tlv_bytes(tlvs: Sequence[Tlv]) -> tuple[bytes, int | None]:
    """The TLVs as bytes, and the offset of the CRC32C value in them (None without one)."""
    parts: list[bytes] = []
    offset = 0
    crc_at: int | None = None
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind} is out of range (0-255)")
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:02X} is {len(value)} bytes long; at most 65535 fit")
        if kind == PP2_TYPE_CRC32C:
            if crc_at is not None:
                raise ValueError("more than one PP2_TYPE_CRC32C TLV")
            if len(value) != 4:
                raise ValueError(f"PP2_TYPE_CRC32C must be 4 bytes, got {len(value)}")
            crc_at = offset + _TLV_HEAD.size
            value = b"\x00\x00\x00\x00"
        head = _TLV_HEAD.pack(kind, len(value))
        parts += (head, bytes(value))
        offset += len(head) + len(value)
    return b"".join(parts), crc_at


def encode_v2(
    *,
    command: Command = "PROXY",
    src: Endpoint | None,
    dst: Endpoint | None,
    tlvs: Sequence[Tlv] = (),
) -> bytes:
    """A complete PROXY v2 header for a TCP connection.

    `src` is the caller (host, port), `dst` the address it connected to; hosts are IP
    literals. Both IPv4 (v4-mapped IPv6 counts as IPv4): family INET. Otherwise INET6, an
    IPv4 side written v4-mapped (::ffff:a.b.c.d). PROXY with both None (addresses unknown)
    and LOCAL (src and dst must be None) send family UNSPEC and no address block: the
    receiver then uses the real endpoints. TLVs are written in the order given; a
    PP2_TYPE_CRC32C TLV among them (any 4-byte value, e.g. from `caller_tlvs(crc=True)`) is
    filled in with the checksum of the whole header. Raises ValueError for bad addresses or
    a header over 16 + 65535 bytes.
    """
    if command == "LOCAL":
        if src is not None or dst is not None:
            raise ValueError("a LOCAL header carries no addresses; pass src=None, dst=None")
        cmd, family, proto, addresses = _CMD_LOCAL, _FAM_UNSPEC, _PROTO_UNSPEC, b""
    elif command == "PROXY":
        cmd = _CMD_PROXY
        if src is None and dst is None:
            family, proto, addresses = _FAM_UNSPEC, _PROTO_UNSPEC, b""
        elif src is None or dst is None:
            raise ValueError("give both src and dst, or neither (addresses unknown)")
        else:
            proto = _PROTO_STREAM
            family, addresses = _address_block(src, dst)
    else:
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', got {command!r}")
    body, crc_at = _tlv_bytes(tlvs)
    length = len(addresses) + len(body)
    if length > 0xFFFF:
        raise ValueError(
            f"the header would be {HEADER_FIXED_LEN + length} bytes; at most {MAX_HEADER_LEN} fit"
        )
    header = _FIXED.pack(SIGNATURE, _VERSION_2 << 4 | cmd, family << 4 | proto, length)
    header += addresses + body
    if crc_at is None:
        return header
    # Section 2.2.3: the checksum covers the whole header with its own field zeroed, which
    # it is at this point.
    at = HEADER_FIXED_LEN + len(addresses) + crc_at
    out = bytearray(header)
    out[at : at + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """What the sidecar knows about the caller of one connection, for the app's header.

    `verified`: True for an mTLS peer whose certificate chain and identity were verified,
    False for a TLS peer without a verified certificate, None for a plaintext connection
    (accepted in permissive/audit mode): then no PP2_TYPE_SSL TLV is sent at all.
    `tls_version` and `cipher` are as Python's ssl reports them ("TLSv1.3",
    "TLS_AES_128_GCM_SHA256"), the same strings OpenSSL gives haproxy. `cn` is the subject
    CN of the peer's certificate, `spiffe_id` its SPIFFE ID; both only for a verified peer,
    since the app will trust them. `sig_alg` and `key_alg` describe the certificate the
    sidecar itself presented, as the spec defines them (see `cert_algorithms`). `resumed`:
    the session was resumed, so the certificate came with an earlier connection of this
    TLS session (PP2_CLIENT_CERT_SESS without PP2_CLIENT_CERT_CONN).
    """

    verified: bool | None
    tls_version: str | None = None
    cipher: str | None = None
    cn: str | None = None
    spiffe_id: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    resumed: bool = False

    def __post_init__(self) -> None:
        if self.verified is None:
            extra = [
                name
                for name in ("tls_version", "cipher", "cn", "spiffe_id", "sig_alg", "key_alg")
                if getattr(self, name) is not None
            ]
            if extra or self.resumed:
                raise ValueError(
                    f"a plaintext caller (verified=None) has no TLS details; got {extra}"
                )
        elif not self.verified and (self.cn is not None or self.spiffe_id is not None):
            # The app authorises on these: never hand it an identity nobody verified.
            raise ValueError("an unverified peer's CN or SPIFFE ID must not be forwarded")


def _text_tlv(kind: int, text: str, what: str, *, ascii_only: bool) -> Tlv:
    try:
        value = text.encode("ascii" if ascii_only else "utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {text[:64]!r} must be US-ASCII") from None
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > MAX_TLV_TEXT:
        raise ValueError(f"{what} is {len(value)} bytes long; at most {MAX_TLV_TEXT} are sent")
    return kind, value


def ssl_tlv(peer: CallerInfo) -> Tlv | None:
    """The PP2_TYPE_SSL TLV for this caller, or None for a plaintext one.

    client = PP2_CLIENT_SSL, plus PP2_CLIENT_CERT_CONN (unless resumed) and
    PP2_CLIENT_CERT_SESS for a verified peer; verify = 0 only for a verified peer.
    Sub-TLVs: VERSION, CN, CIPHER, SIG_ALG, KEY_ALG, each when known.
    """
    if peer.verified is None:
        return None
    client = PP2_CLIENT_SSL
    if peer.verified:
        client |= PP2_CLIENT_CERT_SESS
        if not peer.resumed:
            client |= PP2_CLIENT_CERT_CONN
    subs: list[Tlv] = []
    for kind, text, what, ascii_only in (
        (PP2_SUBTYPE_SSL_VERSION, peer.tls_version, "TLS version", True),
        (PP2_SUBTYPE_SSL_CN, peer.cn, "certificate CN", False),
        (PP2_SUBTYPE_SSL_CIPHER, peer.cipher, "cipher name", True),
        (PP2_SUBTYPE_SSL_SIG_ALG, peer.sig_alg, "signature algorithm", True),
        (PP2_SUBTYPE_SSL_KEY_ALG, peer.key_alg, "key algorithm", True),
    ):
        if text is not None:
            subs.append(_text_tlv(kind, text, what, ascii_only=ascii_only))
    value = _SSL_HEAD.pack(client, 0 if peer.verified else 1) + b"".join(
        _TLV_HEAD.pack(k, len(v)) + v for k, v in subs
    )
    return PP2_TYPE_SSL, value


def caller_tlvs(peer: CallerInfo, id_tlv: int = DEFAULT_ID_TLV, crc: bool = False) -> list[Tlv]:
    """The TLVs the sidecar sends the app about one caller.

    With `crc` a PP2_TYPE_CRC32C placeholder that `encode_v2` fills in, then PP2_TYPE_SSL
    (not for a plaintext caller), then the SPIFFE ID as a URI in TLV `id_tlv` (when the
    peer has one).
    """
    return list(_caller_tlvs(peer, id_tlv, crc))


@functools.lru_cache(maxsize=1024)
def _caller_tlvs(peer: CallerInfo, id_tlv: int, crc: bool) -> tuple[Tlv, ...]:
    # Cached: a sidecar sees the same few callers over and over.
    _check_id_tlv(id_tlv)
    # Ascending type order, CRC first as haproxy writes it: some readers (the proxy-protocol
    # package) re-serialise TLVs sorted by type to check the CRC, so any other order fails there.
    tlvs: list[Tlv] = []
    if crc:
        tlvs.append((PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"))
    ssl = ssl_tlv(peer)
    if ssl is not None:
        tlvs.append(ssl)
    if peer.spiffe_id is not None:
        tlvs.append(_text_tlv(id_tlv, peer.spiffe_id, "SPIFFE ID", ascii_only=True))
    return tuple(tlvs)


def caller_header(
    src: Endpoint,
    dst: Endpoint,
    peer: CallerInfo,
    *,
    id_tlv: int = DEFAULT_ID_TLV,
    crc: bool = False,
) -> bytes:
    """The whole header for one connection to the app: caller `src`, called address `dst`."""
    return encode_v2(src=src, dst=dst, tlvs=caller_tlvs(peer, id_tlv, crc))


# ---------------------------------------------------------------------------
# Certificate details for CallerInfo

# OpenSSL's short names, which is what haproxy sends as SIG_ALG ("RSA-SHA256").
_SIG_NAMES: Final = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "RSA-SHA256",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "RSA-SHA384",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "RSA-SHA512",
    SignatureAlgorithmOID.RSASSA_PSS: "RSASSA-PSS",
    SignatureAlgorithmOID.ED25519: "ED25519",
    SignatureAlgorithmOID.ED448: "ED448",
}


def _load(der: bytes) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def common_name(der: bytes) -> str | None:
    """The first subject CN of a DER certificate; None without one or if unparseable."""
    cert = _load(der)
    if cert is None:
        return None
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) and value else None


@functools.lru_cache(maxsize=64)
def cert_algorithms(der: bytes) -> tuple[str | None, str | None]:
    """(SIG_ALG, KEY_ALG) of a DER certificate, in haproxy's spelling.

    E.g. ("ecdsa-with-SHA256", "EC256") or ("RSA-SHA256", "RSA2048"). The spec defines
    both for the certificate the frontend (here: the sidecar) presented, so call this once
    per own certificate, not per connection. (None, None) if unparseable.
    """
    cert = _load(der)
    if cert is None:
        return None, None
    oid = cert.signature_algorithm_oid
    sig = _SIG_NAMES.get(oid, oid.dotted_string)
    try:
        key = cert.public_key()
    except ValueError:
        return sig, None
    key_alg: str | None
    if isinstance(key, rsa.RSAPublicKey):
        key_alg = f"RSA{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_alg = f"EC{key.key_size}"
    elif isinstance(key, dsa.DSAPublicKey):
        key_alg = f"DSA{key.key_size}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        key_alg = "ED25519"
    elif isinstance(key, ed448.Ed448PublicKey):
        key_alg = "ED448"
    else:
        key_alg = None
    return sig, key_alg


def caller_from_tls(
    *,
    verified: bool,
    version: str | None,
    cipher: str | None,
    peer_der: bytes | None,
    own_der: bytes | None = None,
    resumed: bool = False,
) -> CallerInfo:
    """CallerInfo for a TLS caller from what the TLS session reports.

    `peer_der` is the caller's certificate (DER), `own_der` the sidecar's own leaf (for
    SIG_ALG/KEY_ALG; both cached, so this is cheap per connection). CN and SPIFFE ID are
    taken only when `verified`; an unparseable certificate simply yields neither.
    """
    cn = spiffe_id = None
    if verified and peer_der:
        cn = common_name(peer_der)
        sid = spiffe_id_from_der(peer_der)
        spiffe_id = str(sid) if sid is not None else None
    sig_alg, key_alg = cert_algorithms(own_der) if own_der else (None, None)
    return CallerInfo(
        verified=verified,
        tls_version=version,
        cipher=cipher,
        cn=cn,
        spiffe_id=spiffe_id,
        sig_alg=sig_alg,
        key_alg=key_alg,
        resumed=resumed,
    )


# ---------------------------------------------------------------------------
# Parsing


class ProxyHeaderError(ProxyError):
    """The bytes at the start of a connection are not a valid PROXY v2 header.

    The remote peer's fault; `reason` is the rejection metric label.
    """

    reason = "bad_proxy_header"


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The header is not complete yet: read at least `nbytes` more, then parse again."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class SslInfo:
    """A decoded PP2_TYPE_SSL value: client flags, verify field, sub-TLVs in order."""

    client: int
    verify: int
    subtlvs: tuple[Tlv, ...]

    def get(self, kind: int) -> bytes | None:
        """The first sub-TLV of this type, or None."""
        return next((v for k, v in self.subtlvs if k == kind), None)

    @property
    def verified(self) -> bool:
        """The client presented a certificate and it was verified (verify == 0)."""
        return self.verify == 0


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete, valid header: its length in the stream and what it says.

    `src`/`dst` are (ip, port) for PROXY over TCP/IPv4 or IPv6, None for LOCAL, UNSPEC
    and UNIX (then the real connection endpoints apply). The connection's payload starts
    at `header_len`.
    """

    header_len: int
    command: Command
    family: Family
    src: Endpoint | None
    dst: Endpoint | None
    tlvs: tuple[Tlv, ...]

    def tlv(self, kind: int) -> bytes | None:
        """The first TLV of this type, or None."""
        return next((v for k, v in self.tlvs if k == kind), None)

    def ssl(self) -> SslInfo | None:
        """The decoded PP2_TYPE_SSL TLV, or None without one. Raises ProxyHeaderError."""
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else decode_ssl(value)


def _preview(buf: bytes | bytearray | memoryview) -> str:
    return bytes(buf[:16]).hex(" ")


def _check_start(buf: bytes | bytearray | memoryview) -> None:
    """Refuse as soon as the first bytes cannot become a v2 signature."""
    n = min(len(buf), len(SIGNATURE))
    if bytes(buf[:n]) == SIGNATURE[:n]:
        return
    head = bytes(buf[:5])
    if head and b"PROXY".startswith(head):
        raise ProxyHeaderError(
            "got a PROXY protocol v1 (text) header; this listener takes v2 (binary) only: "
            "have the load balancer send v2 (haproxy: send-proxy-v2)"
        )
    if buf[0] == 0x16:
        raise ProxyHeaderError("got a TLS handshake where a PROXY v2 header was expected")
    raise ProxyHeaderError(f"no PROXY v2 signature; the connection starts with {_preview(buf)}")


def _tlvs(data: memoryview, where: str) -> tuple[Tlv, ...]:
    out: list[Tlv] = []
    at = 0
    while at < len(data):
        if len(data) - at < _TLV_HEAD.size:
            raise ProxyHeaderError(f"truncated TLV {where} at byte {at}: {len(data) - at} left")
        kind, size = _TLV_HEAD.unpack_from(data, at)
        at += _TLV_HEAD.size
        if size > len(data) - at:
            raise ProxyHeaderError(
                f"TLV 0x{kind:02X} {where} says {size} bytes but {len(data) - at} are left"
            )
        out.append((kind, bytes(data[at : at + size])))
        at += size
    return tuple(out)


def decode_ssl(value: bytes) -> SslInfo:
    """Decode a PP2_TYPE_SSL value (client, verify, sub-TLVs). Raises ProxyHeaderError."""
    if len(value) < _SSL_HEAD.size:
        raise ProxyHeaderError(f"PP2_TYPE_SSL is {len(value)} bytes; at least 5 are needed")
    client, verify = _SSL_HEAD.unpack_from(value)
    subs = _tlvs(memoryview(value)[_SSL_HEAD.size :], "inside PP2_TYPE_SSL")
    return SslInfo(client, verify, subs)


def _endpoints(family: int, block: memoryview) -> tuple[Endpoint, Endpoint]:
    ip: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if family == _FAM_INET:
        s, d, sport, dport = _INET.unpack_from(block)
        ip = ipaddress.IPv4Address
    else:
        s, d, sport, dport = _INET6.unpack_from(block)
        ip = ipaddress.IPv6Address
    return (str(ip(s)), sport), (str(ip(d)), dport)


def parse_v2(
    buf: bytes | bytearray | memoryview, *, max_len: int = DEFAULT_MAX_PARSE_LEN
) -> NeedMore | Parsed:
    """Parse a PROXY v2 header at the start of `buf` (the bytes read so far).

    Returns NeedMore until the whole header is there, then Parsed; bytes after
    `Parsed.header_len` are payload. Raises ProxyHeaderError at the first byte that
    cannot be part of a valid header: wrong signature (a v1 text header or TLS is named
    as such), version other than 2, unknown command, family or transport, UDP, an
    address block shorter than its family needs, a header longer than `max_len`,
    truncated TLVs, a malformed or mismatching CRC32C. Call again with more bytes after
    NeedMore; a deadline for the header is the caller's job.
    """
    if not buf:
        return NeedMore(HEADER_FIXED_LEN)
    _check_start(buf)
    if len(buf) < HEADER_FIXED_LEN:
        return NeedMore(HEADER_FIXED_LEN - len(buf))
    _, ver_cmd, fam_proto, length = _FIXED.unpack_from(buf)
    version, cmd = ver_cmd >> 4, ver_cmd & 0x0F
    if version != _VERSION_2:
        raise ProxyHeaderError(f"PROXY protocol version {version} is not supported (only 2)")
    if cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError(f"unknown PROXY v2 command 0x{cmd:X} (LOCAL 0x0, PROXY 0x1)")
    family, proto = fam_proto >> 4, fam_proto & 0x0F
    if family not in _ADDR_LEN:
        raise ProxyHeaderError(f"unknown PROXY v2 address family 0x{family:X}")
    if proto not in (_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM):
        raise ProxyHeaderError(f"unknown PROXY v2 transport 0x{proto:X}")
    total = HEADER_FIXED_LEN + length
    if total > max_len:
        raise ProxyHeaderError(f"PROXY v2 header is {total} bytes long; at most {max_len} accepted")
    addr_len = _ADDR_LEN[family]
    if length < addr_len:
        raise ProxyHeaderError(
            f"PROXY v2 {_FAMILY_NAME[family]} address block needs {addr_len} bytes, "
            f"the header has {length}"
        )
    if cmd == _CMD_PROXY and proto == _PROTO_DGRAM:
        raise ProxyHeaderError("PROXY v2 header is for a UDP (datagram) flow; this is TCP")
    if len(buf) < total:
        return NeedMore(total - len(buf))
    view = memoryview(buf)[:total]
    tlvs = _tlvs(view[HEADER_FIXED_LEN + addr_len :], "in the PROXY v2 header")
    _check_crc(view, HEADER_FIXED_LEN + addr_len, tlvs)
    src: Endpoint | None = None
    dst: Endpoint | None = None
    if cmd == _CMD_PROXY and family in (_FAM_INET, _FAM_INET6) and proto == _PROTO_STREAM:
        src, dst = _endpoints(family, view[HEADER_FIXED_LEN : HEADER_FIXED_LEN + addr_len])
    command: Command = "PROXY" if cmd == _CMD_PROXY else "LOCAL"
    return Parsed(total, command, _family_literal(family), src, dst, tlvs)


def _family_literal(family: int) -> Family:
    if family == _FAM_INET:
        return "inet"
    if family == _FAM_INET6:
        return "inet6"
    if family == _FAM_UNIX:
        return "unix"
    return "unspec"


class HeaderReader:
    """Collects the first bytes of one connection until its PROXY v2 header is complete.

    Feed it every chunk read: None while more is needed, then (Parsed, the payload bytes
    that came after the header). Holds at most `max_len` plus one chunk.
    """

    def __init__(self, max_len: int = DEFAULT_MAX_PARSE_LEN) -> None:
        self.max_len = max_len
        self._buf = bytearray()
        self._done = False

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[Parsed, bytes] | None:
        """Add `data`; raises ProxyHeaderError as soon as the bytes cannot be a header."""
        if self._done:
            raise RuntimeError("the header was already read")
        self._buf += data
        result = parse_v2(self._buf, max_len=self.max_len)
        if isinstance(result, NeedMore):
            return None
        self._done = True
        rest = bytes(self._buf[result.header_len :])
        self._buf = bytearray()
        return result, rest


def _check_crc(view: memoryview, tlv_start: int, tlvs: tuple[Tlv, ...]) -> None:
    crcs = [v for k, v in tlvs if k == PP2_TYPE_CRC32C]
    if not crcs:
        return
    if len(crcs) > 1:
        raise ProxyHeaderError("PROXY v2 header has more than one PP2_TYPE_CRC32C TLV")
    if len(crcs[0]) != 4:
        raise ProxyHeaderError(f"PP2_TYPE_CRC32C is {len(crcs[0])} bytes; it must be 4")
    # Find the CRC value's offset again, zero it, and checksum the whole header.
    at = tlv_start
    while view[at] != PP2_TYPE_CRC32C:
        at += _TLV_HEAD.size + int.from_bytes(view[at + 1 : at + 3], "big")
    zeroed = bytearray(view)
    zeroed[at + 3 : at + 7] = b"\x00\x00\x00\x00"
    want = int.from_bytes(crcs[0], "big")
    got = crc32c(zeroed)
    if got != want:
        raise ProxyHeaderError(
            f"PROXY v2 header CRC32C mismatch: it says 0x{want:08X}, the bytes give 0x{got:08X}"
        )


# ---------------------------------------------------------------------------
# Settings (pure parsers; the settings model calls them)

_ROUTE_NAME_RE: Final = re.compile(r"[a-z0-9_-]{1,32}")
_TLV_TYPE_RE: Final = re.compile(r"0[xX][0-9a-fA-F]{1,2}|[0-9]{1,3}")

ProxyProtocolRoutes: TypeAlias = Literal["off", "all"] | frozenset[str]


def parse_proxy_protocol(text: str) -> ProxyProtocolRoutes:
    """MTLS_PROXY_PROTOCOL: 'off' (also empty), 'all', or comma-separated inbound route names.

    Route names follow the route grammar (1-32 of a-z, 0-9, '_', '-'); each at most once.
    Whether the names exist is checked against the routes by `check_proxy_protocol_routes`.
    """
    value = text.strip()
    if value.lower() in ("", "off"):
        return "off"
    if value.lower() == "all":
        return "all"
    names: set[str] = set()
    for raw in value.split(","):
        name = raw.strip()
        if not name:
            raise ValueError(f"empty route name in {value!r}; expected off, all or NAME,NAME,...")
        if name.lower() in ("off", "all"):
            raise ValueError(f"{name!r} cannot be mixed with route names; use it alone")
        if not _ROUTE_NAME_RE.fullmatch(name):
            raise ValueError(
                f"route name {name!r} must be 1-32 of lower-case letters, digits, '_' or '-' "
                "(expected off, all or inbound route names)"
            )
        if name in names:
            raise ValueError(f"route {name!r} is listed twice")
        names.add(name)
    return frozenset(names)


def check_proxy_protocol_routes(selection: ProxyProtocolRoutes, inbound: Sequence[str]) -> None:
    """Raise ValueError naming every selected route that is not an inbound route."""
    if isinstance(selection, str):
        return
    unknown = sorted(selection - set(inbound))
    if unknown:
        known = ", ".join(inbound) if inbound else "none"
        raise ValueError(f"no inbound route named {', '.join(unknown)} (inbound routes: {known})")


def sends_proxy_header(selection: ProxyProtocolRoutes, route: str) -> bool:
    """Whether connections of inbound route `route` open with a PROXY v2 header."""
    if selection == "off":
        return False
    if selection == "all":
        return True
    return route in selection


def _check_id_tlv(kind: int) -> None:
    if DEFAULT_ID_TLV <= kind <= 0xEF or kind == ZTUNNEL_ID_TLV:
        return
    if kind in _REGISTERED_TYPES:
        why = f"it is {_REGISTERED_TYPES[kind]}, a type the protocol defines"
    elif 0xF0 <= kind <= 0xF7:
        why = "0xF0-0xF7 is reserved for experiments, not production use"
    elif 0xF8 <= kind <= 0xFF:
        why = "0xF8-0xFF is reserved for future protocol use"
    elif 0 <= kind <= 0xFF:
        why = "it is outside the custom range and the protocol may assign it"
    else:
        why = "a TLV type is one byte (0-255)"
    raise ValueError(
        f"TLV type 0x{kind:02X} ({kind}) cannot carry the SPIFFE ID: {why}; "
        "use 0xE0-0xEF (custom range) or 0xD0 (as ztunnel)"
    )


def parse_tlv_type(text: str) -> int:
    """MTLS_PROXY_PROTOCOL_ID_TLV: the TLV type for the caller's SPIFFE ID; default 0xE0.

    Hex (0xE5) or decimal (229). Allowed: 0xE0-0xEF, the range the spec reserves for
    applications (never used by the protocol itself), and 0xD0, which ztunnel uses, so
    apps written for Istio ambient read it unchanged. Everything else is refused: registered
    types would be misread, experimental/future ranges may change meaning.
    """
    value = text.strip()
    if not value:
        return DEFAULT_ID_TLV
    if not _TLV_TYPE_RE.fullmatch(value):
        raise ValueError(f"expected a TLV type like 0xE0 or 224, got {value!r}")
    kind = int(value, 0) if value[:2].lower() == "0x" else int(value, 10)
    _check_id_tlv(kind)
    return kind
