"""First payload bytes of each direction of a TCP connection -> what the connection is.

Pure (no I/O). The bytes may be truncated anywhere (the auditor sees only the first packets):
every parser here reads what is there and never raises on short or hostile input.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Kind = Literal["tls", "proxy", "http1", "h2", "other", "none"]
Class = Literal["tls", "plaintext", "empty", "unknown"]
"""`unknown`: the auditor did not see the connection begin (it started before the agent)."""

PROXY_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP_METHODS: Final = (
    b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ",
    b"TRACE ",
)  # fmt: skip
HTTP_RESPONSE: Final = b"HTTP/1."
_MAX_RECORD: Final = 2**14 + 2048

# IANA TLS Supported Groups, as `MTLS_TLS_GROUPS` and mtls_handshakes_total spell them.
GROUP_NAMES: Final = {
    0x0017: "P-256",
    0x0018: "P-384",
    0x0019: "P-521",
    0x001D: "X25519",
    0x001E: "X448",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
    0x0200: "MLKEM512",
    0x0201: "MLKEM768",
    0x0202: "MLKEM1024",
    0x11EB: "SecP256r1MLKEM768",
    0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
    0x6399: "X25519Kyber768Draft00",
}
VERSION_NAMES: Final = {0x0300: "ssl3", 0x0301: "1.0", 0x0302: "1.1", 0x0303: "1.2", 0x0304: "1.3"}


def group_name(code: int) -> str:
    """The IANA name of a group, or its code in hex (`0x1234`) when unknown."""
    return GROUP_NAMES.get(code) or f"0x{code:04x}"


def is_grease(code: int) -> bool:
    """RFC 8701 GREASE values (0x?A?A), which clients offer to keep servers honest."""
    return code & 0x0F0F == 0x0A0A and (code >> 8) == (code & 0xFF)


@dataclass(frozen=True)
class TlsInfo:
    """What the plaintext part of a TLS handshake showed (None / empty: not visible)."""

    hello: Literal["client", "server", "other"]
    version: str | None = None
    """Client: the highest version offered; server: the version chosen."""
    groups: tuple[str, ...] = ()
    """Client: supported_groups in its order of preference; server: the key_share group."""
    key_shares: tuple[str, ...] = ()
    """Client: the groups it sent a key share for."""


@dataclass(frozen=True)
class Sniff:
    """One direction's first bytes, named."""

    kind: Kind
    tls: TlsInfo | None = None
    proxy_version: int | None = None
    """1 or 2 when a PROXY protocol header came first; `inner` is what followed it."""
    inner: Sniff | None = None


def sniff(data: bytes) -> Sniff:
    """Name the first bytes one side of a connection sent."""
    if not data:
        return Sniff("none")
    if data.startswith(PROXY_V2_SIGNATURE) or (
        len(data) < len(PROXY_V2_SIGNATURE) and PROXY_V2_SIGNATURE.startswith(data)
    ):
        if len(data) < 16:
            return Sniff("proxy", proxy_version=2, inner=Sniff("none"))
        length = struct.unpack_from("!H", data, 14)[0]
        return Sniff("proxy", proxy_version=2, inner=_sniff_plain(data[16 + length :]))
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, 108)  # v1 headers are at most 107 bytes
        rest = data[end + 2 :] if end >= 0 else b""
        return Sniff("proxy", proxy_version=1, inner=_sniff_plain(rest))
    return _sniff_plain(data)


def _sniff_plain(data: bytes) -> Sniff:
    if not data:
        return Sniff("none")
    if _looks_tls(data):
        return Sniff("tls", tls=_tls_info(data))
    if data.startswith(H2_PREFACE) or (len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data)):
        return Sniff("h2")
    if data.startswith(HTTP_METHODS) or data.startswith(HTTP_RESPONSE):
        return Sniff("http1")
    return Sniff("other")


def _looks_tls(data: bytes) -> bool:
    """A TLS record header: content type 20-23, version 3.0-3.4, a length within the limit.
    (A lone 0x16 byte counts: short of more, it is what a ClientHello starts with.)"""
    if data[0] not in (20, 21, 22, 23):
        return False
    if len(data) >= 2 and data[1] != 3:
        return False
    if len(data) >= 3 and data[2] > 4:
        return False
    return not (len(data) >= 5 and struct.unpack_from("!H", data, 3)[0] > _MAX_RECORD)


def _handshake_bytes(data: bytes) -> bytes:
    """The concatenated fragments of the leading handshake records (possibly truncated)."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data) and data[pos] == 22:
        length = struct.unpack_from("!H", data, pos + 3)[0]
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


class _Reader:
    """Bounds-checked reads over a bytes object; `ok` turns False at the first short read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.ok = True

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            self.ok = False
            self.pos = len(self.data)
            return b""
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        b = self.take(1)
        return b[0] if b else 0

    def u16(self) -> int:
        b = self.take(2)
        return int.from_bytes(b, "big") if len(b) == 2 else 0

    def vec(self, len_bytes: int) -> bytes:
        n = self.u8() if len_bytes == 1 else self.u16()
        return self.take(n) if self.ok else b""


