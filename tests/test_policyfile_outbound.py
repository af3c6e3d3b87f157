"""Tests for the outbound part of proxy.policyfile: the `to` grammar, the decision table
before dialling and after the handshake, parse errors (line and reason), the JSON Schema, and
the replay of outbound conn_closed lines."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from proxy.errors import PolicyDenied
from proxy.identity import SpiffeId, parse_spiffe_id
from proxy.policy import check_outbound
from proxy.policyfile import (
    Decision,
    PolicyFileError,
    all_rules,
    decide_destination,
    decide_outbound,
    outbound_check,
    parse_destination,
    parse_policy,
)
from proxy.policyreplay import connections, replay, report

SCHEMA = json.loads((Path(__file__).parent.parent / "deploy" / "policy.schema.json").read_text())
TD = "spiffe://corp.example"

POLICY = f"""\
default: allow
outbound_default: deny
outbound:
  db:
    allow:
      - to: 10.1.0.0/16:5432
        peers: [{TD}/ns/db/*]
      - to: [db.internal:8443, "[fd00::/8]:*"]
  web:
    allow:
      - to: "*:443"
        peers: [{TD}/ns/web/**]
    dry_run: true
  "5432":                # transparent mode: the destination port
    allow: [{{to: 10.0.0.0/8}}]
  "*":
    allow: [{{peers: [{TD}/ns/shared/*]}}]
"""

DESTINATIONS = [
    # route, host, port, (allow, rule, dry_run)
    ("db", "10.1.2.3", 5432, (True, "outbound.db.allow[0]", False)),
    ("db", "10.1.2.3", 5433, (False, "outbound.db.to", False)),
    ("db", "10.2.0.1", 5432, (False, "outbound.db.to", False)),
    ("db", "::ffff:10.1.0.9", 5432, (True, "outbound.db.allow[0]", False)),
    ("db", "DB.internal.", 8443, (True, "outbound.db.allow[1]", False)),
    ("db", "db.internal", 8444, (False, "outbound.db.to", False)),
    ("db", "fd00::7", 1, (True, "outbound.db.allow[1]", False)),
    ("db", "db.other", 5432, (False, "outbound.db.to", False)),  # a name is never a CIDR
    ("web", "192.0.2.1", 443, (True, "outbound.web.allow[0]", True)),
    ("web", "192.0.2.1", 80, (False, "outbound.web.to", True)),
    ("5432", "10.9.9.9", 5432, (True, "outbound.5432.allow[0]", False)),
    ("5432", "192.168.1.1", 5432, (False, "outbound.5432.to", False)),
    ("other", "203.0.113.5", 22, (True, "outbound.*.allow[0]", False)),  # no `to`: anywhere
]


@pytest.mark.parametrize(("route", "host", "port", "want"), DESTINATIONS)
def test_destination_table(route: str, host: str, port: int, want: tuple[bool, str, bool]) -> None:
    assert decide_destination(parse_policy(POLICY), route, host, port) == Decision(*want)


IDENTITIES = [
    # route, host, port, peer path, (allow, rule, dry_run)
    ("db", "10.1.2.3", 5432, "/ns/db/main", (True, "outbound.db.allow[0]", False)),
    ("db", "10.1.2.3", 5432, "/ns/web/x", (False, "outbound.db.peers", False)),
    ("db", "10.1.2.3", 5433, "/ns/db/main", (False, "outbound.db.to", False)),
    ("db", "db.internal", 8443, "/anyone", (True, "outbound.db.allow[1]", False)),
    ("web", "192.0.2.1", 443, "/ns/web/a/b", (True, "outbound.web.allow[0]", True)),
    ("web", "192.0.2.1", 443, "/ns/db/main", (False, "outbound.web.peers", True)),
    ("other", "203.0.113.5", 22, "/ns/shared/x", (True, "outbound.*.allow[0]", False)),
    ("other", "203.0.113.5", 22, "/ns/shared/x/y", (False, "outbound.*.peers", False)),
]


@pytest.mark.parametrize(("route", "host", "port", "peer", "want"), IDENTITIES)
def test_identity_table(
    route: str, host: str, port: int, peer: str, want: tuple[bool, str, bool]
) -> None:
    got = decide_outbound(parse_policy(POLICY), route, host, port, parse_spiffe_id(TD + peer))
    assert got == Decision(*want)


def test_outbound_default_and_files_without_outbound() -> None:
    peer = parse_spiffe_id(TD + "/x")
    inbound_only = parse_policy("default: deny\n")
    assert decide_destination(inbound_only, "db", "10.0.0.1", 1) is None
    assert decide_outbound(inbound_only, "db", "10.0.0.1", 1, peer) is None
    allow_all = parse_policy("default: deny\noutbound_default: allow\n")
    assert decide_outbound(allow_all, "db", "10.0.0.1", 1, peer) == Decision(
        True, "outbound_default", False
    )
    deny_dry = parse_policy("default: deny\ndry_run: true\noutbound_default: deny\noutbound:\n")
    assert decide_destination(deny_dry, "x", "10.0.0.1", 1) == Decision(
        False, "outbound_default", True
    )
    assert all_rules(allow_all) == ["outbound_default"]
    assert all_rules(parse_policy(POLICY))[-1] == "outbound.*.allow[0]"


def test_the_outbound_check_runs_the_route_check_first_and_decides_once() -> None:
    policy = parse_policy(POLICY)
    seen: list[tuple[SpiffeId, Decision]] = []
    expected = parse_spiffe_id(TD + "/ns/db/main")

    def base(peer: SpiffeId | None) -> None:
        check_outbound(peer, expected, "corp.example")

    check = outbound_check(policy, "db", ("10.1.2.3", 5432), base, lambda p, d: seen.append((p, d)))
    check(expected)
    check(expected)  # the handshake and its end both ask: one verdict
    assert seen == [(expected, Decision(True, "outbound.db.allow[0]", False))]
    with pytest.raises(PolicyDenied) as info:
        check(parse_spiffe_id(TD + "/ns/web/x"))
    assert info.value.reason == "identity_mismatch"  # the route's own expectation comes first
    loose = outbound_check(
        policy, "db", ("10.1.2.3", 5432), lambda p: None, lambda p, d: seen.append((p, d))
    )
    with pytest.raises(PolicyDenied) as info:
        loose(parse_spiffe_id(TD + "/ns/web/x"))
    assert info.value.reason == "policy_denied"
    assert str(info.value) == (
        f"remote identity {TD}/ns/web/x at 10.1.2.3:5432 is not allowed on outbound route db "
        "by policy rule outbound.db.peers (MTLS_POLICY_FILE)"
    )
    dry = outbound_check(policy, "web", ("192.0.2.1", 443), lambda p: None, lambda p, d: None)
    dry(parse_spiffe_id(TD + "/ns/db/main"))  # a dry-run deny lets it through


def test_destination_grammar() -> None:
    d = parse_destination("10.0.0.0/8:8000-8999")
    assert (d.network is not None, d.ports) == (True, (8000, 8999))
    assert parse_destination("2001:db8::/32").ports is None
    assert parse_destination("[2001:db8::1]:443").matches("2001:db8::1", 443)
    assert parse_destination("*").matches("anything", 1)
    assert parse_destination("*:*").matches("10.0.0.1", 65535)
    assert parse_destination("10.0.0.1").matches("10.0.0.1", 7)
    assert not parse_destination("10.0.0.1").matches("10.0.0.2", 7)
    for bad, words in (
        ("", "empty"),
        ("10.0.0.0/33:80", "neither an address range"),
        ("10.0.0.0/8:http", "is not a port"),
        ("10.0.0.0/8:0", "1-65535"),
        ("10.0.0.0/8:9-8", "1-65535"),
        ("[fd00::/8", "without ']'"),
        ("[fd00::/8]443", "followed by ':PORT'"),
        ("bad_name!:80", "neither an address range"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_destination(bad)


BAD = [
    (
        "default: deny\noutbound:\n  db: {allow: []}\n",
        "line 2: outbound rules need 'outbound_default: allow' or 'outbound_default: deny'",
    ),
    (
        "default: deny\noutbound_default: maybe\n",
        "line 2: outbound_default must be 'allow' or 'deny', not 'maybe'",
    ),
    ("default: deny\noutbound_default: deny\noutbound: [a]\n", "line 3: outbound must be a map"),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db: {}\n",
        "line 4: outbound.db has no 'allow' list",
    ),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db:\n    allow:\n      - {}\n",
        "line 6: outbound.db.allow[0] names neither 'to' nor 'peers'",
    ),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db:\n    allow:\n"
        "      - to: 10.0.0.0/8\n      - to: [10.0.0.0/8, nope!]\n",
        "line 7: outbound.db.allow[1].to: 'nope!' is neither an address range",
    ),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db:\n    allow:\n"
        "      - peers: [spiffe://*/x]\n",
        "line 6: outbound.db.allow[0].peers: pattern 'spiffe://*/x'",
    ),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db:\n    allow:\n"
        "      - {to: '*', from: x}\n",
        "line 6: outbound.db.allow[0]: unknown key 'from' (known: to, peers)",
    ),
    (
        "default: deny\noutbound_default: deny\noutbound:\n  db: {allow: [], source_cidrs: []}\n",
        "line 4: outbound.db: unknown key 'source_cidrs' (known: allow, dry_run)",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_outbound_rules_name_the_line_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text)
    assert message in str(info.value)


