"""The authorization policy file (MTLS_POLICY_FILE) enforced by real sidecar processes: per
route allow/deny for pooled streams and one-connection-per-connection peers, dry-run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conftest import TD, Pki
from .harness import ROOT, Sidecar, TcpApp, exchange, free_port, identity_env, running, wait_for

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
def mesh(pki: Pki, tmp: Path, echo: TcpApp, policy_text: str, workers: int = 1) -> Iterator[Mesh]:
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
            "MTLS_WORKERS": str(workers),
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


def open_echo(port: int, hello: bytes) -> socket.socket:
    """An app connection through the sidecars, shown open by an echoed `hello`."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(hello)
    got = b""
    while len(got) < len(hello):
        chunk = s.recv(65536)
        assert chunk, f"closed before echoing {hello!r}"
        got += chunk
    assert got == hello
    return s


def still_open(s: socket.socket, probe: bytes) -> bool:
    try:
        s.sendall(probe)
        return s.recv(65536) == probe
    except OSError:
        return False


def was_cut(s: socket.socket) -> bool:
    s.settimeout(10)
    try:
        return s.recv(65536) == b""
    except OSError:
        return True


def policy_test(candidate: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`mtls-sidecar policy test --policy candidate ARGS...` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "policy", "test", "--policy", str(candidate)]
        + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def replace(path: Path, text: str) -> None:
    """Write `path` as config managers do: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


BOTH = f"[{TD}/client, {TD}/ns/other/sa/stranger]"
OPEN_ALL = f"""\
default: deny
inbound:
  api: {{allow: {BOTH}}}
  admin: {{allow: {BOTH}}}
  ops: {{allow: {BOTH}}}
"""
NARROWED = f"""\
default: deny
inbound:
  api: {{allow: [{TD}/client]}}
  admin: {{allow: [{TD}/ns/other/sa/stranger]}}
  ops: {{allow: {BOTH}}}
