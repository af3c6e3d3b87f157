"""End to end on loopback: real sidecar processes, real TLS peers, every bad input counted."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, recv_all, wait_for
from .pki import Identity


def client_ctx(pki: Pki, ident: Identity | None, **kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.root.cert.public_bytes(Encoding.PEM).decode())
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def tls_roundtrip(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes:
    """Handshake, send, half-close is not possible on SSLSocket: read one reply."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw) as s:
        s.sendall(payload)
        return s.recv(65536)


def rejected_events(sc: Sidecar, reason: str) -> list[dict[str, object]]:
    return [
        e for e in sc.log_events() if e.get("event") == "rejected" and e.get("reason") == reason
    ]


class Pair:
    def __init__(
        self, inbound: Sidecar, outbound: Sidecar, plain: Sidecar, ports: dict[str, int]
    ) -> None:
        self.inbound = inbound
        self.outbound = outbound
        self.plain = plain  # an outbound sidecar with MTLS_CONNECTION_REUSE=false
        self.ports = ports


@pytest.fixture(scope="module")
def pair(
    pki: Pki, echo: TcpApp, eof_app: TcpApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    d = tmp_path_factory.mktemp("pair")
    p = {
        "in_echo": free_port(),
        "in_eof": free_port(),
        "in_dead": free_port(),
        "in_v6": free_port("::1"),
        "out_echo": free_port(),
        "out_eof": free_port(),
        "out_wrong": free_port(),
        "out_v6": free_port("::1"),
        "plain_eof": free_port(),
        "dead_app": free_port(),
    }
    app6 = TcpApp("echo", host="::1")
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": (
                f"echo=127.0.0.1:{p['in_echo']}=127.0.0.1:{echo.port},"
                f"eof=127.0.0.1:{p['in_eof']}=127.0.0.1:{eof_app.port},"
                f"dead=127.0.0.1:{p['in_dead']}=127.0.0.1:{p['dead_app']},"
                f"v6=[::1]:{p['in_v6']}=[::1]:{app6.port}"
            ),
            "MTLS_ALLOW_PEERS": f"{TD}/client,{TD}/server",
            "MTLS_HANDSHAKE_TIMEOUT": "1s",
        },
        d / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": (
                f"echo=127.0.0.1:{p['out_echo']}=127.0.0.1:{p['in_echo']}@{TD}/server,"
                f"eof=127.0.0.1:{p['out_eof']}=localhost:{p['in_eof']}@{TD}/server,"
                f"wrong=127.0.0.1:{p['out_wrong']}=127.0.0.1:{p['in_echo']}@{TD}/db,"
                f"v6=[::1]:{p['out_v6']}=[::1]:{p['in_v6']}"
            ),
        },
        d / "outbound.log",
    )
    # Connection reuse off on this one side: one TLS connection per app connection, as
    # with any peer that is not one of ours (handshakes, resumption, their metrics).
    plain = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"eof=127.0.0.1:{p['plain_eof']}=localhost:{p['in_eof']}@{TD}/server",
            "MTLS_CONNECTION_REUSE": "false",
        },
        d / "plain.log",
    )
    try:
        inbound.wait_ready()
        outbound.wait_ready()
        plain.wait_ready()
        yield Pair(inbound, outbound, plain, p)
    finally:
        assert inbound.stop() == 0
        assert outbound.stop() == 0
        assert plain.stop() == 0
        app6.close()
        for sc in (inbound, outbound, plain):
            assert "Traceback" not in sc.logs(), sc.logs()


# --- the happy path ----------------------------------------------------------------------


def test_round_trip_counts_exact_bytes(pair: Pair) -> None:
    before_out = pair.outbound.metric("mtls_bytes_total", route="echo", security="mtls")
    before_in = pair.inbound.metric("mtls_bytes_total", route="echo", security="mtls")
    payload = bytes(range(256)) * 20_000  # 5 MB
    assert exchange(pair.ports["out_echo"], payload) == payload
    want = 2 * len(payload)
    assert (
        pair.outbound.wait_metric(
            "mtls_bytes_total", before_out + want, route="echo", security="mtls"
        )
        == before_out + want
    )
    assert (
        pair.inbound.wait_metric(
            "mtls_bytes_total", before_in + want, route="echo", security="mtls"
        )
        == before_in + want
    )
    # flow=in is what came from the network peer, flow=out what went to it
    assert pair.outbound.metric("mtls_bytes_total", route="echo", flow="out") >= len(payload)
    assert pair.outbound.metric("mtls_connections_total", route="echo", security="mtls") >= 1
    assert pair.outbound.metric("mtls_bytes_total", security="plaintext") == 0


def test_half_close_is_carried_across(pair: Pair) -> None:
    """The client shuts its write side; the app sees EOF, replies, and the reply arrives."""
    assert exchange(pair.ports["out_eof"], b"x" * 100_000) == b"got:100000"


