"""The authorization policy file (MTLS_POLICY_FILE) enforced by real sidecar processes: per
route allow/deny for pooled streams and one-connection-per-connection peers, dry-run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, exchange, free_port, identity_env, running

ROUTES = ("api", "admin", "ops")


def call(port: int, payload: bytes) -> bytes:
    """What the app's client gets back (b'' when the connection was refused or cut)."""
    try:
        return exchange(port, payload)
    except OSError:
        return b""


@dataclass
class Mesh:
    """One inbound sidecar with three routes to the echo app, and two callers: `client`
    (pooled streams) and `stranger` (MTLS_CONNECTION_REUSE=false: a TLS connection per
    app connection), each with an outbound route per inbound route."""

    inbound: Sidecar
    client: Sidecar
    stranger: Sidecar
    client_ports: dict[str, int]
    stranger_ports: dict[str, int]
    policy: Path


@contextlib.contextmanager
def mesh(pki: Pki, tmp: Path, echo: TcpApp, policy_text: str) -> Iterator[Mesh]:
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text)
    in_ports = {r: free_port() for r in ROUTES}
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": ",".join(
                f"{r}=127.0.0.1:{p}=127.0.0.1:{echo.port}" for r, p in in_ports.items()
            ),
            "MTLS_POLICY_FILE": str(policy),
        },
        tmp / "inbound.log",
    )
    callers = []
    ports: list[dict[str, int]] = []
    for name, ident, extra in (
        ("client", pki.client, {}),
        ("stranger", pki.stranger, {"MTLS_CONNECTION_REUSE": "false"}),
    ):
        out = {r: free_port() for r in ROUTES}
        ports.append(out)
        callers.append(
            Sidecar(
                {
                    **identity_env(ident),
                    "MTLS_OUTBOUND": ",".join(
                        f"{r}=127.0.0.1:{out[r]}=127.0.0.1:{in_ports[r]}@{TD}/server"
                        for r in ROUTES
                    ),
                    **extra,
                },
                tmp / f"{name}.log",
            )
        )
    with running(inbound, *callers):
        for sc in (inbound, *callers):
            sc.wait_ready()
        yield Mesh(inbound, callers[0], callers[1], ports[0], ports[1], policy)


POLICY = f"""\
default: deny
inbound:
  api:
    allow: [{TD}/client]
  admin:
    allow: [{TD}/client]
    dry_run: true
  ops:
    allow: [{TD}/ns/other/**]
"""


def test_per_route_allow_deny_and_dry_run(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    with mesh(pki, tmp_path, echo, POLICY) as m:
        # client (pooled streams): allowed on api and (really) on admin, denied on ops
        assert call(m.client_ports["api"], b"c-api") == b"c-api"
        assert call(m.client_ports["admin"], b"c-admin") == b"c-admin"
        assert call(m.client_ports["ops"], b"c-ops") == b""
        # stranger (a connection each): denied on api, dry-run denied (so let in) on admin,
        # allowed on ops
        assert call(m.stranger_ports["api"], b"s-api") == b""
        assert call(m.stranger_ports["admin"], b"s-admin") == b"s-admin"
        assert call(m.stranger_ports["ops"], b"s-ops") == b"s-ops"

        inbound = m.inbound
        rejected = "mtls_connections_rejected_total"
        for route in ("api", "ops"):
            assert inbound.wait_metric(rejected, 1, route=route, reason="peer_not_allowed") == 1
        assert inbound.metric(rejected, route="admin") == 0
        decisions = "mtls_policy_decisions_total"
        assert inbound.metric(decisions, route="admin", decision="deny", dry_run="true") == 1
        assert inbound.metric(decisions, route="api", decision="deny", dry_run="false") == 1
        assert inbound.metric(decisions, route="admin", decision="allow", dry_run="true") >= 1
        assert inbound.metric(decisions, route="ops", decision="allow", dry_run="false") >= 1
        assert inbound.metric(decisions, route="api", decision="deny", dry_run="true") == 0

        events = inbound.log_events()
        dry = [e for e in events if e.get("event") == "policy_dry_run_deny"]
        assert [(e["route"], e["peer_identity"], e["rule"]) for e in dry] == [
            ("admin", f"{TD}/ns/other/sa/stranger", "inbound.admin")
        ]
        refused = [e for e in events if e.get("reason") == "peer_not_allowed"]
        assert {(e["route"], e["peer_identity"]) for e in refused} == {
            ("api", f"{TD}/ns/other/sa/stranger"),
            ("ops", f"{TD}/client"),
        }
        assert all("by policy rule inbound." in e["msg"] for e in refused)
        closed = [e for e in events if e.get("event") == "conn_closed"]
        assert {(e["route"], e["peer_identity"], e["policy_rule"]) for e in closed} == {
            ("api", f"{TD}/client", "inbound.api.allow[0]"),
            ("admin", f"{TD}/client", "inbound.admin.allow[0]"),
            ("admin", f"{TD}/ns/other/sa/stranger", "inbound.admin"),
            ("ops", f"{TD}/ns/other/sa/stranger", "inbound.ops.allow[0]"),
        }
        assert "Traceback" not in inbound.logs()


def test_a_broken_policy_file_refuses_to_start(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: deny\ninbound:\n  api: {allow: [nope]}\n")
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"api=127.0.0.1:{free_port()}=127.0.0.1:{echo.port}",
            "MTLS_POLICY_FILE": str(policy),
        },
        tmp_path / "bad.log",
    )
    assert sc.proc.wait(20) == 2
    sc.stop()
    lines = sc.logs().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"mtls-sidecar: cannot start: MTLS_POLICY_FILE {policy}: line 3: inbound.api.allow: "
        "pattern 'nope':"
    ), lines
