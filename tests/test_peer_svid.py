"""Peers are judged by the same X509-SVID rules as our own leaf: a real inbound sidecar
refuses client certificates that chain to our root but are no valid X509-SVID."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, free_port, identity_env, running
from .pki import Identity, write_identity

BAD_PEERS: list[tuple[str, str | None, dict[str, object]]] = [
    ("ca-true", f"{TD}/client", {"ca": True}),
    ("extra-uri", f"{TD}/client", {"extra_uris": ("https://client.example/",)}),
    ("two-ids", f"{TD}/client", {"extra_uris": (f"{TD}/other",)}),
    ("trailing-slash", f"{TD}/client/", {}),
    ("upper-case", "spiffe://Test.Example/client", {}),
]


@pytest.fixture(scope="module")
def inbound(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, int]]:
    echo = TcpApp("echo")
    port = free_port()
    sidecar = Sidecar(
        {**identity_env(pki.server), "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{echo.port}"},
        tmp_path_factory.mktemp("peer-svid") / "inbound.log",
    )
    with running(sidecar):
        sidecar.wait_ready()
        yield sidecar, port
    echo.close()


def _roundtrip(port: int, ident: Identity) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ident.bundle))
    ctx.load_cert_chain(ident.cert, ident.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(100)


def test_valid_peer_is_relayed(pki: Pki, inbound: tuple[Sidecar, int]) -> None:
    _, port = inbound
    assert _roundtrip(port, pki.client) == b"ping"


@pytest.mark.parametrize(("why", "spiffe_id", "kw"), BAD_PEERS, ids=[c[0] for c in BAD_PEERS])
def test_invalid_svid_peer_is_refused(
    pki: Pki,
    inbound: tuple[Sidecar, int],
    tmp_path: Path,
    why: str,
    spiffe_id: str | None,
    kw: dict[str, object],
) -> None:
    sidecar, port = inbound
    ident = write_identity(tmp_path, why, pki.inter, [pki.root.cert], spiffe_id, **kw)  # type: ignore[arg-type,unused-ignore]
    before = sidecar.metric("mtls_connections_rejected_total", reason="bad_cert")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        if _roundtrip(port, ident) == b"":
            raise ConnectionError("closed without a reply")
    assert sidecar.wait_metric(
        "mtls_connections_rejected_total", before + 1, reason="bad_cert"
    ) == (before + 1)
