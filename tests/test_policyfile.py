"""Tests for proxy.policyfile: the policy file's parser (errors name the line), the JSON
Schema that documents it, and the decision table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from proxy import __main__ as cli
from proxy.identity import parse_spiffe_id
from proxy.policyfile import (
    Decision,
    PolicyFileError,
    all_rules,
    decide,
    parse_policy,
    policy_from_bytes,
    read_policy,
)
from proxy.policyreplay import connections, replay, report

from .conftest import Pki
from .harness import identity_env

SCHEMA = json.loads((Path(__file__).parent.parent / "deploy" / "policy.schema.json").read_text())
TD = "spiffe://corp.example"

POLICY = f"""\
# the worked example of the README
default: deny
inbound:
  api:
    allow:
      - {TD}/ns/shop/*
      - {TD}/ns/ops/**
  admin:
    allow: [{TD}/ns/ops/sa/admin]
    source_cidrs: [127.0.0.0/8, "::1/128"]
  "8443":
    allow: []
    dry_run: true
"""

DECISIONS = [
    # route, peer, source ip, (allow, rule, dry_run)
    ("api", "/ns/shop/web", "10.0.0.1", (True, "inbound.api.allow[0]", False)),
    ("api", "/ns/ops/sa/x", "10.0.0.1", (True, "inbound.api.allow[1]", False)),
    ("api", "/ns/shop/web/extra", "10.0.0.1", (False, "inbound.api", False)),
    ("api", "/ns/bank/web", "10.0.0.1", (False, "inbound.api", False)),
    ("admin", "/ns/ops/sa/admin", "127.0.0.7", (True, "inbound.admin.allow[0]", False)),
    ("admin", "/ns/ops/sa/admin", "::1", (True, "inbound.admin.allow[0]", False)),
    ("admin", "/ns/ops/sa/admin", "::ffff:127.0.0.1", (True, "inbound.admin.allow[0]", False)),
    ("admin", "/ns/ops/sa/admin", "10.0.0.1", (False, "inbound.admin.source_cidrs", False)),
    ("admin", "/ns/ops/sa/admin", None, (False, "inbound.admin.source_cidrs", False)),
    ("admin", "/ns/ops/sa/other", "127.0.0.1", (False, "inbound.admin", False)),
    ("8443", "/ns/shop/web", "10.0.0.1", (False, "inbound.8443", True)),
    ("other", "/ns/shop/web", "10.0.0.1", (False, "default", False)),
]


@pytest.mark.parametrize(("route", "peer", "ip", "want"), DECISIONS)
def test_decision_table(
    route: str, peer: str, ip: str | None, want: tuple[bool, str, bool]
) -> None:
    got = decide(parse_policy(POLICY), route, parse_spiffe_id(TD + peer), ip)
    assert got == Decision(*want)
    assert got.enforced_deny == (not want[0] and not want[2])


def test_file_dry_run_and_route_override() -> None:
    text = """
dry_run: true
default: deny
inbound:
  a: {allow: []}
  b: {allow: [], dry_run: false}
"""
    policy = parse_policy(text)
    peer = parse_spiffe_id(TD + "/x")
    assert decide(policy, "a", peer, "1.2.3.4") == Decision(False, "inbound.a", True)
    assert decide(policy, "b", peer, "1.2.3.4") == Decision(False, "inbound.b", False)
    assert decide(policy, "c", peer, "1.2.3.4") == Decision(False, "default", True)


def test_default_allow_and_rules_listed() -> None:
    policy = parse_policy(f"default: allow\ninbound:\n  a: {{allow: [{TD}/x, {TD}/y]}}\n")
    assert decide(policy, "z", parse_spiffe_id(TD + "/q"), None) == Decision(True, "default", False)
    assert all_rules(policy) == ["inbound.a.allow[0]", "inbound.a.allow[1]", "default"]


def test_describe_is_the_effective_policy() -> None:
    described = parse_policy(POLICY).describe()
    assert described == {
        "dry_run": False,
        "default": "deny",
        "inbound": {
            "api": {
                "allow": [f"{TD}/ns/shop/*", f"{TD}/ns/ops/**"],
                "source_cidrs": None,
                "dry_run": False,
            },
            "admin": {
                "allow": [f"{TD}/ns/ops/sa/admin"],
                "source_cidrs": ["127.0.0.0/8", "::1/128"],
                "dry_run": False,
            },
            "8443": {"allow": [], "source_cidrs": None, "dry_run": True},
        },
        "outbound_default": None,  # outbound is not judged by this file
        "outbound": {},
    }


BAD = [
    # text, the error message (line and reason)
    ("", "the file is empty"),
    ("default: maybe\n", "line 1: default must be 'allow' or 'deny', not 'maybe'"),
    ("dry_run: false\n", "line 1: 'default: allow' or 'default: deny' is required"),
    (
        "default: deny\nallow: []\n",
        "line 2: unknown key 'allow' (known: default, dry_run, inbound, outbound_default, "
        "outbound)",
    ),
    ("default: deny\ndry_run: perhaps\n", "line 2: dry_run must be true or false, not 'perhaps'"),
    ("default: deny\ndefault: allow\n", "line 2: the policy: key 'default' appears twice"),
    ("- default\n", "line 1: the policy must be a mapping"),
    ("default: deny\ninbound: [a]\n", "line 2: inbound must be a mapping"),
    ("default: deny\ninbound:\n  a: {}\n", "line 3: inbound.a has no 'allow' list"),
    ("default: deny\ninbound:\n  a:\n    allow: x\n", "line 4: inbound.a.allow must be a list"),
    (
        "default: deny\ninbound:\n  a:\n    allow:\n      - spiffe://td/ok\n      - spiffe://*/x\n",
        "line 6: inbound.a.allow: pattern 'spiffe://*/x': the trust domain may not be a wildcard",
    ),
    (
        "default: deny\ninbound:\n  a:\n    allow: []\n    source_cidrs: [10.0.0.0/33]\n",
        "line 5: inbound.a.source_cidrs: '10.0.0.0/33' is not a CIDR",
    ),
    (
        "default: deny\ninbound:\n  a:\n    allow: []\n    deny: []\n",
        "line 5: inbound.a: unknown key 'deny' (known: allow, source_cidrs, dry_run)",
    ),
    ("default: deny\ninbound:\n  a: {allow: [\n", "line 4: not valid YAML"),
    (
        "default: !!python/object:os.system x\n",
        "line 1: YAML tag tag:yaml.org,2002:python/object:os.system is not allowed",
    ),
    ("a: " + "[" * 50 + "]" * 50 + "\n", "line 1: nested more than 20 levels deep"),
    (
        "x: &a [1]\n" + "".join(f"y{i}: *a\n" for i in range(1100)),
        "more than 1000 YAML aliases",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_files_name_the_line_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bytes_and_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match=r"^p\.yaml: not UTF-8 text"):
        policy_from_bytes(b"default: \xff\n", "p.yaml")
    with pytest.raises(PolicyFileError, match="larger than"):
        policy_from_bytes(b"#" * 1_000_001, "p.yaml")
    path = tmp_path / "policy.yaml"
    with pytest.raises(PolicyFileError, match="does not exist"):
        read_policy(path)
    path.write_text("default: deny\ninbound:\n  a: {allow: [], dry_run: maybe}\n")
    with pytest.raises(PolicyFileError) as info:
        read_policy(path)
    assert (
        str(info.value) == f"{path}: line 3: inbound.a.dry_run must be true or false, not 'maybe'"
    )
    path.write_text(POLICY)
    assert read_policy(path) == parse_policy(POLICY)


