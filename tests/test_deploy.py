"""Deploy artifacts: Kubernetes manifests, the compose example and the Dockerfile.

The offline half (the real runs: tests/test_deploy_compose.py and the emulated pods):
schemas (kubernetes-validate, strict), the sidecar pod contract (native sidecar, probes,
privileges), cross-references between files, the Dockerfile rules and its healthcheck, the
image's install steps, and `mtls-sidecar check` on the exact env of every manifest.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import dockerfile_lint

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
COMPOSE = REPO / "deploy" / "compose" / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SIDECAR_IMAGE = "mtls-sidecar"
PROXY_UID = 1337
ADMIN_PORT = 15000
# Native sidecars (restartPolicy: Always on init containers) are on by default since 1.29.
MIN_KUBERNETES = "1.29.0"
# Custom resources: no schema in kubernetes-validate; checked by hand below.
CRD_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/", "kustomize.config.k8s.io/")

# SPEC.md's env vars plus the ones added since (documented in the README).
EXTRA_ENV = {
    "MTLS_PLAINTEXT_FALLBACK_TTL",
    "MTLS_ADMIN_ALLOW_REMOTE_DRAIN",
    "MTLS_PEER_IDENTITY_CAP",
    "MTLS_DROP_PRIVILEGES",
}
# Values that are per installation and so not in the manifests (a ConfigMap or .env the user
# creates, see README "deploy"); `check` gets these well-formed stand-ins.
SAMPLE_VALUES = {
    "MTLS_CA_FINGERPRINT": "9f" * 32,
    "MTLS_CA_TOKEN": "sample-join-token",
}


# --- loading --------------------------------------------------------------------------------


@functools.cache
def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.rglob("*.yaml"))
        for doc in _docs(path)
        if path.name != "kustomization.yaml"
    ]


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _deployments() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _manifests() if d["kind"] == "Deployment"]


def _is_sidecar_image(image: str) -> bool:
    return image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1] == SIDECAR_IMAGE


def _sidecar_deployments() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path, dep in _deployments():
        pod = dep["spec"]["template"]["spec"]
        if any(
            c["name"] == "mtls-sidecar" and c.get("args", ["run"])[0] == "run"
            for c in pod.get("initContainers", [])
        ):
            out.append((path, dep))
    return out


def _container(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    containers: list[dict[str, Any]] = pod.get("initContainers", []) + pod.get("containers", [])
    return next((c for c in containers if c["name"] == name), None)


def _configmaps() -> dict[tuple[str, str], dict[str, str]]:
    return {
        (d["metadata"].get("namespace", ""), d["metadata"]["name"]): d.get("data", {})
        for _, d in _manifests()
        if d["kind"] == "ConfigMap"
    }


def container_env(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The env a container gets: envFrom ConfigMaps of the manifests, then env; a value from a
    ConfigMap/Secret the user creates at install time gets its SAMPLE_VALUES stand-in."""
    cms = _configmaps()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert (namespace, ref) in cms, f"envFrom ConfigMap {ref} is not in the manifests"
        env.update(cms[(namespace, ref)])
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = str(item["value"])
            continue
        ref = item["valueFrom"].get("configMapKeyRef")
        if ref and (namespace, ref["name"]) in cms:
            env[name] = cms[(namespace, ref["name"])][ref["key"]]
        else:
            assert name in SAMPLE_VALUES, f"{name}: valueFrom with no sample value"
            env[name] = SAMPLE_VALUES[name]
    return env


def _compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def _compose_value(key: str, value: object) -> str:
    text = str(value)
    if _INTERPOLATION.search(text):
        assert key in SAMPLE_VALUES, f"{key}: interpolated with no sample value"
        return _INTERPOLATION.sub(SAMPLE_VALUES[key], text)
    return text


def _compose_sidecars() -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, svc)
        for name, svc in _compose()["services"].items()
        if _is_sidecar_image(str(svc.get("image", ""))) and svc.get("command") == ["run"]
    ]


def sidecar_envs() -> list[tuple[str, dict[str, str]]]:
    """(where, env) for every sidecar that runs `mtls-sidecar run` in any manifest."""
    out: list[tuple[str, dict[str, str]]] = []
    for path, dep in _sidecar_deployments():
        ns = dep["metadata"].get("namespace", "")
        pod = dep["spec"]["template"]["spec"]
        sidecar = _container(pod, "mtls-sidecar")
        assert sidecar is not None
        out.append(
            (f"{path.relative_to(REPO)}:{dep['metadata']['name']}", container_env(sidecar, ns))
        )
    for name, svc in _compose_sidecars():
        env = {k: _compose_value(k, v) for k, v in svc.get("environment", {}).items()}
        out.append((f"{COMPOSE.relative_to(REPO)}:{name}", env))
    return out


