"""The TLS engine in memory: contexts, groups, resumption, lifetimes and error classification."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from proxy import relay, tls_ffi
from proxy.material import Material, load_material_files
from proxy.tls import (
    DEFAULT_GROUPS,
    SESSION_LIFETIME,
    TlsError,
    TlsState,
    build_tls_state,
    classify_tls_error,
    get_session,
    group_label,
    parse_tls_groups,
    session_lifetime,
    speaks_no_tls,
    supported_groups,
    tls_error,
    tls_info,
)
from proxy.tls_ffi import ffi, lib

from .conftest import Pki
from .pki import Identity


class End:
    """One side of a TLS connection over memory BIOs, driven by hand."""

    def __init__(self, ctx: Any, *, server: bool, session: Any = None) -> None:
        self.ssl = tls_ffi.new_ssl(ctx)
        self.bio_in, self.bio_out = tls_ffi.new_mem_bio(), tls_ffi.new_mem_bio()
        lib.SSL_set_bio(self.ssl, self.bio_in, self.bio_out)
        if server:
            lib.SSL_set_accept_state(self.ssl)
        else:
            lib.SSL_set_connect_state(self.ssl)
        if session is not None:
            lib.SSL_set_session(self.ssl, session)

    def out(self) -> bytes:
        n = lib.BIO_get_mem_data(self.bio_out, ffi.NULL)
        buf = bytearray(n)
        lib.BIO_read(self.bio_out, ffi.from_buffer(buf), n)
        return bytes(buf)

    def feed(self, data: bytes) -> None:
        if data:
            lib.BIO_write(self.bio_in, data, len(data))

    def handshake(self) -> bool:
        r = lib.SSL_do_handshake(self.ssl)
        if r == 1:
            return True
        code = lib.SSL_get_error(self.ssl, r)
        if code == tls_ffi.WANT_READ:
            return False
        raise tls_error(self.ssl, code)

    def read(self) -> bytes:
        buf = bytearray(65536)
        n = lib.SSL_read(self.ssl, ffi.from_buffer(buf), len(buf))
        if n > 0:
            return bytes(buf[:n])
        code = lib.SSL_get_error(self.ssl, n)
        if code == tls_ffi.WANT_READ:
            return b""
        raise tls_error(self.ssl, code)

    def write(self, data: bytes) -> None:
        assert lib.SSL_write(self.ssl, data, len(data)) == len(data)

    def close_clean(self) -> None:
        # What NetLeg.close does for a client leg: freeing it keeps its session resumable.
        lib.SSL_set_shutdown(self.ssl, tls_ffi.SENT_SHUTDOWN)


def connect(server: TlsState, client: TlsState, session: Any = None) -> tuple[End, End]:
    """A full exchange: handshake, then one byte server -> client (which carries the ticket)."""
    srv = End(server.server_ptr, server=True)
    cli = End(client.client_ptr, server=False, session=session)
    done = False
    for _ in range(6):
        cli.handshake()
        srv.feed(cli.out())
        done = srv.handshake()
        cli.feed(srv.out())
    assert done and cli.handshake()
    srv.write(b"x")
    cli.feed(srv.out())
    assert cli.read() == b"x"
    return srv, cli


def material(ident: Identity) -> Material:
    return load_material_files(ident.cert, ident.key, ident.bundle)


@pytest.fixture(scope="module")
def states(pki: Pki) -> dict[str, TlsState]:
    return {
        "server": build_tls_state(material(pki.server)),
        "client": build_tls_state(material(pki.client)),
    }


def test_fast_path_runs_on_the_binding_under_pyopenssl() -> None:
    """Fails if the relay's hot path is not the raw cffi binding of the wheel's OpenSSL."""
    from OpenSSL.SSL import _lib as pyopenssl_lib  # type: ignore[attr-defined]

    assert lib is pyopenssl_lib
    assert tls_ffi.VERSION_NUMBER >= tls_ffi.MIN_VERSION, tls_ffi.VERSION_TEXT
    assert relay._SSL_read is lib.SSL_read
    assert relay._SSL_write is lib.SSL_write
    assert relay._BIO_write is lib.BIO_write
    assert relay._BIO_read is lib.BIO_read
    # The shared buffer is handed to OpenSSL without a copy: same memory.
    assert int(ffi.cast("uintptr_t", relay._PTR)) == int(
        ffi.cast("uintptr_t", ffi.from_buffer(relay._BUF))
    )


def test_binding_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_ffi, "REQUIRED", (*tls_ffi.REQUIRED, "SSL_no_such_call"))
    with pytest.raises(ImportError, match="lacks SSL_no_such_call"):
        tls_ffi._check()
    monkeypatch.setattr(tls_ffi, "VERSION_NUMBER", 0x30000130)
    with pytest.raises(ImportError, match=r"OpenSSL 3\.5 or later"):
        tls_ffi._check()


def test_our_pair_negotiates_post_quantum_tls13(states: dict[str, TlsState]) -> None:
    srv, cli = connect(states["server"], states["client"])
    for end in (srv, cli):
        assert tls_info(end.ssl) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384", "X25519MLKEM768")
    assert tls_ffi.peer_der(srv.ssl) is not None


@pytest.mark.parametrize(
    ("server_groups", "client_groups", "expected"),
    [
        (DEFAULT_GROUPS, ("X25519",), "X25519"),  # a classical-only peer
        (DEFAULT_GROUPS, ("P-256",), "P-256"),
        (("P-256",), DEFAULT_GROUPS, "P-256"),
    ],
)
def test_group_negotiation(
    pki: Pki, server_groups: tuple[str, ...], client_groups: tuple[str, ...], expected: str
) -> None:
    server = build_tls_state(material(pki.server), groups=server_groups)
    client = build_tls_state(material(pki.client), groups=client_groups)
    srv, cli = connect(server, client)
    assert tls_info(srv.ssl)[2] == tls_info(cli.ssl)[2] == expected


def test_tickets_chain_and_resume_in_the_issuing_context_only(
    pki: Pki, states: dict[str, TlsState]
) -> None:
    server, client = states["server"], states["client"]
    _, first = connect(server, client)
    assert not lib.SSL_session_reused(first.ssl)
    first.close_clean()
    session = get_session(first.ssl)
    for _ in range(3):  # each resumed connection hands on its own new ticket
        _, again = connect(server, client, session)
        assert lib.SSL_session_reused(again.ssl)
        assert tls_info(again.ssl)[2] == "X25519MLKEM768"  # PSK with (EC)DHE, still hybrid
        again.close_clean()
        session = get_session(again.ssl)
    # Another worker has its own ticket keys: a full handshake there.
    other_worker = build_tls_state(material(pki.server))
    _, elsewhere = connect(other_worker, client, session)
    assert not lib.SSL_session_reused(elsewhere.ssl)


def test_a_connection_freed_without_the_mark_spoils_its_session(
    states: dict[str, TlsState],
) -> None:
    """Why NetLeg.close marks client legs shut down: OpenSSL otherwise flags the session."""
    _, origin = connect(states["server"], states["client"])
    spoilt = get_session(origin.ssl)
    del origin
    _, after = connect(states["server"], states["client"], spoilt)
    assert not lib.SSL_session_reused(after.ssl)


def test_session_lifetime_never_outlives_the_certificate(pki: Pki) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert session_lifetime(now + dt.timedelta(days=1), now) == SESSION_LIFETIME
    assert session_lifetime(now + dt.timedelta(seconds=600), now) == 600
    assert session_lifetime(now - dt.timedelta(seconds=5), now) == 1
    state = build_tls_state(material(pki.server))
    left = (state.material.not_after - dt.datetime.now(dt.UTC)).total_seconds()
    expected = min(SESSION_LIFETIME, int(left))
    assert abs(lib.SSL_CTX_get_timeout(state.server_ptr) - expected) <= 2
    # As the expiry comes closer, sessions issued from then on end with the certificate.
    soon = state.material.not_after - dt.timedelta(seconds=90)
    assert state.cap_session_lifetime(soon) == 90
    assert lib.SSL_CTX_get_timeout(state.server_ptr) == 90
    assert lib.SSL_CTX_get_timeout(state.client_ptr) == 90


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X25519MLKEM768,X25519,P-256", ("X25519MLKEM768", "X25519", "P-256")),
        (" x25519mlkem768 , x25519 ", ("X25519MLKEM768", "X25519")),
        ("prime256v1", ("P-256",)),
        ("P-384,secp521r1", ("P-384", "P-521")),
        (
            "secp256r1,prime256v1x",
            "unknown key-exchange group 'prime256v1x' (supported: X25519MLKEM768,",
        ),
        ("kyber512", "unknown key-exchange group 'kyber512' (supported: X25519MLKEM768,"),
        ("X25519,x25519", "group X25519 is listed twice"),
        ("X25519,", "empty group name"),
        ("", "empty group name"),
    ],
)
def test_parse_tls_groups(text: str, expected: tuple[str, ...] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError) as info:
            parse_tls_groups(text)
        assert str(info.value).startswith(expected), info.value
        assert "\n" not in str(info.value)
    else:
        assert parse_tls_groups(text) == expected


def test_every_supported_group_is_accepted_by_a_context(pki: Pki) -> None:
    groups = supported_groups()
    assert DEFAULT_GROUPS[0] in groups and "X25519" in groups
    build_tls_state(material(pki.server), groups=groups)
    assert group_label("x25519") == "X25519" and group_label("secp256r1") == "P-256"
    assert group_label("X25519MLKEM768") == "X25519MLKEM768"


def _fail(server: TlsState, client: TlsState) -> tuple[TlsError | None, TlsError | None]:
    srv = End(server.server_ptr, server=True)
    cli = End(client.client_ptr, server=False)
    errors: dict[str, TlsError] = {}
    for _ in range(6):
        for name, end, other in (("client", cli, srv), ("server", srv, cli)):
            if name in errors:
                continue
            try:
                end.handshake()
                end.read()
            except TlsError as exc:
                errors[name] = exc
            other.feed(end.out())
    return errors.get("server"), errors.get("client")


def test_verification_failures_are_classified_from_the_verify_code(
    pki: Pki, states: dict[str, TlsState]
) -> None:
    other = build_tls_state(material(pki.other_ca))
    srv_err, cli_err = _fail(states["server"], other)
    assert (
        srv_err is not None
        and srv_err.verify_code == lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    )
    reason, text = classify_tls_error(srv_err, "peer x")
    assert reason == "unknown_ca" and "trust bundle" in text
    # ...and the client hears it as an alert about its certificate
    assert cli_err is not None
    assert classify_tls_error(cli_err, "remote y")[0] == "unknown_ca"
    assert not speaks_no_tls(srv_err)


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (TlsError("CERTIFICATE_VERIFY_FAILED", 10, "certificate has expired"), "expired_cert"),
        (TlsError("CERTIFICATE_VERIFY_FAILED", 9, "certificate is not yet valid"), "bad_cert"),
        (TlsError("CERTIFICATE_VERIFY_FAILED", 20, "unable to get local issuer"), "unknown_ca"),
        (TlsError("CERTIFICATE_VERIFY_FAILED", 7, "signature failure"), "bad_cert"),
        (TlsError("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no_client_cert"),
        (TlsError("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "no_client_cert"),
        (TlsError("UNSUPPORTED_PROTOCOL"), "tls_version"),
        (TlsError("TLSV1_ALERT_PROTOCOL_VERSION"), "tls_version"),
        (TlsError("NO_SHARED_CIPHER"), "tls_version"),
        (TlsError("WRONG_VERSION_NUMBER"), "not_tls"),
        (TlsError("HTTP_REQUEST"), "not_tls"),
        (TlsError("ENCRYPTED_LENGTH_TOO_LONG"), "not_tls"),
        (TlsError("BAD_RECORD_TYPE"), "not_tls"),
        (TlsError("TLSV1_ALERT_UNKNOWN_CA"), "unknown_ca"),
        (TlsError("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "expired_cert"),
        (TlsError("TLSV1_ALERT_ACCESS_DENIED"), "peer_not_allowed"),
        (TlsError("UNEXPECTED_EOF_WHILE_READING"), "other"),
        (TlsError("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), "other"),
        (ConnectionResetError(), "other"),
        (ValueError("odd"), "other"),
    ],
)
def test_classify(exc: BaseException, label: str) -> None:
    reason, text = classify_tls_error(exc, "peer x")
    assert reason == label
    assert "peer x" in text and "\n" not in text


@pytest.mark.parametrize(
    ("exc", "no_tls"),
    [
        (TlsError("WRONG_VERSION_NUMBER"), True),
        (TlsError("UNEXPECTED_EOF_WHILE_READING"), True),
        (TlsError("EOF"), True),
        (ConnectionResetError(), True),
        (BrokenPipeError(), True),
        (TlsError("CERTIFICATE_VERIFY_FAILED", 20, "x"), False),
        (TlsError("TLSV1_ALERT_UNKNOWN_CA"), False),
        (TlsError("TLSV13_ALERT_CERTIFICATE_REQUIRED"), False),
        (OSError(), False),
    ],
)
def test_speaks_no_tls(exc: BaseException, no_tls: bool) -> None:
    assert speaks_no_tls(exc) is no_tls


def test_chain_anchored_follows_the_trust_roots() -> None:
    """A pooled connection's peer chain (leaf, intermediate) ends at a root of the bundle, or
    no longer does after that root was removed; a root of the same name but another key does
    not count (the signature is checked)."""
    from cryptography.hazmat.primitives import serialization

    from proxy.tls import chain_anchored

    from .pki import make_intermediate, make_leaf, make_root

    def der(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.DER))

    root = make_root("Root A")
    inter = make_intermediate(root)
    leaf, _ = make_leaf(inter, "spiffe://td.example/a")
    other = make_root("Root B")
    impostor = make_root("Root A")  # same name, another key
    chain = [der(leaf), der(inter.cert)]
    assert chain_anchored(chain, [other.cert, root.cert])
    assert not chain_anchored(chain, [other.cert])
    assert not chain_anchored(chain, [impostor.cert])
    assert chain_anchored([der(leaf), der(inter.cert), der(root.cert)], [root.cert])
    assert not chain_anchored([der(leaf)], [root.cert])  # the intermediate was not sent
    assert not chain_anchored([], [root.cert])


def test_chain_anchored_completes_a_resumed_peer_from_known_intermediates() -> None:
    """A resumed session brings only the leaf: intermediates seen in other chains complete
    it, but only one that really signed the leaf counts."""
    from cryptography.hazmat.primitives import serialization

    from proxy.tls import chain_anchored

    from .pki import make_intermediate, make_leaf, make_root

    def der(c: Any) -> bytes:
        return bytes(c.public_bytes(serialization.Encoding.DER))

    old_root, new_root = make_root("Old"), make_root("New")
    old_inter = make_intermediate(old_root, "Issuer")
    new_inter = make_intermediate(new_root, "Issuer")  # the same name, another key and root
    leaf, _ = make_leaf(old_inter, "spiffe://td.example/a")
    known = [der(new_inter.cert), der(old_inter.cert)]
    assert chain_anchored([der(leaf)], [old_root.cert], known)
    assert not chain_anchored([der(leaf)], [new_root.cert], known)
    assert not chain_anchored([der(leaf)], [old_root.cert], [der(new_inter.cert)])
