"""The auditor's DaemonSet (deploy/kubernetes/audit/): what it runs is what the CLI accepts,
with only the privileges the auditor needs, on the node and in the API (read pods, nothing
else). (tests/test_deploy.py validates it, strict, with every other manifest.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.audit.cli import _parser, config_from_args
from proxy.audit.kube import SA_DIR
from proxy.audit.workloads import parse_map
from tests.pki import make_root, pem

pytestmark = pytest.mark.unit

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
MANIFEST = Path(__file__).resolve().parent.parent / "deploy/kubernetes/audit/audit-daemonset.yaml"


def _docs() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


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
    # In-cluster API settings: the automounted token and CA, where kubelet puts them.
    assert args.kubernetes is True
    assert args.kubernetes_api is None and args.kubernetes_token_file is None
    assert args.kubernetes_ca_file is None and str(SA_DIR) == SA_PATH
    args.kubernetes_token_file = tmp_path / "token"
    args.kubernetes_token_file.write_text("a-token\n")
    args.kubernetes_ca_file = tmp_path / "ca.crt"
    args.kubernetes_ca_file.write_bytes(pem(make_root().cert))
    in_pod = {"NODE_NAME": "worker-1", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    config = config_from_args(args, {**in_pod, "KUBERNETES_SERVICE_PORT": "443"})
    assert config.node == "worker-1" and config.workloads == parse_map(wl_text)
    assert config.kubernetes is not None and config.kubernetes.api == "https://10.96.0.1:443"
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
    # The token is mounted for the pod watch (test_rbac_is_reading_pods_only says what it may).
    assert spec["hostNetwork"] is True and spec["automountServiceAccountToken"] is True
    assert "hostPID" not in spec and "hostIPC" not in spec
    assert not any("hostPath" in v for v in spec["volumes"])
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert "privileged" not in sc
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_rbac_is_reading_pods_only() -> None:
    """The DaemonSet's service account may get, list and watch pods, in every namespace, and
    nothing else; the account itself does not mount its token into other pods."""
    docs = _docs()
    ds = docs["DaemonSet"]
    ns = ds["metadata"]["namespace"]
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    sa = docs["ServiceAccount"]
    assert sa["metadata"] == {"name": account, "namespace": ns}
    assert sa["automountServiceAccountToken"] is False
    role, binding = docs["ClusterRole"], docs["ClusterRoleBinding"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": ns}]
    assert "Role" not in docs and "RoleBinding" not in docs