def test_ipv6_routes(pair: Pair) -> None:
    assert exchange(pair.ports["out_v6"], b"over v6", host="::1") == b"over v6"


def test_close_log_line(pair: Pair) -> None:
    exchange(pair.ports["out_eof"], b"abc")
    assert wait_for(
        lambda: any(
            e.get("event") == "conn_closed"
            and e.get("route") == "eof"
            and e.get("bytes_in") == 3
            and e.get("outcome") == "ok"
            and e.get("peer_identity") == f"{TD}/client"
            for e in pair.inbound.log_events()
        )
    )
    line = next(
        e
        for e in pair.outbound.log_events()
        if e.get("event") == "conn_closed" and e.get("route") == "eof"
    )
    assert line["peer_identity"] == f"{TD}/server"
    assert {"bytes_in", "bytes_out", "duration_ms", "outcome", "peer"} <= set(line)


def test_many_concurrent_connections(pair: Pair) -> None:
    socks = [socket.create_connection(("127.0.0.1", pair.ports["out_echo"])) for _ in range(100)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"%05d" % i)
        for i, s in enumerate(socks):
            s.settimeout(10)
            assert s.recv(5) == b"%05d" % i
    finally:
        for s in socks:
            s.close()


def test_status_and_ready(pair: Pair) -> None:
    import json

    code, body = pair.inbound.get("/status")
    assert code == 200
    st = json.loads(body)
    assert st["certificate"]["identity"] == f"{TD}/server"
    assert "key" not in json.dumps(st["certificate"]).lower().replace("key_", "")
    assert {r["name"] for r in st["routes"]} == {"echo", "eof", "dead", "v6"}
    assert pair.inbound.get("/ready")[0] == 200
    assert pair.inbound.get("/live")[0] == 200


# --- bad input: each a clean close, a log line and a counter ------------------------------


def _expect_refused(fn: object) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        reply = fn()  # type: ignore[operator]
        if reply == b"":
            raise ConnectionError("closed")


def test_plaintext_client_rejected_not_tls(pair: Pair) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", route="echo", reason="not_tls")
    with socket.create_connection(("127.0.0.1", pair.ports["in_echo"])) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_all(s) == b""  # a clean close, nothing relayed
    assert (
        sc.wait_metric(
            "mtls_connections_rejected_total", before + 1, route="echo", reason="not_tls"
        )
        == before + 1
    )
    assert any("plaintext" in str(e["msg"]) for e in rejected_events(sc, "not_tls"))


def test_garbage_rejected_not_tls(pair: Pair) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="not_tls")
    with socket.create_connection(("127.0.0.1", pair.ports["in_echo"])) as s:
        s.sendall(bytes(range(1, 200)))
        assert recv_all(s) == b""
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="not_tls") == (
        before + 1
    )


def test_no_client_cert(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="no_client_cert")
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], client_ctx(pki, None)))
    assert sc.wait_metric(
        "mtls_connections_rejected_total", before + 1, reason="no_client_cert"
    ) == (before + 1)
    assert any(
        "no client certificate" in str(e["msg"]) for e in rejected_events(sc, "no_client_cert")
    )


def test_other_ca(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="unknown_ca")
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], client_ctx(pki, pki.other_ca)))
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="unknown_ca") == (
        before + 1
    )
    assert any("trust bundle" in str(e["msg"]) for e in rejected_events(sc, "unknown_ca"))


def test_expired_cert(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="expired_cert")
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], client_ctx(pki, pki.expired)))
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="expired_cert") == (
        before + 1
    )
    assert any("expired" in str(e["msg"]) for e in rejected_events(sc, "expired_cert"))


def test_peer_not_allowed(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="peer_not_allowed")
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], client_ctx(pki, pki.stranger)))
    assert (
        sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="peer_not_allowed")
        == before + 1
    )
    ev = rejected_events(sc, "peer_not_allowed")
    assert any(e.get("peer_identity") == f"{TD}/ns/other/sa/stranger" for e in ev)


def test_cert_without_spiffe_id(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="bad_cert")
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], client_ctx(pki, pki.no_spiffe)))
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="bad_cert") == (
        before + 1
    )


def test_tls12_client_rejected_tls_version(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="tls_version")
    ctx = client_ctx(pki, pki.client, maximum_version=ssl.TLSVersion.TLSv1_2)
    _expect_refused(lambda: tls_roundtrip(pair.ports["in_echo"], ctx))
    assert sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="tls_version") == (
        before + 1
    )


def test_silent_client_handshake_timeout(pair: Pair) -> None:
    sc = pair.inbound
    before = sc.metric("mtls_connections_rejected_total", reason="handshake_timeout")
    with socket.create_connection(("127.0.0.1", pair.ports["in_echo"])) as s:
        t0 = time.monotonic()
        assert recv_all(s, timeout=5) == b""
        assert 0.8 < time.monotonic() - t0 < 4
    assert (
        sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="handshake_timeout")
        == before + 1
    )