def _u16s(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2)]


def _version(code: int) -> str | None:
    return VERSION_NAMES.get(code)


def _tls_info(data: bytes) -> TlsInfo:
    hs = _handshake_bytes(data)
    if not hs:
        return TlsInfo("other")
    msg_type = hs[0]
    if msg_type not in (1, 2):
        return TlsInfo("other")
    r = _Reader(hs[4:])  # type(1) + length(3)
    legacy = r.u16()
    r.take(32)  # random
    r.vec(1)  # session id
    if msg_type == 1:
        r.vec(2)  # cipher suites
        r.vec(1)  # compression methods
    else:
        r.u16()  # cipher suite
        r.u8()  # compression method
    hello: Literal["client", "server"] = "client" if msg_type == 1 else "server"
    version = _version(legacy) if r.ok else None
    groups: list[str] = []
    shares: list[str] = []
    if not r.ok:
        return TlsInfo(hello, version)
    ext_len = r.u16()
    exts = _Reader(r.data[r.pos : r.pos + ext_len])
    while exts.ok and exts.pos + 4 <= len(exts.data):
        ext_type = exts.u16()
        body = exts.vec(2)
        if not exts.ok:
            break  # truncated: what came before still counts
        if ext_type == 43:  # supported_versions
            if hello == "client":
                offered = _u16s(body[1 : 1 + body[0]] if body else b"")
                known = sorted((v for v in offered if _version(v)), reverse=True)
                if known:
                    version = _version(known[0])
            elif len(body) >= 2:
                version = _version(int.from_bytes(body[:2], "big")) or version
        elif ext_type == 10 and hello == "client":  # supported_groups
            inner = _Reader(body).vec(2)
            groups = [group_name(g) for g in _u16s(inner) if not is_grease(g)]
        elif ext_type == 51:  # key_share
            if hello == "server":
                if len(body) >= 2:
                    groups = [group_name(int.from_bytes(body[:2], "big"))]
            else:
                entries = _Reader(_Reader(body).vec(2))
                while entries.ok and entries.pos < len(entries.data):
                    g = entries.u16()
                    entries.vec(2)
                    if entries.ok and not is_grease(g):
                        shares.append(group_name(g))
    return TlsInfo(hello, version, tuple(groups), tuple(shares))


@dataclass(frozen=True)
class Verdict:
    """A connection, named from the first bytes of both directions."""

    klass: Class
    protocol: str
    """What the side that spoke first sent: tls, http1, h2, other, none, or proxy+<inner>."""
    tls_version: str | None = None
    offered_groups: tuple[str, ...] = ()
    key_shares: tuple[str, ...] = ()
    selected_group: str | None = None
    client: Sniff = field(default_factory=lambda: Sniff("none"))
    server: Sniff = field(default_factory=lambda: Sniff("none"))


def _carried(s: Sniff) -> Sniff:
    """What a direction carries, past a PROXY header."""
    return s.inner if s.kind == "proxy" and s.inner is not None else s


def _protocol(s: Sniff) -> str:
    if s.kind == "proxy":
        return f"proxy+{_carried(s).kind}"
    return s.kind


def _klass(sides: Sequence[Sniff]) -> Class:
    carried = [_carried(s) for s in sides]
    # A PROXY header with nothing after it is still addresses in the clear.
    if any(c.kind in ("http1", "h2", "other") for c in carried) or any(
        s.kind == "proxy" and c.kind == "none" for s, c in zip(sides, carried, strict=True)
    ):
        return "plaintext"
    if any(c.kind == "tls" for c in carried):
        return "tls"
    return "empty"


def classify(client: bytes, server: bytes) -> Verdict:
    """Name a connection from what its client (the side that opened it) and server first sent.

    Plaintext in either direction makes it `plaintext`; TLS in one and nothing in the other is
    `tls`; nothing either way is `empty`.
    """
    c, s = sniff(client), sniff(server)
    first = c if c.kind != "none" else s
    ctls, stls = _carried(c).tls, _carried(s).tls
    version = None
    if stls is not None and stls.hello == "server" and stls.version:
        version = stls.version
    elif ctls is not None and ctls.version:
        version = ctls.version
    return Verdict(
        klass=_klass([c, s]),
        protocol=_protocol(first),
        tls_version=version,
        offered_groups=ctls.groups if ctls and ctls.hello == "client" else (),
        key_shares=ctls.key_shares if ctls and ctls.hello == "client" else (),
        selected_group=stls.groups[0] if stls and stls.hello == "server" and stls.groups else None,
        client=c,
        server=s,
    )