def _all_env_names() -> set[str]:
    names: set[str] = set()
    workloads = [d for _, d in _manifests() if d["kind"] in ("Deployment", "StatefulSet")]
    for dep in workloads:
        pod = dep["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            names |= {e["name"] for e in c.get("env", [])}
    for (_, _), data in _configmaps().items():
        # Keys named like files (the auditor's workloads.yaml) are mounted, not env vars.
        names |= {k for k in data if not k.endswith((".yaml", ".yml", ".json"))}
    for svc in _compose()["services"].values():
        names |= set(svc.get("environment", {}))
    return names


def _known_env() -> set[str]:
    known = set(EXTRA_ENV)
    for spec in (REPO.parent / "shared" / "SPEC.md", REPO / "SPEC.md"):
        if spec.is_file():
            known |= set(re.findall(r"\bMTLS_[A-Z0-9_]+", spec.read_text()))
    if len(known) == len(EXTRA_ENV):  # SPEC.md not beside the repo: the names it lists today
        known |= {
            "MTLS_IDENTITY_SOURCE", "MTLS_CERT_FILE", "MTLS_KEY_FILE", "MTLS_TRUST_BUNDLE_FILE",
            "MTLS_CA_URL", "MTLS_CA_TOKEN", "MTLS_CA_TOKEN_FILE", "MTLS_CA_FINGERPRINT",
            "MTLS_IDENTITY", "MTLS_TRUST_DOMAIN", "MTLS_INBOUND", "MTLS_OUTBOUND",
            "MTLS_TRANSPARENT", "MTLS_INBOUND_CAPTURE_PORT", "MTLS_OUTBOUND_CAPTURE_PORT",
            "MTLS_PROXY_UID", "MTLS_EXCLUDE_INBOUND_PORTS", "MTLS_EXCLUDE_OUTBOUND_PORTS",
            "MTLS_EXCLUDE_OUTBOUND_CIDRS", "MTLS_INBOUND_MODE", "MTLS_OUTBOUND_MODE",
            "MTLS_ALLOW_PEERS", "MTLS_MIN_TLS_VERSION", "MTLS_ADMIN_LISTEN", "MTLS_WORKERS",
            "MTLS_HANDSHAKE_TIMEOUT", "MTLS_CONNECT_TIMEOUT", "MTLS_IDLE_TIMEOUT",
            "MTLS_MAX_CONNECTIONS", "MTLS_DRAIN_TIMEOUT", "MTLS_LOG_LEVEL", "MTLS_LOG_FORMAT",
        }  # fmt: skip
    return known


def _duration_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    assert m, f"not a duration: {text!r}"
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * factor


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"{container['name']}: no port named {port}")


# --- Kubernetes: schemas ---------------------------------------------------------------------


def _k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    return [MIN_KUBERNETES, str(utils.latest_version())]


def test_kubernetes_manifests_validate_strict() -> None:
    """Every manifest passes the Kubernetes OpenAPI schemas, strict (unknown fields are
    errors), for the oldest version with native sidecars and the newest the package ships."""
    from kubernetes_validate import utils

    checked = 0
    for path, doc in _manifests():
        for version in _k8s_versions():
            try:
                utils.validate(doc, version, strict=True)
                checked += 1
            except utils.SchemaNotFoundError:
                assert doc["apiVersion"].startswith(CRD_GROUPS), (
                    f"{path}: no schema for {doc['kind']}"
                )
            except utils.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{path}: {doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}"
                )
    assert checked >= 20


def test_strict_validation_catches_a_typo() -> None:
    """The validator is not vacuous: a misspelt field in the sidecar spec is rejected."""
    from kubernetes_validate import utils

    _, dep = _sidecar_deployments()[0]
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["initContainers"][-1]["restartPolicyy"] = "Always"
    with pytest.raises(utils.ValidationError):
        utils.validate(bad, _k8s_versions()[-1], strict=True)


