"""An emulated kubelet: runs Kubernetes pod specs with Docker as the kubelet runs them, no cluster.

No API server, scheduler or kube-proxy can be had on the test machines, so this module plays
the part of one node's kubelet for the pods the deploy tests give it: a pause container owns
the pod's network namespace (on a Docker network the test creates) and every container joins
it; init containers run in order to completion, native sidecars (init containers with
`restartPolicy: Always`) are started and waited on their startup probe before the next one;
each container gets exactly the securityContext its manifest gives (capabilities, user and
group, runAsNonRoot refused for an effective UID 0, read-only root, no_new_privs, fsGroup as a
supplementary group); env is built as the kubelet builds it (envFrom, then env in order with
`$(VAR)` expansion, the downward API, ConfigMap and Secret keys, and the Service link variables
of `enableServiceLinks`); volumes are host directories laid out as the kubelet lays them out
(emptyDir, tmpfs for medium Memory, ConfigMap/Secret/projected files through the `..data`
symlink of the atomic writer with their modes and fsGroup ownership, a projected
service-account token minted and signed here, a directory per PersistentVolumeClaim); the
probes (httpGet, tcpSocket, exec) run from the host against the pod IP with their periods and
thresholds, and a failed liveness probe restarts the container. Of the API server, only the
service-account issuer discovery a workload may ask for is served (`Node.start_api_discovery`).

What it does not do, on purpose: scheduling, image pulls (images are local, optionally renamed
as kustomize's `images:` would), kube-proxy (a Service name resolves to its pod's IP through a
Docker network alias, like a headless Service), token rotation, restarts of failed init
containers (a failure is reported with the logs), and resource requests (limits only where
Docker can apply them).
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import datetime as dt
import functools
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import dockerenv

Obj = dict[str, Any]
API_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBE_API_ACCESS = "/var/run/secrets/kubernetes.io/serviceaccount"
PROBE_DEFAULTS = {
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class PodFailed(AssertionError):
    """A pod that a kubelet would not run (or that failed): says which container and why."""


# --- Kubernetes semantics, pure ---------------------------------------------------------------


def expand(text: str, mapping: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion): `$(NAME)` of a
    defined variable becomes its value, an undefined one stays as written, `$$` is one `$`."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    out.append(mapping.get(name, f"$({name})"))
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def service_link_env(name: str, host: str, ports: list[Obj]) -> dict[str, str]:
    """The variables `enableServiceLinks` (on by default) gives every pod for one Service of
    its namespace (pkg/kubelet/envvars): FOO_SERVICE_HOST, FOO_PORT_8443_TCP_ADDR, ..."""
    prefix = name.upper().replace("-", "_")
    env = {f"{prefix}_SERVICE_HOST": host}
    for i, port in enumerate(ports):
        number, proto = str(port["port"]), str(port.get("protocol", "TCP"))
        if i == 0:
            env[f"{prefix}_SERVICE_PORT"] = number
            env[f"{prefix}_PORT"] = f"{proto.lower()}://{host}:{number}"
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = number
        base = f"{prefix}_PORT_{number}_{proto.upper()}"
        env[base] = f"{proto.lower()}://{host}:{number}"
        env[f"{base}_PROTO"] = proto.lower()
        env[f"{base}_PORT"] = number
        env[f"{base}_ADDR"] = host
    return env


def pod_template(obj: Obj) -> Obj:
    """The pod (metadata + spec) of a Pod or of a workload's pod template."""
    kind = obj.get("kind")
    if kind == "Pod":
        return copy.deepcopy(obj)
    if kind == "CronJob":
        return copy.deepcopy(obj["spec"]["jobTemplate"]["spec"]["template"])
    return copy.deepcopy(obj["spec"]["template"])


# --- the service-account token issuer ---------------------------------------------------------


