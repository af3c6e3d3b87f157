"""Connection reuse between two sidecars, with real processes: many app connections per
handshake with exact bytes, resets and slow readers confined to their stream, fallback to one
TLS connection per app connection with stunnel, haproxy and a sidecar with reuse off. A
stream that names another host is in test_transparent_proof.py (it needs the redirect)."""

from __future__ import annotations

import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from .conftest import TD, Pki, start_pair
from .harness import ScriptedApp, Sidecar, TcpApp, exchange, free_port, identity_env, wait_for
from .pki import Identity, copy_identity, replace_identity, write_identity
from .test_proxyproto_readers import _binary, _foreground


def _closed(sc: Sidecar) -> list[dict[str, object]]:
    return [e for e in sc.log_events() if e.get("event") == "conn_closed"]


def test_500_short_connections_share_a_few_handshakes_and_count_exact_bytes(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    inbound, outbound, _, out_port = start_pair(pki, tmp_path, echo.port)
    try:
        sent = 0
        for i in range(500):
            payload = b"%d:" % i + b"x" * (i % 97)
            assert exchange(out_port, payload) == payload
            sent += len(payload)
        for sc, d, flow in ((outbound, "outbound", "out"), (inbound, "inbound", "in")):
            assert sc.wait_metric("mtls_connections_total", 500, direction=d) == 500
            assert sc.wait_metric("mtls_bytes_total", sent, direction=d, flow=flow) == sent
            assert sc.metric("mtls_pool_streams_total", direction=d) == 500
            # one pooled connection per outbound worker (two), perhaps a few more
            assert 1 <= sc.metric("mtls_handshakes_total", direction=d) <= 6
            assert sc.metric("mtls_connections_rejected_total") == 0
        assert wait_for(lambda: len(_closed(outbound)) == 500 and len(_closed(inbound)) == 500)
        for line in _closed(outbound) + _closed(inbound):
            assert line["pooled"] is True and line["outcome"] == "ok", line
            assert line["tls_group"] == "X25519MLKEM768"
        assert outbound.metric("mtls_pool_connections", state="open") >= 1
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0
    assert "Traceback" not in inbound.logs() + outbound.logs()


def _reset_or_echo(conn: socket.socket) -> None:
    """A connection whose first bytes are b"reset" is reset (SO_LINGER 0); others echo."""
    while data := conn.recv(65536):
        if data.startswith(b"reset"):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        conn.sendall(data)


def _one_worker_pair(pki: Pki, tmp: Path, app_port: int) -> tuple[Sidecar, Sidecar, int]:
    """Both sidecars with one worker: every app connection shares one pooled connection."""
    one = {"MTLS_WORKERS": "1"}
    inbound, outbound, _, out_port = start_pair(
        pki, tmp, app_port, inbound_env=one, outbound_env=one
    )
    return inbound, outbound, out_port


def test_a_reset_in_one_stream_does_not_touch_another(pki: Pki, tmp_path: Path) -> None:
    app = ScriptedApp(_reset_or_echo)
    inbound, outbound, out_port = _one_worker_pair(pki, tmp_path, app.port)
    try:
        with socket.create_connection(("127.0.0.1", out_port)) as keep:
            keep.settimeout(10)
            keep.sendall(b"before")
            assert keep.recv(100) == b"before"
            with socket.create_connection(("127.0.0.1", out_port)) as doomed:
                doomed.settimeout(10)
                doomed.sendall(b"reset please")
                with pytest.raises(ConnectionResetError):
                    while doomed.recv(100):
                        pass
            # the other stream, on the same pooled connection, goes on
            keep.sendall(b"after")
            assert keep.recv(100) == b"after"
        outcomes = {str(e["outcome"]) for e in _closed(inbound)}
        assert "app_reset" in outcomes, _closed(inbound)
        assert wait_for(lambda: "peer_reset" in {str(e["outcome"]) for e in _closed(outbound)})
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 1
        assert outbound.metric("mtls_pool_streams_total", direction="outbound") == 2
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0


def test_a_slow_reader_does_not_stall_the_other_streams(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """Stream A's app never reads its echo: A stops at its flow-control window, while stream B
    on the same pooled connection moves 8 MB both ways."""
    inbound, outbound, out_port = _one_worker_pair(pki, tmp_path, echo.port)
    try:
        stuck = socket.create_connection(("127.0.0.1", out_port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        pushed = 0
        chunk = b"s" * 65536
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # push until everything on A's path is full
            try:
                pushed += stuck.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
        assert pushed > 4 * 1024 * 1024  # A's window (and the buffers behind it) filled up
        payload = bytes(range(256)) * (8 * 4096)
        t0 = time.monotonic()
        assert exchange(out_port, payload, timeout=20) == payload
        assert time.monotonic() - t0 < 15
        stuck.close()
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 1
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0


def test_reuse_off_on_either_side_means_one_tls_connection_per_app_connection(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    for side in ("inbound", "outbound"):
        d = tmp_path / side
        d.mkdir()
        off = {"MTLS_CONNECTION_REUSE": "false"}
        inbound, outbound, _, out_port = start_pair(
            pki,
            d,
            echo.port,
            inbound_env=off if side == "inbound" else None,
            outbound_env=off if side == "outbound" else None,
        )
        try:
            for i in range(5):
                assert exchange(out_port, b"n%d" % i) == b"n%d" % i
            assert outbound.wait_metric("mtls_handshakes_total", 5, direction="outbound") == 5
            assert inbound.wait_metric("mtls_handshakes_total", 5, direction="inbound") == 5

            def all_closed(sc: Sidecar = outbound) -> bool:
                return len(_closed(sc)) == 5

            assert wait_for(all_closed)
            assert all(e["pooled"] is False for e in _closed(outbound) + _closed(inbound))
            assert outbound.metric("mtls_pool_streams_total") == 0
        finally:
            assert inbound.stop() == 0
            assert outbound.stop() == 0


def _foreign_server(kind: str, pki: Pki, tmp: Path, app_port: int, port: int) -> list[str]:
    ident: Identity = pki.server
    if kind == "stunnel":
        conf = tmp / "stunnel.conf"
        conf.write_text(
            f"foreground = yes\npid =\n[s]\naccept = 127.0.0.1:{port}\n"
            f"connect = 127.0.0.1:{app_port}\ncert = {ident.cert}\nkey = {ident.key}\n"
            f"CAfile = {ident.bundle}\nverifyChain = yes\nrequireCert = yes\n"
            "sslVersionMin = TLSv1.3\n"
        )
        return [_binary("stunnel4"), str(conf)]
    pem_file = tmp / "server.pem"
    pem_file.write_bytes(ident.cert.read_bytes() + ident.key.read_bytes())
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 10s\n"
        "    timeout server 10s\n"
        f"frontend f\n    bind 127.0.0.1:{port} ssl crt {pem_file} ca-file {ident.bundle}"
        " verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1\n"
        f"    default_backend b\nbackend b\n    server app 127.0.0.1:{app_port}\n"
    )
    return [_binary("haproxy"), "-db", "-f", str(conf)]


@pytest.mark.parametrize("kind", ["stunnel", "haproxy"])
def test_foreign_peers_get_one_plain_tls_connection_per_app_connection(
    kind: str, pki: Pki, tmp_path: Path, eof_app: TcpApp
) -> None:
    """Our outbound offers reuse; stunnel and haproxy (here with ALPN of its own) never
    select it: each app connection is its own TLS tunnel, half-close and bytes as ever."""
    port, out_port = free_port(), free_port()
    cmd = _foreign_server(kind, pki, tmp_path, eof_app.port, port)
    with _foreground(cmd, tmp_path / f"{kind}.log", port):
        sc = Sidecar(
            {
                **identity_env(pki.client),
                "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{port}@{TD}/server",
            },
            tmp_path / "outbound.log",
        )
        try:
            sc.wait_ready()
            for i in range(4):
                payload = b"to %s " % kind.encode() * (i + 1) * 1000
                assert exchange(out_port, payload) == b"got:%d" % len(payload)
            assert sc.wait_metric("mtls_connections_total", 4, security="mtls") == 4
            assert sc.metric("mtls_handshakes_total") == 4
            assert sc.metric("mtls_pool_streams_total") == 0
            assert sc.metric("mtls_pool_connections", state="open") == 0
            assert all(e["pooled"] is False for e in _closed(sc))
        finally:
            assert sc.stop() == 0
        assert "Traceback" not in sc.logs()


def test_identity_rotation_retires_the_pool_without_dropping_a_stream(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    """The inbound sidecar reloads a new certificate: it tells the outbound side (GOAWAY),
    which opens a new pooled connection for new app connections; the stream open across the
    rotation goes on to its end, then its old pooled connection closes."""
    ident = copy_identity(pki.server, tmp_path / "server-files")
    client = copy_identity(pki.client, tmp_path / "client-files")
    inbound, outbound, _, out_port = start_pair(
        pki, tmp_path, echo.port, server=ident, client=client
    )
    try:
        assert exchange(out_port, b"first") == b"first"
        held = socket.create_connection(("127.0.0.1", out_port))
        held.settimeout(10)
        held.sendall(b"across")
        assert held.recv(100) == b"across"
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 1
        replace_identity(pki.server2, ident)
        inbound.signal(signal.SIGHUP)
        assert inbound.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        assert inbound.wait_metric("mtls_pool_retired_total", 1, reason="rotation") == 1
        assert outbound.wait_metric("mtls_pool_retired_total", 1, reason="goaway") == 1
        # new app connections: a new pooled connection, with the new certificate
        assert exchange(out_port, b"second") == b"second"
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 2
        assert outbound.metric("mtls_pool_connections", state="open") == 2
        # the stream that was open goes on over the old one
        held.sendall(b"still here")
        assert held.recv(100) == b"still here"
        held.close()
        assert outbound.wait_metric("mtls_pool_connections", 1, state="open") == 1
        assert inbound.wait_metric("mtls_pool_connections", 1, state="open") == 1
        assert all(e["outcome"] == "ok" for e in _closed(outbound))
        # our own certificate changing retires our pooled connections too
        fresh = write_identity(
            tmp_path / "new", "client", pki.inter, [pki.root.cert], f"{TD}/client"
        )
        replace_identity(fresh, client)
        outbound.signal(signal.SIGHUP)
        assert outbound.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        assert outbound.wait_metric("mtls_pool_retired_total", 1, reason="rotation") == 1
        assert outbound.wait_metric("mtls_pool_connections", 0, state="open") == 0
        assert exchange(out_port, b"third") == b"third"
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 3
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0


def test_pooled_connections_are_let_go_when_idle_and_retired_when_old(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    pool = {"MTLS_POOL_IDLE_TIMEOUT": "2s", "MTLS_POOL_MAX_LIFETIME": "3s"}
    inbound, outbound, _, out_port = start_pair(pki, tmp_path, echo.port, outbound_env=pool)
    try:
        assert exchange(out_port, b"one") == b"one"
        assert outbound.metric("mtls_pool_connections", state="open") == 1
        # idle for 2 s: closed by the outbound side, and so at the inbound side too
        assert outbound.wait_metric("mtls_pool_retired_total", 1, timeout=15, reason="idle") == 1
        assert outbound.wait_metric("mtls_pool_connections", 0, state="open") == 0
        assert inbound.wait_metric("mtls_pool_connections", 0, state="open") == 0
        # a busy one is retired at 3 s of age: the stream open then goes on, new ones move
        held = socket.create_connection(("127.0.0.1", out_port))
        held.settimeout(10)
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            held.sendall(b"busy")
            assert held.recv(100) == b"busy"
            time.sleep(0.2)
        assert (
            outbound.wait_metric("mtls_pool_retired_total", 1, timeout=10, reason="max_lifetime")
            == 1
        )
        assert exchange(out_port, b"two") == b"two"
        held.sendall(b"last")
        assert held.recv(100) == b"last"
        held.close()
        assert outbound.metric("mtls_handshakes_total", direction="outbound") == 3
        assert all(e["outcome"] == "ok" for e in _closed(outbound))
        assert outbound.metric("mtls_pool_streams_per_connection_count") >= 1
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0