def test_the_json_schema_agrees_with_the_parser() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert not list(validator.iter_errors(yaml.safe_load(POLICY)))
    for text, message in BAD:
        if "neither an address" in message or "pattern" in message:
            continue  # values the parser checks beyond the schema
        assert list(validator.iter_errors(yaml.safe_load(text))), text


def test_describe_shows_the_outbound_rules() -> None:
    described = parse_policy(POLICY).describe()
    assert described["outbound_default"] == "deny"
    outbound = described["outbound"]
    assert isinstance(outbound, dict)
    assert outbound["db"] == {
        "allow": [
            {"to": ["10.1.0.0/16:5432"], "peers": [f"{TD}/ns/db/*"]},
            {"to": ["db.internal:8443", "[fd00::/8]:*"], "peers": None},
        ],
        "dry_run": False,
    }
    assert outbound["web"]["dry_run"] is True
    assert outbound["*"]["allow"] == [{"to": None, "peers": [f"{TD}/ns/shared/*"]}]


def _closed(route: str, target: str, identity: str | None, **extra: object) -> str:
    return json.dumps(
        {
            "event": "conn_closed",
            "direction": "outbound",
            "route": route,
            "policy_route": route,
            "peer": "127.0.0.1:40000",
            "peer_identity": identity,
            "target": target,
            "security": "mtls" if identity else "plaintext",
            "outcome": "ok",
            **extra,
        }
    )


