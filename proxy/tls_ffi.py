"""The raw OpenSSL calls of the TLS engine: the cffi binding under pyOpenSSL, checked at import.

pyOpenSSL's Python wrappers cost a few microseconds per call and copy in `recv_into`; the
hot path (SSL_read/SSL_write into and from the shared buffer, BIO_read/BIO_write) calls the
binding underneath instead. Everything that touches `lib`/`ffi` directly lives here or uses
the names exported here, so a binding change breaks loudly at import, not at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding

lib: Any = Binding.lib
ffi: Any = Binding.ffi

# X25519MLKEM768 and SSL_get0_group_name need OpenSSL 3.5 or later (the wheel brings 4.x).
MIN_VERSION = 0x30500000
REQUIRED = (
    "BIO_free",
    "BIO_get_mem_data",
    "BIO_new",
    "BIO_read",
    "BIO_s_mem",
    "BIO_set_mem_eof_return",
    "BIO_write",
    "ERR_GET_REASON",
    "ERR_clear_error",
    "ERR_get_error",
    "ERR_lib_error_string",
    "ERR_reason_error_string",
    "SSL_CIPHER_get_name",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_free",
    "SSL_CTX_new",
    "SSL_CTX_set_timeout",
    "SSL_do_handshake",
    "SSL_free",
    "SSL_get0_group_name",
    "SSL_get1_session",
    "SSL_get_current_cipher",
    "SSL_get_error",
    "SSL_get_peer_certificate",
    "SSL_get_verify_result",
    "SSL_get_version",
    "SSL_new",
    "SSL_pending",
    "SSL_read",
    "SSL_SESSION_free",
    "SSL_session_reused",
    "SSL_set_accept_state",
    "SSL_set_bio",
    "SSL_set_connect_state",
    "SSL_set_session",
    "SSL_set_shutdown",
    "SSL_shutdown",
    "SSL_write",
    "TLS_method",
    "X509_free",
    "X509_verify_cert_error_string",
    "i2d_X509_bio",
    "SSL_set_verify",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "X509_STORE_CTX_get_ex_data",
    "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_set_error",
    "SSL_CTX_set_alpn_protos",
    "SSL_CTX_set_alpn_select_cb",
    "SSL_get0_alpn_selected",
    "SSL_get_peer_cert_chain",
    "X509_STORE_CTX_get1_chain",
    "sk_X509_num",
    "sk_X509_value",
    "sk_X509_free",
)

VERSION_NUMBER: int = lib.OpenSSL_version_num()
VERSION_TEXT: str = ffi.string(lib.OpenSSL_version(0)).decode("ascii", "replace")


def _check() -> None:
    if VERSION_NUMBER < MIN_VERSION:
        raise ImportError(
            f"the TLS engine needs OpenSSL 3.5 or later under pyOpenSSL, found {VERSION_TEXT}"
        )
    missing = [name for name in REQUIRED if not hasattr(lib, name)]
    if missing:
        raise ImportError(
            f"the cryptography binding ({VERSION_TEXT}) lacks {', '.join(missing)}: "
            "the TLS engine cannot run on it"
        )


_check()

NULL = ffi.NULL
WANT_READ: int = lib.SSL_ERROR_WANT_READ
WANT_WRITE: int = lib.SSL_ERROR_WANT_WRITE
ZERO_RETURN: int = lib.SSL_ERROR_ZERO_RETURN
SYSCALL: int = lib.SSL_ERROR_SYSCALL
ERROR_SSL: int = lib.SSL_ERROR_SSL
SENT_SHUTDOWN: int = lib.SSL_SENT_SHUTDOWN


def errors() -> list[tuple[str, str, int]]:
    """Drain OpenSSL's error queue of this thread: (library, reason text, reason code) each."""
    out: list[tuple[str, str, int]] = []
    while True:
        code = lib.ERR_get_error()
        if not code:
            return out
        lib_name = lib.ERR_lib_error_string(code)
        reason = lib.ERR_reason_error_string(code)
        out.append(
            (
                ffi.string(lib_name).decode("ascii", "replace") if lib_name else "",
                ffi.string(reason).decode("ascii", "replace") if reason else "",
                lib.ERR_GET_REASON(code),
            )
        )


def new_mem_bio() -> Any:
    """A memory BIO, not yet owned by an SSL (free it, or hand it to SSL_set_bio)."""
    bio = lib.BIO_new(lib.BIO_s_mem())
    if bio == NULL:
        raise MemoryError("BIO_new failed")
    return bio


def new_ssl(ctx_ptr: Any) -> Any:
    """An SSL* on `ctx_ptr`, freed when the returned cdata is garbage."""
    ssl = lib.SSL_new(ctx_ptr)
    if ssl == NULL:
        raise MemoryError("SSL_new failed")
    return ffi.gc(ssl, lib.SSL_free)


def peer_der(ssl: Any) -> bytes | None:
    """The DER of the peer's leaf certificate, or None if it sent none."""
    cert = lib.SSL_get_peer_certificate(ssl)
    if cert == NULL:
        return None
    try:
        return _der(cert)
    finally:
        lib.X509_free(cert)


def peer_chain_ders(ssl: Any) -> list[bytes]:
    """The DER of the certificates the peer sent besides its leaf (its intermediates)."""
    chain = lib.SSL_get_peer_cert_chain(ssl)
    if chain == NULL:
        return []
    out = []
    for i in range(lib.sk_X509_num(chain)):
        der = _der(lib.sk_X509_value(chain, i))
        if der is not None:
            out.append(der)
    return out


