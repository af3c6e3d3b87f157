"""The wire auditor's classifier: first bytes -> class, on real handshakes and on garbage."""

from __future__ import annotations

import ssl
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit.classify import (
    H2_PREFACE,
    PROXY_V2_SIGNATURE,
    classify,
    group_name,
    is_grease,
    sniff,
)

from .pki import make_intermediate, make_root, write_identity

pytestmark = pytest.mark.unit


_SERVER_CTX: list[ssl.SSLContext] = []


def _server_ctx() -> ssl.SSLContext:
    """A TLS server context with a throwaway certificate (made once)."""
    if not _SERVER_CTX:
        d = Path(tempfile.mkdtemp(prefix="audit-classify-"))
        root = make_root()
        ident = write_identity(d, "srv", make_intermediate(root), [root.cert], None)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ident.cert, ident.key)
        _SERVER_CTX.append(ctx)
    return _SERVER_CTX[0]


def _hellos(
    groups: str | None = None, max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> tuple[bytes, bytes]:
    """A real ClientHello from OpenSSL (through memory BIOs) and, when a server answers, its
    first flight (ServerHello...)."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = max_version
    if groups and hasattr(client_ctx, "set_groups"):
        client_ctx.set_groups(groups)
    server_ctx = _server_ctx()
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(cin, cout, server_hostname="x")
    s = server_ctx.wrap_bio(sin, sout, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        c.do_handshake()
    hello = cout.read()
    sin.write(hello)
    with pytest.raises(ssl.SSLWantReadError):
        s.do_handshake()
    return hello, sout.read()


@pytest.fixture(scope="module")
def tls13() -> tuple[bytes, bytes]:
    return _hellos()


@pytest.fixture(scope="module")
def tls12() -> tuple[bytes, bytes]:
    return _hellos(max_version=ssl.TLSVersion.TLSv1_2)


def test_tls13_client_and_server_hello(tls13: tuple[bytes, bytes]) -> None:
    client, server = tls13
    v = classify(client, server)
    assert v.klass == "tls" and v.protocol == "tls"
    assert v.tls_version == "1.3"
    assert v.client.tls is not None and v.client.tls.hello == "client"
    assert v.offered_groups, "supported_groups is visible in a ClientHello"
    assert v.key_shares and set(v.key_shares) <= set(v.offered_groups)
    assert v.selected_group in v.key_shares


def test_tls12_version_is_the_servers_choice(tls12: tuple[bytes, bytes]) -> None:
    client, server = tls12
    v = classify(client, server)
    assert v.klass == "tls" and v.tls_version == "1.2"
    assert classify(client, b"").tls_version == "1.2"  # the client offered 1.2 at most


def test_client_hello_alone_is_tls(tls13: tuple[bytes, bytes]) -> None:
    v = classify(tls13[0], b"")
    assert v.klass == "tls" and v.tls_version == "1.3" and v.selected_group is None


@given(cut=st.integers(min_value=1, max_value=4000))
@settings(max_examples=300, deadline=None)
def test_truncated_client_hello_is_still_tls(cut: int) -> None:
    """However few of its bytes the auditor saw, a ClientHello is TLS; groups are reported
    only when the whole extension was visible (never a wrong one)."""
    hello = _HELLO[:cut]
    v = classify(hello, b"")
    assert v.klass == "tls" and v.protocol == "tls"
    full = classify(_HELLO, b"")
    assert set(v.offered_groups) <= set(full.offered_groups)
    assert v.offered_groups in ((), full.offered_groups)


_HELLO = b""  # set by setup_module: fixtures cannot feed @given


def setup_module() -> None:
    global _HELLO
    _HELLO = _hellos()[0]


@pytest.mark.parametrize(
    ("client", "server", "klass", "protocol"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n", "plaintext", "http1"),
        (b"POST /x HTTP/1.0\r\n", b"", "plaintext", "http1"),
        (H2_PREFACE + b"\x00\x00\x00\x04\x00", b"", "plaintext", "h2"),
        (H2_PREFACE[:10], b"", "plaintext", "h2"),
        (b"", b"220 smtp.example ESMTP\r\n", "plaintext", "other"),
        (b"\x00\x01\x02hello", b"", "plaintext", "other"),
        (b"", b"", "empty", "none"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n", b"", "plaintext", "proxy+http1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"", "plaintext", "proxy+none"),
    ],
)
def test_plaintext_and_empty(client: bytes, server: bytes, klass: str, protocol: str) -> None:
    v = classify(client, server)
    assert (v.klass, v.protocol) == (klass, protocol)
    assert v.tls_version is None


def _proxy_v2(inner: bytes) -> bytes:
    addrs = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1234, 80)
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs + inner


def test_proxy_v2_then_what_follows(tls13: tuple[bytes, bytes]) -> None:
    v = classify(_proxy_v2(b"GET / HTTP/1.1\r\n"), b"HTTP/1.1 200 OK\r\n")
    assert (v.klass, v.protocol) == ("plaintext", "proxy+http1")
    assert v.client.proxy_version == 2
    v = classify(_proxy_v2(tls13[0]), tls13[1])
    assert (v.klass, v.protocol, v.tls_version) == ("tls", "proxy+tls", "1.3")
    # The header alone is addresses in the clear.
    assert classify(_proxy_v2(b""), b"").klass == "plaintext"
    assert sniff(PROXY_V2_SIGNATURE[:5]).kind == "proxy"


def test_tls_client_with_plaintext_answer_is_plaintext(tls13: tuple[bytes, bytes]) -> None:
    v = classify(tls13[0], b"HTTP/1.1 400 Bad Request\r\n")
    assert v.klass == "plaintext" and v.protocol == "tls"


def test_groups_and_grease() -> None:
    assert group_name(0x11EC) == "X25519MLKEM768" and group_name(0x1D) == "X25519"
    assert group_name(0x4242) == "0x4242"
    assert is_grease(0x0A0A) and is_grease(0xFAFA) and not is_grease(0x0A1A)


@given(st.binary(max_size=3000), st.binary(max_size=3000))
@settings(max_examples=500, deadline=None)
def test_never_raises_on_garbage(client: bytes, server: bytes) -> None:
    v = classify(client, server)
    assert v.klass in ("tls", "plaintext", "empty")
    assert v.klass != "empty" or (not client and not server)


@given(st.binary(max_size=600), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
@settings(max_examples=500, deadline=None)
def test_never_raises_on_tls_shaped_garbage(body: bytes, version: int, length: int) -> None:
    """Record and handshake headers that claim any length over any body."""
    for msg in (1, 2):
        hs = bytes([msg]) + length.to_bytes(3, "big") + version.to_bytes(2, "big") + body
        record = b"\x16\x03\x01" + struct.pack("!H", min(len(hs), 2**14)) + hs
        v = classify(record, record)
        assert v.klass == "tls"
