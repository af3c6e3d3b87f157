"""The Kubernetes pods, run as a kubelet runs them (tests/kubelet.py), with Docker, no cluster.

Three pods on one Docker network: the CA from deploy/kubernetes/ca.yaml, and a server and a
client that are plain app manifests run through `mtls-sidecar inject` (transparent mode). The
client app's plaintext HTTP to the server pod's IP is captured by the rules the
`mtls-iptables` init container set, crosses the network as mTLS (a capture on the bridge holds
only TLS records on the server port, no marker of the app's bytes), and reaches the server app,
whose sidecar counts it from the client's SPIFFE ID. Then the same pods uninjected talk
plaintext (and the same capture check finds the marker: it can fail), and the hand-written
demo pods (demo-app.yaml, demo-client.yaml) run too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import dockerenv, netns
from tests.kubelet import Node, Pod, PodFailed, TokenIssuer, expand, service_link_env

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
SIDECAR_TAG = "mtlsk8s-sidecar:test"
CURL_IMAGE = "mtlsk8s-curl:bookworm"
CA_URL = "https://mtls-ca.mtls-demo.svc:8443"
CLIENT_MARKER = "client-marker-7f3a9c"
SERVER_MARKER = "server-marker-b41d2e"

# The server app: answers on 8080 with a marker (and logs the request line), and a health
# endpoint on 8081 that the kubelet's readiness probe asks.
APP_PY = f"""
import http.server, threading
class App(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"{SERVER_MARKER} " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class Health(App):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
health = http.server.ThreadingHTTPServer(("0.0.0.0", 8081), Health)
threading.Thread(target=health.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), App).serve_forever()
"""

SERVER_MANIFEST = (
    yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "web-app", "namespace": "shop"},
            "data": {"app.py": APP_PY},
        }
    )
    + """---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      automountServiceAccountToken: false
      containers:
        - name: web
          image: python:3.11-slim-bookworm
          command: ["python", "-u", "/app/app.py"]
          ports:
            - {name: http, containerPort: 8080}
            - {name: health, containerPort: 8081}
          readinessProbe:
            httpGet: {path: /healthz, port: health}
            periodSeconds: 1
          securityContext:
            runAsUser: 1000
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          volumeMounts:
            - {name: app, mountPath: /app, readOnly: true}
      volumes:
        - name: app
          configMap: {name: web-app}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 8080, targetPort: http}
"""
)

WARM_UP_PY = """
import time, urllib.request
deadline = time.monotonic() + 90
while True:
    try:
        print(urllib.request.urlopen("http://web.shop.svc:8080/warm-up", timeout=5).read().decode())
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""

