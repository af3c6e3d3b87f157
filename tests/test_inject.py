"""`inject` / `uninject` and the `injector` webhook: goldens, schemas, the pod contract,
property tests, the CLI as a process, and the webhook as a real HTTPS server."""

from __future__ import annotations

import base64
import copy
import functools
import http.client
import io
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.k8s import inject as inj
from proxy.k8s.cli import inject_main
from proxy.k8s.webhook import BadReview, parse_review, review_answer
from tests import pki
from tests.test_deploy import SAMPLE_VALUES, _k8s_versions, assert_sidecar_pod_contract

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "inject"
CASES = sorted(p.stem for p in (GOLDEN / "in").glob("*.yaml"))


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _cli(main: Any, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return int(code), out.getvalue(), err.getvalue()


def _templates(obj: Any) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, workload, pod template) for every pod template in a manifest."""
    if obj.get("kind", "").endswith("List"):
        for item in obj["items"]:
            yield from _templates(item)
        return
    path = inj.TEMPLATE_PATHS.get(obj.get("kind"))
    if path is None:
        return
    node = obj
    for key in path:
        node = node[key]
    yield inj.describe(obj), obj, node


def pod_env(container: dict[str, Any], namespace: str, service_account: str) -> dict[str, str]:
    """The env the kubelet gives a container: downward-API fields, the fingerprint ConfigMap
    (its sample value) and $(VAR) expansion of earlier variables."""
    env: dict[str, str] = {}
    fields = {"metadata.namespace": namespace, "spec.serviceAccountName": service_account}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert item["valueFrom"]["configMapKeyRef"] == {
                "name": "mtls-ca-trust",
                "key": "fingerprint",
            }
            env[item["name"]] = SAMPLE_VALUES["MTLS_CA_FINGERPRINT"]
    return env


def _sa(template: dict[str, Any]) -> str:
    return str(template["spec"].get("serviceAccountName", "default"))


def _ns(workload: dict[str, Any]) -> str:
    return str(workload["metadata"].get("namespace", "default"))


# --- goldens ----------------------------------------------------------------------------------


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / "out" / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.mark.parametrize("case", CASES)
def test_inject_golden(case: str) -> None:
    code, out, err = _cli(inject_main, [str(GOLDEN / "in" / f"{case}.yaml")])
    assert code == 0, err
    _check_golden(f"{case}.yaml", out)


def test_golden_cases_cover_every_kind() -> None:
    kinds = set()
    for case in CASES:
        for doc in _load_all(GOLDEN / "in" / f"{case}.yaml"):
            kinds.add(doc["kind"])
            kinds |= {item["kind"] for item in doc.get("items", [])}
    assert set(inj.TEMPLATE_PATHS) | {"List", "Service", "ConfigMap"} <= kinds


@pytest.mark.parametrize("case", CASES)
def test_injected_golden_validates_and_keeps_the_contract(case: str) -> None:
    """Every injected output: Kubernetes schemas (1.29 and the newest, strict) and the pod
    contract the hand-written manifests follow."""
    from kubernetes_validate import utils

    injected = 0
    for doc in _load_all(GOLDEN / "out" / f"{case}.yaml"):
        # A List has no schema of its own (kubectl unpacks it): its items are checked.
        for obj in doc["items"] if doc["kind"] == "List" else [doc]:
            for version in _k8s_versions():
                try:
                    utils.validate(obj, version, strict=True)
                except utils.ValidationError as exc:
                    where = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{case} {version}: {obj['kind']}: {where}: {exc.message}")
        for where, workload, template in _templates(doc):
            if not inj.is_injected(template):
                continue
            injected += 1
            ns, sa = _ns(workload), _sa(template)
            assert_sidecar_pod_contract(
                f"{case}: {where}",
                template,
                functools.partial(pod_env, namespace=ns, service_account=sa),
                user_workload=True,
            )
            sidecar = next(
                c for c in template["spec"]["initContainers"] if c["name"] == "mtls-sidecar"
            )
            env = pod_env(sidecar, ns, sa)
            assert env["MTLS_IDENTITY"] == f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
            assert env["MTLS_CA_TOKEN_FILE"] == "/var/run/secrets/mtls/token"
            assert not [k for k in env if not k.startswith("MTLS_") and k not in
                        ("POD_NAMESPACE", "POD_SERVICE_ACCOUNT")]  # fmt: skip
            (token,) = [v for v in template["spec"]["volumes"] if v["name"] == "mtls-token"]
            assert token["projected"]["sources"] == [
                {
                    "serviceAccountToken": {
                        "audience": "mtls-sidecar",
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ]
    assert injected >= 1, case


@pytest.mark.parametrize("case", CASES)
def test_golden_uninject_round_trip_and_idempotence(case: str) -> None:
    original = _load_all(GOLDEN / "in" / f"{case}.yaml")
    injected = _load_all(GOLDEN / "out" / f"{case}.yaml")
    assert [inj.uninject(d) for d in injected] == original
    assert [inj.inject(d) for d in injected] == injected


def test_injected_env_passes_check(tmp_path: Path) -> None:
    """`mtls-sidecar check` (the real command) accepts the env the injected pod gets, the
    non-MTLS helpers for the identity included."""
    (doc,) = _load_all(GOLDEN / "out" / "nginx-deployment.yaml")
    (_, _, template), *_ = _templates(doc)
    sidecar = template["spec"]["initContainers"][1]
    env = pod_env(sidecar, "default", "default")
    token = tmp_path / "token"
    token.write_text("a projected token\n")
    env["MTLS_CA_TOKEN_FILE"] = str(token)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"MTLS_IDENTITY": "spiffe://cluster.local/ns/default/sa/default"' in result.stdout


# --- decisions --------------------------------------------------------------------------------


def _deployment(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    template: dict[str, Any] = {
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "web:1"}], **spec},
    }
    if annotations is not None:
        template["metadata"]["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
    }


def _sidecar_env(obj: dict[str, Any]) -> dict[str, str]:
    template = obj["spec"]["template"]
    sidecar = next(c for c in template["spec"]["initContainers"] if c["name"] == "mtls-sidecar")
    return pod_env(sidecar, "shop", _sa(template))


P = inj.PREFIX


@pytest.mark.parametrize(
    "annotations,expected",
    [
        ({P + "workers": "abc"}, f"annotation {P}workers='abc': MTLS_WORKERS"),
        ({P + "inbound-mode": "lenient"}, f"annotation {P}inbound-mode='lenient'"),
        ({P + "exclude-inbound-ports": "http"}, f"annotation {P}exclude-inbound-ports='http'"),
        ({P + "exclude-outbound-cidrs": "10.0.0.0/33"}, f"{P}exclude-outbound-cidrs"),
        ({P + "allow-peers": "https://x"}, f"annotation {P}allow-peers="),
        ({P + "log-level": "loud"}, f"annotation {P}log-level='loud'"),
        ({P + "inject": "yes"}, f"annotation {P}inject='yes': must be enabled or disabled"),
        ({P + "mode": "magic"}, f"annotation {P}mode='magic'"),
        ({P + "wrokers": "2"}, f"unknown annotation {P}wrokers"),
        ({P + "mode": "explicit"}, "nothing to do"),
        ({P + "trust-domain": "Not A Domain"}, f"annotation {P}trust-domain="),
        ({P + "ca-url": "http://plain"}, f"annotation {P}ca-url='http://plain': MTLS_CA_URL"),
        ({P + "ca-fingerprint": "abc"}, f"annotation {P}ca-fingerprint='abc'"),
        # Not a setting of this sidecar version: refused rather than failing in the pod.
        ({P + "proxy-protocol": "bogus-value"}, f"annotation {P}proxy-protocol="),
        ({P + "policy-configmap": "Web_Policy"}, "'Web_Policy' is not a ConfigMap name"),
        ({P + "policy-configmap": "web/a b"}, "'a b' is not a ConfigMap key"),
        ({P + "policy-configmap": "web/.."}, "'..' is not a ConfigMap key"),
        ({P + "policy-configmap": ""}, "'' is not a ConfigMap name"),
    ],
)  # fmt: skip
def test_bad_annotation_is_a_clear_error(annotations: dict[str, str], expected: str) -> None:
    with pytest.raises(inj.InjectError) as info:
        inj.inject(_deployment(annotations))
    message = str(info.value)
    assert message.startswith("Deployment shop/web: "), message
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "annotations,var,value",
    [
        ({}, "MTLS_EXCLUDE_INBOUND_PORTS", "15000"),
        ({P + "exclude-inbound-ports": "22,9090-9099"}, "MTLS_EXCLUDE_INBOUND_PORTS",
         "15000,22,9090-9099"),
        ({P + "exclude-outbound-ports": "53"}, "MTLS_EXCLUDE_OUTBOUND_PORTS", "53"),
        ({P + "exclude-outbound-cidrs": "169.254.169.254/32"}, "MTLS_EXCLUDE_OUTBOUND_CIDRS",
         "169.254.169.254/32"),
        ({P + "inbound-mode": "audit"}, "MTLS_INBOUND_MODE", "audit"),
        ({P + "outbound-mode": "permissive"}, "MTLS_OUTBOUND_MODE", "permissive"),
        ({P + "allow-peers": "spiffe://cluster.local/ns/shop/**"}, "MTLS_ALLOW_PEERS",
         "spiffe://cluster.local/ns/shop/**"),
        ({P + "workers": "3"}, "MTLS_WORKERS", "3"),
        ({P + "log-level": "debug"}, "MTLS_LOG_LEVEL", "debug"),
        ({P + "log-format": "text"}, "MTLS_LOG_FORMAT", "text"),
        ({P + "min-tls-version": "1.2"}, "MTLS_MIN_TLS_VERSION", "1.2"),
        ({P + "drain-timeout": "5s"}, "MTLS_DRAIN_TIMEOUT", "5s"),
        ({P + "idle-timeout": "10m"}, "MTLS_IDLE_TIMEOUT", "10m"),
        ({P + "connection-reuse": "false"}, "MTLS_CONNECTION_REUSE", "false"),
        ({P + "max-connections": "100"}, "MTLS_MAX_CONNECTIONS", "100"),
        ({P + "ca-url": "https://ca.example:8443"}, "MTLS_CA_URL", "https://ca.example:8443"),
        ({P + "trust-domain": "corp.example"}, "MTLS_IDENTITY",
         "spiffe://corp.example/ns/shop/sa/default"),
        ({P + "ca-fingerprint": "ab" * 32}, "MTLS_CA_FINGERPRINT", "ab" * 32),
    ],
)  # fmt: skip
def test_annotation_sets_its_variable(annotations: dict[str, str], var: str, value: str) -> None:
    assert _sidecar_env(inj.inject(_deployment(annotations)))[var] == value


@pytest.mark.parametrize("mode", inj.MODES)
def test_policy_configmap_is_mounted_and_named_by_mtls_policy_file(mode: str) -> None:
    annotations = {P + "policy-configmap": "web-policy/authz.yaml", P + "mode": mode}
    if mode == "explicit":
        annotations[P + "inbound"] = "0.0.0.0:8443=127.0.0.1:8080"
    obj = _deployment(annotations)
    injected = inj.inject(obj)
    env = _sidecar_env(injected)
    assert env["MTLS_POLICY_FILE"] == "/etc/mtls/policy/authz.yaml"
    spec = injected["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "mtls-policy"]
    assert volume["configMap"] == {
        "name": "web-policy",
        "items": [{"key": "authz.yaml", "path": "authz.yaml"}],
        "defaultMode": 0o444,
    }
    # A directory mount (the kubelet updates it in place), never a subPath (never updated),
    # in every container that loads the settings.
    for c in spec["initContainers"]:
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "mtls-policy"]
        assert mount == {"name": "mtls-policy", "mountPath": "/etc/mtls/policy", "readOnly": True}
    assert len(spec["initContainers"]) == (2 if mode == "transparent" else 1)
    assert inj.uninject(injected) == obj
    assert inj.inject(injected) == injected
    # Without a key the file is policy.yaml; without the annotation nothing of it.
    plain = inj.inject(_deployment({P + "policy-configmap": "web-policy"}))
    assert _sidecar_env(plain)["MTLS_POLICY_FILE"] == "/etc/mtls/policy/policy.yaml"
    assert "MTLS_POLICY_FILE" not in _sidecar_env(inj.inject(_deployment()))
    taken = _deployment(
        {P + "policy-configmap": "web-policy"},
        volumes=[{"name": "mtls-policy", "emptyDir": {}}],
    )
    with pytest.raises(inj.InjectError, match="a volume is already named mtls-policy"):
        inj.inject(taken)


def test_the_policy_of_the_golden_configmap_is_valid() -> None:
    from proxy.policyfile import parse_policy

    (configmap, _) = _load_all(GOLDEN / "in" / "policy-configmap.yaml")
    policy = parse_policy(configmap["data"]["policy.yaml"])
    assert policy.outbound_default == "deny" and "*" in policy.outbound


def test_options_set_the_ca_and_image() -> None:
    options = inj.Options(
        image="registry.internal/mtls-sidecar:0.2.0",
        ca_url="https://ca.mtls-system.svc:8443",
        ca_fingerprint="cd" * 32,
        trust_domain="corp.example",
        token_audience="mesh",
        token_expiration_seconds=7200,
    )
    out = inj.inject(_deployment(), options)
    spec = out["spec"]["template"]["spec"]
    assert {c["image"] for c in spec["initContainers"]} == {options.image}
    env = _sidecar_env(out)
    assert env["MTLS_CA_URL"] == options.ca_url
    assert env["MTLS_CA_FINGERPRINT"] == "cd" * 32
    assert env["MTLS_IDENTITY"] == "spiffe://corp.example/ns/shop/sa/default"
    (token,) = [v for v in spec["volumes"] if v["name"] == "mtls-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "mesh",
        "expirationSeconds": 7200,
        "path": "token",
    }
    with pytest.raises(inj.InjectError, match=r"--ca-url: MTLS_CA_URL"):
        inj.inject(_deployment(), inj.Options(ca_url="ftp://x"))


def test_probe_ports_are_excluded_from_capture() -> None:
    (pod,) = _load_all(GOLDEN / "in" / "pod-probes.yaml")
    result = inj.inject_report(pod)
    sidecar = result.obj["spec"]["initContainers"][1]
    env = pod_env(sidecar, "shop", "web")
    # health (named 8081), tcpSocket 8080, grpc 9090; not 80, which probes another host.
    assert env["MTLS_EXCLUDE_INBOUND_PORTS"] == "15000,8081,8080,9090"
    assert len(result.notes) == 3 and all("accepts plaintext" in n for n in result.notes)
    # The app's probes themselves are untouched.
    assert result.obj["spec"]["containers"] == pod["spec"]["containers"]
    # Explicit mode captures nothing, so nothing is excluded.
    pod["metadata"]["annotations"] = {P + "mode": "explicit", P + "inbound": ":8443=127.0.0.1:8080"}
    env = pod_env(inj.inject(pod)["spec"]["initContainers"][0], "shop", "web")
    assert "MTLS_EXCLUDE_INBOUND_PORTS" not in env


def test_probe_on_an_unknown_named_port_is_an_error() -> None:
    dep = _deployment()
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/", "port": "nope"}
    }
    with pytest.raises(inj.InjectError, match=r"container web: livenessProbe uses port 'nope'"):
        inj.inject(dep)


def test_skipped_workloads() -> None:
    for dep, note in (
        (_deployment({P + "inject": "disabled"}), "inject is disabled"),
        (_deployment(hostNetwork=True), "hostNetwork"),
    ):
        result = inj.inject_report(dep)
        assert result.obj == dep
        assert len(result.notes) == 1 and note in result.notes[0]
    with open(REPO / "deploy" / "kubernetes" / "demo-app.yaml") as f:
        hand_made = next(d for d in yaml.safe_load_all(f) if d["kind"] == "Deployment")
    assert inj.inject(hand_made) == hand_made
    assert inj.uninject(hand_made) == hand_made
    taken = _deployment(volumes=[{"name": "mtls-tmp", "emptyDir": {}}])
    with pytest.raises(inj.InjectError, match="a volume is already named mtls-tmp"):
        inj.inject(taken)


@pytest.mark.parametrize(
    "spec,mode,expected",
    [
        ({"containers": [{"name": "web", "image": "w", "ports": [{"containerPort": 15000}]}]},
         "explicit", "container web: port 15000 is the sidecar's admin port"),
        ({"containers": [{"name": "web", "image": "w", "ports": [{"containerPort": 15006}]}]},
         "transparent", "port 15006 is the sidecar's inbound capture port"),
        ({"containers": [{"name": "web", "image": "w", "securityContext": {"runAsUser": 1337}}]},
         "transparent", "container web runs as UID 1337"),
        ({"securityContext": {"runAsUser": 1337},
          "containers": [{"name": "web", "image": "w"}]},
         "transparent", "container web runs as UID 1337"),
    ],
)  # fmt: skip
def test_pods_that_clash_with_the_sidecar(spec: dict[str, Any], mode: str, expected: str) -> None:
    dep = _deployment({P + "mode": mode, P + "inbound": ":8443=127.0.0.1:8080"})
    dep["spec"]["template"]["spec"] = spec
    with pytest.raises(inj.InjectError, match=re.escape(expected)):
        inj.inject(dep)
    # The same pod with another UID, or port 15006 in explicit mode, is fine.
    if mode == "transparent" and "15006" not in expected:
        spec = json.loads(json.dumps(spec).replace("1337", "1000"))
        dep["spec"]["template"]["spec"] = spec
        assert inj.is_injected(inj.inject(dep)["spec"]["template"])


def test_damaged_state_annotation() -> None:
    out = inj.inject(_deployment())
    out["spec"]["template"]["metadata"]["annotations"][inj.STATE_ANNOTATION] = "{not json"
    with pytest.raises(inj.InjectError, match=r"mtls-sidecar\.io/injected is damaged"):
        inj.uninject(out)


def test_grace_period_bounds_the_drain_timeout() -> None:
    for grace, drain in ((None, "20s"), (60, "20s"), (10, "5s"), (3, "0s")):
        spec: dict[str, Any] = {} if grace is None else {"terminationGracePeriodSeconds": grace}
        assert _sidecar_env(inj.inject(_deployment(**spec)))["MTLS_DRAIN_TIMEOUT"] == drain


# --- properties -------------------------------------------------------------------------------

_names = st.sampled_from(["app", "web", "db", "worker", "cache", "job"])
# Not the sidecar's own ports, which `inject` refuses (test_pods_that_clash_with_the_sidecar).
_port = st.integers(min_value=1, max_value=65535).filter(lambda p: p not in inj.SIDECAR_PORTS)


@st.composite
def _containers(draw: st.DrawFn, min_size: int) -> list[dict[str, Any]]:
    names = draw(st.lists(_names, min_size=min_size, max_size=3, unique=True))
    out = []
    for name in names:
        c: dict[str, Any] = {"name": name, "image": f"{name}:1"}
        ports = draw(st.lists(_port, max_size=2, unique=True))
        if ports:
            c["ports"] = [{"name": f"p{i}", "containerPort": p} for i, p in enumerate(ports)]
        for probe in draw(st.lists(st.sampled_from(inj.PROBES), max_size=3, unique=True)):
            kind = draw(st.sampled_from(["httpGet", "tcpSocket", "grpc", "exec"]))
            if kind == "exec":
                c[probe] = {"exec": {"command": ["true"]}}
            elif ports and kind != "grpc" and draw(st.booleans()):
                c[probe] = {kind: {"port": "p0"}}
            else:
                c[probe] = {kind: {"port": draw(_port)}}
        if draw(st.booleans()):
            c["env"] = [{"name": "APP_MODE", "value": draw(st.sampled_from(["a", "b"]))}]
        out.append(c)
    return out


@st.composite
def _workloads(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": draw(_containers(1))}
    if draw(st.booleans()):
        spec["initContainers"] = draw(_containers(0))
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
    if draw(st.booleans()):
        spec["securityContext"] = draw(
            st.sampled_from(
                [
                    {},
                    {"fsGroup": 2000},
                    {"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}},
                ]
            )
        )
    if draw(st.booleans()):
        spec["serviceAccountName"] = draw(_names)
    if draw(st.booleans()):
        spec["terminationGracePeriodSeconds"] = draw(st.integers(0, 120))
    metadata: dict[str, Any] = {}
    if draw(st.booleans()):
        metadata["labels"] = {"app": draw(_names)}
    annotations = draw(
        st.dictionaries(
            st.sampled_from([
                "prometheus.io/scrape", "prometheus.io/port", "team",
                P + "inbound-mode", P + "workers", P + "exclude-outbound-ports",
            ]),
            st.sampled_from(["true", "2", "strict", "audit", "53"]),
            max_size=3,
        )
    )  # fmt: skip
    if annotations.get(P + "inbound-mode") not in (None, "strict", "audit"):
        annotations[P + "inbound-mode"] = "audit"
    if annotations.get(P + "workers") not in (None, "2"):
        annotations[P + "workers"] = "2"
    if annotations.get(P + "exclude-outbound-ports") not in (None, "2", "53"):
        annotations[P + "exclude-outbound-ports"] = "53"
    if annotations:
        metadata["annotations"] = annotations
    template: dict[str, Any] = {"spec": spec}
    keep_empty_metadata = draw(st.booleans())
    if metadata or keep_empty_metadata:
        template["metadata"] = metadata
    kind = draw(st.sampled_from(sorted(inj.TEMPLATE_PATHS)))
    obj: dict[str, Any] = {"kind": kind, "metadata": {"name": "w"}}
    path = inj.TEMPLATE_PATHS[kind]
    if not path:
        obj.update(template)
        return obj
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = template
    return obj


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_workloads(), st.sampled_from(inj.MODES))
def test_inject_is_idempotent_and_uninject_restores(obj: dict[str, Any], mode: str) -> None:
    before = copy.deepcopy(obj)
    options = inj.Options(mode=mode)  # type: ignore[arg-type]
    if mode == "explicit":  # explicit mode needs a route
        _, _, template = next(_templates(obj))
        template.setdefault("metadata", {}).setdefault("annotations", {})[P + "inbound"] = (
            ":8443=127.0.0.1:8080"
        )
        before = copy.deepcopy(obj)
    once = inj.inject(obj, options)
    assert obj == before, "inject changed its input"
    assert inj.inject(once, options) == once
    assert inj.uninject(once) == before
    assert inj.uninject(before) == before
    _, _, template = next(_templates(once))
    assert inj.is_injected(template)
    names = [c["name"] for c in template["spec"]["initContainers"]]
    assert names[: len(names) - len(before_inits(before))] == (
        ["mtls-iptables", "mtls-sidecar"] if mode == "transparent" else ["mtls-sidecar"]
    )


def before_inits(obj: dict[str, Any]) -> list[Any]:
    _, _, template = next(_templates(obj))
    return list(template["spec"].get("initContainers", []))


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text("ab1:/-", max_size=4),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text("abn", max_size=3), inner, max_size=2)
    ),
    max_leaves=6,
)


def _maybe_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(strategy, _junk)


_junk_container = st.fixed_dictionaries(
    {"name": _maybe_junk(_names)},
    optional={
        "ports": _maybe_junk(st.lists(st.fixed_dictionaries(
            {"name": _maybe_junk(st.just("p")), "containerPort": _maybe_junk(_port)}), max_size=2)),
        "livenessProbe": _maybe_junk(st.fixed_dictionaries({"httpGet": _maybe_junk(
            st.fixed_dictionaries({"port": _maybe_junk(_port | st.just("p"))}))})),
    },
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"kind": st.just("Pod"), "spec": _maybe_junk(st.fixed_dictionaries(
            {"containers": _maybe_junk(st.lists(_maybe_junk(_junk_container), max_size=2))},
            optional={k: _junk for k in ("initContainers", "volumes", "securityContext",
                                         "hostNetwork", "terminationGracePeriodSeconds",
                                         "serviceAccountName")}))},
        optional={"metadata": _maybe_junk(st.fixed_dictionaries(
            {}, optional={"annotations": _junk, "labels": _junk, "name": _junk}))},
    )
)  # fmt: skip
def test_malformed_objects_are_an_inject_error_never_a_crash(obj: dict[str, Any]) -> None:
    before = copy.deepcopy(obj)
    try:
        out = inj.inject(obj)
    except inj.InjectError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("Pod ")
        event("refused")
        return
    event("injected" if out != before else "unchanged")
    assert obj == before
    try:
        assert inj.uninject(out) == before
    except inj.InjectError as exc:
        pytest.fail(f"inject accepted it but uninject failed: {exc}")


# --- the CLI as a process ---------------------------------------------------------------------


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_stdin_files_list_unknown_kind_and_uninject(tmp_path: Path) -> None:
    nginx = (GOLDEN / "in" / "nginx-deployment.yaml").read_text()
    piped = _run("inject", "-", stdin=nginx)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert piped.stdout == (GOLDEN / "out" / "nginx-deployment.yaml").read_text()
    # Several files (a List and multi-document YAML among them), in order.
    files = [GOLDEN / "in" / f"{c}.yaml" for c in ("list", "multi-document", "job")]
    many = _run("inject", *map(str, files))
    assert many.returncode == 0, many.stderr
    expected = [d for f in files for d in _load_all(GOLDEN / "out" / f.name)]
    assert list(yaml.safe_load_all(many.stdout)) == expected
    assert many.stderr.splitlines() == [
        "mtls-sidecar inject: Service shop/web: left unchanged (not a kind with pods)",
        "mtls-sidecar inject: ConfigMap settings: left unchanged (not a kind with pods)",
        "mtls-sidecar inject: Deployment legacy: mtls-sidecar.io/inject is disabled, "
        "left unchanged",
    ]
    # And back.
    (tmp_path / "injected.yaml").write_text(many.stdout)
    back = _run("uninject", str(tmp_path / "injected.yaml"))
    assert back.returncode == 0, back.stderr
    assert list(yaml.safe_load_all(back.stdout)) == [d for f in files for d in _load_all(f)]


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    dep = _deployment({P + "workers": "many"})
    bad = _run("inject", "-", stdin=yaml.safe_dump(dep))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "mtls-sidecar inject: error: stdin: Deployment shop/web: annotation "
        "mtls-sidecar.io/workers='many': MTLS_WORKERS: expected a whole number, got 'many' "
        "(example: MTLS_WORKERS=2)\n"
    )
    for args, stdin, message in (
        (["inject", "-"], "a: [1, 2\n", "stdin: not YAML"),
        (["inject", str(tmp_path / "missing.yaml")], "", "missing.yaml: cannot read"),
        (["uninject", "-"], "kind: Pod\nmetadata: {name: p}\n", "Pod p: no pod template"),
    ):
        result = _run(*args, stdin=stdin)
        assert result.returncode == 2 and result.stdout == "", result
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_cli_flags() -> None:
    code, out, err = _cli(
        inject_main,
        ["--mode", "explicit", "--image", "reg/mtls-sidecar:9", "--ca-fingerprint", "ef" * 32, "-"],
        stdin=json.dumps(_deployment({P + "inbound": ":8443=127.0.0.1:8080"})),
    )
    assert code == 0, err
    (doc,) = yaml.safe_load_all(out)
    (sidecar,) = doc["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["image"] == "reg/mtls-sidecar:9"
    assert _sidecar_env(doc)["MTLS_CA_FINGERPRINT"] == "ef" * 32
    code, out, err = _cli(inject_main, ["--token-expiration", "60", "-"], stdin="")
    assert code == 2 and "must be at least 600" in err


# --- the webhook ------------------------------------------------------------------------------


def _review(
    pod: Any, *, uid: str = "0b6f-42", namespace: str = "shop", **request: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
            **request,
        },
    }


def _pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it: no name yet, no namespace in the object."""
    dep = _deployment(annotations)
    template = copy.deepcopy(dep["spec"]["template"])
    template["metadata"]["generateName"] = "web-7d4b9-"
    return {"apiVersion": "v1", "kind": "Pod", **template}


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"not json", "body is not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
         "expected apiVersion admission.k8s.io/v1"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
         "no request"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"uid": "x"}}).encode(), "request.object is missing"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                     "request": {"object": {}}}).encode(), "request.uid is missing"),
    ],
)  # fmt: skip
def test_parse_review_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(BadReview, match=re.escape(reason)):
        parse_review(body)


