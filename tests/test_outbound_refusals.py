"""What the outbound side reports when the remote refuses it after the TLS 1.3 handshake:
a rejection with the remote's reason, never a relayed connection, never an undelivered
byte counted, and a cut (RST) towards the app rather than an empty reply."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, free_port, identity_env, wait_for
from .pki import Identity, pem
from .test_interop import _outbound_to_stunnel


def _app_call(port: int, payload: bytes) -> str:
    """Send a request the way an app does and say how the connection ended."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            s.settimeout(10)
            data = s.recv(100)
    except (ConnectionResetError, BrokenPipeError):  # the reset may beat the send
        return "reset"
    return "eof" if not data else "data"


def _pair(
    pki: Pki, tmp: Path, echo: TcpApp, client: Identity, inbound_env: dict[str, str]
) -> tuple[Sidecar, Sidecar, int]:
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            **inbound_env,
        },
        tmp / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(client),
            "MTLS_OUTBOUND": f"out=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
        },
        tmp / "outbound.log",
    )
    inbound.wait_ready()
    outbound.wait_ready()
    return inbound, outbound, out_port


def _outbound_counted_nothing(sc: Sidecar) -> None:
    assert sc.metric("mtls_connections_total", direction="outbound") == 0
    assert sc.metric("mtls_peer_connections_total", direction="outbound") == 0
    assert sc.metric("mtls_peer_key_exchange_total", direction="outbound") == 0
    assert sc.metric("mtls_bytes_total", direction="outbound", flow="out") == 0
    assert sc.metric("mtls_handshakes_total", direction="outbound") == 0
    assert sc.metric("mtls_connections_active", direction="outbound") == 0


def test_refused_by_allow_peers_the_remote_says_so_with_an_alert(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    inbound, outbound, out_port = _pair(
        pki, tmp_path, echo, pki.stranger, {"MTLS_ALLOW_PEERS": f"{TD}/client"}
    )
    try:
        assert _app_call(out_port, b"GET / HTTP/1.1\r\n\r\n") == "reset"
        rejected = "mtls_connections_rejected_total"
        assert inbound.wait_metric(rejected, 1, reason="peer_not_allowed") == 1
        assert outbound.wait_metric(rejected, 1, reason="peer_not_allowed") == 1
        _outbound_counted_nothing(outbound)
        lines = [e for e in outbound.log_events() if e.get("event") == "rejected"]
        assert "refused our identity" in lines[0]["msg"]
        assert not [e for e in outbound.log_events() if e.get("outcome") == "ok"]
        # The refused peer is named in the inbound's line, from inside the handshake.
        refused = [e for e in inbound.log_events() if e.get("reason") == "peer_not_allowed"]
        assert refused[0]["peer_identity"] == f"{TD}/ns/other/sa/stranger"
        # Each end counts the refusal under the other's identity: the inbound the identity
        # it refused, the outbound the remote that refused it.
        by_peer, why = "mtls_peer_rejections_total", "peer_not_allowed"
        stranger = f"{TD}/ns/other/sa/stranger"
        assert inbound.wait_metric(by_peer, 1, peer_identity=stranger, reason=why) == 1
        assert outbound.wait_metric(by_peer, 1, peer_identity=f"{TD}/server", reason=why) == 1
        assert inbound.metric(by_peer, direction="inbound") == 1
        assert outbound.metric(by_peer, direction="outbound") == 1
        assert inbound.metric(by_peer) == outbound.metric(by_peer) == 1
    finally:
        inbound.stop()
        outbound.stop()


def test_a_good_pair_still_counts_once(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    inbound, outbound, out_port = _pair(pki, tmp_path, echo, pki.client, {})
    try:
        assert _app_call(out_port, b"ping") == "data"
        name = "mtls_connections_total"
        assert outbound.wait_metric(name, 1, direction="outbound") == 1
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 1
        assert outbound.wait_metric("mtls_bytes_total", 4, direction="outbound", flow="out") == 4
        # A remote that accepts and then answers nothing: still a relayed connection.
        with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
            s.sendall(b"x")
            time.sleep(0.2)
        assert outbound.wait_metric(name, 2, direction="outbound") == 2
        # Both connections under the remote's identity and the key-exchange group of the
        # TLS connection that carried them (the second a stream on the pooled one).
        groups = "mtls_peer_key_exchange_total"
        pq = {"peer_identity": f"{TD}/server", "group": "X25519MLKEM768"}
        assert outbound.metric(groups, direction="outbound", **pq) == 2
        assert outbound.metric(groups) == 2
        assert inbound.wait_metric(groups, 2, direction="inbound", group="X25519MLKEM768") == 2
        assert inbound.metric(groups, peer_identity=f"{TD}/client") == 2
        assert outbound.metric("mtls_peer_rejections_total") == 0
    finally:
        inbound.stop()
        outbound.stop()


@pytest.mark.parametrize("workers", ["1"])
def test_stunnel_refusing_our_ca_is_a_rejection_only(
    pki: Pki, echo: TcpApp, tmp_path: Path, workers: str
) -> None:
    other_bundle = tmp_path / "other-root.pem"
    other_bundle.write_bytes(pem(pki.other_root.cert))
    with _outbound_to_stunnel(pki, echo, tmp_path, other_bundle) as (sc, out_port):
        assert _app_call(out_port, b"hello") in ("reset", "eof")
        rejected = "mtls_connections_rejected_total"
        assert wait_for(lambda: sc.metric(rejected, direction="outbound") >= 1)
        reasons = {e.get("reason") for e in sc.log_events() if e.get("event") == "rejected"}
        assert reasons & {"unknown_ca", "bad_cert"}, reasons
        _outbound_counted_nothing(sc)


def test_an_upload_the_remote_never_answers_is_counted_while_open(
    pki: Pki, tmp_path: Path, eof_app: TcpApp
) -> None:
    """A remote that accepts and stays silent (it replies only at the end) is counted within
    about a second, so a long upload's bytes show while it runs."""
    inbound, outbound, out_port = _pair(pki, tmp_path, eof_app, pki.client, {})
    try:
        with socket.create_connection(("127.0.0.1", out_port), timeout=10) as s:
            s.sendall(b"u" * 1000)
            name = "mtls_bytes_total"
            assert outbound.wait_metric(name, 1000, direction="outbound", flow="out") == 1000
            assert outbound.metric("mtls_connections_total", direction="outbound") == 1
            assert outbound.metric("mtls_connections_active", direction="outbound") == 1
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"got:1000"
    finally:
        inbound.stop()
        outbound.stop()
