"""The auditor's DaemonSet (deploy/kubernetes/audit/): what it runs is what the CLI accepts,
with only the privileges the auditor needs. (tests/test_deploy.py validates it, strict, with
every other manifest.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.audit.cli import _parser, config_from_args
from proxy.audit.workloads import parse_map

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).resolve().parent.parent / "deploy/kubernetes/audit/audit-daemonset.yaml"


def _docs() -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def test_daemonset_runs_what_the_cli_accepts(tmp_path: Path) -> None:
    docs = _docs()
    pod = docs["DaemonSet"]["spec"]["template"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["args"][0] == "audit"
    wl_text = docs["ConfigMap"]["data"]["workloads.yaml"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "workloads"]
    args = _parser().parse_args(c["args"][1:])
    assert str(args.workloads) == f"{mount['mountPath']}/workloads.yaml"
    (tmp_path / "workloads.yaml").write_text(wl_text)
    args.workloads = tmp_path / "workloads.yaml"
    config = config_from_args(args, {"NODE_NAME": "worker-1"})
    assert config.node == "worker-1" and config.workloads == parse_map(wl_text)
    assert 15000 in config.ignore_ports  # the sidecars' admin port, plaintext by design
    port = config.listen.port
    assert {p["containerPort"] for p in c["ports"]} == {port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "admin"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_daemonset_privileges_are_the_minimum() -> None:
    spec = _docs()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["automountServiceAccountToken"] is False
    assert "hostPID" not in spec and "hostIPC" not in spec
    assert not any("hostPath" in v for v in spec["volumes"])
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
