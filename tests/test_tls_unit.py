"""TLS contexts: shared ticket keys resume across contexts (workers), error classification."""

from __future__ import annotations

import contextlib
import gc
import os
import ssl

from proxy.material import load_material_files
from proxy.openssl import keep_session_resumable, set_session
from proxy.tls import TlsState, build_tls_state, classify_tls_error

from .conftest import Pki


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(si, so, server_side=True)
    cli = client.wrap_bio(ci, co, session=session)
    for _ in range(8):
        for obj in (cli, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        si.write(co.read())
        ci.write(so.read())
    srv.write(b"x")  # the ticket travels before the first application data
    ci.write(so.read())
    assert cli.read(10) == b"x"
    return cli


def test_shared_ticket_keys_resume_on_another_worker(pki: Pki) -> None:
    server_m = load_material_files(pki.server.cert, pki.server.key, pki.server.bundle)
    client_m = load_material_files(pki.client.cert, pki.client.key, pki.client.bundle)
    keys = os.urandom(80)
    worker1 = build_tls_state(server_m, ticket_keys=keys)
    worker2 = build_tls_state(server_m, ticket_keys=keys)
    other = build_tls_state(server_m, ticket_keys=os.urandom(80))
    client = build_tls_state(client_m)
    first = _handshake(worker1.server, client.client)
    assert not first.session_reused
    session = first.session
    assert _handshake(worker2.server, client.client, session).session_reused
    # a reload brings new keys: old tickets no longer resume
    assert not _handshake(other.server, client.client, session).session_reused


def test_classify_verification_errors() -> None:
    exc = ssl.SSLCertVerificationError()
    exc.verify_code = 10
    exc.verify_message = "certificate has expired"
    assert classify_tls_error(exc, "peer x")[0] == "expired_cert"
    exc.verify_code = 20
    exc.verify_message = "unable to get local issuer certificate"
    reason, text = classify_tls_error(exc, "peer x")
    assert reason == "unknown_ca" and "trust bundle" in text
    assert classify_tls_error(ConnectionResetError(), "peer x")[0] == "other"


def _handshake_shared(
    server: ssl.SSLContext, state: TlsState, session: ssl.SSLSession | None
) -> ssl.SSLObject:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(si, so, server_side=True)
    cli = state.client.wrap_bio(ci, co)
    if session is not None:
        assert state.client_ptr is not None
        assert set_session(cli, state.client_ptr, session)
    for _ in range(8):
        for obj in (cli, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        si.write(co.read())
        ci.write(so.read())
    srv.write(b"x")
    ci.write(so.read())
    assert cli.read(10) == b"x"
    return cli


def test_shared_session_survives_an_aborted_connection(pki: Pki) -> None:
    """Sessions shared with SSL_set_session resume, and stay resumable when the connection
    they came from is dropped without close_notify, thanks to keep_session_resumable."""
    server = build_tls_state(
        load_material_files(pki.server.cert, pki.server.key, pki.server.bundle),
        ticket_keys=os.urandom(80),
    ).server
    client = build_tls_state(
        load_material_files(pki.client.cert, pki.client.key, pki.client.bundle)
    )
    assert client.client_ptr is not None
    first = _handshake_shared(server, client, None)
    session = first.session
    assert session is not None
    assert keep_session_resumable(first, client.client_ptr)
    del first  # freed without close_notify, like an aborted connection
    gc.collect()
    for _ in range(3):
        again = _handshake_shared(server, client, session)
        assert again.session_reused
        assert keep_session_resumable(again, client.client_ptr)
        del again
        gc.collect()
    # without the mark, freeing the connection a session came from spoils that session
    origin = _handshake_shared(server, client, None)
    spoilt = origin.session
    assert spoilt is not None
    del origin
    gc.collect()
    assert not _handshake_shared(server, client, spoilt).session_reused