CLIENT_MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: shop}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      automountServiceAccountToken: false
      containers:
        - name: client
          image: python:3.11-slim-bookworm
          command: ["python", "-c", "import signal; signal.sigwait({signal.SIGTERM})"]
          securityContext:
            runAsUser: 1001
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
"""


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _cli(*args: str, input: str | None = None) -> str:
    proc = dockerenv.run(sys.executable, "-m", "proxy", *args, input=input, cwd=REPO, timeout=120)
    return proc.stdout


def _kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise AssertionError(f"no {kind} {name or ''} in the manifests")


# --- images -----------------------------------------------------------------------------------


def _sidecar_image() -> str:
    """This checkout's image under a tag of our own (another test may rebuild the shared tag
    from another tree at the same time)."""
    base = dockerenv.base_image()
    dockerenv.docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
        "-t", SIDECAR_TAG, str(REPO), timeout=1200,
    )  # fmt: skip
    return SIDECAR_TAG


def _curl_image() -> str:
    """Stands in for curlimages/curl (demo-client.yaml): sh and curl, user 100:101."""
    base = dockerenv.base_image()
    with tempfile.TemporaryDirectory(prefix="mtlsk8s-curl-") as tmp:
        Path(tmp, "Dockerfile").write_text(
            f"FROM {base}\n"
            "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"
            " --no-install-recommends curl && rm -rf /var/lib/apt/lists/*\n"
            "USER 100:101\n"
        )
        dockerenv.docker("build", "--network", "host", "-t", CURL_IMAGE, tmp, timeout=1200)
    return CURL_IMAGE


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    node: Node
    fingerprint: str
    ca: Pod
    workdir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    dockerenv.require_engine()
    if os.geteuid() != 0:  # tcpdump on the bridge, tmpfs volumes, fsGroup ownership
        pytest.skip(f"{dockerenv.SKIP_PREFIX}: the emulated kubelet needs root")
    images = {
        "mtls-sidecar:0.1.0": _sidecar_image(),
        "python:3.11-slim-bookworm": dockerenv.base_image(),
        "curlimages/curl:8.10.1": _curl_image(),
    }
    workdir = tmp_path_factory.mktemp("k8s")
    ca_dir = workdir / "ca"
    _cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", "cluster.local")
    root = x509.load_pem_x509_certificate((ca_dir / "root-1.crt").read_bytes())
    fingerprint = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    issuer = TokenIssuer()
    node = Node(f"mtlsk8s-{uuid.uuid4().hex[:6]}", workdir, images=images, issuer=issuer)
    try:
        node.start_api_discovery()  # what `ca serve --k8s-issuer` asks, as ca.yaml has it
        keys = ["ca.json", "root-1.crt", "intermediate-1.crt", "intermediate-1.key", "token_secret"]
        node.apply(
            [
                # README "Kubernetes with our CA", step 2: the Secret and the fingerprint.
                {
                    "kind": "Secret",
                    "metadata": {"name": "mtls-ca-keys", "namespace": "mtls-demo"},
                    "stringData": {k: (ca_dir / k).read_text() for k in keys},
                },
                {
                    "kind": "ConfigMap",
                    "metadata": {"name": "mtls-ca-trust", "namespace": "mtls-demo"},
                    "data": {"fingerprint": fingerprint},
                },
            ]
        )
        ca_docs = _docs((K8S / "ca.yaml").read_text())
        node.apply(ca_docs)
        ca = node.run_pod(_kind(ca_docs, "StatefulSet"), wait_ready=90)
        yield Cluster(node, fingerprint, ca, workdir)
    finally:
        node.close()


# --- capture ----------------------------------------------------------------------------------


class Capture:
    """tcpdump on the Docker network's bridge: every TCP packet between the pods."""

    def __init__(self, node: Node, path: Path) -> None:
        self.path = path
        iface = dockerenv.bridge_interface(node.network)
        # -Z root: Debian's tcpdump otherwise drops to user tcpdump and may not write `path`;
        # --immediate-mode: no packet waits in the kernel ring when tcpdump is stopped.
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", iface, "-nn", "-U", "--immediate-mode", "-s", "0", "-Z", "root",
             "-w", str(path), "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on br-...": the capture is running
        assert "listening on" in line, line

    def stop(self) -> list[netns.Segment]:
        """Stop tcpdump (it writes what it has), check it lost nothing, parse the file."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        captured = re.search(r"(\d+) packets? captured", err)
        passed = re.search(r"(\d+) packets? received by filter", err)
        dropped = re.search(r"(\d+) packets? dropped by kernel", err)
        assert captured and passed and dropped, err
        assert captured[1] == passed[1] and dropped[1] == "0", f"tcpdump lost packets: {err}"
        return netns.read_pcap(self.path.read_bytes())


# --- helpers ----------------------------------------------------------------------------------


def _inject(manifest: str, fingerprint: str) -> list[dict[str, Any]]:
    out = _cli("inject", "--ca-url", CA_URL, "--ca-fingerprint", fingerprint, "-", input=manifest)
    return _docs(out)


def _http(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _crossed(streams: dict[netns.Flow, netns.Stream], marker: str) -> bool:
    return any(marker.encode() in bytes(s.data) for s in streams.values())


def _get_from(pod: Pod, container: str, url: str) -> subprocess.CompletedProcess[str]:
    """The app's own plaintext HTTP request, made inside its container (as its user)."""
    code = (
        "import sys, urllib.request as u; "
        f"sys.stdout.write(u.urlopen({url!r}, timeout=10).read().decode())"
    )
    return pod.exec(container, "python", "-c", code, check=False)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_env_expansion_is_kubernetes_own() -> None:
    env = {"A": "x", "B": "$(A)y"}
    assert expand("$(A)/$(B)/$(C)", env) == "x/$(A)y/$(C)"
    assert expand("$$(A) $$ $x $( $(A", env) == "$(A) $ $x $( $(A"
    assert expand("trailing $", env) == "trailing $"
    links = service_link_env("mtls-ca", "10.0.0.5", [{"name": "https", "port": 8443}])
    assert links["MTLS_CA_SERVICE_HOST"] == "10.0.0.5"
    assert links["MTLS_CA_PORT"] == "tcp://10.0.0.5:8443"
    assert links["MTLS_CA_PORT_8443_TCP_ADDR"] == "10.0.0.5"
    assert links["MTLS_CA_SERVICE_PORT_HTTPS"] == "8443"


