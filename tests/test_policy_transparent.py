"""MTLS_POLICY_FILE in transparent mode: rules (inbound and outbound) are keyed by the
destination port the caller dialled, for pooled streams between sidecars, and a live change
applies to that port."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import wait_for
from .test_transparent_proof import APP_B, Mesh, build_mesh


@pytest.fixture(scope="module")
def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with build_mesh(pki, tmp_path_factory.mktemp("policy-proof"), ["a", "b"]) as m:
        yield m


def test_rules_are_keyed_by_the_destination_port(mesh: Mesh) -> None:
    # The sidecar runs as the proxy uid: the policy lives where that uid can read it.
    folder = Path(tempfile.mkdtemp(prefix="mtls-policy-"))
    folder.chmod(0o755)
    policy = folder / "policy.yaml"
    try:
        policy.write_text(
            f'default: deny\ninbound:\n  "{APP_B}": {{allow: [{TD}/ns/proof/sa/client]}}\n'
        )
        policy.chmod(0o644)
        b = mesh.sidecar("b", MTLS_POLICY_FILE=str(policy))
        mesh.sidecar("a")
        ip_b = mesh.lab["b"].v4
        result = mesh.dial("a", ip_b, APP_B, b"hello")
        assert result["error"] is None and result["reply"] == b"hello", mesh.report()
        closed = [e for e in b.log_events() if e.get("event") == "conn_closed"][-1]
        assert closed["policy_route"] == str(APP_B), closed
        assert closed["policy_rule"] == f"inbound.{APP_B}.allow[0]"
        assert b.metric("mtls_policy_decisions_total", route=str(APP_B), decision="allow") >= 1

        # The same port closed to that identity, live: the next stream is refused.
        new = folder / "policy.new"
        new.write_text(f'default: deny\ninbound:\n  "{APP_B}": {{allow: []}}\n')
        new.chmod(0o644)
        os.replace(new, policy)
        assert wait_for(lambda: b.metric("mtls_policy_reloads_total", result="ok") >= 2, 15)
        result = mesh.dial("a", ip_b, APP_B, b"again")
        assert result["reply"] != b"again", result
        denied = b.wait_metric(
            "mtls_policy_decisions_total", 1, route=str(APP_B), decision="deny", dry_run="false"
        )
        assert denied >= 1, mesh.report()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_outbound_rules_are_keyed_by_the_destination_port(mesh: Mesh) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mtls-policy-"))
    folder.chmod(0o755)
    policy = folder / "policy.yaml"
    ip_b = mesh.lab["b"].v4
    server = f"{TD}/ns/proof/sa/server"

    def write(text: str) -> None:
        new = folder / "policy.new"
        new.write_text(text)
        new.chmod(0o644)
        os.replace(new, policy)

    def outbound(to: str, peer: str) -> str:
        return (
            f'default: allow\noutbound_default: deny\noutbound:\n  "{APP_B}":\n'
            f'    allow: [{{to: "{to}", peers: [{peer}]}}]\n'
        )

    try:
        write(outbound(f"{ip_b}/32:{APP_B}", server))
        mesh.sidecar("b")
        a = mesh.sidecar("a", MTLS_POLICY_FILE=str(policy))
        result = mesh.dial("a", ip_b, APP_B, b"hello")
        assert result["error"] is None and result["reply"] == b"hello", mesh.report()
        closed = [e for e in a.log_events() if e.get("event") == "conn_closed"][-1]
        assert (closed["direction"], closed["policy_route"], closed["policy_rule"]) == (
            "outbound",
            str(APP_B),
            f"outbound.{APP_B}.allow[0]",
        )
        decisions = "mtls_policy_decisions_total"
        assert a.metric(decisions, direction="outbound", route=str(APP_B), decision="allow") >= 1

        # Another address range: refused before dialling, on the capture route.
        write(outbound(f"192.0.2.0/24:{APP_B}", server))
        assert wait_for(lambda: a.metric("mtls_policy_reloads_total", result="ok") >= 2, 15)
        result = mesh.dial("a", ip_b, APP_B, b"again")
        assert result["reply"] != b"again", result
        rejected = "mtls_connections_rejected_total"
        assert a.wait_metric(rejected, 1, direction="outbound", reason="policy_denied") == 1

        # The right range, another identity: refused after the handshake.
        write(outbound(f"{ip_b}/32:{APP_B}", f"{TD}/ns/proof/sa/other"))
        assert wait_for(lambda: a.metric("mtls_policy_reloads_total", result="ok") >= 3, 15)
        result = mesh.dial("a", ip_b, APP_B, b"third")
        assert result["reply"] != b"third", result
        assert a.wait_metric(rejected, 2, direction="outbound", reason="policy_denied") == 2
        rules = [
            e["msg"].rsplit("by policy rule ", 1)[1]
            for e in a.log_events()
            if e.get("reason") == "policy_denied"
        ]
        assert rules == [
            f"outbound.{APP_B}.to (MTLS_POLICY_FILE)",
            f"outbound.{APP_B}.peers (MTLS_POLICY_FILE)",
        ], mesh.report()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
