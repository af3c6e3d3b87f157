"""Prometheus rules, scrape configs and the Grafana dashboard, checked with the real promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "deploy" / "prometheus"
RULE_FILES = [PROM / "rules" / "mtls-recording.yml", PROM / "rules" / "mtls-alerts.yml"]
ALERT_TESTS = PROM / "tests" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "mtls-sidecar-dashboard.json"

# Names are API (SPEC.md "Metrics"): rules and panels may use these and nothing else.
METRICS = {
    "mtls_connections_total",
    "mtls_connections_active",
    "mtls_connections_rejected_total",
    "mtls_bytes_total",
    "mtls_handshake_seconds_bucket",
    "mtls_handshake_seconds_sum",
    "mtls_handshake_seconds_count",
    "mtls_peer_connections_total",
    "mtls_upstream_connect_failures_total",
    "mtls_cert_expiry_timestamp_seconds",
    "mtls_cert_renewals_total",
    "mtls_cert_reloads_total",
    "mtls_trust_bundle_roots",
    "mtls_handshakes_total",
    "mtls_crl_reloads_total",
    "mtls_crl_this_update_timestamp_seconds",
    "mtls_crl_next_update_timestamp_seconds",
    "mtls_crl_revoked_certificates",
    "mtls_revoked_connections_closed_total",
    "mtls_pool_connections",
    "mtls_pool_streams_total",
    "mtls_pool_streams_per_connection_bucket",
    "mtls_pool_streams_per_connection_sum",
    "mtls_pool_streams_per_connection_count",
    "mtls_pool_retired_total",
    "up",
}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.geteuid() == 0:
            pytest.fail("promtool missing: `make apt` installs the Debian package prometheus")
        pytest.skip("promtool not installed (Debian package prometheus; `make apt` as root)")
    return path


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords and labels left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", "1", s)
    s = re.sub(r"\boffset\s+-?\d+\w*", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def _rules(kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in _load(path)["groups"]:
            out.extend(r for r in group["rules"] if kind in r)
    return out


def _recorded() -> set[str]:
    return {str(r["record"]) for r in _rules("record")}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                out.append((str(panel["title"]), str(target["expr"])))

    walk(dash["panels"])
    return out


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (job, le) (rate(mtls_handshake_seconds_bucket{job=~"$job", a="x y"}[5m])) '
        "/ on (job) group_left sum(up offset 10m) > 1e3 and mtls:x:ratio unless "
        "histogram_quantile(0.5, foo[$__rate_interval])"
    )
    assert metric_names(expr) == {"mtls_handshake_seconds_bucket", "up", "mtls:x:ratio", "foo"}


def test_check_rules() -> None:
    """Both rule files parse and every expression is valid PromQL (promtool check rules)."""
    result = _run("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_config() -> None:
    """prometheus.yml is valid and its rule_files resolve (relative to the config file)."""
    config = _load(PROM / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file
    result = _run("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_check_kubernetes_config(tmp_path: Path) -> None:
    """prometheus-kubernetes.yml is valid; with Debian's promtool (built without Kubernetes
    service discovery) the relabelling is checked on a copy with static targets instead."""
    path = PROM / "prometheus-kubernetes.yml"
    config = _load(path)
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file
    result = _run("check", "config", str(path))
    if (
        result.returncode != 0
        and "kubernetes_sd_configs not found" in result.stdout + result.stderr
    ):
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:15000"]}]
        config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
        copy = tmp_path / "prometheus.yml"
        copy.write_text(yaml.safe_dump(config))
        result = _run("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert jobs == ["mtls-sidecar"], "the alert rules select up{job='mtls-sidecar'}"


def test_alert_unit_tests() -> None:
    """promtool test rules: every alert fires on its bad series and stays quiet on the good."""
    result = _run("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_both_ways() -> None:
    alerts = {str(r["alert"]) for r in _rules("alert")}
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in _load(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(str(check["alertname"]))
    assert alerts <= fires, f"alerts never shown to fire: {sorted(alerts - fires)}"
    # "quiet" also comes from series in a firing case that must not appear in exp_alerts;
    # an explicit empty expectation (pending or no alert) is required on top for each alert.
    assert alerts <= quiet, f"alerts never shown to stay quiet: {sorted(alerts - quiet)}"
    assert {"MtlsPlaintextTraffic", "MtlsRejectionSpike", "MtlsCertExpiringSoon"} <= alerts
    assert {"MtlsCertRenewalsFailing", "MtlsSidecarDown"} <= alerts


def test_rules_use_only_known_metrics() -> None:
    allowed = METRICS | _recorded()
    for rule in _rules("expr"):
        unknown = metric_names(str(rule["expr"])) - allowed
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown {unknown}"


def test_coverage_rules_exist() -> None:
    recorded = _recorded()
    assert "mtls:encryption_coverage:ratio_rate5m" in recorded
    assert "mtls:encryption_coverage_overall:ratio_rate5m" in recorded


def test_dashboard_parses_and_uses_only_known_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    exprs = _dashboard_exprs()
    assert exprs, "no panel queries"
    allowed = METRICS | _recorded()
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: selects no metric"
        assert not names - allowed, f"panel {title!r}: unknown {names - allowed}"
        used |= names
    # What issue 5 asks the dashboard to show.
    for needed in (
        "mtls_bytes_total",  # coverage
        "mtls_connections_total",  # connection rates
        "mtls_connections_rejected_total",  # rejections by reason
        "mtls_handshake_seconds_bucket",  # handshake latency
        "mtls_cert_expiry_timestamp_seconds",  # cert expiry
        "mtls_handshakes_total",  # share of post-quantum key exchange
    ):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool parses them as recording rules, with the
    Grafana variables replaced by values of the right type."""
    subst = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(_dashboard_exprs()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
