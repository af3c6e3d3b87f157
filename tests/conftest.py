"""Shared fixtures: one throwaway PKI per test session."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pytest

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
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
