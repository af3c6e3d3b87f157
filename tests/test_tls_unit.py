"""TLS contexts: shared ticket keys resume across contexts (workers), error classification."""

from __future__ import annotations

import contextlib
import os
import ssl

from proxy.material import load_material_files
from proxy.tls import build_tls_state, classify_tls_error

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
