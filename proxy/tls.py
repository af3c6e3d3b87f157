"""TLS contexts built once per identity, session resumption, and TLS error classification."""

from __future__ import annotations

import os
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import CertError
from .material import Material
from .openssl import ctx_pointer, set_ticket_keys

# ECDHE with AEAD ciphers only, for TLS 1.2 when it is enabled (TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305"
)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _load_chain_in_memory(ctx: ssl.SSLContext, material: Material) -> None:
    """Load cert+key without writing the key to disk: SSLContext only takes paths, so use memfds."""
    fds: list[int] = []
    try:
        paths = []
        for name, data in (("chain", material.chain_pem), ("key", material.key_pem)):
            fd = os.memfd_create(f"mtls-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        ctx.load_cert_chain(paths[0], paths[1])
    except ssl.SSLError as exc:
        raise CertError(f"cannot use certificate and key: {exc.reason or exc}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _base_context(protocol: int, material: Material, min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if min_version == "1.2":
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=material.bundle_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise CertError(f"cannot use trust bundle: {exc.reason or exc}") from None
    _load_chain_in_memory(ctx, material)
    return ctx


class SessionCache:
    """Client-side TLS session tickets per upstream, bounded; lives and dies with one context.

    A resumed TLS 1.3 handshake skips both certificate signatures and verifications, which is
    most of the CPU cost of a new proxied connection.
    """

    # Reading `SSLObject.session` leaks about 6 KB per read on CPython 3.11 (gh-116810: fixed
    # in 3.12.7 and 3.13), ~2 GB a day at 100 new connections/s. A TLS 1.3 ticket resumes many
    # connections, so a session is read only when there is none for the upstream, the last one
    # did not resume (see `drop`), or it is older than this.
    REFRESH = 300.0

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._sessions: OrderedDict[str, ssl.SSLSession] = OrderedDict()
        self._taken: dict[str, float] = {}

    def wants(self, key: str) -> bool:
        """Should the next connection to `key` hand its session to `put`?"""
        taken = self._taken.get(key)
        return taken is None or time.monotonic() - taken > self.REFRESH

    def get(self, key: str) -> ssl.SSLSession | None:
        return self._sessions.get(key)

    def put(self, key: str, session: ssl.SSLSession | None) -> None:
        if session is None or not session.has_ticket:
            return
        self._sessions[key] = session
        self._taken[key] = time.monotonic()
        self._sessions.move_to_end(key)
        if len(self._sessions) > self._size:
            old, _ = self._sessions.popitem(last=False)
            self._taken.pop(old, None)

    def drop(self, key: str) -> None:
        self._sessions.pop(key, None)
        self._taken.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class TlsState:
    """Everything a new connection needs from the current identity; replaced whole on reload."""

    material: Material
    server: ssl.SSLContext
    client: ssl.SSLContext
    sessions: SessionCache = field(default_factory=SessionCache)
    client_ptr: int | None = None  # the client SSL_CTX*, for sharing sessions (openssl.py)
    server_resumed: ssl.SSLContext | None = None  # `server` without new tickets


def build_tls_state(
    material: Material, min_version: str = "1.3", ticket_keys: bytes | None = None
) -> TlsState:
    """Build server and client contexts; raises CertError, leaving nothing half-built.

    `ticket_keys` (80 bytes, the same in every worker) lets any worker resume a session
    another one issued; new keys come with each new identity, so a reload ends old sessions.
    """
    server = _base_context(ssl.PROTOCOL_TLS_SERVER, material, min_version)
    # One ticket is enough: a client keeps only the newest one per upstream.
    server.num_tickets = 1
    # For clients that resume, a context that issues no new ticket: with OpenSSL 3.0 making
    # and taking a ticket costs about a quarter of a resumed handshake, and the one the client
    # holds stays valid (it resumes with it again; expired or unknown, it gets a full handshake
    # and, next time, no PSK to offer and so a ticket).
    server_resumed = _base_context(ssl.PROTOCOL_TLS_SERVER, material, min_version)
    server_resumed.num_tickets = 0
    if ticket_keys is not None:
        set_ticket_keys(server, ticket_keys)
        set_ticket_keys(server_resumed, ticket_keys)
    client = _base_context(ssl.PROTOCOL_TLS_CLIENT, material, min_version)
    # Peers are authenticated by SPIFFE ID (URI SAN), checked after the handshake, not by DNS.
    client.check_hostname = False
    return TlsState(
        material=material,
        server=server,
        client=client,
        client_ptr=ctx_pointer(client),
        server_resumed=server_resumed,
    )


# --- classifying handshake failures -------------------------------------------------------

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
}


def speaks_no_tls(exc: BaseException) -> bool:
    """Did a client handshake fail because nothing TLS-capable answered (not because the
    remote refused us)? Outbound permissive mode then falls back to plaintext."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError):
        return True
    if isinstance(exc, ssl.SSLError):
        return classify_tls_error(exc, "")[0] == "not_tls" or (exc.reason or "") in (
            "UNEXPECTED_EOF_WHILE_READING",
        )
    return False


def classify_tls_error(exc: BaseException, who: str) -> tuple[str, str]:
    """Map a handshake exception to (reason label, sentence for the log).

    `who` names the peer in the sentence, e.g. "peer 10.0.0.7:51234".
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
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
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in _NO_CERT_REASONS:
            if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
                return "no_client_cert", f"{who} requires a client certificate we did not send"
            return "no_client_cert", f"{who} sent no client certificate"
        if reason in _VERSION_REASONS:
            return (
                "tls_version",
                f"{who} offered no TLS version we accept ({exc.reason.lower()})",
            )
        if reason in _NOT_TLS_REASONS:
            return "not_tls", f"{who} did not speak TLS ({reason.lower().replace('_', ' ')})"
        if reason in _REMOTE_ALERTS:
            label = _REMOTE_ALERTS[reason]
            return label, f"{who} refused our certificate ({reason.lower().replace('_', ' ')})"
        if reason == "UNEXPECTED_EOF_WHILE_READING" or isinstance(exc, ssl.SSLEOFError):
            return "other", f"{who} closed the connection in the middle of the TLS handshake"
        if reason == "NO_SHARED_CIPHER":
            return "tls_version", f"{who} offered no cipher suite we accept"
        return "other", f"TLS handshake with {who} failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "other", f"{who} reset the connection during the TLS handshake"
    return "other", f"TLS handshake with {who} failed ({exc!r})"
