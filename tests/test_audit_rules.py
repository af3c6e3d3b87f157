"""The wire auditor's Prometheus rules (deploy/prometheus/rules/mtls-audit.yml), checked and
unit-tested with the real promtool; tests/test_audit_wire.py runs them in a real Prometheus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .test_prometheus_rules import METRICS, _run, metric_names

PROM = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = PROM / "rules" / "mtls-audit.yml"
TESTS = PROM / "tests" / "audit_test.yml"
AUDIT_METRICS = {"mtls_audit_connections_total", "mtls_audit_bytes_total"}


def _rules(kind: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if kind in r]


def test_check_rules() -> None:
    result = _run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests() -> None:
    result = _run("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_tested_both_ways() -> None:
    alerts = {str(r["alert"]) for r in _rules("alert")}
    assert alerts == {"MtlsAuditDisagrees"}
    fires: set[str] = set()
    quiet: set[str] = set()
    reasons: set[str] = set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(str(check["alertname"]))
            for alert in check.get("exp_alerts") or []:
                reasons.add(alert["exp_labels"]["disagreement"])
    assert alerts <= fires and alerts <= quiet
    assert reasons == {"plaintext_not_counted", "bytes_not_carried"}


def test_rules_use_only_known_metrics() -> None:
    recorded = {str(r["record"]) for r in _rules("record")}
    allowed = METRICS | AUDIT_METRICS | recorded
    for rule in _rules("expr"):
        unknown = metric_names(str(rule["expr"])) - allowed - {"vector"}
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown {unknown}"
