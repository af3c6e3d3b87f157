"""Outbound rules of the policy file (MTLS_POLICY_FILE) enforced by real sidecar processes:
destinations judged before dialling, the remote's identity after the handshake (pooled
streams and one connection per connection alike), dry-run, a live change cutting open
outbound connections, and `policy test` over outbound log lines."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import Sidecar, TcpApp, free_port, identity_env, running, wait_for
from .test_policy_live import call, open_echo, policy_test, replace, still_open, was_cut

SERVER = f"{TD}/server"
STRANGER = f"{TD}/ns/other/sa/stranger"
# Outbound routes of the callers: name -> which inbound sidecar it dials.
ROUTES = {"db": "server", "db2": "server", "wide": "server", "rogue": "other", "dry": "other"}


@dataclass
class Mesh:
    """Two inbound sidecars in front of the echo app, `server` (identity server) and
    `other` (identity stranger), and two callers with the same outbound routes and policy:
    `client` (pooled streams) and `lone` (MTLS_CONNECTION_REUSE=false)."""

    server: Sidecar
    other: Sidecar
    client: Sidecar
    lone: Sidecar
    client_ports: dict[str, int]
    lone_ports: dict[str, int]
    inbound_ports: dict[str, int]
    policy: Path
    sink: socket.socket  # where route `blocked` points: a listener nobody should reach

    @property
    def sink_port(self) -> int:
        return int(self.sink.getsockname()[1])


def policy_text(ports: dict[str, int], *, db_peer: str = SERVER, dry: bool = True) -> str:
    a = ports["server"]
    return f"""\
default: allow
outbound_default: deny
outbound:
  db:
    allow:
      - {{to: "127.0.0.1:{a}", peers: [{db_peer}]}}
  db2:                      # the same destination and pool as db, another identity
    allow:
      - {{to: "127.0.0.1:{a}", peers: [{STRANGER}]}}
  wide:
    allow:
      - {{to: "127.0.0.0/8:{a}", peers: [{SERVER}]}}
  rogue:                    # a destination allowed, but only for the server's identity
    allow:
      - {{to: "127.0.0.0/8:*", peers: [{SERVER}]}}
  dry:
    allow: []
    dry_run: {"true" if dry else "false"}
