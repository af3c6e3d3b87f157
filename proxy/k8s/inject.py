"""Add the sidecar to Kubernetes workload objects and take it out again; pure, no I/O.

`inject` turns a parsed manifest (Pod, a workload with a pod template, a List) into the same
manifest with the sidecar: in transparent mode an iptables init container and the sidecar as a
native sidecar (an init container with restartPolicy: Always), the projected service-account
token the CA enrols with, scratch volumes and scrape annotations. Everything it adds is
recorded in one annotation, `mtls-sidecar.io/injected`, so that `uninject` gives back exactly
the input and a second `inject` changes nothing. Per-workload settings come from pod template
annotations under `mtls-sidecar.io/`; the sidecar env they produce is validated with the same
settings loader `mtls-sidecar run` uses, so a bad annotation fails here, not in the pod.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .. import __version__

# The one import of the settings loader in this package (it validates the injected env).
from ..config import load_settings
from ..errors import ConfigError, ProxyError

PREFIX = "mtls-sidecar.io/"
STATE_ANNOTATION = PREFIX + "injected"
SIDECAR = "mtls-sidecar"
IPTABLES = "mtls-iptables"
TOKEN_VOLUME = "mtls-token"
TMP_VOLUME = "mtls-tmp"
XTABLES_VOLUME = "xtables-lock"
TOKEN_DIR = "/var/run/secrets/mtls"
POLICY_VOLUME = "mtls-policy"
POLICY_DIR = "/etc/mtls/policy"
POLICY_KEY = "policy.yaml"
TOKEN_PATH = "token"
ADMIN_PORT = 15000
PROXY_UID = 1337
FINGERPRINT_CONFIGMAP = "mtls-ca-trust"
ENABLED_LABEL = "mtls-sidecar/enabled"
STATE_VERSION = 1

Mode = Literal["transparent", "explicit"]
MODES: tuple[Mode, ...] = ("transparent", "explicit")
Obj = dict[str, Any]

# Where each kind keeps its pod template (a dict with metadata and spec); () = the object itself.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

# Per-workload annotations (without the prefix) that set one MTLS_* variable each, in the
# order their variables appear in the sidecar's env.
ANNOTATION_VARS: dict[str, str] = {
    "inbound": "MTLS_INBOUND",
    "outbound": "MTLS_OUTBOUND",
    "inbound-mode": "MTLS_INBOUND_MODE",
    "outbound-mode": "MTLS_OUTBOUND_MODE",
    "allow-peers": "MTLS_ALLOW_PEERS",
    "exclude-inbound-ports": "MTLS_EXCLUDE_INBOUND_PORTS",
    "exclude-outbound-ports": "MTLS_EXCLUDE_OUTBOUND_PORTS",
    "exclude-outbound-cidrs": "MTLS_EXCLUDE_OUTBOUND_CIDRS",
    "proxy-protocol": "MTLS_PROXY_PROTOCOL",
    "min-tls-version": "MTLS_MIN_TLS_VERSION",
    "workers": "MTLS_WORKERS",
    "drain-timeout": "MTLS_DRAIN_TIMEOUT",
    "idle-timeout": "MTLS_IDLE_TIMEOUT",
    "connection-reuse": "MTLS_CONNECTION_REUSE",
    "max-connections": "MTLS_MAX_CONNECTIONS",
    "log-level": "MTLS_LOG_LEVEL",
    "log-format": "MTLS_LOG_FORMAT",
}
# Annotations that steer the injection itself (or override an injector option).
CONTROL_ANNOTATIONS = (
    "inject",
    "mode",
    "ca-url",
    "ca-fingerprint",
    "trust-domain",
    "policy-configmap",
    "injected",
)
# annotation -> (Options field, CLI flag, the variable it ends up in)
OPTION_ANNOTATIONS = {
    "ca-url": ("ca_url", "--ca-url", "MTLS_CA_URL"),
    "ca-fingerprint": ("ca_fingerprint", "--ca-fingerprint", "MTLS_CA_FINGERPRINT"),
    "trust-domain": ("trust_domain", "--trust-domain", "MTLS_TRUST_DOMAIN"),
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Stand-ins for values that exist only in the running pod, used to validate the env here.
_STAND_IN_FINGERPRINT = "0" * 64
_STAND_IN_TOKEN = "projected-service-account-token"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
# A ConfigMap's name (a DNS subdomain) and one of its keys.
_CONFIGMAP_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")


class InjectError(ProxyError):
    """A workload cannot be injected as asked; the message names the workload and the cause."""


@dataclass(frozen=True)
class Options:
    """What the injector puts into every workload (CLI flags / webhook flags).

    ca_fingerprint None means: read it from the ConfigMap `mtls-ca-trust` (key `fingerprint`)
    in the workload's namespace, as the hand-written manifests in deploy/kubernetes do.
    """

    mode: Mode = "transparent"
    image: str = f"mtls-sidecar:{__version__}"
    ca_url: str = "https://mtls-ca.mtls-demo.svc:8443"
    ca_fingerprint: str | None = None
    trust_domain: str = "cluster.local"
    token_audience: str = "mtls-sidecar"
    token_expiration_seconds: int = 3600


@dataclass
class Result:
    """The transformed object and one line per thing worth telling the user (stderr, or the
    admission response's warnings)."""

    obj: Any
    notes: list[str] = field(default_factory=list)


# --- public API -------------------------------------------------------------------------------


def inject(obj: Any, options: Options | None = None, *, namespace: str | None = None) -> Any:
    """A copy of `obj` with the sidecar injected into every pod template it holds."""
    return inject_report(obj, options, namespace=namespace).obj


def inject_report(
    obj: Any, options: Options | None = None, *, namespace: str | None = None
) -> Result:
    """Like `inject`, with the notes (skipped kinds, probe ports excluded from capture).

    `namespace` is the namespace to assume when the object does not say (an admission
    request's namespace). Raises InjectError for a workload that cannot be injected.
    """
    opts = options or Options()
    notes: list[str] = []
    out = _walk(obj, lambda t, w: _inject_template(t, w, opts, namespace, notes), notes, namespace)
    return Result(out, notes)


def uninject(obj: Any) -> Any:
    """A copy of `obj` with everything `inject` added taken out again."""
    return uninject_report(obj).obj


def uninject_report(obj: Any) -> Result:
    """Like `uninject`, with the notes (skipped kinds, sidecars added by other means)."""
    notes: list[str] = []
    out = _walk(obj, lambda t, w: _uninject_template(t, w, notes), notes)
    return Result(out, notes)


def is_injected(template: Mapping[str, Any]) -> bool:
    """Whether a pod (or pod template) already carries the sidecar, injected or by hand."""
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    spec = template.get("spec") or {}
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    names = {c.get("name") for c in containers if isinstance(c, dict)}
    return STATE_ANNOTATION in annotations or SIDECAR in names


def describe(obj: Mapping[str, Any], namespace: str | None = None) -> str:
    """'Deployment shop/web': how messages name a workload."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "")
    ns = meta.get("namespace") or namespace
    return f"{obj.get('kind', 'object')} {f'{ns}/' if ns else ''}{name or '(unnamed)'}"


# --- walking manifests ------------------------------------------------------------------------

TemplateFn = Callable[[Obj, str], Obj]


def _walk(obj: Any, fn: TemplateFn, notes: list[str], namespace: str | None = None) -> Any:
    if not isinstance(obj, dict):
        notes.append(f"skipped a {type(obj).__name__} document: not a Kubernetes object")
        return obj
    kind = obj.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
        out = dict(obj)
        out["items"] = [_walk(item, fn, notes, namespace) for item in obj["items"]]
        return out
    path = TEMPLATE_PATHS.get(kind) if isinstance(kind, str) else None
    if path is None:
        notes.append(f"{describe(obj, namespace)}: left unchanged (not a kind with pods)")
        return obj
    parent: Any = obj
    for key in path:
        parent = parent.get(key) if isinstance(parent, dict) else None
    where = describe(obj, namespace)
    if not isinstance(parent, dict) or not isinstance(parent.get("spec"), dict):
        raise InjectError(f"{where}: no pod template at {'.'.join((*path, 'spec'))}")
    try:
        new_template = fn(parent, where)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        # A field of the wrong shape (the API server would refuse the object anyway).
        raise InjectError(
            f"{where}: not a valid pod template ({type(exc).__name__}: {exc})"
        ) from None
    if new_template is parent:
        return obj
    out = copy.deepcopy(obj)
    if not path:
        return new_template
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new_template
    return out


# --- inject -----------------------------------------------------------------------------------


def _annotations(template: Mapping[str, Any]) -> dict[str, str]:
    return dict((template.get("metadata") or {}).get("annotations") or {})


def _ours(annotations: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in annotations.items():
        if not isinstance(k, str) or not k.startswith(PREFIX):
            continue
        if isinstance(v, (dict, list)):
            # Annotation values are strings; never render a structure (it may be huge).
            kind = type(v).__name__
            raise ValueError(f"annotation {k}: the value must be a string, not a {kind}")
        out[k[len(PREFIX) :]] = str(v)
    return out


def _inject_template(
    template: Obj, where: str, options: Options, namespace: str | None, notes: list[str]
) -> Obj:
    ours = _ours(_annotations(template))
    if is_injected(template):
        notes.append(f"{where}: already has the sidecar, left unchanged")
        return template
    known = set(ANNOTATION_VARS) | set(CONTROL_ANNOTATIONS)
    for key in ours:
        if key not in known:
            raise InjectError(
                f"{where}: unknown annotation {PREFIX}{key} (known: "
                f"{', '.join(sorted(known - {'injected'}))})"
            )
    switch = ours.get("inject", "enabled")
    if switch not in ("enabled", "disabled"):
        raise InjectError(
            f"{where}: annotation {PREFIX}inject={switch!r}: must be enabled or disabled"
        )
    if switch == "disabled":
        notes.append(f"{where}: {PREFIX}inject is disabled, left unchanged")
        return template
    spec: Obj = template["spec"]
    if spec.get("hostNetwork"):
        notes.append(f"{where}: uses the node's network (hostNetwork), left unchanged")
        return template
    if _os_name(spec) == "windows":
        # The patch is Linux-only (iptables, seccompProfile, Linux security contexts): the
        # API server would refuse it, or the pod would not start.
        notes.append(
            f"{where}: a Windows pod (spec.os.name: windows), left unchanged: "
            "the sidecar is Linux-only"
        )
        return template
    mode = ours.get("mode", options.mode)
    if mode not in MODES:
        raise InjectError(
            f"{where}: annotation {PREFIX}mode={mode!r}: must be transparent or explicit"
        )
    sources: dict[str, str] = {}  # MTLS_* var -> what set it, for error messages
    for key, (attr, flag, var) in OPTION_ANNOTATIONS.items():
        sources[var] = flag
        if key in ours:
            overrides: dict[str, Any] = {attr: ours[key]}
            options = replace(options, **overrides)
            sources[var] = f"annotation {PREFIX}{key}={ours[key]!r}"
    policy = _policy_configmap(ours, where)
    _check_names(spec, where, mode, policy is not None)
    _check_pod(spec, where, mode)
    probe_ports = _probe_ports(spec, where) if mode == "transparent" else []
    env = _sidecar_env(template, spec, ours, options, mode, probe_ports, sources)
    if policy is not None:
        env.append(_env("MTLS_POLICY_FILE", f"{POLICY_DIR}/{policy[1]}"))
        sources["MTLS_POLICY_FILE"] = f"annotation {PREFIX}policy-configmap"
    _validate(env, where, sources, _namespace(template, namespace), _service_account(spec))
    for container, probe, port in probe_ports:
        notes.append(
            f"{where}: container {container}: {probe} port {port} excluded from inbound capture "
            f"(kubelet probes are plaintext), so it accepts plaintext connections"
        )
    return _apply(template, env, options, mode, policy)


def _policy_configmap(ours: Mapping[str, str], where: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) of the policy file the annotation names, if any: `NAME` (key
    policy.yaml) or `NAME/KEY`."""
    value = ours.get("policy-configmap")
    if value is None:
        return None
    name, slash, key = value.partition("/")
    key = key if slash else POLICY_KEY
    if len(name) > 253 or not _CONFIGMAP_NAME.fullmatch(name):
        raise InjectError(
            f"{where}: annotation {PREFIX}policy-configmap={value!r}: {name!r} is not a "
            "ConfigMap name (lower-case letters, digits, '-' and '.'); write NAME or NAME/KEY"
        )
    if len(key) > 253 or not _CONFIGMAP_KEY.fullmatch(key) or key in (".", ".."):
        raise InjectError(
            f"{where}: annotation {PREFIX}policy-configmap={value!r}: {key!r} is not a "
            "ConfigMap key (letters, digits, '-', '_' and '.')"
        )
    return name, key


def _os_name(spec: Mapping[str, Any]) -> str | None:
    """spec.os.name, lowercased ("linux", "windows"), or None when the pod does not say."""
    os_field = spec.get("os")
    name = os_field.get("name") if isinstance(os_field, dict) else None
    return name.lower() if isinstance(name, str) else None


def _check_names(spec: Mapping[str, Any], where: str, mode: str, policy: bool) -> None:
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    taken = {c.get("name") for c in containers}
    for name in (IPTABLES, SIDECAR):
        if name in taken:
            raise InjectError(f"{where}: a container is already named {name}")
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    wanted = [TOKEN_VOLUME, TMP_VOLUME] + ([XTABLES_VOLUME] if mode == "transparent" else [])
    wanted += [POLICY_VOLUME] if policy else []
    for name in wanted:
        if name in volumes:
            raise InjectError(f"{where}: a volume is already named {name}")


# The ports the sidecar binds in the pod's network namespace (admin; transparent captures).
SIDECAR_PORTS = {ADMIN_PORT: "admin", 15001: "outbound capture", 15006: "inbound capture"}


def _check_pod(spec: Mapping[str, Any], where: str, mode: str) -> None:
    """Refuse pods the sidecar would clash with, or that would bypass it unseen."""
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        for p in c.get("ports") or []:
            port = p.get("containerPort")
            if port == ADMIN_PORT or (mode == "transparent" and port in SIDECAR_PORTS):
                raise InjectError(
                    f"{where}: container {c.get('name')}: port {port} is the sidecar's "
                    f"{SIDECAR_PORTS[port]} port"
                )
        uid = (c.get("securityContext") or {}).get("runAsUser", pod_uid)
        if mode == "transparent" and uid == PROXY_UID:
            # Traffic of the proxy's UID is never captured: it would leave in plaintext.
            raise InjectError(
                f"{where}: container {c.get('name')} runs as UID {PROXY_UID}, the sidecar's, "
                f"whose connections are not captured; run it as another user"
            )


def _probe_ports(spec: Mapping[str, Any], where: str) -> list[tuple[str, str, int]]:
    """(container, probe, port) of every kubelet network probe aimed at the pod's own IP."""
    found: list[tuple[str, str, int]] = []
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        for probe in PROBES:
            handlers = c.get(probe) or {}
            for kind in ("httpGet", "tcpSocket", "grpc"):
                handler = handlers.get(kind)
                if not isinstance(handler, dict) or handler.get("host"):
                    continue  # a probe of another host is not inbound to this pod
                port = _resolve_port(c, handler.get("port"), where, probe)
                if port is not None and (c["name"], probe, port) not in found:
                    found.append((c["name"], probe, port))
    return found


def _resolve_port(container: Mapping[str, Any], port: Any, where: str, probe: str) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise InjectError(
        f"{where}: container {container.get('name')}: {probe} uses port {port!r}, "
        f"which is not one of its named ports"
    )


def _namespace(template: Mapping[str, Any], namespace: str | None) -> str:
    return str((template.get("metadata") or {}).get("namespace") or namespace or "default")


def _service_account(spec: Mapping[str, Any]) -> str:
    return str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")


def _drain_timeout(spec: Mapping[str, Any]) -> str:
    """Shorter than the grace period, so that draining ends before the kubelet's SIGKILL."""
    grace = spec.get("terminationGracePeriodSeconds")
    grace = 30 if grace is None else int(grace)
    return f"{max(0, min(20, grace - 5))}s"


def _env(name: str, value: str) -> Obj:
    return {"name": name, "value": value}


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _merge_ports(*lists: str) -> str:
    out: list[str] = []
    for text in lists:
        for item in (p.strip() for p in text.split(",")):
            if item and item not in out:
                out.append(item)
    return ",".join(out)


def _sidecar_env(
    template: Mapping[str, Any],
    spec: Mapping[str, Any],
    ours: Mapping[str, str],
    options: Options,
    mode: str,
    probe_ports: list[tuple[str, str, int]],
    sources: dict[str, str],
) -> list[Obj]:
    """The sidecar's env, shared by the iptables init container so both see one config."""
    if options.ca_fingerprint is None:
        fingerprint: Obj = {
            "name": "MTLS_CA_FINGERPRINT",
            "valueFrom": {"configMapKeyRef": {"name": FINGERPRINT_CONFIGMAP, "key": "fingerprint"}},
        }
    else:
        fingerprint = _env("MTLS_CA_FINGERPRINT", options.ca_fingerprint)
    env: list[Obj] = [
        _env("MTLS_IDENTITY_SOURCE", "ca"),
        _env("MTLS_CA_URL", options.ca_url),
        fingerprint,
        _env("MTLS_CA_TOKEN_FILE", f"{TOKEN_DIR}/{TOKEN_PATH}"),
        _env("MTLS_TRUST_DOMAIN", options.trust_domain),
        # Helpers for MTLS_IDENTITY below; not MTLS_* names, which the sidecar reserves.
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        # Kubernetes expands $(VAR) from variables declared earlier in the list.
        _env(
            "MTLS_IDENTITY",
            "spiffe://$(MTLS_TRUST_DOMAIN)/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)",
        ),
    ]
    values = {var: ours[key] for key, var in ANNOTATION_VARS.items() if key in ours}
    for key, var in ANNOTATION_VARS.items():
        if key in ours:
            sources[var] = f"annotation {PREFIX}{key}={ours[key]!r}"
    if mode == "transparent":
        env.append(_env("MTLS_TRANSPARENT", "true"))
        env.append(_env("MTLS_PROXY_UID", str(PROXY_UID)))
        probes = ",".join(str(port) for _, _, port in probe_ports)
        values["MTLS_EXCLUDE_INBOUND_PORTS"] = _merge_ports(
            str(ADMIN_PORT), probes, values.get("MTLS_EXCLUDE_INBOUND_PORTS", "")
        )
    defaults = {
        "MTLS_ADMIN_LISTEN": f"0.0.0.0:{ADMIN_PORT}",
        "MTLS_ADMIN_ALLOW_REMOTE_DRAIN": "false",
        "MTLS_WORKERS": "1",
        "MTLS_DRAIN_TIMEOUT": _drain_timeout(spec),
        "MTLS_LOG_FORMAT": "json",
    }
    for var, value in defaults.items():
        env.append(_env(var, values.pop(var, value)))
    # The rest in the table's order, after the fixed part.
    env += [_env(var, values[var]) for var in ANNOTATION_VARS.values() if var in values]
    return env


def _expand(value: str, seen: Mapping[str, str]) -> str:
    """Kubernetes' dependent env var expansion: $(VAR) of an earlier variable, else kept."""
    return _VAR_REF.sub(lambda m: seen.get(m.group(1), m.group(0)), value)


def _validate(
    env: list[Obj], where: str, sources: Mapping[str, str], namespace: str, service_account: str
) -> None:
    """Load the env the pod will see with the sidecar's settings loader; raise InjectError
    naming the annotation or option behind each problem."""
    resolved: dict[str, str] = {}
    fields = {"metadata.namespace": namespace, "spec.serviceAccountName": service_account}
    for item in env:
        if "value" in item:
            resolved[item["name"]] = _expand(item["value"], resolved)
        elif "fieldRef" in item["valueFrom"]:
            resolved[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            resolved[item["name"]] = _STAND_IN_FINGERPRINT
    # The token file exists only in the pod; a token value stands in for it. The policy
    # file, from a ConfigMap, too: the sidecar checks it at start (and refuses a bad one).
    del resolved["MTLS_CA_TOKEN_FILE"]
    resolved.pop("MTLS_POLICY_FILE", None)
    resolved["MTLS_CA_TOKEN"] = _STAND_IN_TOKEN
    try:
        load_settings(resolved)
    except ConfigError as exc:
        parts = []
        for problem in exc.problems:
            var = "MTLS_CA_TOKEN_FILE" if problem.var == "MTLS_CA_TOKEN" else problem.var
            source = sources.get(var)
            if var == "MTLS_IDENTITY":
                source = f"identity of namespace {namespace!r}, service account {service_account!r}"
            parts.append(f"{source}: {problem}" if source else str(problem))
        raise InjectError(f"{where}: {'; '.join(parts)}") from None


# --- the added objects ------------------------------------------------------------------------


def _policy_mount() -> Obj:
    # The ConfigMap's directory, not a subPath: the kubelet updates it in place (an atomic
    # rename), which the sidecar's watcher picks up; a subPath mount is never updated.
    return {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True}


def _iptables_container(image: str, env: list[Obj], policy: bool) -> Obj:
    mounts: list[Obj] = [
        # iptables takes its lock in /run/xtables.lock.
        {"name": XTABLES_VOLUME, "mountPath": "/run"},
        # The same settings as the sidecar are validated, the token (and policy) file included.
        {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    if policy:
        mounts.append(_policy_mount())
    return {
        "name": IPTABLES,
        "image": image,
        "args": ["iptables", "--apply"],
        "env": copy.deepcopy(env),
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        # Changing the pod's netfilter tables needs root in the pod and these two
        # capabilities, nothing else; the container exits before the app starts.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def _sidecar_container(image: str, env: list[Obj], policy: bool) -> Obj:
    def probe(path: str, period: int, failures: int) -> Obj:
        return {
            "httpGet": {"path": path, "port": "mtls-admin"},
            "periodSeconds": period,
            "failureThreshold": failures,
        }

    return {
        "name": SIDECAR,
        "image": image,
        # A native sidecar: starts before the app, stops after it, does not keep Jobs alive.
        "restartPolicy": "Always",
        "args": ["run"],
        "env": copy.deepcopy(env),
        "ports": [{"name": "mtls-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        # The app starts only once this passes: a certificate is held, listeners are up.
        "startupProbe": probe("/ready", 1, 60),
        "readinessProbe": probe("/ready", 5, 2),
        "livenessProbe": probe("/live", 10, 3),
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            # Scratch space (metrics files shared by the worker processes).
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            *([_policy_mount()] if policy else []),
        ],
    }


def _volumes(options: Options, mode: str, policy: tuple[str, str] | None) -> list[Obj]:
    volumes: list[Obj] = [
        {
            "name": TOKEN_VOLUME,
            "projected": {
                # Only the sidecar (and the iptables step) mount it; 1337 must read it.
                "defaultMode": 0o444,
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": options.token_audience,
                            "expirationSeconds": options.token_expiration_seconds,
                            "path": TOKEN_PATH,
                        }
                    }
                ],
            },
        },
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    if mode == "transparent":
        volumes.append(
            {"name": XTABLES_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        )
    if policy is not None:
        name, key = policy
        # Only that key; the pod does not start without it (no policy is no silent allow).
        volumes.append(
            {
                "name": POLICY_VOLUME,
                "configMap": {
                    "name": name,
                    "items": [{"key": key, "path": key}],
                    "defaultMode": 0o444,
                },
            }
        )
    return volumes


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def _apply(
    template: Obj, env: list[Obj], options: Options, mode: str, policy: tuple[str, str] | None
) -> Obj:
    out = copy.deepcopy(template)
    added: list[str] = []

    def child(parent: Obj, key: str, path: str) -> Obj:
        if key not in parent:
            parent[key] = {}
            added.append(f"{path}/{_escape(key)}")
        elif not isinstance(parent[key], dict):
            raise ValueError(f"{path}/{key} is not a mapping")
        value: Obj = parent[key]
        return value

    def setdefault(parent: Obj, key: str, value: Any, path: str) -> None:
        if key not in parent:
            parent[key] = value
            added.append(f"{path}/{_escape(key)}")

    spec: Obj = out["spec"]
    has_policy = policy is not None
    inits = [_iptables_container(options.image, env, has_policy)] if mode == "transparent" else []
    inits.append(_sidecar_container(options.image, env, has_policy))
    if "initContainers" not in spec:
        spec["initContainers"] = []
        added.append("/spec/initContainers")
    # First, so that the app's own init containers already run inside the mesh.
    spec["initContainers"][:0] = inits
    volumes = _volumes(options, mode, policy)
    if "volumes" not in spec:
        spec["volumes"] = []
        added.append("/spec/volumes")
    spec["volumes"].extend(volumes)
    security = child(spec, "securityContext", "/spec")
    setdefault(security, "seccompProfile", {"type": "RuntimeDefault"}, "/spec/securityContext")

    meta = child(out, "metadata", "")
    labels = child(meta, "labels", "/metadata")
    setdefault(labels, ENABLED_LABEL, "true", "/metadata/labels")
    annotations = child(meta, "annotations", "/metadata")
    # For Prometheus configured by pod annotations; an app's own scrape settings win.
    for key, value in (
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", str(ADMIN_PORT)),
        ("prometheus.io/path", "/metrics"),
    ):
        setdefault(annotations, key, value, "/metadata/annotations")
    state = {
        "version": STATE_VERSION,
        "mode": mode,
        "initContainers": [c["name"] for c in inits],
        "volumes": [v["name"] for v in volumes],
        "added": added,
    }
    annotations[STATE_ANNOTATION] = json.dumps(state, separators=(",", ":"))
    return out


# --- uninject ---------------------------------------------------------------------------------


def _named(item: Any, names: set[str]) -> bool:
    return isinstance(item, dict) and item.get("name") in names


def _uninject_template(template: Obj, where: str, notes: list[str]) -> Obj:
    annotations = _annotations(template)
    if STATE_ANNOTATION not in annotations:
        if is_injected(template):
            notes.append(f"{where}: its sidecar was not added by `inject`, left unchanged")
        return template
    try:
        state = json.loads(annotations[STATE_ANNOTATION])
        names = set(state["initContainers"])
        volume_names = set(state["volumes"])
        added = [str(p) for p in state["added"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InjectError(f"{where}: annotation {STATE_ANNOTATION} is damaged ({exc})") from None
    out = copy.deepcopy(template)
    del out["metadata"]["annotations"][STATE_ANNOTATION]
    spec = out["spec"]
    spec["initContainers"] = [c for c in spec.get("initContainers") or [] if not _named(c, names)]
    spec["volumes"] = [v for v in spec.get("volumes") or [] if not _named(v, volume_names)]
    for path in reversed(added):
        *parents, last = [_unescape(p) for p in path.split("/")[1:]]
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out