def test_wrong_server_identity(pair: Pair) -> None:
    sc = pair.outbound
    before = sc.metric("mtls_connections_rejected_total", reason="identity_mismatch")
    with socket.create_connection(("127.0.0.1", pair.ports["out_wrong"])) as s:
        s.sendall(b"secret")
        # closed with nothing relayed, or reset when b"secret" was still unread in the kernel
        with contextlib.suppress(ConnectionResetError):
            assert recv_all(s) == b""
    assert (
        sc.wait_metric("mtls_connections_rejected_total", before + 1, reason="identity_mismatch")
        == before + 1
    )
    ev = rejected_events(sc, "identity_mismatch")
    assert any(f"{TD}/db" in str(e["msg"]) and f"{TD}/server" in str(e["msg"]) for e in ev)


def test_app_refuses_connection(pair: Pair, pki: Pki) -> None:
    sc = pair.inbound
    before = sc.metric(
        "mtls_upstream_connect_failures_total", route="dead", reason="connect_refused"
    )
    with pytest.raises((ssl.SSLError, OSError)):
        reply = tls_roundtrip(pair.ports["in_dead"], client_ctx(pki, pki.client))
        if reply == b"":
            raise ConnectionError("closed")
    assert (
        sc.wait_metric(
            "mtls_upstream_connect_failures_total",
            before + 1,
            route="dead",
            reason="connect_refused",
        )
        == before + 1
    )
    assert any(e.get("event") == "upstream_failed" for e in sc.log_events())


def test_other_connections_unaffected_by_rejections(pair: Pair) -> None:
    assert exchange(pair.ports["out_echo"], b"still fine") == b"still fine"


def test_too_many_connections(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_MAX_CONNECTIONS": "2",
        },
        tmp_path / "sc.log",
    )
    try:
        sc.wait_ready()
        ctx = client_ctx(pki, pki.client)
        held = []
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", port))
            s = ctx.wrap_socket(raw)
            s.sendall(b"a")
            assert s.recv(1) == b"a"
            held.append(s)
        with socket.create_connection(("127.0.0.1", port)) as s3:
            assert recv_all(s3) == b""
        assert (
            sc.wait_metric("mtls_connections_rejected_total", 1, reason="too_many_connections") == 1
        )
        for s in held:
            s.close()
    finally:
        assert sc.stop() == 0


def test_tls_sessions_are_resumed(pair: Pair) -> None:
    """After the first connection to an upstream, handshakes resume (both workers' tickets)."""
    for i in range(6):
        assert exchange(pair.ports["plain_eof"], b"r%d" % i) == b"got:2"
    assert wait_for(
        lambda: (
            sum(
                1
                for e in pair.plain.log_events()
                if e.get("event") == "conn_closed"
                and e.get("route") == "eof"
                and e.get("tls_resumed")
            )
            >= 5
        )
    )
    # The inbound side writes its line when its leg closes, which may come after the
    # outbound's: wait for it too.
    assert wait_for(
        lambda: (
            sum(
                1
                for e in pair.inbound.log_events()
                if e.get("event") == "conn_closed"
                and e.get("route") == "eof"
                and e.get("tls_resumed")
            )
            >= 5
        )
    )


def test_post_quantum_key_exchange_is_shown_in_metrics_and_logs(pair: Pair) -> None:
    """Our two sidecars agree on X25519MLKEM768 and say so per connection and in a counter
    (one TLS connection per app connection here: reuse is off at the outbound side)."""
    before = {
        (sc, resumed): sc.metric(
            "mtls_handshakes_total", group="X25519MLKEM768", resumed=resumed, direction=d
        )
        for sc, d in ((pair.inbound, "inbound"), (pair.plain, "outbound"))
        for resumed in ("yes", "no")
    }
    for i in range(3):
        assert exchange(pair.ports["plain_eof"], b"pq%d" % i) == b"got:3"
    for sc, d in ((pair.inbound, "inbound"), (pair.plain, "outbound")):
        want = before[(sc, "yes")] + before[(sc, "no")] + 3

        def done(sc: Sidecar = sc, d: str = d, want: float = want) -> bool:
            got = sc.metric("mtls_handshakes_total", group="X25519MLKEM768", direction=d)
            return bool(got == want)

        assert wait_for(done), sc.metrics()
        # the second and third connections resume with the ticket the one before left
        assert sc.metric("mtls_handshakes_total", resumed="yes", direction=d) >= 2
    for sc in (pair.inbound, pair.plain):
        lines = [
            e
            for e in sc.log_events()
            if e.get("event") == "conn_closed" and e.get("route") == "eof"
        ]
        assert lines
        for line in lines:
            assert line["tls_group"] == "X25519MLKEM768", line
            assert line["tls_version"] == "TLSv1.3"
            assert line["tls_cipher"].startswith("TLS_")
            assert isinstance(line["tls_resumed"], bool)