def test_review_answers() -> None:
    options = inj.Options()
    skipped = review_answer(_review(_pod({P + "inject": "disabled"}))["request"], options)
    assert skipped.review["response"] == {
        "uid": "0b6f-42",
        "allowed": True,
        "warnings": ["Pod shop/web-7d4b9-*: mtls-sidecar.io/inject is disabled, left unchanged"],
    }
    already = inj.inject(_pod(), namespace="shop")
    assert "patch" not in review_answer(_review(already)["request"], options).review["response"]
    update = review_answer(_review(_pod(), operation="UPDATE")["request"], options)
    assert update.review["response"] == {"uid": "0b6f-42", "allowed": True}
    denied = review_answer(_review(_pod({P + "workers": "0"}))["request"], options)
    response = denied.review["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert response["status"]["message"].startswith(
        "Pod shop/web-7d4b9-*: annotation mtls-sidecar.io/workers='0': MTLS_WORKERS"
    )


def _start_injector(cert: Path, key: str | Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`python -m proxy injector` on a free port; returns it and its https://localhost URL
    once it says where it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "injector", "--listen", "127.0.0.1:0",
         "--cert", str(cert), "--key", str(key), *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"listening on https://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, f"https://localhost:{m.group(1)}"
    proc.wait(timeout=30)
    raise AssertionError("the injector did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    """The injector serving a certificate from our own CA (`ca init`, `ca issue --dns`), the
    alternative to cert-manager that README describes."""
    tmp = tmp_path_factory.mktemp("injector")
    for args in (
        ["ca", "init", "--dir", str(tmp / "ca"), "--trust-domain", "cluster.local"],
        ["ca", "issue", "--dir", str(tmp / "ca"), "--id",
         "spiffe://cluster.local/ns/mtls-system/sa/mtls-injector", "--dns", "localhost",
         "--ttl", "1d", "--out", str(tmp / "injector")],
    ):  # fmt: skip
        made = _run(*args)
        assert made.returncode == 0, made.stderr
    proc, url = _start_injector(
        tmp / "injector.crt", tmp / "injector.key", "--ca-fingerprint", "9f" * 32
    )
    ctx = ssl.create_default_context(cafile=str(tmp / "injector.bundle.pem"))
    try:
        yield url, ctx
    finally:
        _stop(proc)


def _post(url: str, ctx: ssl.SSLContext, body: bytes, path: str = "/inject") -> tuple[int, Any]:
    req = urllib.request.Request(
        url + path, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_injector_patch_gives_what_inject_gives(injector: tuple[str, ssl.SSLContext]) -> None:
    url, ctx = injector
    options = inj.Options(ca_fingerprint="9f" * 32)
    pods = [_pod(), _pod({P + "allow-peers": "spiffe://cluster.local/ns/shop/sa/client"})]
    (sts,) = _load_all(GOLDEN / "in" / "statefulset.yaml")  # init containers, fsGroup
    (ds,) = _load_all(GOLDEN / "in" / "daemonset.yaml")  # volumes
    (nginx,) = _load_all(GOLDEN / "in" / "nginx-deployment.yaml")  # the Kubernetes docs' one
    pods += [{"apiVersion": "v1", "kind": "Pod", **t["spec"]["template"]} for t in (sts, ds, nginx)]
    (probes,) = _load_all(GOLDEN / "in" / "pod-probes.yaml")
    pods.append(probes)
    for i, pod in enumerate(pods):
        status, review = _post(url, ctx, json.dumps(_review(pod, uid=f"uid-{i}")).encode())
        assert status == 200, review
        response = review["response"]
        assert response["uid"] == f"uid-{i}" and response["allowed"] is True
        assert response["patchType"] == "JSONPatch"
        patch = jsonpatch.JsonPatch(json.loads(base64.b64decode(response["patch"])))
        assert patch.apply(pod) == inj.inject(pod, options, namespace="shop")
    assert len(response["warnings"]) == 3  # the probe-pod's excluded ports


def test_injector_denies_bad_annotations_and_skips(injector: tuple[str, ssl.SSLContext]) -> None:
    url, ctx = injector
    status, review = _post(url, ctx, json.dumps(_review(_pod({P + "log-level": "x"}))).encode())
    assert status == 200
    assert review["response"]["allowed"] is False
    assert "mtls-sidecar.io/log-level='x'" in review["response"]["status"]["message"]
    for pod in (_pod({P + "inject": "disabled"}), inj.inject(_pod(), namespace="shop")):
        status, review = _post(url, ctx, json.dumps(_review(pod)).encode())
        assert status == 200 and review["response"]["allowed"] is True
        assert "patch" not in review["response"]


def test_injector_rejects_bad_reviews(injector: tuple[str, ssl.SSLContext]) -> None:
    url, ctx = injector
    huge = b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    for body, reason in (
        (b"{", "body is not JSON"),
        (json.dumps({"kind": "Pod"}).encode(), "expected apiVersion"),
        (json.dumps(_review(None)).encode(), "request.object is missing"),
        (huge, "is over"),
    ):
        status, answer = _post(url, ctx, body)
        assert status == 400, (status, answer)
        assert reason in answer["error"] and "Traceback" not in answer["error"]
    # Chunked, with no Content-Length: cut off once it passes the limit.
    host, port = url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        chunks = (b"a" * 65536 for _ in range(65))  # just over 4 MiB
        conn.request("POST", "/inject", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 400 and "is over" in json.loads(resp.read())["error"]
    finally:
        conn.close()
    # Still serving after all that.
    for path in ("/live", "/ready"):
        with urllib.request.urlopen(url + path, context=ctx, timeout=10) as resp:
            assert resp.status == 200


def _ready(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", context=ctx, timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ssl.SSLError, OSError):
        return False


def test_injector_reloads_a_renewed_certificate(tmp_path: Path) -> None:
    """Files replaced the way a Secret volume does it (rename): the injector serves the new
    certificate; a broken renewal keeps the old one."""
    old_root, new_root = pki.make_root("old root"), pki.make_root("new root")
    old = pki.write_identity(tmp_path / "old", "s", old_root, [old_root.cert], None)
    new = pki.write_identity(tmp_path / "new", "s", new_root, [new_root.cert], None)
    live = tmp_path / "live"
    live.mkdir()
    for name, src in (("tls.crt", old.cert), ("tls.key", old.key)):
        (live / name).write_bytes(src.read_bytes())
    proc, url = _start_injector(live / "tls.crt", live / "tls.key", "--reload-interval", "0.1")
    try:
        old_ctx = ssl.create_default_context(cafile=str(old.bundle))
        new_ctx = ssl.create_default_context(cafile=str(new.bundle))
        assert _ready(url, old_ctx) and not _ready(url, new_ctx)
        # A certificate whose key does not match: not loaded, the old one stays.
        (tmp_path / "bad.crt").write_bytes(new.cert.read_bytes())
        os.replace(tmp_path / "bad.crt", live / "tls.crt")
        deadline = time.monotonic() + 20
        while "not reloaded" not in _stderr_line(proc):
            assert time.monotonic() < deadline, "no log line about the failed reload"
        assert _ready(url, old_ctx)
        (tmp_path / "new.key").write_bytes(new.key.read_bytes())
        os.replace(tmp_path / "new.key", live / "tls.key")
        deadline = time.monotonic() + 20
        while not _ready(url, new_ctx):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
        assert not _ready(url, old_ctx)
        # A client that sends no SNI gets the renewed certificate too.
        no_sni = ssl.create_default_context(cafile=str(new.bundle))
        no_sni.check_hostname = False
        port = int(url.rpartition(":")[2])
        with no_sni.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as tls:
            assert tls.getpeercert() is not None
    finally:
        _stop(proc)


def _stderr_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    return proc.stderr.readline()


def test_injector_refuses_bad_flags(tmp_path: Path) -> None:
    result = _run("injector", "--cert", str(tmp_path / "no.crt"), "--key", str(tmp_path / "no.key"))
    assert result.returncode == 2 and "cannot load --cert" in result.stderr
    result = _run("injector", "--cert", "c", "--key", "k", "--trust-domain", "Bad Domain")
    assert result.returncode == 2 and "--trust-domain" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
