"""One table of env mappings fed to every entry point that reads the settings: `check`,
`run` and `iptables --print` accept and refuse the same inputs with the same messages."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import __main__ as cli
from proxy import iptables
from proxy.config import RULE_VARIABLES, known_variables, load_rule_settings, load_settings
from proxy.errors import ConfigError, ConfigProblem

from .conftest import Pki
from .harness import identity_env

# (overrides of a valid transparent-mode config, variables `check` refuses)
CASES: list[tuple[dict[str, str], set[str]]] = [
    ({}, set()),
    ({"MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.0.0.1/8"}, {"MTLS_EXCLUDE_OUTBOUND_CIDRS"}),
    ({"MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.0.0.0/33"}, {"MTLS_EXCLUDE_OUTBOUND_CIDRS"}),
    ({"MTLS_EXCLUDE_INBOUND_PORTS": "22,x"}, {"MTLS_EXCLUDE_INBOUND_PORTS"}),
    ({"MTLS_EXCLUDE_OUTBOUND_PORTS": "8010-8000"}, {"MTLS_EXCLUDE_OUTBOUND_PORTS"}),
    ({"MTLS_INBOUND_CAPTURE_PORT": "0"}, {"MTLS_INBOUND_CAPTURE_PORT"}),
    ({"MTLS_OUTBOUND_CAPTURE_PORT": "15006"}, {"MTLS_OUTBOUND_CAPTURE_PORT"}),
    ({"MTLS_PROXY_UID": "root"}, {"MTLS_PROXY_UID"}),
    ({"MTLS_ADMIN_LISTEN": "localhost"}, {"MTLS_ADMIN_LISTEN"}),
    ({"MTLS_ADMIN_LISTEN": "127.0.0.1:15001"}, {"MTLS_ADMIN_LISTEN"}),
    ({"MTLS_INBOUND": "web=:15006=127.0.0.1:8080"}, {"MTLS_INBOUND_CAPTURE_PORT"}),
    ({"MTLS_EXCLUDE_OUTBOUND_CIDR": "10.0.0.0/8"}, {"MTLS_EXCLUDE_OUTBOUND_CIDR"}),
    ({"mtls_proxy_uid": "1337"}, {"mtls_proxy_uid"}),
    # Variables the rules do not read: refused by check and run, not by iptables.
    ({"MTLS_WORKERS": "many"}, {"MTLS_WORKERS"}),
    ({"MTLS_OUTBOUND": "lp=127.0.0.1:28601=127.0.0.1:28601"}, {"MTLS_OUTBOUND"}),
    ({"MTLS_CERT_FILE": "/nonexistent/tls.crt"}, {"MTLS_CERT_FILE"}),
    (
        {"MTLS_IDENTITY_SOURCE": "ca"},
        {"MTLS_CA_URL", "MTLS_CA_FINGERPRINT", "MTLS_IDENTITY", "MTLS_CA_TOKEN"},
    ),
    # Several at once: every one listed, by every entry point.
    (
        {
            "MTLS_PROXY_UID": "-1",
            "MTLS_EXCLUDE_OUTBOUND_CIDRS": "fd00::1/8",
            "MTLS_LOG_FORMAT": "xml",
            "MTLS_TRANSPARNT": "true",
        },
        {
            "MTLS_PROXY_UID",
            "MTLS_EXCLUDE_OUTBOUND_CIDRS",
            "MTLS_LOG_FORMAT",
            "MTLS_TRANSPARNT",
        },
    ),
]


def _problem_lines(text: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize(("overrides", "refused"), CASES)
def test_every_entry_point_judges_alike(
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    refused: set[str],
) -> None:
    env = {**identity_env(pki.server), "MTLS_TRANSPARENT": "true", **overrides}
    for key in list(os.environ):
        if key.upper().startswith("MTLS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    # check, through the command line
    rc = cli.main(["check"])
    out, err = capsys.readouterr()
    check_problems = _problem_lines(err, "  - ")
    assert {line.split(":", 1)[0] for line in check_problems} == refused
    assert rc == (2 if refused else 0), err
    if not refused:
        assert '"MTLS_TRANSPARENT": true' in out and '"certificate"' in out

    # run: the same loader, refusing before anything starts
    loaded = cli._settings(os.environ)
    assert (loaded is None) is bool(refused)
    assert _problem_lines(capsys.readouterr().err, "  - ") == check_problems
    if refused:
        assert cli.main(["run"]) == 2
        assert _problem_lines(capsys.readouterr().err, "  - ") == check_problems

    # iptables --print: the same problems, for the variables it reads (and typos)
    stdout, stderr = io.StringIO(), io.StringIO()
    rc = iptables.main(["--print"], dict(os.environ), stdout=stdout, stderr=stderr)
    rule_problems = _problem_lines(stderr.getvalue(), "mtls-sidecar iptables: config error: ")
    expected = [
        line
        for line in check_problems
        if (var := line.split(":", 1)[0]) in RULE_VARIABLES or var not in known_variables()
    ]
    assert rule_problems == expected
    assert rc == (2 if expected else 0)
    assert ("*nat" in stdout.getvalue()) is not bool(expected)


# A valid transparent-mode config that needs no files, for the property test below.
CA_BASE = {
    "MTLS_IDENTITY_SOURCE": "ca",
    "MTLS_CA_URL": "https://ca.internal:8443",
    "MTLS_CA_TOKEN": "t",
    "MTLS_CA_FINGERPRINT": "ab" * 32,
    "MTLS_IDENTITY": "spiffe://corp.example/web",
    "MTLS_TRANSPARENT": "true",
}
_VALUES = st.one_of(
    st.sampled_from(
        [
            "15006",
            "15001",
            "15000",
            "0",
            "8443",
            "x",
            "22,15001",
            "9-1",
            "10.0.0.1/8",
            "10.0.0.0/8,fd00::/8",
            "127.0.0.1:15001",
            "127.0.0.1:0",
            ":8443",
            "localhost",
            ":15006=127.0.0.1:1",
            "o=127.0.0.1:9=127.0.0.1:15001",
            "-1",
        ]
    ),
    st.text(max_size=10),
)
_NAMES = st.sampled_from(
    [*sorted(RULE_VARIABLES), "MTLS_INBOUND", "MTLS_OUTBOUND", "MTLS_WORKERS", "MTLS_PROXY_UI"]
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_NAMES, _VALUES, max_size=5))
def test_iptables_loader_agrees_with_run_loader(env: dict[str, str]) -> None:
    """For any env, iptables refuses exactly what run refuses among the variables it reads."""
    full = {**CA_BASE, **env}
    run_problems: list[ConfigProblem] = []
    rule_problems: list[ConfigProblem] = []
    try:
        load_settings(full)
    except ConfigError as exc:
        run_problems = exc.problems
    try:
        load_rule_settings(full)
    except ConfigError as exc:
        rule_problems = exc.problems
    assert rule_problems == [
        p for p in run_problems if p.var in RULE_VARIABLES or p.var not in known_variables()
    ]