"""


@contextlib.contextmanager
def mesh(pki: Pki, tmp: Path, echo: TcpApp, extra_routes: str = "") -> Iterator[Mesh]:
    inbound_ports = {"server": free_port(), "other": free_port()}
    policy = tmp / "policy.yaml"
    policy.write_text(policy_text(inbound_ports))
    server, other = (
        Sidecar(
            {
                **identity_env(ident),
                "MTLS_INBOUND": f"api=127.0.0.1:{inbound_ports[name]}=127.0.0.1:{echo.port}",
            },
            tmp / f"{name}.log",
        )
        for name, ident in (("server", pki.server), ("other", pki.stranger))
    )
    sink = socket.socket()
    sink.bind(("127.0.0.1", free_port()))
    sink.listen(16)
    sink.setblocking(False)
    callers = []
    ports: list[dict[str, int]] = []
    for name, extra in (("client", {}), ("lone", {"MTLS_CONNECTION_REUSE": "false"})):
        out = {r: free_port() for r in (*ROUTES, "blocked")}
        ports.append(out)
        routes = [
            f"{r}=127.0.0.1:{out[r]}=127.0.0.1:{inbound_ports[target]}"
            for r, target in ROUTES.items()
        ]
        # Not in the policy, so outbound_default (deny): never dialled.
        routes.append(f"blocked=127.0.0.1:{out['blocked']}=127.0.0.1:{sink.getsockname()[1]}")
        callers.append(
            Sidecar(
                {
                    **identity_env(pki.client),
                    "MTLS_OUTBOUND": ",".join(routes),
                    "MTLS_POLICY_FILE": str(policy),
                    **extra,
                },
                tmp / f"{name}.log",
            )
        )
    with sink, running(server, other, *callers):
        for sc in (server, other, *callers):
            sc.wait_ready()
        yield Mesh(
            server, other, callers[0], callers[1], ports[0], ports[1], inbound_ports, policy, sink
        )


REJECTED = "mtls_connections_rejected_total"
DECISIONS = "mtls_policy_decisions_total"


def test_destinations_and_identities_are_judged(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    with mesh(pki, tmp_path, echo) as m:
        for name, ports in (("client", m.client_ports), ("lone", m.lone_ports)):
            assert call(ports["db"], b"db") == b"db", name
            assert call(ports["wide"], b"wide") == b"wide", name
            assert call(ports["dry"], b"dry") == b"dry", name  # denied, but dry-run
            assert call(ports["blocked"], b"blocked") == b"", name
            assert call(ports["rogue"], b"rogue") == b"", name
            assert call(ports["db2"], b"db2") == b"", name

        for caller in (m.client, m.lone):
            assert caller.wait_metric(REJECTED, 1, route="blocked", reason="policy_denied") == 1
            assert caller.metric(REJECTED, route="rogue", reason="policy_denied") == 1
            assert caller.metric(REJECTED, route="db2", reason="policy_denied") == 1
            assert caller.metric(REJECTED, route="dry") == 0
            assert caller.metric(REJECTED, route="db") == 0
            labels = {"direction": "outbound"}
            assert caller.metric(DECISIONS, route="db", decision="allow", **labels) == 1
            assert caller.metric(DECISIONS, route="blocked", decision="deny", **labels) == 1
            assert caller.metric(DECISIONS, route="dry", decision="deny", dry_run="true") == 1
            assert caller.metric(DECISIONS, route="dry", decision="allow") == 0  # counted once
            assert caller.metric(DECISIONS, route="db", direction="inbound") == 0

            events = caller.log_events()
            refused = {e["route"]: e["msg"] for e in events if e.get("reason") == "policy_denied"}
            a, b = m.inbound_ports["server"], m.inbound_ports["other"]
            assert refused["blocked"].endswith(
                f"destination 127.0.0.1:{m.sink_port} is not allowed on outbound route blocked "
                "by policy rule outbound_default (MTLS_POLICY_FILE)"
            )
            assert refused["rogue"].endswith(
                f"remote identity {STRANGER} at 127.0.0.1:{b} is not allowed on outbound route "
                "rogue by policy rule outbound.rogue.peers (MTLS_POLICY_FILE)"
            )
            assert f"remote identity {SERVER} at 127.0.0.1:{a}" in refused["db2"]
            dry = [e for e in events if e.get("event") == "policy_dry_run_deny"]
            assert [(e["direction"], e["route"], e["rule"]) for e in dry] == [
                ("outbound", "dry", "outbound.dry.to")
            ]
            closed = {
                e["route"]: (e["policy_route"], e["policy_rule"], e["peer_identity"], e["target"])
                for e in events
                if e.get("event") == "conn_closed"
            }
            assert closed == {
                "db": ("db", "outbound.db.allow[0]", SERVER, f"127.0.0.1:{a}"),
                "wide": ("wide", "outbound.wide.allow[0]", SERVER, f"127.0.0.1:{a}"),
                "dry": ("dry", "outbound.dry.to", STRANGER, f"127.0.0.1:{b}"),
            }
            assert "Traceback" not in caller.logs()

        # The blocked destination was refused before dialling (a dial would have completed
        # in the listener's backlog before the refusal was counted).
        with pytest.raises(BlockingIOError):
            m.sink.accept()


def test_a_denied_pooled_stream_is_never_opened(pki: Pki, tmp_path: Path, echo: TcpApp) -> None:
    with mesh(pki, tmp_path, echo) as m:
        c = m.client
        assert call(m.client_ports["db"], b"first") == b"first"  # makes the pooled connection
        assert m.server.wait_metric("mtls_connections_total", 1, direction="inbound") == 1
        handshakes = c.metric("mtls_handshakes_total", direction="outbound")
        assert call(m.client_ports["db2"], b"denied") == b""
        assert c.wait_metric(REJECTED, 1, route="db2", reason="policy_denied") == 1
        # No new handshake (the pooled connection's identity was judged), and the server
        # never saw a stream for it.
        assert c.metric("mtls_handshakes_total", direction="outbound") == handshakes
        assert call(m.client_ports["db"], b"again") == b"again"

        def server_closed() -> list[str]:
            events = m.server.log_events()
            return [e["outcome"] for e in events if e.get("event") == "conn_closed"]

        # Streams are handled in order: by the time the second allowed one has ended, a
        # stream opened for db2 would have ended too (reset: outcome peer_reset).
        assert wait_for(lambda: server_closed().count("ok") == 2), m.server.logs()
        assert server_closed() == ["ok", "ok"]
        (refusal,) = [e for e in c.log_events() if e.get("reason") == "policy_denied"]
        assert refusal["route"] == "db2" and refusal["peer_identity"] == SERVER


def test_a_live_change_cuts_exactly_the_denied_outbound_connections(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    with mesh(pki, tmp_path, echo) as m:
        conns = {
            ("client", "db"): open_echo(m.client_ports["db"], b"1"),  # pooled stream
            ("lone", "db"): open_echo(m.lone_ports["db"], b"2"),  # one-to-one
            ("client", "dry"): open_echo(m.client_ports["dry"], b"3"),  # dry-run: let in
            ("client", "wide"): open_echo(m.client_ports["wide"], b"4"),
            ("lone", "wide"): open_echo(m.lone_ports["wide"], b"5"),
        }
        try:
            # db now only for the stranger (the server's identity is denied); dry enforced.
            replace(m.policy, policy_text(m.inbound_ports, db_peer=STRANGER, dry=False))
            for caller in (m.client, m.lone):
                got = caller.wait_metric(
                    REJECTED, 1, timeout=15, route="db", reason="policy_changed"
                )
                assert got == 1, caller.logs()
            assert m.client.wait_metric(
                REJECTED, 1, timeout=15, route="dry", reason="policy_changed"
            )
            for key in (("client", "db"), ("lone", "db"), ("client", "dry")):
                assert was_cut(conns[key]), key
            for key in (("client", "wide"), ("lone", "wide")):
                assert still_open(conns[key], b"still"), key

            changed = {
                e["route"]: e["msg"]
                for e in m.client.log_events()
                if e.get("event") == "policy_changed"
            }
            b = m.inbound_ports["other"]
            assert sorted(changed) == ["db", "dry"]
            assert changed["db"].endswith(
                f"remote identity {SERVER} at 127.0.0.1:{m.inbound_ports['server']} is not "
                "allowed on outbound route db by policy rule outbound.db.peers "
                "(MTLS_POLICY_FILE) (the policy changed)"
            )
            assert changed["dry"].endswith(
                f"destination 127.0.0.1:{b} is not allowed on outbound route dry by policy rule "
                "outbound.dry.to (MTLS_POLICY_FILE) (the policy changed)"
            )
            outcomes = {
                e["route"]: (e["outcome"], e["policy_rule"], e["pooled"])
                for e in m.client.log_events()
                if e.get("event") == "conn_closed"
            }
            assert outcomes == {
                "db": ("policy_changed", "outbound.db.peers", True),
                "dry": ("policy_changed", "outbound.dry.to", True),
            }
            # New connections are judged by the new policy at once.
            assert call(m.client_ports["db"], b"new") == b""
            assert call(m.client_ports["dry"], b"new") == b""
            assert call(m.client_ports["wide"], b"new") == b"new"
            assert "Traceback" not in m.client.logs() + m.lone.logs()
        finally:
            for s in conns.values():
                s.close()


def test_replay_of_outbound_lines_gives_the_verdicts_of_live_enforcement(
    pki: Pki, tmp_path: Path, echo: TcpApp
) -> None:
    with mesh(pki, tmp_path, echo) as m:
        ports = m.lone_ports
        open_all = "default: allow\noutbound_default: allow\n"
        replace(m.policy, open_all)
        assert m.lone.wait_metric("mtls_policy_reloads_total", 2, timeout=15, result="ok") == 2
        for route in ROUTES:
            assert call(ports[route], b"past") == b"past", route

        def closed() -> int:
            return sum(1 for e in m.lone.log_events() if e.get("event") == "conn_closed")

        assert wait_for(lambda: closed() == len(ROUTES)), m.lone.logs()

        candidate = tmp_path / "candidate.yaml"
        candidate.write_text(policy_text(m.inbound_ports, dry=False))
        run = policy_test(candidate, m.lone.log_path, "--format", "json")
        assert run.returncode == 1, run.stderr
        result = json.loads(run.stdout)
        replayed = {
            v["route"]: v["decision"] for v in result["verdicts"] if v["direction"] == "outbound"
        }
        assert len(replayed) == len(ROUTES)

        # The same candidate enforced live, the same traffic again.
        replace(m.policy, candidate.read_text())
        assert m.lone.wait_metric("mtls_policy_reloads_total", 3, timeout=15, result="ok") == 3
        live = {
            route: "allow" if call(ports[route], b"again") == b"again" else "deny"
            for route in ROUTES
        }
        assert replayed == live
        assert sorted(r for r, v in live.items() if v == "deny") == ["db2", "dry", "rogue"]
        refused = {e["route"] for e in m.lone.log_events() if e.get("reason") == "policy_denied"}
        assert refused == {"db2", "dry", "rogue"}

        # A candidate allowing all that was seen replays clean.
        everyone = tmp_path / "everyone.yaml"
        everyone.write_text(open_all)
        run = policy_test(everyone, m.lone.log_path, "--format", "json")
        assert run.returncode == 0, run.stdout + run.stderr