def test_injected_pods_talk_mtls_transparently(cluster: Cluster) -> None:
    node = cluster.node
    server_docs = _inject(SERVER_MANIFEST, cluster.fingerprint)
    client_obj = _docs(CLIENT_MANIFEST)[0]
    # The app's own init container runs after the sidecar, already inside the mesh: it calls
    # the server by its Service name (retrying until the server pod is up).
    client_obj["spec"]["template"]["spec"]["initContainers"] = [
        {
            "name": "warm-up",
            "image": "python:3.11-slim-bookworm",
            "command": ["python", "-c", WARM_UP_PY],
            "securityContext": {"runAsUser": 1001, "runAsNonRoot": True},
        }
    ]
    client_docs = _inject(yaml.safe_dump(client_obj), cluster.fingerprint)
    node.apply(server_docs)
    # Started side by side, as a kubelet starts pods.
    server = node.run_pod(_kind(server_docs, "Deployment"), background=True)
    client = node.run_pod(_kind(client_docs, "Deployment"), background=True)
    server.wait_ready(120)
    client.wait_ready(120)

    # The app containers started only after the sidecar's startup probe (/ready: a certificate
    # is held) passed, and the sidecar holds the identity of the pod's service account.
    for pod, sa in ((server, "web"), (client, "client")):
        events = "\n".join(pod.events)
        assert events.index("mtls-sidecar: startup probe passed") < events.index(
            f"started {sa} "
        ), events
        status, body = _http(f"http://{pod.ip}:15000/status")
        assert status == 200 and f"spiffe://cluster.local/ns/shop/sa/{sa}" in body, body

    # The CA verified their tokens with the keys it fetched as ca.yaml has it: discovery at
    # the API server, with its own automounted token and the cluster CA.
    issuer_keys = "service-account keys fetched from https://kubernetes.default.svc.cluster.local/"
    assert issuer_keys in cluster.ca.logs("ca")

    capture = Capture(node, cluster.workdir / "injected.pcap")
    got = _get_from(client, "client", f"http://{server.ip}:8080/{CLIENT_MARKER}")
    segments = capture.stop()
    assert got.returncode == 0, got.stderr
    assert got.stdout == f"{SERVER_MARKER} /{CLIENT_MARKER}"

    # Nothing of the app's bytes crossed in the clear; the server port carried TLS records.
    streams = netns.tcp_streams(segments)
    assert not _crossed(streams, CLIENT_MARKER) and not _crossed(streams, SERVER_MARKER)
    server_port = {
        f: s for f, s in streams.items() if server.ip in (f[0], f[2]) and 8080 in (f[1], f[3])
    }
    assert server_port, f"no TCP payload to or from {server.ip}:8080: {list(streams)}"
    types = {ctype for s in server_port.values() for ctype, _ in netns.tls_records(bytes(s.data))}
    # Application data, nothing else; the handshake may be older than the capture: the
    # sidecars reuse the mTLS connection the warm-up call opened (MTLS_CONNECTION_REUSE).
    assert 23 in types and types <= {20, 21, 22, 23}, types

    # The server app got it, through its sidecar, from the client's SPIFFE ID; the warm-up
    # init container's call got through too (the strict sidecar takes only mTLS).
    assert CLIENT_MARKER in server.logs("web")
    assert f"{SERVER_MARKER} /warm-up" in client.logs("warm-up")
    metrics = _http(f"http://{server.ip}:15000/metrics")[1]
    peer = "spiffe://cluster.local/ns/shop/sa/client"
    assert (
        _metric(metrics, "mtls_peer_connections_total", direction="inbound", peer_identity=peer)
        >= 1
    ), metrics
    assert _metric(metrics, "mtls_connections_total", direction="inbound", security="mtls") >= 1
    client_metrics = _http(f"http://{client.ip}:15000/metrics")[1]
    assert (
        _metric(client_metrics, "mtls_connections_total", direction="outbound", security="mtls")
        >= 1
    )

    # Probe ports, as the README says: the app's probe port (excluded from capture) answers
    # plaintext from the node, the admin port answers /ready; the app port itself does not
    # take plaintext from outside (captured into the strict sidecar).
    assert _http(f"http://{server.ip}:8081/healthz") == (200, "ok")
    assert _http(f"http://{server.ip}:15000/ready")[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _http(f"http://{server.ip}:8080/{CLIENT_MARKER}")
    assert server.ready() and client.ready(), (server.status(), client.status())
    assert server.restarts("mtls-sidecar") == 0 and client.restarts("mtls-sidecar") == 0

    # The sidecar runs as the manifest says: UID/GID 1337, no capabilities, no_new_privs,
    # read-only root; the iptables step had exactly NET_ADMIN and NET_RAW.
    proc_status = server.exec("mtls-sidecar", "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in proc_status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[:2] == ["1337", "1337"] and fields["Gid"].split()[0] == "1337"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    touch = server.exec("mtls-sidecar", "python", "-c", "open('/x', 'w')", check=False)
    assert "Read-only file system" in touch.stderr
    host_config = dockerenv.docker(
        "inspect", "--format", "{{json .HostConfig}}", server.docker_name("mtls-iptables")
    ).stdout
    iptables = json.loads(host_config)
    assert iptables["CapDrop"] == ["ALL"] and sorted(iptables["CapAdd"]) == [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
    ]
    assert iptables["ReadonlyRootfs"] and iptables["NetworkMode"].startswith("container:")

    # Deleted as the kubelet deletes a pod: the app first, then the sidecar, which drains
    # and exits 0 on SIGTERM.
    codes = client.stop()
    assert codes["mtls-sidecar"] == 0, (codes, client.logs("mtls-sidecar"))


def test_uninjected_pods_talk_plaintext(cluster: Cluster) -> None:
    """`uninject` gives back pods that run without us; the capture check sees their bytes."""
    node = cluster.node
    server_docs = _docs(
        _cli(
            "uninject", "-", input=yaml.safe_dump_all(_inject(SERVER_MANIFEST, cluster.fingerprint))
        )
    )
    client_docs = _docs(
        _cli(
            "uninject", "-", input=yaml.safe_dump_all(_inject(CLIENT_MANIFEST, cluster.fingerprint))
        )
    )
    assert server_docs == _docs(SERVER_MANIFEST) and client_docs == _docs(CLIENT_MANIFEST)
    node.apply(server_docs)
    server = node.run_pod(_kind(server_docs, "Deployment"), name="web-plain", background=True)
    client = node.run_pod(_kind(client_docs, "Deployment"), name="client-plain", background=True)
    server.wait_ready(60)
    client.wait_ready(60)
    assert set(server.statuses) == {"web"} and set(client.statuses) == {"client"}
    capture = Capture(node, cluster.workdir / "plain.pcap")
    got = _get_from(client, "client", f"http://{server.ip}:8080/{CLIENT_MARKER}")
    streams = netns.tcp_streams(capture.stop())
    assert got.returncode == 0 and got.stdout == f"{SERVER_MARKER} /{CLIENT_MARKER}", got
    # The control: the same checks find the app's bytes when they really cross in the clear.
    assert _crossed(streams, CLIENT_MARKER) and _crossed(streams, SERVER_MARKER)
    to_server = [s for f, s in streams.items() if f[2] == server.ip and f[3] == 8080]
    with pytest.raises(ValueError, match="not a TLS record"):
        netns.tls_records(bytes(to_server[0].data))


def test_hand_written_demo_pods(cluster: Cluster) -> None:
    """deploy/kubernetes/demo-app.yaml and demo-client.yaml as written, in mtls-demo beside
    the CA's Service (whose link variables every pod of the namespace gets)."""
    node = cluster.node
    app_docs = _docs((K8S / "demo-app.yaml").read_text())
    client_docs = _docs((K8S / "demo-client.yaml").read_text())
    node.apply(app_docs + client_docs)
    app = node.run_pod(_kind(app_docs, "Deployment"), background=True)
    client = node.run_pod(_kind(client_docs, "Deployment"), background=True)
    app.wait_ready(120)
    client.wait_ready(120)
    # The client's loop curls http://demo-app.mtls-demo.svc:8080/ every 5 s.
    dockerenv.wait_for(
        "demo-client's curl to get 200 through the sidecars",
        lambda: re.search(r"^200 ", client.logs("client"), re.M),
        timeout=30,
    )
    metrics = _http(f"http://{app.ip}:15000/metrics")[1]
    peer = "spiffe://cluster.local/ns/mtls-demo/sa/demo-client"
    assert (
        _metric(metrics, "mtls_peer_connections_total", direction="inbound", peer_identity=peer)
        >= 1
    ), metrics
    assert app.ready() and client.ready()


def test_app_starts_only_once_the_sidecar_holds_a_certificate(cluster: Cluster) -> None:
    """With the CA frozen, an injected pod's sidecar runs and answers /ready 503, the app
    container is not created and the pod is not Ready; once the CA answers, all of it follows."""
    node = cluster.node
    docs = _inject(SERVER_MANIFEST, cluster.fingerprint)
    node.apply(docs)
    ca = cluster.ca.docker_name("ca")
    dockerenv.docker("pause", ca)
    try:
        pod = node.run_pod(_kind(docs, "Deployment"), name="web-gated", background=True)

        def sidecar_waiting() -> bool:
            if "mtls-sidecar" not in pod.statuses:
                return False
            return _http(f"http://{pod.ip}:15000/ready", timeout=2)[0] == 503

        dockerenv.wait_for("the sidecar's /ready to say 503 (no certificate)", sidecar_waiting, 60)
        assert "web" not in pod.statuses, pod.events  # the app container does not exist yet
        assert not pod.ready()
    finally:
        dockerenv.docker("unpause", ca)
    pod.wait_ready(120)
    events = "\n".join(pod.events)
    assert events.index("mtls-sidecar: startup probe passed") < events.index("started web "), events
    assert _http(f"http://{pod.ip}:15000/ready")[0] == 200


def test_the_kubelet_refuses_what_a_kubelet_refuses(cluster: Cluster) -> None:
    """runAsNonRoot with an image that runs as root, a missing ConfigMap key: the pod does not
    start, as on a cluster (so the pods above passing means something)."""
    pod: dict[str, Any] = _docs(CLIENT_MANIFEST)[0]
    spec = pod["spec"]["template"]["spec"]
    del spec["containers"][0]["securityContext"]["runAsUser"]  # the image's user: root
    with pytest.raises(PodFailed, match="runAsNonRoot and image will run as root"):
        cluster.node.run_pod(pod, name="nonroot-refused")
    spec = _docs(CLIENT_MANIFEST)[0]
    spec["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "mtls-ca-trust", "key": "nope"}}}
    ]
    with pytest.raises(PodFailed, match="key 'nope' not found"):
        cluster.node.run_pod(spec, name="missing-key", namespace="mtls-demo")


def test_ca_pod_restart_keeps_its_state(cluster: Cluster) -> None:
    """The StatefulSet's pod deleted and started again on its claim: `ca serve` drains and exits
    0, `ca-keys` runs on the used volume, the issuance log is kept, and new pods enrol."""
    node = cluster.node
    ca_list = ["mtls-sidecar", "ca", "list", "--dir", "/var/lib/mtls-ca/ca", "--json"]
    docs = _inject(CLIENT_MANIFEST, cluster.fingerprint)
    node.run_pod(_kind(docs, "Deployment"), name="client-before-restart", wait_ready=120)
    before = json.loads(cluster.ca.exec("ca", *ca_list).stdout)
    assert any("client-before-restart" in json.dumps(row) for row in before), before
    codes = cluster.ca.delete()
    assert codes["ca"] == 0, (codes, cluster.ca.logs("ca"))
    statefulset = _kind(_docs((K8S / "ca.yaml").read_text()), "StatefulSet")
    cluster.ca = node.run_pod(statefulset, wait_ready=90)
    after = json.loads(cluster.ca.exec("ca", *ca_list).stdout)
    assert after == before
    pod = node.run_pod(_kind(docs, "Deployment"), name="client-after-restart", wait_ready=120)
    assert _http(f"http://{pod.ip}:15000/ready")[0] == 200
    assert len(json.loads(cluster.ca.exec("ca", *ca_list).stdout)) == len(before) + 1