def test_the_json_schema_agrees_with_the_parser() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert not list(validator.iter_errors(yaml.safe_load(POLICY)))
    for text, _ in BAD:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if any(w in _ for w in ("CIDR", "pattern", "aliases", "nested", "twice", "tag")):
            continue  # beyond what the schema says (the parser checks the values themselves)
        assert list(validator.iter_errors(doc)), text


def test_check_prints_the_effective_policy_or_one_error_line(
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in list(os.environ):
        if key.upper().startswith("MTLS_"):
            monkeypatch.delenv(key)
    path = tmp_path / "policy.yaml"
    env = {
        **identity_env(pki.server),
        "MTLS_INBOUND": "api=:0=127.0.0.1:1",
        "MTLS_POLICY_FILE": str(path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["check"]) == 2
    assert "MTLS_POLICY_FILE" in capsys.readouterr().err

    path.write_text(POLICY)
    assert cli.main(["check"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["policy"] == parse_policy(POLICY).describe()
    assert out["config"]["MTLS_POLICY_FILE"] == str(path)
    assert "MTLS_ALLOW_PEERS" not in captured.err

    # Both set: valid (exit 0), with the warning run gives at start.
    monkeypatch.setenv("MTLS_ALLOW_PEERS", f"{TD}/ns/shop/*")
    assert cli.main(["check"]) == 0
    assert "MTLS_ALLOW_PEERS is ignored" in capsys.readouterr().err
    monkeypatch.delenv("MTLS_ALLOW_PEERS")

    path.write_text("default: deny\ninbound:\n  api: {allow: [spiffe://*/x]}\n")
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"mtls-sidecar: MTLS_POLICY_FILE {path}: line 3: inbound.api.allow: pattern "
        "'spiffe://*/x': the trust domain may not be a wildcard; '*' and '**' only stand for "
        "path segments"
    ]
    assert "Traceback" not in err


def _closed(route: str, identity: str | None, peer: str = "10.0.0.1:4000", **extra: object) -> str:
    return json.dumps(
        {
            "event": "conn_closed",
            "direction": "inbound",
            "route": route,
            "peer": peer,
            "peer_identity": identity,
            "outcome": "ok",
            **extra,
        }
    )


def test_replay_groups_verdicts_and_lists_rules_never_matched() -> None:
    lines = [
        "not json at all",
        _closed("api", f"{TD}/ns/shop/web"),
        _closed("api", f"{TD}/ns/shop/web"),
        _closed("api", f"{TD}/ns/bank/web"),
        _closed("admin", f"{TD}/ns/ops/sa/admin", "[::1]:5000"),
        _closed("admin", f"{TD}/ns/ops/sa/admin", "10.1.1.1:5000"),
        _closed("8443", f"{TD}/ns/shop/web"),
        _closed("x", None),  # plaintext (permissive): no identity to judge
        _closed("x", f"{TD}/ns/shop/web", policy_route="other"),
        json.dumps({"event": "conn_closed", "direction": "outbound", "route": "api"}),
    ]
    result = replay(parse_policy(POLICY), connections(lines))
    got = [
        (v.route, v.peer_identity, v.decision.label, v.decision.rule, v.connections)
        for v in result.verdicts
    ]
    assert got == [
        ("8443", f"{TD}/ns/shop/web", "deny", "inbound.8443", 1),
        ("admin", f"{TD}/ns/ops/sa/admin", "allow", "inbound.admin.allow[0]", 1),
        ("admin", f"{TD}/ns/ops/sa/admin", "deny", "inbound.admin.source_cidrs", 1),
        ("api", f"{TD}/ns/bank/web", "deny", "inbound.api", 1),
        ("api", f"{TD}/ns/shop/web", "allow", "inbound.api.allow[0]", 2),
        ("other", f"{TD}/ns/shop/web", "deny", "default", 1),
    ]
    assert result.connections == 7 and result.skipped_no_identity == 1
    assert result.denied == 3  # the dry-run deny on 8443 is reported, not counted
    assert result.never_matched == ["inbound.api.allow[1]"]
    text = report(result, "p.yaml")
    assert "would deny (dry run)" in text and "DENY" in text
    assert text.endswith("result: 3 connection(s) would be denied\n")
    assert "rules that never matched: inbound.api.allow[1]" in text


def test_policy_test_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(f"default: deny\ninbound:\n  api: {{allow: [{TD}/ns/shop/*]}}\n")
    log = tmp_path / "a.log"
    log.write_text(_closed("api", f"{TD}/ns/shop/web") + "\n")
    assert cli.main(["policy", "test", "--policy", str(policy), str(log)]) == 0
    assert "no connection would be denied" in capsys.readouterr().out
    log.write_text(log.read_text() + _closed("api", f"{TD}/ns/bank/web") + "\n")
    assert cli.main(["policy", "test", "--policy", str(policy), "--format", "json", str(log)]) == 1
    assert json.loads(capsys.readouterr().out)["denied"] == 1
    for argv, message in (
        (["policy", "test", "--policy", str(tmp_path / "none.yaml"), str(log)], "does not exist"),
        (["policy", "test", "--policy", str(policy), str(tmp_path / "none.log")], "none.log"),
        (["policy", "test", str(log)], "--policy"),
        (["policy", "prove"], "unknown command"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    policy.write_text("default: deny\ninbound: [\n")
    assert cli.main(["policy", "test", "--policy", str(policy), str(log)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_an_allowing_default_is_our_own_trust_domains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As MTLS_ALLOW_PEERS's default: a federated domain's peer is let in by a rule that
    names it, never by `default: allow`; the replay judges the same with --trust-domain."""
    policy = parse_policy(
        "default: allow\ninbound:\n  api: {allow: [spiffe://partner.example/billing]}\n"
    )
    ours = parse_spiffe_id(TD + "/ns/shop/web")
    partner = parse_spiffe_id("spiffe://partner.example/billing")
    own = "corp.example"
    assert decide(policy, "z", ours, None, own) == Decision(True, "default", False)
    assert decide(policy, "z", partner, None, own) == Decision(False, "default.trust_domain", False)
    assert decide(policy, "api", partner, None, own) == Decision(
        True, "inbound.api.allow[0]", False
    )
    # Without our trust domain (it is not known yet), any domain's peer, as before.
    assert decide(policy, "z", partner, None) == Decision(True, "default", False)

    path = tmp_path / "p.yaml"
    path.write_text("default: allow\n")
    log = tmp_path / "a.log"
    log.write_text(_closed("api", "spiffe://partner.example/billing") + "\n")
    monkeypatch.delenv("MTLS_TRUST_DOMAIN", raising=False)
    assert cli.main(["policy", "test", "--policy", str(path), str(log)]) == 0
    assert cli.main(["policy", "test", "--policy", str(path), "--trust-domain", own, str(log)]) == 1
    assert "default.trust_domain" in capsys.readouterr().out
    monkeypatch.setenv("MTLS_TRUST_DOMAIN", own)
    assert cli.main(["policy", "test", "--policy", str(path), str(log)]) == 1
    capsys.readouterr()
    assert (
        cli.main(["policy", "test", "--policy", str(path), "--trust-domain", "Bad TD", str(log)])
        == 2
    )
    assert "--trust-domain" in capsys.readouterr().err