class TokenIssuer:
    """The cluster's service-account token signer: an RSA key, its JWKS, tokens as the API
    server mints them for projected volumes (TokenRequest)."""

    def __init__(self, issuer: str = API_ISSUER) -> None:
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return json.dumps({"keys": [jwk]})

    def mint(
        self,
        *,
        namespace: str,
        service_account: str,
        pod: str,
        pod_uid: str,
        audience: str,
        expiration_seconds: int,
    ) -> str:
        now = int(time.time())
        claims = {
            "aud": [audience],
            "exp": now + expiration_seconds,
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "emulated-node", "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, "n"))},
                "pod": {"name": pod, "uid": pod_uid},
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


# --- probes -----------------------------------------------------------------------------------


@dataclass
class ProbeState:
    container: str
    kind: str  # startupProbe, readinessProbe, livenessProbe
    spec: Obj
    started: float
    last: float = 0.0
    successes: int = 0
    failures: int = 0
    ok: bool = False
    last_result: str = ""

    def setting(self, name: str) -> int:
        return int(self.spec.get(name, PROBE_DEFAULTS[name]))

    def due(self, now: float) -> bool:
        if now < self.started + self.setting("initialDelaySeconds"):
            return False
        return self.last == 0.0 or now >= self.last + self.setting("periodSeconds")


@dataclass
class ContainerStatus:
    name: str
    docker_name: str
    init: bool
    sidecar: bool
    spec: Obj
    started: bool = False
    ready: bool = False
    restarts: int = 0
    probes: list[ProbeState] = field(default_factory=list)

    def startup_done(self) -> bool:
        return all(p.ok for p in self.probes if p.kind == "startupProbe")


# --- the node ---------------------------------------------------------------------------------


class Node:
    """One emulated node: a Docker network, the API objects its pods refer to (ConfigMaps,
    Secrets, ServiceAccounts, Services), the token issuer, and the pods it runs."""

    def __init__(
        self,
        prefix: str,
        workdir: Path,
        *,
        images: Mapping[str, str] | None = None,
        issuer: TokenIssuer | None = None,
        api_audience: str = API_ISSUER,
    ) -> None:
        self.prefix = prefix
        self.workdir = workdir
        self.images = dict(images or {})
        self.issuer = issuer or TokenIssuer()
        self.api_audience = api_audience
        self.network = f"{prefix}-net"
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.pods: list[Pod] = []
        self.mounts: list[Path] = []
        self.closed = False
        self.containers: list[str] = []
        self.root_ca_pem = b""  # the cluster CA a kube-api-access volume carries as ca.crt
        self.api_tokens: list[str] = []  # tokens minted for the API server's audience
        self.api_dir: Path | None = None
        dockerenv.docker("network", "create", self.network, timeout=60)

    # API objects

    def apply(self, docs: Iterable[Obj], namespace: str | None = None) -> None:
        """Store ConfigMaps, Secrets, ServiceAccounts and Services (what the pods refer to)."""
        for doc in docs:
            kind = doc.get("kind")
            if kind not in ("ConfigMap", "Secret", "ServiceAccount", "Service"):
                continue
            meta = doc["metadata"]
            ns = meta.get("namespace") or namespace or "default"
            self.objects[(kind, ns, meta["name"])] = copy.deepcopy(doc)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get((kind, namespace, name))

    def configmap_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        cm = self.get("ConfigMap", namespace, name)
        if cm is None:
            return None
        data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return data

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        secret = self.get("Secret", namespace, name)
        if secret is None:
            return None
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        data.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
        return data

    def image(self, name: str) -> str:
        return self.images.get(name, name)

    # the API server's service-account issuer discovery

    def start_api_discovery(self) -> str:
        """Serve what the API server serves for service-account issuer discovery (GET
        /.well-known/openid-configuration and /openid/v1/jwks, bearer token required) as
        https://kubernetes.default.svc.cluster.local, with a cluster CA that every automounted
        kube-api-access volume carries as ca.crt. Returns the container's name."""
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        now = dt.datetime.now(dt.UTC)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        names = [f"kubernetes{s}" for s in ("", ".default", ".default.svc")]
        names.append("kubernetes.default.svc.cluster.local")
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.root_ca_pem = ca_cert.public_bytes(pem)
        api = self.workdir / "kube-apiserver"
        api.mkdir(parents=True)
        api.chmod(0o755)
        (api / "tls.crt").write_bytes(cert.public_bytes(pem))
        (api / "tls.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        issuer = self.issuer.issuer
        (api / "openid-configuration.json").write_text(
            json.dumps(
                {
                    "issuer": issuer,
                    "jwks_uri": f"{issuer}/openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }
            )
        )
        (api / "jwks.json").write_text(self.issuer.jwks())
        (api / "tokens").write_text("")
        (api / "server.py").write_text(API_SERVER_PY)
        self.api_dir = api
        name = f"{self.prefix}-kube-apiserver"
        self.containers.append(name)
        argv = ["run", "-d", "--name", name, "--network", self.network, "--no-healthcheck"]
        for alias in names:
            argv += ["--network-alias", alias]
        argv += ["--mount", f"type=bind,source={api},target=/api,readonly"]
        argv += [dockerenv.base_image(), "python3", "-u", "/api/server.py"]
        dockerenv.docker(*argv, timeout=120)
        return name

    def sync_api_tokens(self) -> None:
        if self.api_dir is not None:
            (self.api_dir / "tokens").write_text("\n".join(self.api_tokens) + "\n")

    # pods

    def run_pod(
        self,
        workload: Obj,
        *,
        name: str | None = None,
        namespace: str | None = None,
        ordinal: int = 0,
        wait_ready: float | None = 120,
        background: bool = False,
    ) -> Pod:
        """Create the pod of a Pod or workload object and start it as the kubelet would;
        wait (up to `wait_ready` seconds, None: not at all) until it is Ready. `background`:
        start it in a thread and return at once (`wait_ready` then raises what start raised)."""
        template = pod_template(workload)
        meta = template.setdefault("metadata", {})
        ns = meta.get("namespace") or workload.get("metadata", {}).get("namespace")
        ns = ns or namespace or "default"
        kind = workload.get("kind")
        owner = workload.get("metadata", {}).get("name", "pod")
        if name is None:
            if kind == "Pod":
                name = owner
            elif kind == "StatefulSet":
                name = f"{owner}-{ordinal}"
            else:
                name = f"{owner}-{uuid.uuid4().hex[:5]}"
        claims: dict[str, str] = {}
        if kind == "StatefulSet":
            for claim in workload["spec"].get("volumeClaimTemplates") or []:
                cname = claim["metadata"]["name"]
                claims[cname] = f"{cname}-{name}"
        pod = Pod(self, name, ns, template, claims)
        self.pods.append(pod)
        if background:
            pod.start_in_background()
            return pod
        pod.start()
        if wait_ready is not None:
            pod.wait_ready(wait_ready)
        return pod

    def services_for(self, namespace: str, labels: Mapping[str, str]) -> list[Obj]:
        out = []
        for (kind, ns, _), svc in self.objects.items():
            selector = (svc.get("spec") or {}).get("selector") or {}
            selected = selector and all(labels.get(k) == v for k, v in selector.items())
            if kind == "Service" and ns == namespace and selected:
                out.append(svc)
        return out

    def service_ip(self, svc: Obj) -> str | None:
        ns = svc["metadata"].get("namespace", "default")
        for pod in self.pods:
            if pod.namespace == ns and pod.ip and svc in self.services_for(ns, pod.labels):
                return pod.ip
        return None

    def close(self) -> None:
        """Remove every container, network and mount this node made (also after a failure)."""
        self.closed = True
        for pod in reversed(self.pods):
            pod.stop_probing()
            if pod._starter is not None:
                pod._starter.join(timeout=30)
        # In parallel: removing a container that ran takes seconds on the vfs driver.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(
                pool.map(
                    lambda name: dockerenv.docker("rm", "-f", "-v", name, check=False, timeout=300),
                    self.containers,
                )
            )
        dockerenv.docker("network", "rm", self.network, check=False, timeout=60)
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


class Pod:
    """One pod on the emulated node; `status()` is what `kubectl get pod` would show."""

    def __init__(
        self, node: Node, name: str, namespace: str, template: Obj, claims: Mapping[str, str]
    ) -> None:
        self.node = node
        self.name = name
        self.namespace = namespace
        self.template = template
        self.spec: Obj = template["spec"]
        self.labels: dict[str, str] = dict(template["metadata"].get("labels") or {})
        self.annotations: dict[str, str] = dict(template["metadata"].get("annotations") or {})
        self.uid = str(uuid.uuid4())
        self.claims = dict(claims)
        self.dir = node.workdir / "pods" / f"{name}-{self.uid[:8]}"
        self.pause = f"{node.prefix}-{name}-pause"
        self.ip = ""
        self.statuses: dict[str, ContainerStatus] = {}
        self.events: list[str] = []
        self.volume_dirs: dict[str, tuple[Path, bool]] = {}  # name -> (host dir, read-only)
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        self.start_error: BaseException | None = None
        self._lock = threading.Lock()

    # lifecycle

    def start(self) -> None:
        sc = self.spec.get("securityContext") or {}
        if self.spec.get("hostNetwork"):
            raise PodFailed(f"{self.name}: hostNetwork is not emulated")
        services = self.node.services_for(self.namespace, self.labels)
        aliases: list[str] = []
        for svc in services:
            svc_name = svc["metadata"]["name"]
            aliases += [
                svc_name,
                f"{svc_name}.{self.namespace}",
                f"{svc_name}.{self.namespace}.svc",
                f"{svc_name}.{self.namespace}.svc.cluster.local",
            ]
        argv = ["run", "-d", "--name", self.pause, "--network", self.node.network]
        argv += ["--hostname", self.name[:63], "--no-healthcheck"]
        for alias in aliases:
            argv += ["--network-alias", alias]
        for sysctl in sc.get("sysctls") or []:
            argv += ["--sysctl", f"{sysctl['name']}={sysctl['value']}"]
        # The pause container: sleeps until SIGTERM, holding the network namespace.
        argv += ["--user", "65535:65535", *pause_image()]
        self.node.containers.append(self.pause)
        dockerenv.docker(*argv, timeout=120)
        self.ip = dockerenv.container_ip(self.pause, self.node.network)
        self.event(f"sandbox {self.pause} ip {self.ip} aliases {aliases}")
        self._prepare_volumes()
        self.node.sync_api_tokens()
        for c in self.spec.get("initContainers") or []:
            sidecar = c.get("restartPolicy") == "Always"
            status = self._create(c, init=True, sidecar=sidecar)
            if sidecar:
                self._start_probes(status)
                self._wait_started(status)
            else:
                self._run_to_completion(status)
        for c in self.spec.get("containers") or []:
            status = self._create(c, init=False, sidecar=False)
            self._start_probes(status)

    def start_in_background(self) -> None:
        def target() -> None:
            try:
                self.start()
            except BaseException as exc:  # handed to wait_ready()
                self.start_error = exc

        self._starter = threading.Thread(target=target, name=f"start-{self.name}", daemon=True)
        self._starter.start()

    def _wait_started(self, status: ContainerStatus) -> None:
        """A native sidecar: the next container starts only once its startup probe passed."""
        startup = [p for p in status.probes if p.kind == "startupProbe"]
        if not startup:
            return
        probe = startup[0]
        limit = probe.setting("initialDelaySeconds") + probe.setting("periodSeconds") * (
            probe.setting("failureThreshold") + 1
        )
        deadline = time.monotonic() + limit + 10
        while time.monotonic() < deadline:
            with self._lock:
                if probe.ok:
                    self.event(f"{status.name}: startup probe passed")
                    return
            state = dockerenv.container_state(status.docker_name)
            if not state.get("Running"):
                raise PodFailed(
                    f"pod {self.name}: sidecar {status.name} exited ({state.get('ExitCode')}) "
                    f"before its startup probe passed\n{self.logs(status.name)}"
                )
            time.sleep(0.2)
        raise PodFailed(
            f"pod {self.name}: sidecar {status.name} startup probe did not pass "
            f"({probe.last_result})\n{self.logs(status.name)}"
        )

    def _run_to_completion(self, status: ContainerStatus) -> None:
        proc = dockerenv.docker("wait", status.docker_name, timeout=300)
        code = int(proc.stdout.strip() or "-1")
        self.event(f"init container {status.name} exited {code}")
        if code != 0:
            raise PodFailed(
                f"pod {self.name}: init container {status.name} exited {code} (Init:Error)\n"
                f"{self.logs(status.name)}"
            )

    def stop(self) -> dict[str, int]:
        """Delete the pod as the kubelet does: app containers get SIGTERM and the grace
        period, then the native sidecars in reverse order; returns the exit codes."""
        self.stop_probing()
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        codes: dict[str, int] = {}
        apps = [s for s in self.statuses.values() if not s.init]
        sidecars = [s for s in self.statuses.values() if s.sidecar]
        for group in (apps, list(reversed(sidecars))):
            for s in group:
                dockerenv.docker("stop", "-t", str(grace), s.docker_name, check=False)
            for s in group:
                codes[s.name] = int(dockerenv.container_state(s.docker_name).get("ExitCode", -1))  # type: ignore[call-overload]
        dockerenv.docker("stop", "-t", "5", self.pause, check=False)
        return codes

    def delete(self) -> dict[str, int]:
        """`kubectl delete pod`: stop as the kubelet does, then remove the containers, so that
        a pod of the same name (a StatefulSet's) can take its place; returns the exit codes."""
        codes = self.stop()
        names = [s.docker_name for s in self.statuses.values()] + [self.pause]
        dockerenv.docker("rm", "-f", "-v", *names, check=False, timeout=300)
        self.node.pods.remove(self)
        return codes

    def stop_probing(self) -> None:
        self._stop.set()
        if self._prober is not None:
            self._prober.join(timeout=15)

    # status

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")

    def docker_name(self, container: str) -> str:
        return f"{self.node.prefix}-{self.name}-{container}"

    def logs(self, container: str) -> str:
        proc = dockerenv.docker("logs", self.docker_name(container), check=False, timeout=60)
        return f"--- logs of {container} ---\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"

    def ready(self) -> bool:
        """The pod's Ready condition: every app container and native sidecar ready."""
        wanted = [c["name"] for c in self.spec.get("containers") or []] + [
            c["name"]
            for c in self.spec.get("initContainers") or []
            if c.get("restartPolicy") == "Always"
        ]
        with self._lock:
            return all(n in self.statuses and self.statuses[n].ready for n in wanted)

    def restarts(self, container: str) -> int:
        return self.statuses[container].restarts

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": self.name,
                "ip": self.ip,
                "containers": {
                    n: {"ready": s.ready, "started": s.started, "restarts": s.restarts}
                    for n, s in self.statuses.items()
                },
            }

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.start_error is not None:
                raise self.start_error
            if self.ready():
                return
            for s in list(self.statuses.values()):
                if (s.init and not s.sidecar) or not s.started:
                    continue
                state = dockerenv.container_state(s.docker_name)
                if not state.get("Running") and not s.init:
                    raise PodFailed(
                        f"pod {self.name}: container {s.name} exited "
                        f"({state.get('ExitCode')})\n{self.logs(s.name)}"
                    )
            time.sleep(0.3)
        logs = "\n".join(self.logs(n) for n in self.statuses)
        raise PodFailed(f"pod {self.name} not ready within {timeout:.0f}s: {self.status()}\n{logs}")

    def exec(
        self, container: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl exec`: runs as the container's user, in its namespaces."""
        return dockerenv.docker(
            "exec", self.docker_name(container), *argv, check=check, timeout=120
        )

    # containers

    def _effective_user(self, c: Obj, image: str) -> tuple[int | None, int | None, bool]:
        """(runAsUser, runAsGroup, runAsNonRoot) after the pod-level defaults."""
        pod_sc = self.spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}

        def pick(key: str) -> Any:
            return sc[key] if key in sc else pod_sc.get(key)

        uid, gid, non_root = pick("runAsUser"), pick("runAsGroup"), bool(pick("runAsNonRoot"))
        if non_root:
            user = uid
            if user is None:
                image_user = dockerenv.docker(
                    "image", "inspect", "--format", "{{.Config.User}}", image
                ).stdout.strip()
                name = image_user.split(":")[0]
                if not name:
                    user = 0
                elif not name.isdigit():
                    raise PodFailed(
                        f"pod {self.name}: container {c['name']}: image has non-numeric user "
                        f"({name}), cannot verify user is non-root (CreateContainerConfigError)"
                    )
                else:
                    user = int(name)
            if user == 0:
                raise PodFailed(
                    f"pod {self.name}: container {c['name']}: container has runAsNonRoot and "
                    f"image will run as root (CreateContainerConfigError)"
                )
        return uid, gid, non_root

    def _create(self, c: Obj, *, init: bool, sidecar: bool) -> ContainerStatus:
        name = c["name"]
        if self.node.closed:
            raise PodFailed(f"pod {self.name}: the node is shutting down")
        docker_name = self.docker_name(name)
        image = self.node.image(c["image"])
        status = ContainerStatus(name, docker_name, init, sidecar, c)
        with self._lock:
            self.statuses[name] = status
        pod_sc = self.spec.get("securityContext") or {}
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            raise PodFailed(f"pod {self.name}: container {name} asks to be privileged")
        uid, gid, _ = self._effective_user(c, image)
        env = self._env(c)
        argv = ["create", "--name", docker_name, "--network", f"container:{self.pause}"]
        # The kubelet ignores an image's HEALTHCHECK; it has its own probes.
        argv += ["--no-healthcheck", "--restart", "no"]
        if uid is not None:
            argv += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        elif gid is not None:
            raise PodFailed(f"pod {self.name}: {name}: runAsGroup without runAsUser not emulated")
        groups = list(pod_sc.get("supplementalGroups") or [])
        if pod_sc.get("fsGroup") is not None:
            groups.append(pod_sc["fsGroup"])
        for g in groups:
            argv += ["--group-add", str(g)]
        caps = sc.get("capabilities") or {}
        for cap in caps.get("drop") or []:
            argv += ["--cap-drop", cap]
        for cap in caps.get("add") or []:
            argv += ["--cap-add", cap]
        if sc.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            argv += ["--security-opt", "seccomp=unconfined"]
        elif seccomp not in (None, "RuntimeDefault"):
            raise PodFailed(f"pod {self.name}: {name}: seccompProfile {seccomp} not emulated")
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            argv += ["--memory", str(_quantity_bytes(str(limits["memory"])))]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        for mount in self._mounts(c):
            argv += ["--mount", mount]
        if c.get("workingDir"):
            argv += ["--workdir", c["workingDir"]]
        command = [expand(str(a), env) for a in c.get("command") or []]
        args = [expand(str(a), env) for a in c.get("args") or []]
        if command:
            argv += ["--entrypoint", command[0]]
        argv.append(image)
        argv += command[1:] + args
        self.node.containers.append(docker_name)
        created = dockerenv.docker(*argv, check=False, timeout=300)
        if created.returncode != 0:
            raise PodFailed(
                f"pod {self.name}: container {name} could not be created "
                f"(CreateContainerError): {created.stderr.strip()}"
            )
        started = dockerenv.docker("start", docker_name, check=False, timeout=120)
        if started.returncode != 0:
            raise PodFailed(
                f"pod {self.name}: container {name} could not start (RunContainerError): "
                f"{started.stderr.strip()}\n{self.logs(name)}"
            )
        status.started = True
        self.event(f"started {name} ({image}) as {shlex.join(argv[argv.index(image) :])}")
        return status

    # env

    def _field(self, path: str) -> str:
        fields = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": "emulated-node",
            "spec.serviceAccountName": self._service_account(),
            "status.hostIP": _host_ip(self.node.network),
            "status.hostIPs": _host_ip(self.node.network),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
        }
        if path in fields:
            return fields[path]
        match = _FIELD_LABEL.match(path)
        if match:
            source = self.labels if match.group(1) == "labels" else self.annotations
            return source.get(match.group(2), "")
        raise PodFailed(f"pod {self.name}: fieldRef {path} is not a downward API field")

    def _service_account(self) -> str:
        return str(
            self.spec.get("serviceAccountName") or self.spec.get("serviceAccount") or "default"
        )

    def _key_ref(self, kind: str, ref: Obj, container: str) -> str | None:
        getter = self.node.configmap_data if kind == "ConfigMap" else self.node.secret_data
        data = getter(self.namespace, ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodFailed(
                f"pod {self.name}: container {container}: {kind} {ref['name']!r} key "
                f"{ref['key']!r} not found (CreateContainerConfigError)"
            )
        return data[ref["key"]].decode()

    def _env(self, c: Obj) -> dict[str, str]:
        """The container's environment, built as pkg/kubelet makeEnvironmentVariables does."""
        env: dict[str, str] = {}
        if self.spec.get("enableServiceLinks", True) is not False:
            for (kind, ns, _), svc in sorted(self.node.objects.items()):
                if kind != "Service" or ns != self.namespace:
                    continue
                # No kube-proxy: a Service's address is its pod's (a stand-in before it runs).
                host = self.node.service_ip(svc) or "10.96.0.10"
                ports = svc["spec"]["ports"]
                env.update(service_link_env(svc["metadata"]["name"], host, ports))
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref, data = (
                    source["configMapRef"],
                    self.node.configmap_data(self.namespace, source["configMapRef"]["name"]),
                )
            else:
                ref, data = (
                    source["secretRef"],
                    self.node.secret_data(self.namespace, source["secretRef"]["name"]),
                )
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodFailed(
                    f"pod {self.name}: container {c['name']}: envFrom {ref['name']!r} not found "
                    "(CreateContainerConfigError)"
                )
            for key, raw in data.items():
                if _ENV_NAME.match(prefix + key):  # invalid names are skipped, with an event
                    env[prefix + key] = raw.decode()
        for item in c.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            value: str | None
            if "fieldRef" in source:
                value = self._field(source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source:
                value = self._key_ref("ConfigMap", source["configMapKeyRef"], c["name"])
            elif "secretKeyRef" in source:
                value = self._key_ref("Secret", source["secretKeyRef"], c["name"])
            else:
                raise PodFailed(f"pod {self.name}: env {name}: {sorted(source)} not emulated")
            if value is not None:
                env[name] = value
        return env

    # volumes

    def _prepare_volumes(self) -> None:
        pod_sc = self.spec.get("securityContext") or {}
        fs_group = pod_sc.get("fsGroup")
        volumes = list(self.spec.get("volumes") or [])
        for claim, claim_name in self.claims.items():
            volumes.append({"name": claim, "persistentVolumeClaim": {"claimName": claim_name}})
        if self._automount():
            volumes.append(self._kube_api_access())
        for vol in volumes:
            name = vol["name"]
            target = self.dir / "volumes" / name
            if "emptyDir" in vol:
                target.mkdir(parents=True)
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    size = _quantity_bytes(str(vol["emptyDir"].get("sizeLimit", "64Mi")))
                    self._tmpfs(target, size)
                target.chmod(0o777)
                _set_ownership(target, fs_group, read_only=False)
                self.volume_dirs[name] = (target, False)
            elif "persistentVolumeClaim" in vol:
                claim_name = vol["persistentVolumeClaim"]["claimName"]
                target = self.node.workdir / "pvc" / claim_name
                fresh = not target.exists()
                if fresh:  # a new volume's file system root: root-owned 0755
                    target.mkdir(parents=True)
                    target.chmod(0o755)
                policy = pod_sc.get("fsGroupChangePolicy", "Always")
                if fs_group is not None and (
                    policy == "Always" or target.stat().st_gid != fs_group or fresh
                ):
                    for path in [target, *target.rglob("*")]:
                        _set_ownership(path, fs_group, read_only=False)
                self.volume_dirs[name] = (
                    target,
                    bool(vol["persistentVolumeClaim"].get("readOnly")),
                )
            elif "configMap" in vol or "secret" in vol or "projected" in vol:
                files = self._projected_files(vol)
                target.mkdir(parents=True)
                self._tmpfs(target, 16 << 20)
                target.chmod(0o1777)
                _atomic_write(target, files)
                for path in [target, *target.rglob("*")]:
                    if not path.is_symlink():
                        _set_ownership(path, fs_group, read_only=True)
                self.volume_dirs[name] = (target, True)
            else:
                raise PodFailed(f"pod {self.name}: volume {name}: {sorted(vol)} not emulated")

    def _automount(self) -> bool:
        if "automountServiceAccountToken" in self.spec:
            return bool(self.spec["automountServiceAccountToken"])
        sa = self.node.get("ServiceAccount", self.namespace, self._service_account())
        return bool((sa or {}).get("automountServiceAccountToken", True))

    def _kube_api_access(self) -> Obj:
        """The volume the ServiceAccount admission plugin adds (kube-api-access-*)."""
        return {
            "name": "kube-api-access",
            "projected": {
                "defaultMode": 0o644,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"_file": {"path": "ca.crt", "data": self.node.root_ca_pem}},
                    {"_file": {"path": "namespace", "data": self.namespace.encode()}},
                ],
            },
        }

    def _projected_files(self, vol: Obj) -> dict[str, tuple[bytes, int]]:
        """path -> (content, mode) of a configMap, secret or projected volume."""
        if "configMap" in vol or "secret" in vol:
            key = "configMap" if "configMap" in vol else "secret"
            sources = [{key: vol[key]}]
            default_mode = int(vol[key].get("defaultMode", 0o644))
        else:
            sources = vol["projected"]["sources"]
            default_mode = int(vol["projected"].get("defaultMode", 0o644))
        files: dict[str, tuple[bytes, int]] = {}
        for source in sources:
            if "configMap" in source or "secret" in source:
                kind = "configMap" if "configMap" in source else "secret"
                ref = source[kind]
                ref_name = ref.get("name") or ref.get("secretName")
                data = (
                    self.node.configmap_data(self.namespace, ref_name)
                    if kind == "configMap"
                    else self.node.secret_data(self.namespace, ref_name)
                )
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise PodFailed(
                        f"pod {self.name}: volume {vol['name']}: {kind} {ref_name!r} not found "
                        "(the pod stays in ContainerCreating)"
                    )
                mode = int(ref.get("defaultMode", default_mode))
                items = ref.get("items")
                if items:
                    for item in items:
                        files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
                else:
                    for k, v in data.items():
                        files[k] = (v, mode)
            elif "serviceAccountToken" in source:
                tok = source["serviceAccountToken"]
                seconds = int(tok.get("expirationSeconds", 3600))
                if seconds < 600:
                    raise PodFailed(f"pod {self.name}: expirationSeconds {seconds} < 600")
                token = self.node.issuer.mint(
                    namespace=self.namespace,
                    service_account=self._service_account(),
                    pod=self.name,
                    pod_uid=self.uid,
                    audience=tok.get("audience") or self.node.api_audience,
                    expiration_seconds=seconds,
                )
                if (tok.get("audience") or self.node.api_audience) == self.node.api_audience:
                    self.node.api_tokens.append(token)  # the API server accepts it
                files[tok["path"]] = (token.encode(), default_mode)
            elif "_file" in source:
                files[source["_file"]["path"]] = (source["_file"]["data"], default_mode)
            else:
                raise PodFailed(f"pod {self.name}: projected source {sorted(source)} not emulated")
        return files

    def _tmpfs(self, target: Path, size: int) -> None:
        if os.geteuid() != 0:
            return  # a plain directory stands in (the contents are the same)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(target)],
            check=True,
            capture_output=True,
        )
        self.node.mounts.append(target)

    def _mounts(self, c: Obj) -> list[str]:
        out = []
        mounts = list(c.get("volumeMounts") or [])
        if self._automount() and not any(m["mountPath"] == KUBE_API_ACCESS for m in mounts):
            mounts.append({"name": "kube-api-access", "mountPath": KUBE_API_ACCESS})
        for m in mounts:
            if m["name"] not in self.volume_dirs:
                raise PodFailed(f"pod {self.name}: {c['name']}: no volume {m['name']!r}")
            source, read_only = self.volume_dirs[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            spec = f"type=bind,source={source},target={m['mountPath']}"
            if read_only or m.get("readOnly"):
                spec += ",readonly"
            out.append(spec)
        return out

    # probes

    def _start_probes(self, status: ContainerStatus) -> None:
        now = time.monotonic()
        c = status.spec
        with self._lock:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if c.get(kind):
                    status.probes.append(ProbeState(status.name, kind, c[kind], now))
            if not any(p.kind == "readinessProbe" for p in status.probes):
                status.ready = True  # no readiness probe: ready once started (and startup passed)
        if self._prober is None:
            self._prober = threading.Thread(target=self._probe_loop, name=f"prober-{self.name}")
            self._prober.daemon = True
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                work = [
                    (s, p)
                    for s in self.statuses.values()
                    for p in s.probes
                    if p.due(now) and (p.kind == "startupProbe" or s.startup_done())
                ]
                for _, p in work:
                    p.last = now
            for s, p in work:
                ok, detail = self._probe(s, p.spec)
                with self._lock:
                    self._record(s, p, ok, detail)
            self._stop.wait(0.1)

    def _record(self, s: ContainerStatus, p: ProbeState, ok: bool, detail: str) -> None:
        p.last_result = detail
        if ok:
            p.successes, p.failures = p.successes + 1, 0
            if p.successes >= p.setting("successThreshold"):
                p.ok = True
        else:
            p.failures, p.successes = p.failures + 1, 0
            if p.failures >= p.setting("failureThreshold"):
                p.ok = False
        has_readiness = any(q.kind == "readinessProbe" for q in s.probes)
        if p.kind == "readinessProbe" or (p.kind == "startupProbe" and not has_readiness):
            s.ready = p.ok
        if (
            not ok
            and p.kind in ("livenessProbe", "startupProbe")
            and p.failures >= p.setting("failureThreshold")
        ):
            self.event(f"{s.name}: {p.kind} failed {p.failures} times ({detail}): restarting")
            dockerenv.docker("restart", "-t", "5", s.docker_name, check=False)
            s.restarts += 1
            s.ready = False
            restarted = time.monotonic()
            for q in s.probes:
                q.ok, q.failures, q.successes, q.last, q.started = False, 0, 0, 0.0, restarted

    def _probe(self, s: ContainerStatus, spec: Obj) -> tuple[bool, str]:
        timeout = float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                h = spec["httpGet"]
                port = _port(s.spec, h["port"])
                host = h.get("host") or self.ip
                conn: http.client.HTTPConnection
                if h.get("scheme", "HTTP").upper() == "HTTPS":
                    ctx = ssl._create_unverified_context()  # the kubelet does not verify either
                    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                headers = {"User-Agent": "kube-probe/1.29", "Accept": "*/*"}
                for hdr in h.get("httpHeaders") or []:
                    headers[hdr["name"]] = hdr["value"]
                try:
                    conn.request("GET", h.get("path", "/"), headers=headers)
                    code = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= code < 400, f"HTTP {code}"
            if "tcpSocket" in spec:
                t = spec["tcpSocket"]
                port = _port(s.spec, t["port"])
                with socket.create_connection((t.get("host") or self.ip, port), timeout=timeout):
                    return True, "connected"
            if "exec" in spec:
                proc = dockerenv.docker(
                    "exec",
                    s.docker_name,
                    *spec["exec"]["command"],
                    check=False,
                    timeout=timeout + 30,
                )
                return proc.returncode == 0, f"exit {proc.returncode}"
        except (OSError, http.client.HTTPException) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return False, f"probe {sorted(spec)} not emulated"


# --- the API server's discovery endpoints -----------------------------------------------------

# Run with the base image's Python: what kube-apiserver answers a pod's service-account token
# on its issuer discovery paths (a token it did not mint: 401).
API_SERVER_PY = """
import http.server, ssl
D = "/api"
PATHS = {"/.well-known/openid-configuration": "openid-configuration.json",
         "/openid/v1/jwks": "jwks.json"}
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        tokens = set(open(D + "/tokens").read().split())
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:].strip() not in tokens:
            return self.answer(401, b'{"kind":"Status","code":401,"reason":"Unauthorized"}')
        name = PATHS.get(self.path)
        if name is None:
            return self.answer(404, b'{"kind":"Status","code":404}')
        self.answer(200, open(D + "/" + name, "rb").read())
    def answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Api)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(D + "/tls.crt", D + "/tls.key")
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


# --- the pause image -------------------------------------------------------------------------

PAUSE_IMAGE = "mtlsk8s-pause:1"
# What the kubelet's pause container does (kubernetes/build/pause/linux/pause.c, shortened):
# wait for SIGTERM or SIGINT, reap children, exit 0.
PAUSE_C = r"""
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
int main(void) {
    sigset_t set;
    int sig;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    for (;;) {
        sigwait(&set, &sig);
        if (sig != SIGCHLD) return 0;
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
}
"""


@functools.cache
def pause_image() -> tuple[str, ...]:
    """`docker run` arguments from the image on: a pause image of one static binary (like the
    kubelet's, tiny, so that a sandbox costs next to nothing); without a C compiler, Python
    from the base image does the same."""
    if shutil.which("gcc") is None:
        return _python_pause()
    recipe = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:16]
    label = dockerenv.docker(
        "image", "inspect", "--format", "{{json .Config.Labels}}", PAUSE_IMAGE, check=False
    )
    if label.returncode == 0 and recipe in label.stdout:
        return (PAUSE_IMAGE,)
    with tempfile.TemporaryDirectory(prefix="mtlsk8s-pause-") as tmp:
        root = Path(tmp, "root")
        root.mkdir()
        Path(tmp, "pause.c").write_text(PAUSE_C)
        built = subprocess.run(
            ["gcc", "-static", "-Os", "-o", str(root / "pause"), str(Path(tmp, "pause.c"))],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            return _python_pause()
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True)
        imported = subprocess.run(
            ["docker", "import", "-c", 'ENTRYPOINT ["/pause"]', "-c",
             f"LABEL io.mtls-sidecar.test-recipe={recipe}", "-", PAUSE_IMAGE],
            input=tar.stdout,
            capture_output=True,
            check=False,
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
    return (PAUSE_IMAGE,)


def _python_pause() -> tuple[str, ...]:
    code = "import signal; signal.sigwait({signal.SIGTERM, signal.SIGINT})"
    return ("--entrypoint", "python3", dockerenv.base_image(), "-c", code)


# --- helpers ----------------------------------------------------------------------------------


def _port(container: Obj, port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise PodFailed(f"container {container['name']}: no port named {port!r}")


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}


def _quantity_bytes(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _host_ip(network: str) -> str:
    proc = dockerenv.docker(
        "network", "inspect", "--format", "{{(index .IPAM.Config 0).Gateway}}", network
    )
    return proc.stdout.strip()


def _set_ownership(path: Path, fs_group: int | None, *, read_only: bool) -> None:
    """pkg/volume SetVolumeOwnership: group fsGroup, group read (and write unless read-only)
    bits, setgid and group x on directories."""
    if fs_group is None:
        return
    os.chown(path, -1, fs_group)
    mode = path.stat().st_mode & 0o7777
    mask = 0o440 if read_only else 0o660
    if path.is_dir():
        mask |= 0o2000 | 0o110
    path.chmod(mode | mask)


def _atomic_write(target: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """pkg/volume/util AtomicWriter's layout: the files in a timestamped directory, `..data`
    a symlink to it, and each top-level name a symlink through `..data`."""
    stamp = "..{}".format(dt.datetime.now(dt.UTC).strftime("%Y_%m_%d_%H_%M_%S.%f"))
    data_dir = target / stamp
    data_dir.mkdir()
    data_dir.chmod(0o755)
    for rel, (content, mode) in files.items():
        path = data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    (target / "..data").symlink_to(stamp)
    for top in sorted({rel.split("/")[0] for rel in files}):
        (target / top).symlink_to(f"..data/{top}")
