"""The TLS engine (pyOpenSSL on the wheel's OpenSSL): contexts per identity, sessions, errors."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from . import tls_ffi
from .errors import CertError
from .hbone import ALPN as HBONE_ALPN
from .material import Material
from .mux import ALPN_VERSIONS
from .tls_ffi import ffi, lib


class TlsSettings(Protocol):
    """What the TLS contexts take from the settings (proxy.config.Settings has them)."""

    @property
    def min_tls_version(self) -> str: ...

    @property
    def tls_groups(self) -> Sequence[str]: ...

    @property
    def connection_reuse(self) -> bool: ...

    @property
    def pool_protocol(self) -> int: ...


# ECDHE with AEAD ciphers only, for TLS 1.2 when it is enabled (TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# --- key-exchange groups ------------------------------------------------------------------

# Post-quantum hybrid first: east-west traffic recorded today must stay secret when a
# quantum computer can break X25519. Classical after it, so peers on OpenSSL < 3.5 (no
# ML-KEM) still connect: they get X25519 (or P-256).
DEFAULT_GROUPS: tuple[str, ...] = ("X25519MLKEM768", "X25519", "P-256")

# The groups we offer in MTLS_TLS_GROUPS, spelled as users and metrics see them; a name is
# supported if the OpenSSL we run on accepts it (see `supported_groups`).
_GROUP_NAMES = (
    "X25519MLKEM768",
    "SecP256r1MLKEM768",
    "SecP384r1MLKEM1024",
    "X25519",
    "X448",
    "P-256",
    "P-384",
    "P-521",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
)
# Other spellings OpenSSL knows, and what SSL_get0_group_name reports, to our spelling.
_GROUP_ALIASES = {
    "secp256r1": "P-256",
    "prime256v1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
}
_CANONICAL = {name.lower(): name for name in _GROUP_NAMES} | _GROUP_ALIASES
POST_QUANTUM = frozenset(n for n in _GROUP_NAMES if "MLKEM" in n)

_supported: tuple[str, ...] | None = None


def supported_groups() -> tuple[str, ...]:
    """The names of `_GROUP_NAMES` this OpenSSL accepts, in that order (probed once)."""
    global _supported
    if _supported is None:
        ctx = lib.SSL_CTX_new(lib.TLS_method())
        try:
            _supported = tuple(
                n for n in _GROUP_NAMES if lib.SSL_CTX_set1_curves_list(ctx, n.encode()) == 1
            )
        finally:
            lib.SSL_CTX_free(ctx)
            lib.ERR_clear_error()
    return _supported


def group_label(name: str) -> str:
    """Our spelling of a group name as OpenSSL reports it ('x25519' -> 'X25519')."""
    return _CANONICAL.get(name.lower(), name)


def parse_tls_groups(text: str) -> tuple[str, ...]:
    """Parse MTLS_TLS_GROUPS: comma-separated key-exchange groups, preferred first.

    Names are case-insensitive (secp256r1/prime256v1 mean P-256); unknown or repeated
    names are an error that lists what this build supports.
    """
    supported = supported_groups()
    groups: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError("empty group name in the list")
        name = _CANONICAL.get(item.lower())
        if name is None or name not in supported:
            raise ValueError(
                f"unknown key-exchange group {item!r} (supported: {', '.join(supported)})"
            )
        if name in groups:
            raise ValueError(f"group {name} is listed twice")
        groups.append(name)
    return tuple(groups)


# --- contexts -----------------------------------------------------------------------------

# Server-side session lifetime (ticket lifetime hint, and how long a ticket is accepted).
SESSION_LIFETIME = 7200


def session_lifetime(not_after: dt.datetime, now: dt.datetime | None = None) -> int:
    """Seconds a resumed session may last: never past the leaf certificate's expiry."""
    now = now or dt.datetime.now(dt.UTC)
    left = int((not_after - now).total_seconds())
    return max(1, min(SESSION_LIFETIME, left))