"""


def test_a_live_change_cuts_exactly_the_denied_connections(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    # Two workers: the master hands the new policy to each, and each cuts its own.
    with mesh(pki, tmp_path, echo, OPEN_ALL, workers=2) as m:
        inbound = m.inbound
        conns = {
            ("client", "api"): open_echo(m.client_ports["api"], b"1"),  # pooled stream
            ("client", "admin"): open_echo(m.client_ports["admin"], b"2"),  # pooled stream
            ("stranger", "api"): open_echo(m.stranger_ports["api"], b"3"),  # one-to-one
            ("stranger", "admin"): open_echo(m.stranger_ports["admin"], b"4"),  # one-to-one
        }
        try:
            replace(m.policy, NARROWED)
            rejected = "mtls_connections_rejected_total"
            for route in ("api", "admin"):
                got = inbound.wait_metric(
                    rejected, 1, timeout=15, route=route, reason="policy_changed"
                )
                assert got == 1, inbound.logs()
            assert was_cut(conns[("client", "admin")])
            assert was_cut(conns[("stranger", "api")])
            assert still_open(conns[("client", "api")], b"still")
            assert still_open(conns[("stranger", "admin")], b"still")
            assert inbound.metric("mtls_policy_reloads_total", result="ok") == 2

            events = inbound.log_events()
            changed = [e for e in events if e.get("event") == "policy_changed"]
            assert sorted((e["route"], e["msg"].split(": ", 1)[1]) for e in changed) == [
                (
                    "admin",
                    f"peer identity {TD}/client is not allowed on route admin by policy rule "
                    "inbound.admin (MTLS_POLICY_FILE) (the policy changed)",
                ),
                (
                    "api",
                    f"peer identity {TD}/ns/other/sa/stranger is not allowed on route api by "
                    "policy rule inbound.api (MTLS_POLICY_FILE) (the policy changed)",
                ),
            ]
            outcomes = {
                (e["route"], e["peer_identity"]): (e["outcome"], e["policy_rule"], e["pooled"])
                for e in events
                if e.get("event") == "conn_closed"
            }
            assert outcomes == {
                ("admin", f"{TD}/client"): ("policy_changed", "inbound.admin", True),
                ("api", f"{TD}/ns/other/sa/stranger"): ("policy_changed", "inbound.api", False),
            }
            # New connections and streams are judged by the new policy at once.
            assert call(m.client_ports["admin"], b"new") == b""
            assert call(m.stranger_ports["admin"], b"new") == b"new"

            # A broken file keeps the policy in force: counted and logged (line, reason).
            replace(m.policy, NARROWED.replace("default: deny", "default: nobody"))
            reloads = "mtls_policy_reloads_total"
            assert inbound.wait_metric(reloads, 1, timeout=15, result="error") == 1
            refused = [e for e in inbound.log_events() if e.get("event") == "policy_refused"]
            assert refused[0]["error"] == (
                f"{m.policy}: line 1: default must be 'allow' or 'deny', not 'nobody'"
            )
            assert still_open(conns[("client", "api")], b"kept")
            assert call(m.client_ports["api"], b"ok") == b"ok"
            assert call(m.client_ports["admin"], b"no") == b""
            # SIGHUP reads the file again (still broken: refused again).
            inbound.signal(signal.SIGHUP)
            assert inbound.wait_metric(reloads, 2, timeout=15, result="error") == 2
            assert inbound.metric(reloads, result="ok") == 2
            assert "Traceback" not in inbound.logs()
        finally:
            for s in conns.values():
                s.close()


def test_replay_gives_the_verdicts_of_live_enforcement(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    callers = ("client", "stranger")
    identity = {"client": f"{TD}/client", "stranger": f"{TD}/ns/other/sa/stranger"}
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(NARROWED)
    with mesh(pki, tmp_path, echo, OPEN_ALL) as m:
        ports = {"client": m.client_ports, "stranger": m.stranger_ports}
        # Traffic under the open policy: every caller on every route, logged as it ends.
        for caller in callers:
            for route in ROUTES:
                assert call(ports[caller][route], b"past") == b"past"

        def closed() -> int:
            return sum(1 for e in m.inbound.log_events() if e.get("event") == "conn_closed")

        assert wait_for(lambda: closed() == 6), m.inbound.logs()

        # The candidate, tried on those logs.
        run = policy_test(candidate, m.inbound.log_path, "--format", "json")
        assert run.returncode == 1, run.stderr
        result = json.loads(run.stdout)
        replayed = {(v["route"], v["peer_identity"]): v["decision"] for v in result["verdicts"]}
        assert result["never_matched"] == []

        # The same candidate enforced live, the same traffic again.
        replace(m.policy, NARROWED)
        assert m.inbound.wait_metric("mtls_policy_reloads_total", 2, timeout=15, result="ok") == 2
        live = {}
        for caller in callers:
            for route in ROUTES:
                ok = call(ports[caller][route], b"again") == b"again"
                live[(route, identity[caller])] = "allow" if ok else "deny"
        assert replayed == live
        assert sorted(k for k, v in live.items() if v == "deny") == [
            ("admin", f"{TD}/client"),
            ("api", f"{TD}/ns/other/sa/stranger"),
        ]
        refused = {
            (e["route"], e["peer_identity"])
            for e in m.inbound.log_events()
            if e.get("reason") == "peer_not_allowed"
        }
        assert refused == {k for k, v in live.items() if v == "deny"}

        # A candidate that allows everything seen replays clean: exit 0.
        everyone = tmp_path / "everyone.yaml"
        everyone.write_text(OPEN_ALL)
        run = policy_test(everyone, m.inbound.log_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "result: no connection would be denied" in run.stdout


def test_allow_peers_beside_a_policy_file_is_ignored_with_a_warning(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"default: deny\ninbound:\n  api: {{allow: [{TD}/client]}}\n")
    port = free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"api=127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_POLICY_FILE": str(policy),
            "MTLS_ALLOW_PEERS": f"{TD}/ns/other/**",  # would refuse the client
        },
        tmp_path / "inbound.log",
    )
    out = free_port()
    client = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"api=127.0.0.1:{out}=127.0.0.1:{port}@{TD}/server",
        },
        tmp_path / "client.log",
    )
    with running(inbound, client):
        inbound.wait_ready()
        client.wait_ready()
        assert call(out, b"file decides") == b"file decides"
        (warning,) = [e for e in inbound.log_events() if e.get("event") == "allow_peers_ignored"]
        assert warning["level"] == "warning"
        assert warning["msg"] == (
            "both MTLS_POLICY_FILE and MTLS_ALLOW_PEERS are set: the policy file decides who "
            f"may connect inbound, MTLS_ALLOW_PEERS ({TD}/ns/other/**) is ignored"
        )
