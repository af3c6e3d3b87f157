"""The few OpenSSL calls the `ssl` module lacks, made through ctypes, each checked before use.

CPython's `ssl` objects start with the OpenSSL pointer they wrap right after the object
header; every pointer read that way is verified against a value the `ssl` module itself
reports before it is handed to OpenSSL, and on any other Python, or any mismatch, these
functions do nothing and return False (the caller keeps working, only slower).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from typing import Any

log = logging.getLogger("mtls.openssl")

_HEADER = object.__basicsize__  # ob_refcnt + ob_type
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEYS_LEN = 80  # 16 bytes key name, 32 HMAC secret, 32 AES key


class _Lib:
    def __init__(self) -> None:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # libssl via _ssl
        self.ctx_ctrl = self._fn(lib.SSL_CTX_ctrl, ctypes.c_long, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_long, ctypes.c_void_p)  # fmt: skip
        self.ctx_get_options = self._fn(lib.SSL_CTX_get_options, ctypes.c_uint64, ctypes.c_void_p)
        self.get_ssl_ctx = self._fn(lib.SSL_get_SSL_CTX, ctypes.c_void_p, ctypes.c_void_p)
        self.set_session = self._fn(lib.SSL_set_session, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p)  # fmt: skip
        self.session_get_time = self._fn(lib.SSL_SESSION_get_time, ctypes.c_long, ctypes.c_void_p)
        self.session_get_version = self._fn(
            lib.SSL_SESSION_get_protocol_version, ctypes.c_int, ctypes.c_void_p
        )
        self.set_shutdown = self._fn(lib.SSL_set_shutdown, None, ctypes.c_void_p, ctypes.c_int)

    @staticmethod
    def _fn(fn: Any, restype: Any, *argtypes: Any) -> Any:
        fn.restype = restype
        fn.argtypes = list(argtypes)
        return fn


def _load() -> _Lib | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        return _Lib()
    except (OSError, AttributeError) as exc:
        log.debug("OpenSSL helpers unavailable: %s", exc)
        return None


_LIB = _load()


def _pointer_at(obj: object, offset: int) -> int | None:
    value = ctypes.c_void_p.from_address(id(obj) + offset).value
    return int(value) if value else None


def ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX* of `ctx`, if it can be confirmed (its options read back the same)."""
    if _LIB is None:
        return None
    ptr = _pointer_at(ctx, _HEADER)
    if ptr is None or _LIB.ctx_get_options(ptr) != int(ctx.options):
        return None
    return ptr


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give a server context these session-ticket keys (SSL_CTX_set_tlsext_ticket_keys)."""
    ptr = ctx_pointer(ctx)
    if _LIB is None or ptr is None or len(keys) != TICKET_KEYS_LEN:
        return False
    buf = ctypes.create_string_buffer(keys, TICKET_KEYS_LEN)
    return bool(_LIB.ctx_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_LEN, buf) == 1)


_SSL_SENT_SHUTDOWN = 1


def _ssl_ptr(sslobj: ssl.SSLObject, ctx_ptr: int) -> int | None:
    """The SSL* of `sslobj`, confirmed by its SSL_CTX* being `ctx_ptr`."""
    if _LIB is None:
        return None
    inner = getattr(sslobj, "_sslobj", None)  # the _ssl._SSLSocket: header, Socket, SSL*
    if inner is None:
        return None
    ssl_ptr = _pointer_at(inner, _HEADER + ctypes.sizeof(ctypes.c_void_p))
    if ssl_ptr is None or _LIB.get_ssl_ctx(ssl_ptr) != ctx_ptr:
        return None
    return ssl_ptr


def keep_session_resumable(sslobj: ssl.SSLObject, ctx_ptr: int) -> bool:
    """Before a client connection is dropped without close_notify (a reset, an abort): mark
    it shut down, or OpenSSL frees it by flagging its session, which `set_session` shares
    with other connections, as not resumable. Nothing is sent on the wire."""
    ssl_ptr = _ssl_ptr(sslobj, ctx_ptr)
    if _LIB is None or ssl_ptr is None:
        return False
    _LIB.set_shutdown(ssl_ptr, _SSL_SENT_SHUTDOWN)
    return True


def set_session(sslobj: ssl.SSLObject, ctx_ptr: int, session: ssl.SSLSession) -> bool:
    """SSL_set_session on a client SSLObject before its handshake, sharing `session`.

    The `session=` argument of wrap_bio makes CPython copy the session by encoding and
    decoding it (certificate included), which with OpenSSL 3.0 costs more CPU than the rest
    of a resumed handshake. OpenSSL itself takes a reference; no copy is needed.
    """
    ssl_ptr = _ssl_ptr(sslobj, ctx_ptr)
    if _LIB is None or ssl_ptr is None:
        return False
    sess_ptr = _pointer_at(session, _HEADER)
    if sess_ptr is None or _LIB.session_get_time(sess_ptr) != session.time:
        return False
    if _LIB.session_get_version(sess_ptr) not in (0x0303, 0x0304):
        return False
    return bool(_LIB.set_session(ssl_ptr, sess_ptr) == 1)