def _der(cert: Any) -> bytes | None:
    bio = new_mem_bio()
    try:
        if lib.i2d_X509_bio(bio, cert) != 1:
            return None
        data = ffi.new("char **")
        n = lib.BIO_get_mem_data(bio, data)
        return bytes(ffi.buffer(data[0], n))
    finally:
        lib.BIO_free(bio)


VERIFY_PEER_REQUIRED = 0x01 | 0x02  # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
X509_V_OK = 0
X509_V_ERR_CERT_REVOKED = 23
X509_V_ERR_CERT_REJECTED = 28
X509_V_ERR_APPLICATION_VERIFICATION = 50

X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20  # alert unknown_ca

PeerDecision = Callable[[int, bytes, bytes | None], int]
"""(SSL* as an int, the peer leaf's DER, the DER of the trust anchor its verified chain ends
at) -> X509_V_OK to accept, or an X509_V_ERR_* code."""


def _anchor_der(store: Any) -> bytes | None:
    """The last certificate of the chain OpenSSL built and verified: the trust anchor."""
    chain = lib.X509_STORE_CTX_get1_chain(store)
    if chain == NULL:
        return None
    try:
        n = lib.sk_X509_num(chain)
        return _der(lib.sk_X509_value(chain, n - 1)) if n > 0 else None
    finally:
        for i in range(lib.sk_X509_num(chain)):
            lib.X509_free(lib.sk_X509_value(chain, i))
        lib.sk_X509_free(chain)


def verify_callback(decide: PeerDecision, *, anchor: bool = False) -> Any:
    """An SSL_set_verify callback that, once OpenSSL has verified the chain, asks `decide`
    about the leaf: refused inside the handshake, so OpenSSL sends the peer the alert for the
    error code (CERT_REVOKED -> certificate_revoked, APPLICATION_VERIFICATION ->
    handshake_failure). With `anchor`, `decide` also gets the root the verified chain ends
    at (per-trust-domain checks), else None. Keep the returned object alive as long as it
    is installed."""

    def callback(ok: int, store: Any) -> int:
        if not ok or lib.X509_STORE_CTX_get_error_depth(store) != 0:
            return ok
        try:
            ssl = lib.X509_STORE_CTX_get_ex_data(store, lib.SSL_get_ex_data_X509_STORE_CTX_idx())
            der = _der(lib.X509_STORE_CTX_get_current_cert(store))
            root = _anchor_der(store) if anchor else None
            code = decide(int(ffi.cast("uintptr_t", ssl)), der, root) if der else X509_V_OK
        except Exception:  # a callback must not raise into OpenSSL: refuse instead
            code = X509_V_ERR_APPLICATION_VERIFICATION
        if code == X509_V_OK:
            return 1
        lib.X509_STORE_CTX_set_error(store, code)
        return 0

    return ffi.callback("int(int, X509_STORE_CTX *)", callback)


def set_verify(ssl: Any, callback: Any) -> None:
    """Verify the peer on this SSL with `callback` (from `verify_callback`)."""
    lib.SSL_set_verify(ssl, VERIFY_PEER_REQUIRED, callback)


def ssl_id(ssl: Any) -> int:
    """The SSL* as an int, the key `verify_callback`'s decisions are looked up by."""
    return int(ffi.cast("uintptr_t", ssl))


def text(ptr: Any) -> str:
    """A C string from OpenSSL as str ('' for NULL)."""
    return ffi.string(ptr).decode("ascii", "replace") if ptr != NULL else ""


def alpn_select_callback(protocols: Sequence[bytes], *, required: bool = False) -> Any:
    """An SSL_CTX_set_alpn_select_cb callback that selects the first of `protocols` (ours,
    in order of preference) the client offers, and otherwise lets the handshake go on without
    ALPN (a client that offers other protocols, or none, gets a plain TLS connection); with
    `required`, the handshake fails instead (alert no_application_protocol). Keep the
    returned object alive."""
    ok = lib.SSL_TLSEXT_ERR_OK
    noack = lib.SSL_TLSEXT_ERR_ALERT_FATAL if required else lib.SSL_TLSEXT_ERR_NOACK

    def callback(ssl: Any, out: Any, outlen: Any, offered: Any, inlen: int, arg: Any) -> int:
        data = bytes(ffi.buffer(offered, inlen))
        where: dict[bytes, int] = {}
        pos = 0
        while pos < inlen:
            n = data[pos]
            where.setdefault(data[pos + 1 : pos + 1 + n], pos + 1)
            pos += 1 + n
        for protocol in protocols:
            at = where.get(protocol)
            if at is not None:
                out[0] = offered + at
                outlen[0] = len(protocol)
                return int(ok)
        return int(noack)

    return ffi.callback(
        "int(SSL *, unsigned char **, unsigned char *, unsigned char *, unsigned int, void *)",
        callback,
    )


def set_alpn(ctx_ptr: Any, *, offer: Sequence[bytes] = (), select: Any = None) -> None:
    """Client context: offer the protocols `offer`; server context: select with `select`."""
    if offer:
        wire = b"".join(bytes([len(p)]) + p for p in offer)
        if lib.SSL_CTX_set_alpn_protos(ctx_ptr, wire, len(wire)) != 0:  # 0 is success here
            errors()
            raise MemoryError("SSL_CTX_set_alpn_protos failed")
    if select is not None:
        lib.SSL_CTX_set_alpn_select_cb(ctx_ptr, select, NULL)


def alpn_selected(ssl: Any) -> bytes:
    """The ALPN protocol the handshake agreed on (b'' for none)."""
    data = ffi.new("unsigned char **")
    n = ffi.new("unsigned int *")
    lib.SSL_get0_alpn_selected(ssl, data, n)
    return bytes(ffi.buffer(data[0], n[0])) if n[0] else b""