def test_kustomizations_list_every_manifest() -> None:
    assert len(_kustomizations()) == 3
    for kfile in _kustomizations():
        data = _docs(kfile)[0]
        assert data["kind"] == "Kustomization"
        listed = set(data["resources"])
        for res in listed:
            assert (kfile.parent / res).is_file(), f"{kfile}: {res} does not exist"
        present = {p.name for p in kfile.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert present == listed, f"{kfile}: not listed {present - listed}"
        for image in data.get("images", []):
            assert image["name"] == SIDECAR_IMAGE


def test_cert_manager_kustomization_keeps_namespaces() -> None:
    """A `namespace:` transformer would move the CA Certificate out of cert-manager's namespace."""
    data = _docs(K8S / "cert-manager" / "kustomization.yaml")[0]
    assert "namespace" not in data


# --- Kubernetes: the sidecar pod contract ----------------------------------------------------


def test_every_sidecar_pod_follows_the_contract() -> None:
    deployments = _sidecar_deployments()
    assert len(deployments) == 4, [d["metadata"]["name"] for _, d in deployments]
    for path, dep in deployments:
        ns = dep["metadata"]["namespace"]
        assert_sidecar_pod_contract(
            f"{path.relative_to(REPO)}:{dep['metadata']['name']}",
            dep["spec"]["template"],
            functools.partial(container_env, namespace=ns),
        )


EnvOf = Callable[[dict[str, Any]], dict[str, str]]


def assert_sidecar_pod_contract(
    where: str, template: dict[str, Any], env_of: EnvOf, *, user_workload: bool = False
) -> None:
    """The sidecar pod contract on one pod template; `env_of` gives a container's env.

    `user_workload`: a user's pod after `inject`: its own containers, volumes (a
    StatefulSet's claim templates) and scrape annotations are the user's business; only what
    the sidecar brings is checked.
    """
    pod = template["spec"]
    inits = pod["initContainers"]
    names = [c["name"] for c in inits]
    sidecar = inits[names.index("mtls-sidecar")]
    env = env_of(sidecar)
    own = [c for c in inits if c["name"].startswith("mtls-")]

    # A native sidecar: starts before the app, lives as long as the pod.
    assert sidecar["restartPolicy"] == "Always", where
    assert _is_sidecar_image(sidecar["image"]), where

    # Runs as the proxy UID (exempt from capture), read-only, nothing extra.
    sc = sidecar["securityContext"]
    assert sc["runAsUser"] == PROXY_UID and sc["runAsNonRoot"] is True, where
    assert sc["readOnlyRootFilesystem"] is True, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"] == {"drop": ["ALL"]}, where
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where

    # Resources: requests for scheduling, a memory limit.
    res = sidecar["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], where

    # Admin port: reachable by the kubelet (probes) and Prometheus; drain stays local.
    host, _, port = env["MTLS_ADMIN_LISTEN"].rpartition(":")
    assert int(port) == ADMIN_PORT, where
    assert host in ("0.0.0.0", "", "[::]"), f"{where}: kubelet probes need a non-loopback admin"
    assert env.get("MTLS_ADMIN_ALLOW_REMOTE_DRAIN") == "false", where
    for probe, path_ in (("readinessProbe", "/ready"), ("livenessProbe", "/live"),
                         ("startupProbe", "/ready")):  # fmt: skip
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path_, f"{where}: {probe}"
        assert _port_number(sidecar, get["port"]) == ADMIN_PORT, f"{where}: {probe}"
    annotations = template["metadata"]["annotations"]
    if not (user_workload and annotations.get("prometheus.io/port", "") != str(ADMIN_PORT)):
        assert annotations["prometheus.io/scrape"] == "true", where
        assert int(annotations["prometheus.io/port"]) == ADMIN_PORT, where
        assert annotations["prometheus.io/path"] == "/metrics", where
    assert template["metadata"]["labels"]["mtls-sidecar/enabled"] == "true", where

    # Draining finishes before the kubelet's SIGKILL.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    assert _duration_seconds(env["MTLS_DRAIN_TIMEOUT"]) < grace, where
    assert int(env["MTLS_WORKERS"]) >= 1, f"{where}: set MTLS_WORKERS (default = node CPUs)"

    # Every mount has its volume; /tmp is writable scratch; *_FILE paths are mounted.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    for c in own if user_workload else inits + pod["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: {c['name']} mounts unknown {m['name']}"
    assert "emptyDir" in volumes[mounts["/tmp"]], where
    for key, value in env.items():
        if key.endswith("_FILE"):
            assert any(value.startswith(mp + "/") for mp in mounts), f"{where}: {key} not mounted"

    if env.get("MTLS_TRANSPARENT") == "true":
        # The iptables init container runs first, with NET_ADMIN/NET_RAW and nothing else.
        assert names.index("mtls-iptables") < names.index("mtls-sidecar"), where
        ipt = inits[names.index("mtls-iptables")]
        assert ipt["args"] == ["iptables", "--apply"], where
        assert "restartPolicy" not in ipt, where
        caps = ipt["securityContext"]["capabilities"]
        assert caps["drop"] == ["ALL"] and sorted(caps["add"]) == ["NET_ADMIN", "NET_RAW"], where
        assert ipt["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert ipt["securityContext"]["readOnlyRootFilesystem"] is True, where
        # Same settings as the sidecar, so the rules match what it listens on.
        assert env_of(ipt) == env, where
        # Probes and scrapes must not be captured into the mTLS listener.
        excluded = env.get("MTLS_EXCLUDE_INBOUND_PORTS", "").split(",")
        assert str(ADMIN_PORT) in excluded, where
        assert int(env["MTLS_PROXY_UID"]) == PROXY_UID, where
    else:
        # Explicit mode needs no privileges anywhere in the pod.
        for c in own if user_workload else inits + pod["containers"]:
            assert not c["securityContext"]["capabilities"].get("add"), f"{where}: {c['name']}"
            assert c["securityContext"]["runAsNonRoot"] is True, f"{where}: {c['name']}"


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _ca_docs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in _docs(K8S / "ca.yaml")}


def _ca_serve_args(ca: dict[str, Any]) -> Any:
    """The CA container's flags, parsed by `mtls-sidecar ca`'s own parser (so they exist)."""
    from proxy.ca.cli import build_parser

    assert ca["args"][0] == "ca"
    args = build_parser().parse_args(ca["args"][1:])
    assert args.command == "serve"
    return args


def test_ca_statefulset() -> None:
    """The CA: one pod, its directory (ca.db, crl.pem) on a persistent claim written by both
    containers, hardened, enrolling by service-account token with the pod's own token and
    the issuer-discovery binding, behind the Service that sidecars and the injector dial."""
    from proxy.k8s.inject import Options

    docs = _ca_docs()
    assert ("Deployment", "mtls-ca") not in docs
    sts = docs[("StatefulSet", "mtls-ca")]
    spec = sts["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (ca,) = pod["containers"]
    (keys,) = pod["initContainers"]
    args = _ca_serve_args(ca)
    ca_dir = str(args.dir)

    # The CA directory is on the claim, read-write, in both containers; nothing of it is an
    # emptyDir (which would forget ca.db on every restart).
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    for c in (ca, keys):
        (mount,) = [m for m in c["volumeMounts"] if ca_dir.startswith(m["mountPath"] + "/")]
        assert mount["name"] in claims and mount["name"] not in volumes, c["name"]
        assert not mount.get("readOnly"), f"{c['name']}: ca serve writes ca.db and crl.pem"
    claim = claims[mount["name"]]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }, "deleting the StatefulSet must not delete the issuance log"
    # The keys come from the Secret, through ca-keys.
    secret_mounts = [m for m in keys["volumeMounts"] if "secret" in volumes.get(m["name"], {})]
    assert [volumes[m["name"]]["secret"]["secretName"] for m in secret_mounts] == ["mtls-ca-keys"]
    assert not [m for m in ca["volumeMounts"] if "secret" in volumes.get(m["name"], {})]

    # Hardened like the other manifests. The kubelet must not re-chmod the volume on each
    # mount (group bits on ca.db make ca serve refuse the directory).
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert psc["fsGroup"] == PROXY_UID and psc["fsGroupChangePolicy"] == "OnRootMismatch"
    for c in (ca, keys):
        sc = c["securityContext"]
        assert sc["runAsUser"] == PROXY_UID and sc["runAsNonRoot"] is True, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]

    # Service-account enrolment: the issuer's keys fetched with the pod's own token and CA.
    assert args.k8s_issuer == "https://kubernetes.default.svc.cluster.local"
    assert args.k8s_jwks is None
    assert str(args.k8s_ca_file) == f"{SA_DIR}/ca.crt"
    assert str(args.k8s_token_file) == f"{SA_DIR}/token"
    assert args.k8s_audience == Options().token_audience, "the audience inject projects"
    assert pod["automountServiceAccountToken"] is True
    assert not any(m["mountPath"] == SA_DIR for c in (ca, keys) for m in c["volumeMounts"])
    # ...and only the CA and the wire auditor (it watches pods: tests/test_audit_deploy.py
    # checks its RBAC): every other pod in the manifests goes without an API token.
    for path, doc in _manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet") and doc is not sts:
            if (doc["kind"], doc["metadata"]["name"]) == ("DaemonSet", "mtls-audit"):
                continue
            where = f"{path.relative_to(REPO)}:{doc['metadata']['name']}"
            assert doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, where
    sa = docs[("ServiceAccount", pod["serviceAccountName"])]
    ns = sts["metadata"]["namespace"]
    assert sa["metadata"]["namespace"] == ns
    bindings = [
        d for (kind, _), d in docs.items()
        if kind == "ClusterRoleBinding"
        and d["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": "system:service-account-issuer-discovery"}
    ]  # fmt: skip
    assert [b["subjects"] for b in bindings] == [
        [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}]
    ]

    # The Service: selects the pod, reaches ca serve's port, governs the StatefulSet.
    svc = docs[("Service", "mtls-ca")]
    assert spec["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    listen_port = args.listen[1]
    (svc_port,) = svc["spec"]["ports"]
    assert _port_number(ca, svc_port["targetPort"]) == listen_port
    url = f"https://{svc['metadata']['name']}.{ns}.svc:{svc_port['port']}"
    assert f"{svc['metadata']['name']}.{ns}.svc" in args.dns, "the service cert names the URL"
    # The injector's default --ca-url, and the flag in its Deployment, are this Service.
    assert Options().ca_url == url
    injector = next(d for _, d in _deployments() if d["metadata"]["name"] == "mtls-injector")
    (container,) = injector["spec"]["template"]["spec"]["containers"]
    assert f"--ca-url={url}" in container["args"]
    # Every sidecar of the CA example enrols with this Service, by its service-account token
    # (a join token enrols once; two replicas or a restarted sidecar enrol again).
    demos = [(p, d) for p, d in _sidecar_deployments() if p.parent == K8S]
    assert len(demos) == 2
    for _, dep in demos:
        demo_pod = dep["spec"]["template"]["spec"]
        sidecar = _container(demo_pod, "mtls-sidecar")
        assert sidecar is not None
        env = container_env(sidecar, ns)
        assert env["MTLS_IDENTITY_SOURCE"] == "ca"
        assert env["MTLS_CA_URL"] == url
        token_dir, _, token_name = env["MTLS_CA_TOKEN_FILE"].rpartition("/")
        (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == token_dir]
        (source,) = {v["name"]: v for v in demo_pod["volumes"]}[mount["name"]]["projected"][
            "sources"
        ]
        assert source["serviceAccountToken"]["audience"] == args.k8s_audience
        assert source["serviceAccountToken"]["path"] == token_name
        sa_name = demo_pod["serviceAccountName"]
        assert env["MTLS_IDENTITY"] == f"spiffe://cluster.local/ns/{ns}/sa/{sa_name}"


def test_ca_state_survives_a_restart(tmp_path: Path) -> None:
    """The ca-keys init script, run for real on a Secret-shaped directory (Kubernetes' atomic
    writer layout: ..data symlinks, files 0440) and a volume, twice, as at two pod starts:
    the issuance log, a revocation and crl.pem survive the second start, a key that left the
    Secret leaves the volume, group bits the kubelet added are taken away again, and
    `ca serve` starts with the manifest's flags on the result."""
    if not (REPO / "proxy" / "ca" / "cli.py").is_file():
        pytest.skip("the CA CLI does not exist yet")
    from tests.harness import free_port

    pod = _ca_docs()[("StatefulSet", "mtls-ca")]["spec"]["template"]["spec"]
    (keys,) = pod["initContainers"]
    assert keys["command"][:2] == ["python", "-c"]
    made = tmp_path / "made"
    init = _run_cli("ca", "init", "--dir", str(made), "--trust-domain", "cluster.local")
    assert init.returncode == 0, init.stderr
    offline = _run_cli("ca", "issue", "--dir", str(made), "--id", "spiffe://cluster.local/vm/db",
                       "--out", str(tmp_path / "db"))  # fmt: skip
    assert offline.returncode == 0, offline.stderr  # in the offline ca.db, not the volume's
    (made / "root-1.key").unlink()  # kept offline, as README "deploy" says
    secret = tmp_path / "secret"
    data = secret / "..2026_01_01_00_00_00.000000000"
    data.mkdir(parents=True)
    for f in made.iterdir():  # ca.db and crl.pem too: they must not replace the volume's
        (data / f.name).write_bytes(f.read_bytes())
        (data / f.name).chmod(0o440)
        (secret / f.name).symlink_to(Path("..data") / f.name)
    (secret / "..data").symlink_to(data.name)
    secret.chmod(0o1777)
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o2775)  # what fsGroup makes of a fresh volume's root
    ca_dir = volume / "ca"
    script = keys["command"][2].replace('"/etc/mtls-ca"', repr(str(secret)))
    script = script.replace('"/var/lib/mtls-ca/ca"', repr(str(ca_dir)))
    assert script != keys["command"][2]

    def start_pod() -> str:
        copy = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
        )
        assert copy.returncode == 0, copy.stderr
        info = _run_cli("ca", "info", "--dir", str(ca_dir))
        assert info.returncode == 0, info.stdout + info.stderr
        assert "cluster.local" in info.stdout
        return copy.stdout

    start_pod()
    client, app = (
        f"spiffe://cluster.local/ns/mtls-demo/sa/{sa}" for sa in ("demo-client", "demo-app")
    )
    issued = _run_cli("ca", "issue", "--dir", str(ca_dir), "--id", client, "--out",
                      str(tmp_path / "client"))  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    revoked = _run_cli("ca", "revoke", "--dir", str(ca_dir), "--id", app, "--reason",
                       "keyCompromise")  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    crl = (ca_dir / "crl.pem").read_bytes()
    # Between the two starts: the kubelet's fsGroup walk adds group bits, and an old key
    # (say, a generation removed by rotate-root) is on the volume but no longer in the Secret.
    for f in ca_dir.iterdir():
        f.chmod(f.stat().st_mode | 0o660)
    ca_dir.chmod(0o2770)
    (ca_dir / "intermediate-9.key").write_bytes(b"old\n")
    out = start_pod()

    assert "removing intermediate-9.key" in out and "ignoring ca.db" in out
    assert not (ca_dir / "intermediate-9.key").exists()
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    assert (ca_dir / "ca.db").stat().st_mode & 0o777 == 0o600
    assert (ca_dir / "crl.pem").read_bytes() == crl
    listing = _run_cli("ca", "list", "--dir", str(ca_dir), "--json")
    assert listing.returncode == 0, listing.stderr
    assert [row["identity"] for row in json.loads(listing.stdout)] == [client]
    again = _run_cli("ca", "issue", "--dir", str(ca_dir), "--id", app, "--out",
                     str(tmp_path / "app"))  # fmt: skip
    assert again.returncode != 0 and "revoked" in again.stderr, again.stderr

    # ca serve, with the manifest's flags (paths moved here), serves that directory.
    (ca,) = pod["containers"]
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text("a-token\n")
    (sa_dir / "ca.crt").write_bytes((made / "root-1.crt").read_bytes())
    port = free_port()
    argv = [
        a.replace("/var/lib/mtls-ca/ca", str(ca_dir)).replace(SA_DIR, str(sa_dir))
        for a in ca["args"]
    ]
    argv[argv.index("--listen") + 1] = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *argv], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "ca serve never listened"
                time.sleep(0.1)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "created the CA store" not in log, "the store on the volume was used"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_injector_manifests() -> None:
    """The webhook reaches the injector's Service and port over a certificate cert-manager
    issues for that Service's name, selects labelled namespaces only, and the injector's
    flags are the injector's own."""
    from proxy.k8s.cli import options_from
    from proxy.k8s.inject import inject
    from proxy.k8s.webhook import build_parser

    base = K8S / "injector"
    docs = {(d["kind"], d["metadata"]["name"]): d for d in
            (d for f in sorted(base.glob("*.yaml")) if f.name != "kustomization.yaml"
             for d in _docs(f))}  # fmt: skip
    (hook,) = docs[("MutatingWebhookConfiguration", "mtls-sidecar-injector")]["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail" and 1 <= hook["timeoutSeconds"] <= 10
    assert hook["reinvocationPolicy"] in ("Never", "IfNeeded")
    assert hook["namespaceSelector"] == {"matchLabels": {"mtls-sidecar.io/inject": "enabled"}}
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]  # fmt: skip
    assert any("'disabled'" in c["expression"] for c in hook["matchConditions"])
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == "/inject"
    svc = docs[("Service", ref["name"])]
    assert svc["metadata"]["namespace"] == ref["namespace"]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
    dep = docs[("Deployment", "mtls-injector")]
    pod = dep["spec"]["template"]["spec"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert container["args"][0] == "injector"
    flags = [a.replace("$(MTLS_CA_FINGERPRINT)", SAMPLE_VALUES["MTLS_CA_FINGERPRINT"])
             for a in container["args"][1:]]  # fmt: skip
    args = build_parser().parse_args(flags)
    assert int(args.listen.rpartition(":")[2]) == _port_number(container, port["targetPort"])
    assert args.image == container["image"], "the injected sidecar is the injector's version"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    # The serving certificate: cert-manager's, for the Service's DNS name, mounted at --cert.
    annotation = docs[("MutatingWebhookConfiguration", "mtls-sidecar-injector")]["metadata"][
        "annotations"
    ]["cert-manager.io/inject-ca-from"]
    cert_ns, cert_name = annotation.split("/")
    cert = docs[("Certificate", cert_name)]
    assert cert["metadata"]["namespace"] == cert_ns
    assert f"{ref['name']}.{ref['namespace']}.svc" in cert["spec"]["dnsNames"]
    assert docs[("Issuer", cert["spec"]["issuerRef"]["name"])]["metadata"]["namespace"] == cert_ns
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    assert volumes[mount["name"]]["secret"]["secretName"] == cert["spec"]["secretName"]
    assert args.cert == f"{mount['mountPath']}/tls.crt"
    assert args.key == f"{mount['mountPath']}/tls.key"
    # Restricted: no privileges, no API token; the namespace itself is never injected.
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    ns = docs[("Namespace", "mtls-system")]["metadata"]["labels"]
    assert "mtls-sidecar.io/inject" not in ns
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"
    # These flags are accepted by the injector and end up in the injected sidecar.
    _, demo = next((p, d) for p, d in _deployments() if d["metadata"]["name"] == "demo-app")
    plain = copy.deepcopy(demo)
    plain["spec"]["template"]["spec"]["initContainers"] = []
    plain["spec"]["template"]["spec"]["volumes"] = [{"name": "srv", "emptyDir": {}}]
    injected = inject(plain, options_from(args))
    template = injected["spec"]["template"]
    sidecar = _container(template["spec"], "mtls-sidecar")
    assert sidecar is not None
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["MTLS_CA_URL"] == args.ca_url and env["MTLS_CA_FINGERPRINT"] == "9f" * 32


def test_service_monitor_selects_the_sidecars() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _manifests()}
    sm = docs[("ServiceMonitor", "mtls-sidecar")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = next(
        d for (kind, _), d in docs.items()
        if kind == "Service"
        and sm["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    )  # fmt: skip
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "mtls-sidecar", "action": "replace"} in endpoint[
        "relabelings"
    ], "the alert rules select up{job='mtls-sidecar'}"
    selected = [
        dep for path, dep in _sidecar_deployments()
        if path.parent == K8S
        and svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    ]  # fmt: skip
    assert len(selected) == 2
    for dep in selected:
        sidecar = _container(dep["spec"]["template"]["spec"], "mtls-sidecar")
        assert sidecar is not None
        assert _port_number(sidecar, ports[endpoint["port"]]["targetPort"]) == ADMIN_PORT


def test_cert_manager_variant_uses_csi_driver_spiffe() -> None:
    found = 0
    for path, dep in _sidecar_deployments():
        if path.parent.name != "cert-manager":
            continue
        found += 1
        pod = dep["spec"]["template"]["spec"]
        sidecar = _container(pod, "mtls-sidecar")
        assert sidecar is not None
        env = container_env(sidecar, dep["metadata"]["namespace"])
        assert env["MTLS_IDENTITY_SOURCE"] == "files"
        assert "MTLS_TRANSPARENT" not in env
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(
            m for m in sidecar["volumeMounts"] if env["MTLS_CERT_FILE"].startswith(m["mountPath"])
        )
        csi = volumes[mount["name"]]["csi"]
        assert csi["driver"] == "spiffe.csi.cert-manager.io"
        assert csi["volumeAttributes"]["spiffe.csi.cert-manager.io/fs-group"] == str(PROXY_UID)
        for key, name in (("MTLS_CERT_FILE", "tls.crt"), ("MTLS_KEY_FILE", "tls.key"),
                          ("MTLS_TRUST_BUNDLE_FILE", "ca.crt")):  # fmt: skip
            assert env[key] == f"{mount['mountPath']}/{name}"
    assert found == 2


# --- env vars --------------------------------------------------------------------------------


def test_env_vars_are_documented() -> None:
    names = _all_env_names()
    mtls = {n for n in names if n.startswith("MTLS_")}
    assert len(mtls) > 15
    unknown = mtls - _known_env()
    assert not unknown, f"not in SPEC.md nor the known extras: {sorted(unknown)}"
    others = names - mtls - {"GF_AUTH_ANONYMOUS_ENABLED", "GF_AUTH_ANONYMOUS_ORG_ROLE"}
    assert not others, f"unexpected env vars: {others}"


def test_env_vars_are_in_the_readme() -> None:
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    text = readme.read_text()
    missing = sorted(n for n in _all_env_names() if n.startswith("MTLS_") and n not in text)
    assert not missing, f"env vars used in deploy/ but not documented in README.md: {missing}"


def _write_material(directory: Path, spiffe_id: str) -> dict[str, Path]:
    """A root CA and a leaf for spiffe_id, as csi-driver-spiffe or `ca issue` would write them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy test root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            critical=True,
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {
        "cert": directory / "tls.crt",
        "key": directory / "tls.key",
        "bundle": directory / "ca.crt",
        "token": directory / "token",
    }
    paths["cert"].write_bytes(leaf.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    paths["bundle"].write_bytes(root.public_bytes(pem))
    paths["token"].write_text(SAMPLE_VALUES["MTLS_CA_TOKEN"] + "\n")
    return paths


@pytest.mark.parametrize("where,env", sidecar_envs(), ids=[w for w, _ in sidecar_envs()])
def test_manifest_env_passes_check(where: str, env: dict[str, str], tmp_path: Path) -> None:
    """`mtls-sidecar check` accepts the exact env of every sidecar in deploy/.

    Paths that exist only inside the pod (*_FILE: the join token, csi-driver-spiffe's files)
    are pointed at stand-ins in tmp_path: a token file, and a real root + leaf for the identity
    the manifest implies. Values the user creates at install time use SAMPLE_VALUES.
    """
    if not (REPO / "proxy" / "__main__.py").is_file():
        pytest.skip("proxy/__main__.py does not exist yet (the CLI lands with the core)")
    m = re.search(
        r"/ns/([^/]+)/sa/([^/,]+)", env.get("MTLS_ALLOW_PEERS", "") + env.get("MTLS_OUTBOUND", "")
    )
    spiffe_id = env.get("MTLS_IDENTITY") or (
        f"spiffe://cluster.local/ns/{m.group(1)}/sa/demo-app" if m else "spiffe://cluster.local/x"
    )
    files = _write_material(tmp_path, spiffe_id)
    by_suffix = {"MTLS_CERT_FILE": "cert", "MTLS_KEY_FILE": "key",
                 "MTLS_TRUST_BUNDLE_FILE": "bundle", "MTLS_CA_TOKEN_FILE": "token"}  # fmt: skip
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    for key, value in env.items():
        run_env[key] = str(files[by_suffix[key]]) if key in by_suffix else value
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{where}: check failed:\n{result.stdout}\n{result.stderr}"


# --- compose ---------------------------------------------------------------------------------


def test_compose_file_references_exist() -> None:
    data = _compose()
    services: dict[str, Any] = data["services"]
    base = COMPOSE.parent
    assert len(_compose_sidecars()) == 2
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = (base / build["context"]).resolve()
            assert ctx.is_dir(), f"{name}: build context {ctx}"
            assert (ctx / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (base / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in data["volumes"], f"{name}: named volume {source} not declared"
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name}: depends on unknown {dep}"
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in services, name
        image = str(svc.get("image", ""))
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_sidecars_explicit_mode_and_scraped() -> None:
    data = _compose()
    services = data["services"]
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "mtls-sidecar")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    # Compose v1 (docker-compose 1.29) refuses the Compose Spec's top-level `name:`.
    assert set(data) <= {"services", "volumes", "networks", "x-sidecar", "x-pod"}, set(data)
    for name, svc in _compose_sidecars():
        env = svc["environment"]
        assert "MTLS_TRANSPARENT" not in env, name
        assert "MTLS_INBOUND" in env or "MTLS_OUTBOUND" in env, name
        assert env["MTLS_IDENTITY_SOURCE"] == "ca", name
        assert env["MTLS_CA_URL"].startswith("https://ca:"), name
        assert str(svc["user"]).split(":")[0] == str(PROXY_UID), name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        # Docker's grace period outlasts the drain, or `docker stop` kills mid-drain.
        drain = float(env["MTLS_DRAIN_TIMEOUT"].rstrip("s"))
        assert float(str(svc["stop_grace_period"]).rstrip("s")) > drain, name
        # The sidecar and its app join a pod-like holder of the network namespace, so either
        # can restart without taking the other's network away.
        mode = svc["network_mode"]
        assert mode.startswith("service:"), name
        pod = mode.split(":", 1)[1]
        assert services[pod].get("restart") == "unless-stopped", pod
        host, _, port = env["MTLS_ADMIN_LISTEN"].rpartition(":")
        assert ipaddress.ip_address(host or "0.0.0.0").is_unspecified, name
        assert f"{pod}:{port}" in targets, f"prometheus.yml does not scrape {name} ({pod})"
        apps = [
            n
            for n, s in services.items()
            if s.get("network_mode") == f"service:{pod}" and n != name
        ]
        assert len(apps) == 1, (name, apps)
    # The CA writes its store (ca.db, crl.pem) into its volume, and its certificate names the
    # host the sidecars dial.
    ca = services["ca"]
    assert all(not v.endswith(":ro") for v in ca["volumes"]), ca["volumes"]
    command = ca["command"]
    assert command[command.index("--dns") + 1] == "ca"
    # setup.sh writes every variable the compose file requires (${VAR:?...}).
    setup = (COMPOSE.parent / "setup.sh").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required
    for var in required:
        assert re.search(rf"echo \"{var}=", setup), f"setup.sh does not write {var}"


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_passes_lint() -> None:
    findings = dockerfile_lint.lint(DOCKERFILE.read_text())
    assert not findings, "\n".join(map(str, findings))


def test_dockerfile_shape() -> None:
    parsed = dockerfile_lint.parse(DOCKERFILE.read_text())
    stages = dockerfile_lint.stages(parsed)
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    assert final.image.startswith("python:3.11-slim"), final.image
    kw = {i.keyword: i.args for i in final.instructions}
    assert kw["USER"] == f"{PROXY_UID}:{PROXY_UID}"
    assert json.loads(kw["ENTRYPOINT"]) == ["mtls-sidecar"]
    assert json.loads(kw["CMD"]) == ["run"]
    assert not any(i.keyword == "RUN" and "pip" in i.args for i in final.instructions), (
        "the final stage copies the built venv; it does not build"
    )


@pytest.mark.parametrize(
    "snippet,rule",
    [
        ("FROM python\nUSER 1\n", "DF001"),
        ("FROM python:latest\n", "DF001"),
        ("FROM python:3.11\nUSER app\n", "DF021"),
        ("FROM python:3.11\nUSER 0\n", "DF020"),
        ("FROM python:3.11\n", "DF020"),
        ("FROM python:3.11\nENTRYPOINT mtls-sidecar run\n", "DF023"),
        ("FROM python:3.11\nCMD run\n", "DF023"),
        ("FROM python:3.11\n", "DF024"),
        ("FROM python:3.11\nHEALTHCHECK CMD curl -f http://x/ || exit 1\n", "DF025"),
        ("FROM python:3.11\nADD https://example.com/x.tgz /x\n", "DF010"),
        ("FROM python:3.11\nADD . /src\n", "DF011"),
        ("FROM python:3.11\nRUN apt-get update && apt-get install -y --no-install-recommends x",
         "DF053"),
        ("FROM python:3.11\nRUN apt-get install -y --no-install-recommends x\n", "DF052"),
        ("FROM python:3.11\nRUN apt-get update && apt-get install -y x"
         " && rm -rf /var/lib/apt/lists/*",
         "DF050"),
        ("FROM python:3.11\nRUN pip install x\n", "DF055"),
        ("FROM python:3.11\nENV MTLS_CA_TOKEN=abc\n", "DF030"),
        ("FROM python:3.11\nENV API_KEY abc\n", "DF030"),
        ("FROM python:3.11\nARG DB_PASSWORD=hunter2\n", "DF031"),
        ("FROM python:3.11\nCOPY --from=nope /a /b\n", "DF014"),
        ("FROM python:3.11\nLABEL org.opencontainers.image.title=x\n", "DF040"),
    ],
)  # fmt: skip
def test_dockerfile_lint_catches(snippet: str, rule: str) -> None:
    assert rule in {f.rule for f in dockerfile_lint.lint(snippet)}


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or its parents."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        rx = re.escape(pattern.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for ins in dockerfile_lint.parse(DOCKERFILE.read_text()):
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources += [w for w in ins.args.split() if not w.startswith("--")][:-1]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert (REPO / src).exists(), f"COPY {src}: missing from the repo"
        assert not _dockerignore_excludes(src, patterns), f"COPY {src}: excluded by .dockerignore"
        if (REPO / src).is_dir():
            for f in (REPO / src).rglob("*.py"):
                rel = str(f.relative_to(REPO))
                assert not _dockerignore_excludes(rel, patterns), rel
    for secret in (
        "certs/dev.key",
        "demo-out/x.pem",
        ".venv/bin/python",
        ".git/config",
        "tests/x.py",
    ):
        assert _dockerignore_excludes(secret, patterns), secret


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, name="health-server", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_command_works(health_server: http.server.ThreadingHTTPServer) -> None:
    """The HEALTHCHECK's python -c, run for real: 0 on 200 from /ready, non-zero otherwise,
    with MTLS_ADMIN_LISTEN in each address form (a wildcard is probed on loopback)."""
    cmd = dockerfile_lint.healthcheck_command(DOCKERFILE.read_text())
    assert cmd and cmd[0] == "python" and cmd[1] == "-c"
    port = health_server.server_address[1]

    def run(listen: str | None) -> int:
        env = {"PATH": os.environ.get("PATH", "")}
        if listen is not None:
            env["MTLS_ADMIN_LISTEN"] = listen
        return subprocess.run(
            [sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=10
        ).returncode

    for listen in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f":{port}"):
        _Health.status = 200
        assert run(listen) == 0, listen
    _Health.status = 503
    assert run(f"127.0.0.1:{port}") != 0
    _Health.status = 200
    health_server.server_close()  # nothing listens any more: refused
    assert run(f"127.0.0.1:{port}") != 0


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A scratch directory UID 1337 can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mtls-image-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_image_install_steps(world_readable_dir: Path) -> None:
    """The Dockerfile's install steps on this machine: build the wheel, install it into a fresh
    venv, and run the console script `mtls-sidecar check` from it (as UID 1337 when root).

    The wheel is built exactly as in the image (pip wheel with build isolation); the runtime
    dependencies come from the project venv (a .pth file) rather than a second download.
    """
    if not (REPO / "proxy" / "__main__.py").is_file():
        pytest.skip("proxy/__main__.py does not exist yet (the CLI lands with the core)")
    if not (REPO / "README.md").is_file():
        pytest.fail("README.md is missing: pyproject's readme, and COPY'd by the Dockerfile")
    wheels = world_readable_dir / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
         "--wheel-dir", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("mtls_sidecar-*.whl")
    target = world_readable_dir / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    site = next(target.glob("lib/python3*/site-packages"))
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "project-deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir",
         "--target", str(site), "--upgrade", str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # pip --target puts the console script under site/bin; a real venv install under venv/bin.
    script = site / "bin" / "mtls-sidecar"
    assert script.is_file(), sorted(p.name for p in site.iterdir())
    script.write_text(
        re.sub(r"^#!.*", f"#!{target / 'bin' / 'python'}", script.read_text(), count=1)
    )
    files = _write_material(world_readable_dir, "spiffe://corp.example/ns/shop/sa/web")
    if os.geteuid() == 0:  # the key stays 0600, owned by the user that runs check
        for p in [world_readable_dir, *world_readable_dir.rglob("*")]:
            os.chown(p, PROXY_UID, PROXY_UID, follow_symlinks=False)
    env = {
        "PATH": f"{target / 'bin'}:/usr/bin:/bin",
        "HOME": str(world_readable_dir),
        "MTLS_IDENTITY_SOURCE": "files",
        "MTLS_CERT_FILE": str(files["cert"]),
        "MTLS_KEY_FILE": str(files["key"]),
        "MTLS_TRUST_BUNDLE_FILE": str(files["bundle"]),
        "MTLS_INBOUND": "127.0.0.1:18443=127.0.0.1:18080",
    }
    root = os.geteuid() == 0
    result = subprocess.run(
        [str(script), "check"], cwd=world_readable_dir, env=env, capture_output=True, text=True,
        timeout=30, check=False, user=PROXY_UID if root else None,
        group=PROXY_UID if root else None, extra_groups=[] if root else None,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import proxy" not in result.stderr
    # ...and a proxied connection through `mtls-sidecar run` from that install, same user.
    import socket
    import ssl
    import urllib.request

    from tests.harness import TcpApp, free_port

    echo = TcpApp("echo")
    port, admin = free_port(), free_port()
    env.update(
        {
            "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{echo.port}",
            "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "MTLS_WORKERS": "1",
        }
    )
    proc = subprocess.Popen(
        [str(script), "run"], cwd=world_readable_dir, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        user=PROXY_UID if root else None, group=PROXY_UID if root else None,
        extra_groups=[] if root else None,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the installed sidecar never became ready"
                time.sleep(0.1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(files["bundle"])
        ctx.load_cert_chain(files["cert"], files["key"])
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
            s.sendall(b"through the installed wheel")
            assert s.recv(100) == b"through the installed wheel"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        echo.close()
    assert proc.returncode == 0, out


def test_every_setting_and_metric_is_in_the_readme() -> None:
    """The README documents every MTLS_* variable the settings know and every metric."""
    import re

    from proxy.config import known_variables

    text = (REPO / "README.md").read_text()
    missing = [v for v in known_variables() if f"`{v}`" not in text]
    assert not missing, f"settings not documented in README.md: {missing}"
    source = (REPO / "proxy" / "metrics.py").read_text()
    metrics = set(re.findall(r'"(mtls_[a-z_]+)"', source))
    assert metrics
    undocumented = sorted(m for m in metrics if m not in text)
    assert not undocumented, f"metrics not documented in README.md: {undocumented}"