def _ctx_ptr(ctx: SSL.Context) -> Any:
    # pyOpenSSL keeps the SSL_CTX* here; the raw calls need it.
    return ctx._context


def _base_context(
    method: int, material: Material, min_version: str, groups: tuple[str, ...]
) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(_VERSIONS[min_version])
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    if min_version == "1.2":
        ctx.set_cipher_list(TLS12_CIPHERS.encode())
    ctx.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE
    )
    # pyOpenSSL turns on partial writes; NetLeg.send hands each SSL_write all it has (the
    # memory BIO takes any amount) and counts on it being written whole.
    ctx.clear_mode(lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    # Idle connections give their record buffers back (~34 KB each): most proxied
    # connections are idle most of the time.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # No Python callback: OpenSSL verifies the chain; SPIFFE IDs are checked afterwards
    # (policy.py), never host names.
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if lib.SSL_CTX_set1_curves_list(_ctx_ptr(ctx), ":".join(groups).encode()) != 1:
        tls_ffi.errors()
        raise CertError(f"OpenSSL refused the key-exchange groups {','.join(groups)}")
    store = ctx.get_cert_store()
    assert store is not None
    try:
        for root in material.roots:
            store.add_cert(crypto.X509.from_cryptography(root))
    except crypto.Error as exc:
        raise CertError(f"cannot use trust bundle: {exc}") from None
    # Federated trust domains' roots join the store, so OpenSSL can verify their peers'
    # chains; which root may vouch for which trust domain is checked in the verify
    # callback (Material.trust), never left to the shared store.
    for td, roots in material.federated_roots.items():
        for root in roots:
            try:
                store.add_cert(crypto.X509.from_cryptography(root))
            except crypto.Error as exc:
                if "already in hash table" in str(exc):
                    continue  # the same root in two bundles: stored once, judged per domain
                raise CertError(f"cannot use the trust bundle of {td}: {exc}") from None
    # Certificate and key from memory: the key never touches a file.
    try:
        chain = x509.load_pem_x509_certificates(material.chain_pem)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
        ctx.use_certificate(chain[0])
        for cert in chain[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(key)  # type: ignore[arg-type]  # load_pem_private_key's wide union
        ctx.check_privatekey()
    except (SSL.Error, crypto.Error, ValueError, TypeError) as exc:
        raise CertError(f"cannot use certificate and key: {exc}") from None
    ctx.set_timeout(session_lifetime(material.not_after))
    return ctx


class SessionCache:
    """Client-side TLS sessions (tickets) per upstream, bounded; lives and dies with one context.

    A resumed TLS 1.3 handshake skips both certificate signatures and verifications, most of
    the CPU cost of a new proxied connection. Each connection leaves the session of its newest
    ticket for the next ones (`put`), so tickets are chained rather than one reused for hours.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._sessions: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str) -> Any:
        """The newest session for `key` (an SSL_SESSION*), or None."""
        return self._sessions.get(key)

    def put(self, key: str, session: Any) -> None:
        if session is None:
            return
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        if len(self._sessions) > self._size:
            self._sessions.popitem(last=False)

    def drop(self, key: str) -> None:
        self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)


def get_session(ssl: Any) -> Any:
    """The session of a client connection, for the next one (None if there is none)."""
    sess = lib.SSL_get1_session(ssl)
    if sess == ffi.NULL:
        return None
    return ffi.gc(sess, lib.SSL_SESSION_free)


@dataclass
class TlsState:
    """Everything a new connection needs from the current identity; replaced whole on reload."""

    material: Material
    server: SSL.Context
    client: SSL.Context
    groups: tuple[str, ...] = DEFAULT_GROUPS
    sessions: SessionCache = field(default_factory=SessionCache)
    server_ptr: Any = None  # the SSL_CTX* of `server`, for tls_ffi.new_ssl
    client_ptr: Any = None
    hbone_server: SSL.Context | None = None  # MTLS_HBONE_LISTEN: ALPN h2, TLS 1.3 only
    hbone_server_ptr: Any = None
    hbone_client: SSL.Context | None = None  # HBONE outbound: ALPN h2 offered, TLS 1.3 only
    hbone_client_ptr: Any = None

    def cap_session_lifetime(self, now: dt.datetime | None = None) -> int:
        """Let sessions issued from now on end by the leaf's expiry (called once a second,
        so a ticket never outlives the certificate it vouches for); returns the seconds."""
        seconds = session_lifetime(self.material.not_after, now)
        lib.SSL_CTX_set_timeout(self.server_ptr, seconds)
        lib.SSL_CTX_set_timeout(self.client_ptr, seconds)
        for ptr in (self.hbone_server_ptr, self.hbone_client_ptr):
            if ptr is not None:
                lib.SSL_CTX_set_timeout(ptr, seconds)
        return seconds


def tls_state_for(material: Material, settings: TlsSettings) -> TlsState:
    """The one check every material passes before it is used, in `check`, in the master
    (before it accepts files, an enrolment, a renewal or a reload) and in each worker: the
    contexts this sidecar's settings build from it. Raises CertError."""
    return build_tls_state(
        material,
        settings.min_tls_version,
        settings.tls_groups,
        reuse=settings.connection_reuse,
        hbone=getattr(settings, "hbone_address", None) is not None,
        reuse_version=settings.pool_protocol,
    )


# Connection reuse's ALPN names from a newest version down, newest first: a client offers
# them all, a server selects the newest the client offered. One selection callback each,
# for every context.
def _alpn_names(newest: int) -> tuple[bytes, ...]:
    return tuple(sorted((n for n, v in ALPN_VERSIONS.items() if v <= newest), reverse=True))


_ALPN_SELECT = {v: tls_ffi.alpn_select_callback(_alpn_names(v)) for v in ALPN_VERSIONS.values()}
# HBONE's listener: `h2` or nothing (no_application_protocol alert), as ztunnel does.
_HBONE_SELECT = tls_ffi.alpn_select_callback((HBONE_ALPN,), required=True)


def build_tls_state(
    material: Material,
    min_version: str = "1.3",
    groups: Sequence[str] = DEFAULT_GROUPS,
    *,
    reuse: bool = False,
    hbone: bool = False,
    reuse_version: int = 2,
) -> TlsState:
    """Build server and client contexts; raises CertError, leaving nothing half-built.

    Each process has its own ticket keys (OpenSSL makes them per context; the binding has
    no call to set them), so a ticket resumes only in the worker that issued it.
    """
    groups = tuple(groups)
    server = _base_context(SSL.TLS_SERVER_METHOD, material, min_version, groups)
    # Resumption with client certificates needs a session ID context (any constant).
    server.set_session_id(b"mtls-sidecar")
    client = _base_context(SSL.TLS_CLIENT_METHOD, material, min_version, groups)
    if reuse:
        # Connection reuse (pool.py) is negotiated: we offer it as a client and select it as
        # a server; a peer that does not speak it never sees anything but plain TLS.
        # `reuse_version` is the newest version we speak (MTLS_POOL_PROTOCOL).
        tls_ffi.set_alpn(_ctx_ptr(client), offer=_alpn_names(reuse_version))
        tls_ffi.set_alpn(_ctx_ptr(server), select=_ALPN_SELECT[reuse_version])
    # HBONE outbound: a client context offering only `h2`, TLS 1.3 only.
    hbone_client = _base_context(SSL.TLS_CLIENT_METHOD, material, "1.3", groups)
    tls_ffi.set_alpn(_ctx_ptr(hbone_client), offer=(HBONE_ALPN,))
    hbone_server: SSL.Context | None = None
    if hbone:
        # HBONE is TLS 1.3 only, whatever MTLS_MIN_TLS_VERSION allows elsewhere.
        hbone_server = _base_context(SSL.TLS_SERVER_METHOD, material, "1.3", groups)
        hbone_server.set_session_id(b"mtls-sidecar-hbone")
        tls_ffi.set_alpn(_ctx_ptr(hbone_server), select=_HBONE_SELECT)
    return TlsState(
        material=material,
        server=server,
        client=client,
        groups=groups,
        server_ptr=_ctx_ptr(server),
        client_ptr=_ctx_ptr(client),
        hbone_server=hbone_server,
        hbone_server_ptr=_ctx_ptr(hbone_server) if hbone_server is not None else None,
        hbone_client=hbone_client,
        hbone_client_ptr=_ctx_ptr(hbone_client),
    )


# --- one connection's facts ---------------------------------------------------------------


def tls_info(ssl: Any) -> tuple[str, str, str]:
    """(version, cipher, key-exchange group) of an established connection."""
    cipher = lib.SSL_get_current_cipher(ssl)
    return (
        tls_ffi.text(lib.SSL_get_version(ssl)),
        tls_ffi.text(lib.SSL_CIPHER_get_name(cipher)) if cipher != ffi.NULL else "",
        group_label(tls_ffi.text(lib.SSL_get0_group_name(ssl))),
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chain_anchored(
    ders: Sequence[bytes],
    roots: Sequence[x509.Certificate],
    known: Sequence[bytes] = (),
) -> bool:
    """Does this peer chain (leaf first, as sent, DER) end at one of `roots`: a certificate of
    it is a root, or its last one is directly issued by one (signature checked)? Asked of
    open pooled connections when the trust bundle changes.

    A resumed session has no chain but the leaf: `known` intermediates (DER, seen in other
    peers' chains) then complete it, each link's signature checked."""
    root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    if any(d in root_ders for d in ders):
        return True
    if not ders:
        return False
    try:
        top = x509.load_der_x509_certificate(ders[-1])
        extra = [x509.load_der_x509_certificate(d) for d in known]
    except ValueError:
        return False
    for _ in range(len(extra) + 1):
        if any(_issued_by(top, root) for root in roots):
            return True
        nxt = next((c for c in extra if c != top and _issued_by(top, c)), None)
        if nxt is None:
            return False
        top = nxt
    return False


# --- classifying handshake failures -------------------------------------------------------


class TlsError(Exception):
    """A TLS failure as OpenSSL reported it: the reason (upper snake case) and, when our
    verification of the peer's certificate failed, the X509_V_ERR_* code."""

    def __init__(self, reason: str, verify_code: int = 0, verify_message: str = "") -> None:
        super().__init__(reason.lower().replace("_", " "))
        self.reason = reason
        self.verify_code = verify_code
        self.verify_message = verify_message

    @property
    def eof(self) -> bool:
        """Did the peer close the TCP stream without close_notify?"""
        return self.reason in _EOF_REASONS


_EOF_REASONS = {"UNEXPECTED_EOF_WHILE_READING", "EOF_OCCURRED_IN_VIOLATION_OF_PROTOCOL", "EOF"}
_VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"


def tls_error(ssl: Any, code: int) -> TlsError:
    """Turn the failure of the last call on `ssl` (SSL_get_error `code`) into a TlsError,
    draining OpenSSL's error queue."""
    queue = tls_ffi.errors()
    if not queue:
        # SSL_ERROR_SYSCALL with nothing queued: the memory BIO hit its end.
        return TlsError("EOF" if code == tls_ffi.SYSCALL else f"SSL_ERROR_{code}")
    # The first entry is the cause; later ones are context added on the way up.
    reason = queue[0][1].upper().replace(" ", "_")
    if reason == _VERIFY_FAILED:
        vcode = int(lib.SSL_get_verify_result(ssl))
        message = tls_ffi.text(lib.X509_verify_cert_error_string(vcode))
        return TlsError(reason, vcode, message)
    return TlsError(reason)


# OpenSSL X509_V_ERR_* codes
_UNKNOWN_CA_CODES = {2, 18, 19, 20, 21, 27, 30, 31}
_EXPIRED_CODES = {10}
_NOT_YET_VALID = {9}

_NOT_TLS_REASONS = {
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNKNOWN_PROTOCOL",
    "PACKET_LENGTH_TOO_LONG",
    "RECORD_LAYER_FAILURE",
    "UNEXPECTED_MESSAGE",
    "LENGTH_MISMATCH",
    "RECORD_LENGTH_MISMATCH",
    "BAD_PACKET_LENGTH",
    "UNEXPECTED_RECORD",
    # OpenSSL 3.5+ names for a record that cannot be TLS (too long, unknown content type).
    "ENCRYPTED_LENGTH_TOO_LONG",
    "BAD_RECORD_TYPE",
}
_VERSION_REASONS = {
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "VERSION_TOO_LOW",
    "WRONG_SSL_VERSION",
    "UNKNOWN_SSL_VERSION",
}
_NO_CERT_REASONS = {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
# Alerts sent by the remote side about *our* certificate.
_REMOTE_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired_cert",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_cert",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_cert",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_cert",
    "TLSV1_ALERT_ACCESS_DENIED": "peer_not_allowed",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad_cert",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "other",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "revoked",
}


def alert_name(reason: str) -> str:
    """The alert in an OpenSSL reason, whatever its version prefix: 'SSLV3_ALERT_BAD_CERTIFICATE'
    and 'TLS_ALERT_BAD_CERTIFICATE' are both 'BAD_CERTIFICATE' ('' when not an alert)."""
    _, sep, name = reason.partition("ALERT_")
    return name if sep else ""


_ALERTS_BY_NAME = {alert_name(k): v for k, v in _REMOTE_ALERTS.items()}


def classify_tls_error(exc: BaseException, who: str) -> tuple[str, str]:
    """Map a handshake exception to (reason label, sentence for the log).

    `who` names the peer in the sentence, e.g. "peer 10.0.0.7:51234".
    """
    if isinstance(exc, TlsError):
        code = exc.verify_code
        if code:
            msg = exc.verify_message
            if code in _EXPIRED_CODES:
                return "expired_cert", f"{who} presented an expired certificate ({msg})"
            if code in _UNKNOWN_CA_CODES:
                return (
                    "unknown_ca",
                    f"{who} presented a certificate that is not issued by a CA in our trust "
                    f"bundle ({msg})",
                )
            if code in _NOT_YET_VALID:
                return "bad_cert", f"{who} presented a certificate that is not valid yet ({msg})"
            return "bad_cert", f"{who} presented an invalid certificate ({msg})"
        reason = exc.reason
        text = reason.lower().replace("_", " ")
        if reason in _NO_CERT_REASONS:
            if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
                return "no_client_cert", f"{who} requires a client certificate we did not send"
            return "no_client_cert", f"{who} sent no client certificate"
        if reason in _VERSION_REASONS:
            return "tls_version", f"{who} offered no TLS version we accept ({text})"
        if reason in _NOT_TLS_REASONS:
            return "not_tls", f"{who} did not speak TLS ({text})"
        label = _REMOTE_ALERTS.get(reason) or _ALERTS_BY_NAME.get(alert_name(reason))
        if label is not None:
            return label, f"{who} refused our certificate ({text})"
        if exc.eof:
            return "other", f"{who} closed the connection in the middle of the TLS handshake"
        if reason == "NO_SHARED_CIPHER":
            return "tls_version", f"{who} offered no cipher suite we accept"
        return "other", f"TLS handshake with {who} failed ({text})"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "other", f"{who} reset the connection during the TLS handshake"
    return "other", f"TLS handshake with {who} failed ({exc!r})"


def speaks_no_tls(exc: BaseException) -> bool:
    """Did a client handshake fail because nothing TLS-capable answered (not because the
    remote refused us)? Outbound permissive mode then falls back to plaintext."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return True
    if isinstance(exc, TlsError):
        if exc.verify_code:
            return False
        return exc.eof or classify_tls_error(exc, "")[0] == "not_tls"
    return False
