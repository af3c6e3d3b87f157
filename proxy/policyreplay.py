"""Replay past inbound connections (conn_closed log lines) against a candidate policy (pure)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .identity import parse_spiffe_id
from .policyfile import Decision, Policy, all_rules, decide


@dataclass(frozen=True)
class Verdict:
    """Past connections of one peer identity on one route, and what the policy says."""

    route: str
    peer_identity: str
    decision: Decision
    connections: int


@dataclass
class Replay:
    """What `policy test` found: verdicts, the rules never matched, what was skipped."""

    verdicts: list[Verdict] = field(default_factory=list)
    never_matched: list[str] = field(default_factory=list)
    connections: int = 0
    skipped_no_identity: int = 0  # plaintext (permissive/audit): the policy judges identities

    @property
    def denied(self) -> int:
        """Past connections the candidate would refuse (dry-run denies not included)."""
        return sum(v.connections for v in self.verdicts if v.decision.enforced_deny)

    def to_json(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "denied": self.denied,
            "skipped_no_identity": self.skipped_no_identity,
            "verdicts": [
                {
                    "route": v.route,
                    "peer_identity": v.peer_identity,
                    "decision": v.decision.label,
                    "rule": v.decision.rule,
                    "dry_run": v.decision.dry_run,
                    "connections": v.connections,
                }
                for v in self.verdicts
            ],
            "never_matched": self.never_matched,
        }


def source_ip(peer: object) -> str | None:
    """The address of a log line's `peer` ('10.0.0.1:5555', '[::1]:5555')."""
    if not isinstance(peer, str) or ":" not in peer:
        return None
    host = peer.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def inbound_connections(lines: Iterable[str]) -> Iterable[dict[str, object]]:
    """The inbound conn_closed records among log lines (other lines and text are skipped)."""
    for line in lines:
        if '"conn_closed"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and record.get("event") == "conn_closed"
            and record.get("direction") == "inbound"
        ):
            yield record


def replay(policy: Policy, records: Iterable[dict[str, object]]) -> Replay:
    """Judge each past inbound connection as `policy` would have, grouped by route, peer
    identity and verdict (a rule with source_cidrs can judge one identity two ways)."""
    out = Replay()
    counts: dict[tuple[str, str, Decision], int] = {}
    matched: set[str] = set()
    for record in records:
        route = record.get("policy_route") or record.get("route")
        identity = record.get("peer_identity")
        if not isinstance(route, str):
            continue
        try:
            peer = parse_spiffe_id(identity) if isinstance(identity, str) else None
        except ValueError:
            peer = None
        if peer is None:
            out.skipped_no_identity += 1
            continue
        out.connections += 1
        decision = decide(policy, route, peer, source_ip(record.get("peer")))
        if decision.allow:
            matched.add(decision.rule)
        key = (route, str(peer), decision)
        counts[key] = counts.get(key, 0) + 1
    out.verdicts = [
        Verdict(route, peer, decision, n)
        for (route, peer, decision), n in sorted(
            counts.items(), key=lambda item: (item[0][0], item[0][1], item[0][2].rule)
        )
    ]
    out.never_matched = [rule for rule in all_rules(policy) if rule not in matched]
    return out


def report(result: Replay, policy_name: str) -> str:
    """The human-readable report of `policy test`."""
    lines = [
        f"{result.connections} past inbound connection(s) judged against {policy_name}"
        + (
            f" ({result.skipped_no_identity} without a peer identity skipped)"
            if result.skipped_no_identity
            else ""
        )
    ]
    route = None
    for v in result.verdicts:
        if v.route != route:
            route = v.route
            lines.append(f"route {route}:")
        d = v.decision
        word = "allow" if d.allow else ("would deny (dry run)" if d.dry_run else "DENY")
        lines.append(f"  {word:<22} {v.peer_identity}  {v.connections} connection(s)  [{d.rule}]")
    if result.never_matched:
        lines.append("rules that never matched: " + ", ".join(result.never_matched))
    else:
        lines.append("every rule matched at least one connection")
    lines.append(
        f"result: {result.denied} connection(s) would be denied"
        if result.denied
        else "result: no connection would be denied"
    )
    return "\n".join(lines) + "\n"
