"""Shared fixtures: one throwaway PKI per test session."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import Pair, Sidecar, TcpApp, free_port, identity_env
from .pki import Identity, Issuer, make_intermediate, make_root, write_identity

TD = "spiffe://test.example"


@dataclass
class Pki:
    root: Issuer
    inter: Issuer
    other_root: Issuer
    server: Identity
    client: Identity
    other_ca: Identity
    expired: Identity
    no_spiffe: Identity
    stranger: Identity  # valid cert, identity not allowed by a restrictive policy
    server2: Identity  # a second server cert, for rotation
    directory: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    root = make_root()
    inter = make_intermediate(root)
    other_root = make_root("Other CA")
    other_inter = make_intermediate(other_root, "Other Intermediate")
    bundle = [root.cert]
    now = dt.datetime.now(dt.UTC)
    return Pki(
        root=root,
        inter=inter,
        other_root=other_root,
        server=write_identity(d, "server", inter, bundle, f"{TD}/server"),
        client=write_identity(d, "client", inter, bundle, f"{TD}/client"),
        other_ca=write_identity(d, "other", other_inter, bundle, f"{TD}/client"),
        expired=write_identity(
            d,
            "expired",
            inter,
            bundle,
            f"{TD}/client",
            not_before=now - dt.timedelta(days=2),
            not_after=now - dt.timedelta(days=1),
        ),
        no_spiffe=write_identity(d, "nospiffe", inter, bundle, None),
        stranger=write_identity(d, "stranger", inter, bundle, f"{TD}/ns/other/sa/stranger"),
        server2=write_identity(d, "server2", inter, bundle, f"{TD}/server"),
        directory=d,
    )


@pytest.fixture(scope="module")
def echo() -> Iterator[TcpApp]:
    """A loopback app that echoes every byte back."""
    app = TcpApp("echo")
    yield app
    app.close()


@pytest.fixture(scope="module")
def eof_app() -> Iterator[TcpApp]:
    """A loopback app that reads to EOF, then answers b"got:<n>" and closes (half-close)."""
    app = TcpApp("eof-reply")
    yield app
    app.close()


def start_pair(
    pki: Pki,
    tmp: Path,
    app_port: int,
    *,
    server: Identity | None = None,
    inbound_env: dict[str, str] | None = None,
    in_port: int | None = None,
    client: Identity | None = None,
    outbound_env: dict[str, str] | None = None,
) -> Pair:
    """Start and wait for a pair of sidecars in front of the app on `app_port`: the app's
    client connects to `out_port` (client identity), carried over mTLS to `in_port` (server
    identity, or `server`), forwarded to the app. Unpacks as (inbound, outbound, in, out)."""
    in_port = in_port or free_port()
    out_port = free_port()
    inbound = Sidecar(
        {
            **identity_env(server or pki.server),
            "MTLS_INBOUND": f"app=127.0.0.1:{in_port}=127.0.0.1:{app_port}",
            **(inbound_env or {}),
        },
        tmp / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(client or pki.client),
            "MTLS_OUTBOUND": f"app=127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
            **(outbound_env or {}),
        },
        tmp / "outbound.log",
    )
    inbound.wait_ready()
    outbound.wait_ready()
    return Pair(inbound, outbound, in_port, out_port)


# Test modules that run in-process only (no sidecar processes, no real peers): `make unit`.
UNIT_MODULES = frozenset(
    {
        "test_flow",
        "test_identity",
        "test_policy",
        "test_settings",
        "test_parsers_property",
        "test_fuzz_property",
        "test_ca_issuer",
        "test_tls_unit",
        "test_config_entrypoints",
        "test_federation",
        "test_policyfile",
        "test_policyfile_outbound",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
