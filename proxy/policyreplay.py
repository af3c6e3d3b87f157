"""Replay past connections (conn_closed log lines) against a candidate policy (pure)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .identity import parse_spiffe_id
from .policyfile import Decision, Policy, all_rules, decide, decide_outbound, hostport


@dataclass(frozen=True)
class Verdict:
    """Past connections of one peer identity on one route (outbound: to one destination),
    and what the policy says."""

    route: str
    peer_identity: str | None  # None: outbound in plaintext (judged by destination only)
    decision: Decision
    connections: int
    direction: str = "inbound"
    destination: str | None = None  # outbound: host:port


@dataclass
class Replay:
    """What `policy test` found: verdicts, the rules never matched, what was skipped."""

    verdicts: list[Verdict] = field(default_factory=list)
    never_matched: list[str] = field(default_factory=list)
    connections: int = 0
    skipped_no_identity: int = 0  # inbound plaintext (permissive/audit): identities judged
    skipped_not_judged: int = 0  # outbound, when the policy says nothing of outbound

    @property
    def denied(self) -> int:
        """Past connections the candidate would refuse (dry-run denies not included)."""
        return sum(v.connections for v in self.verdicts if v.decision.enforced_deny)

    def to_json(self) -> dict[str, object]:
        return {
            "connections": self.connections,
            "denied": self.denied,
            "skipped_no_identity": self.skipped_no_identity,
            "skipped_not_judged": self.skipped_not_judged,
            "verdicts": [
                {
                    "direction": v.direction,
                    "route": v.route,
                    "destination": v.destination,
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


def connections(lines: Iterable[str]) -> Iterable[dict[str, object]]:
    """The conn_closed records among log lines, inbound and outbound (other lines and text
    are skipped)."""
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
            and record.get("direction") in ("inbound", "outbound")
        ):
            yield record


def destination(target: object) -> tuple[str, int] | None:
    """The (host, port) of a log line's `target` ('10.0.0.5:5432', '[fd00::5]:443')."""
    if not isinstance(target, str) or ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        return None
    return (host, number) if host and 0 < number < 65536 else None


_Key = tuple[str, str, str | None, str | None, Decision]


def _judge(
    policy: Policy, record: dict[str, object], out: Replay, own_domain: str | None
) -> _Key | None:
    route = record.get("policy_route") or record.get("route")
    identity = record.get("peer_identity")
    if not isinstance(route, str):
        return None
    try:
        peer = parse_spiffe_id(identity) if isinstance(identity, str) else None
    except ValueError:
        peer = None
    if record.get("direction") == "outbound":
        dst = destination(record.get("target"))
        if dst is None:
            return None
        # No identity: plaintext (permissive fallback), judged by its destination only.
        decision = decide_outbound(policy, route, *dst, peer)
        if decision is None:
            out.skipped_not_judged += 1
            return None
        return ("outbound", route, hostport(dst), str(peer) if peer else None, decision)
    if peer is None:
        out.skipped_no_identity += 1
        return None
    decision = decide(policy, route, peer, source_ip(record.get("peer")), own_domain)
    return ("inbound", route, None, str(peer), decision)


def replay(
    policy: Policy, records: Iterable[dict[str, object]], own_domain: str | None = None
) -> Replay:
    """Judge each past connection as `policy` would have, grouped by direction, route,
    destination (outbound), peer identity and verdict (a rule with source_cidrs can judge
    one identity two ways). Inbound lines without a peer identity (plaintext) are skipped;
    outbound ones are judged by their destination, as the running sidecar does.
    `own_domain`: the sidecar's trust domain, which an allowing default is limited to."""
    out = Replay()
    counts: dict[_Key, int] = {}
    matched: set[str] = set()
    for record in records:
        key = _judge(policy, record, out, own_domain)
        if key is None:
            continue
        out.connections += 1
        if key[4].allow:
            matched.add(key[4].rule)
        counts[key] = counts.get(key, 0) + 1
    out.verdicts = [
        Verdict(route, peer, decision, n, direction, where)
        for (direction, route, where, peer, decision), n in sorted(
            counts.items(),
            key=lambda item: (
                item[0][0],
                item[0][1],
                item[0][2] or "",
                item[0][3] or "",
                item[0][4].rule,
            ),
        )
    ]
    out.never_matched = [rule for rule in all_rules(policy) if rule not in matched]
    return out


def report(result: Replay, policy_name: str) -> str:
    """The human-readable report of `policy test`."""
    skipped = []
    if result.skipped_no_identity:
        skipped.append(f"{result.skipped_no_identity} inbound without a peer identity")
    if result.skipped_not_judged:
        skipped.append(
            f"{result.skipped_not_judged} outbound (the policy has no outbound rules or "
            "outbound_default)"
        )
    lines = [
        f"{result.connections} past connection(s) judged against {policy_name}"
        + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
    ]
    route = None
    for v in result.verdicts:
        if (v.direction, v.route) != route:
            route = (v.direction, v.route)
            lines.append(f"{'outbound ' if v.direction == 'outbound' else ''}route {v.route}:")
        d = v.decision
        word = "allow" if d.allow else ("would deny (dry run)" if d.dry_run else "DENY")
        who = v.peer_identity or "(plaintext)"
        if v.destination is not None:
            who = f"{v.destination} {who}"
        lines.append(f"  {word:<22} {who}  {v.connections} connection(s)  [{d.rule}]")
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