def test_replay_judges_outbound_lines_by_destination_and_identity() -> None:
    lines = [
        _closed("db", "10.1.2.3:5432", f"{TD}/ns/db/main"),
        _closed("db", "10.1.2.3:5432", f"{TD}/ns/db/main"),
        _closed("db", "10.1.2.3:5432", f"{TD}/ns/web/x"),
        _closed("db", "10.7.0.1:5432", None),  # plaintext fallback: destination only
        _closed("db", "[fd00::5]:99", None),
        _closed("web", "192.0.2.1:443", f"{TD}/ns/db/main"),
        _closed("db", "no port", f"{TD}/ns/db/main"),  # unreadable target: skipped
    ]
    result = replay(parse_policy(POLICY), connections(lines))
    got = [
        (v.direction, v.route, v.destination, v.peer_identity, v.decision.rule, v.connections)
        for v in result.verdicts
    ]
    assert got == [
        ("outbound", "db", "10.1.2.3:5432", f"{TD}/ns/db/main", "outbound.db.allow[0]", 2),
        ("outbound", "db", "10.1.2.3:5432", f"{TD}/ns/web/x", "outbound.db.peers", 1),
        ("outbound", "db", "10.7.0.1:5432", None, "outbound.db.to", 1),
        ("outbound", "db", "[fd00::5]:99", None, "outbound.db.allow[1]", 1),
        ("outbound", "web", "192.0.2.1:443", f"{TD}/ns/db/main", "outbound.web.peers", 1),
    ]
    assert result.connections == 6 and result.denied == 2  # the web deny is dry-run
    assert "outbound.5432.allow[0]" in result.never_matched
    text = report(result, "p.yaml")
    assert "outbound route db:" in text
    assert f"DENY                   10.1.2.3:5432 {TD}/ns/web/x  1 connection(s)" in text
    assert "10.7.0.1:5432 (plaintext)" in text
    assert json.loads(json.dumps(result.to_json()))["verdicts"][0]["destination"] == (
        "10.1.2.3:5432"
    )
    # A candidate that says nothing of outbound judges none of them.
    inbound_only = replay(parse_policy("default: deny\n"), connections(lines))
    assert inbound_only.connections == 0 and inbound_only.skipped_not_judged == 6
    assert "6 outbound (the policy has no outbound rules" in report(inbound_only, "p.yaml")
