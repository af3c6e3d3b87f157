"""The compose example, run for real: setup.sh, `up`, traffic, a capture, drain, CA restart.

Runs deploy/compose exactly as the README tells a user to (`sh setup.sh`, then `up -d`), with
the Compose this machine has (Debian's docker-compose 1.29, v1; `docker compose` v2 when it is
there), on a copy of the repository, against a real Docker engine (tests/dockerenv.py starts
one and builds the images: the base image from Debian packages, as no registry can be
reached here; Prometheus from Debian's package, laid out like the official image). Grafana's
image cannot be built from Debian packages: it runs only when the image is already present.

The tests share one compose project and run in file order, each a step a user would take.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import dockerenv
from tests.dockerenv import docker, wait_for
from tests.harness import free_port

REPO = dockerenv.REPO
# The first test builds the images on a fresh machine (debootstrap, pip inside the build).
pytestmark = pytest.mark.timeout(1200)
GRAFANA_IMAGE = "grafana/grafana:11.2.2"
# Only the apps' plaintext carries these (client-app's request line, web-app's answer); mTLS
# records, the CA's traffic and the admin ports' /metrics (which this test polls) never do.
APP_MARKERS = (b"GET / HTTP/1.1", b"Directory listing for")
SERVICES = ["ca", "web", "web-sidecar", "web-app", "client", "client-sidecar", "client-app"]
# What the image build reads from the checkout, plus the deploy files themselves.
TREE = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "proxy", "deploy")


@dataclass
class Project:
    root: Path  # the copy of the repository
    env: dict[str, str]
    compose: list[str]
    name: str
    prometheus_port: int
    network: str = ""
    started: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.root / "deploy" / "compose"

    def dc(self, *argv: str, check: bool = True, timeout: float = 300) -> str:
        proc = dockerenv.run(
            *self.compose, *argv, check=check, timeout=timeout, env=self.env, cwd=self.dir
        )
        return proc.stdout + proc.stderr

    def container(self, service: str) -> str:
        out = self.dc("ps", "-q", service).strip().splitlines()
        assert out, f"no container for {service}"
        return out[0]

    def dotenv(self) -> dict[str, str]:
        lines = (self.dir / ".env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def admin(self, pod: str, path: str) -> tuple[int, str]:
        ip = dockerenv.container_ip(self.container(pod))
        return http_get(f"http://{ip}:15000{path}")

    def metrics(self, pod: str) -> str:
        status, body = self.admin(pod, "/metrics")
        assert status == 200, body
        return body


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _compose_command() -> list[str]:
    if dockerenv.run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip(f"{dockerenv.SKIP_PREFIX}: no docker compose or docker-compose (make apt)")


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".env")
    for name in TREE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    dockerenv.require_engine()
    base = dockerenv.base_image()
    dockerenv.sidecar_image()
    prometheus = dockerenv.prometheus_image()
    compose = _compose_command()
    root = Path(tempfile.mkdtemp(prefix="mtls-compose-"))
    root.chmod(0o755)
    _copy_tree(root)
    name = f"mtlsc{secrets.token_hex(3)}"
    env = dockerenv.docker_env()
    env.update(
        COMPOSE_PROJECT_NAME=name,
        BASE_IMAGE=base,
        PROMETHEUS_IMAGE=prometheus,
        PROMETHEUS_PORT=str(free_port()),
        GRAFANA_PORT=str(free_port()),
        COMPOSE=" ".join(compose),
    )
    proj = Project(root, env, compose, name, int(env["PROMETHEUS_PORT"]))
    try:
        yield proj
    finally:
        logs = root / "compose.log"
        if (proj.dir / ".env").exists():
            logs.write_text(proj.dc("logs", "--no-color", "--tail", "200", check=False))
            print(f"compose logs: {logs}")
            proj.dc("down", "-v", "--remove-orphans", "-t", "2", check=False)
        for extra in proj.started:
            docker("rm", "-f", extra, check=False)
        if os.environ.get("KEEP_COMPOSE_TREE") is None:
            shutil.rmtree(root, ignore_errors=True)


def test_setup_writes_env_before_anything_runs(project: Project) -> None:
    """setup.sh runs with no .env yet (Compose interpolates the sidecars' ${...:?} guards even
    for `run ca-init`), creates the CA in the project's volume and writes every variable the
    compose file needs."""
    assert not (project.dir / ".env").exists()
    out = dockerenv.run("sh", "setup.sh", env=project.env, cwd=project.dir, timeout=900).stdout
    assert "wrote" in out
    values = project.dotenv()
    assert values["COMPOSE_PROJECT_NAME"] == project.name
    assert re.fullmatch(r"[0-9a-f]{64}", values["MTLS_CA_FINGERPRINT"])
    for token in ("WEB_JOIN_TOKEN", "CLIENT_JOIN_TOKEN"):
        assert values[token].startswith("mtlsjt1."), token
    volume = f"{project.name}_ca-data"
    assert docker("volume", "inspect", volume, check=False).returncode == 0


def test_up_serves_through_the_pair(project: Project) -> None:
    services = [*SERVICES, "prometheus"]
    if dockerenv.image_present(GRAFANA_IMAGE):
        services.append("grafana")
    else:
        print(f"grafana not started: image {GRAFANA_IMAGE} is not present and no registry")
    project.dc("up", "-d", *services, timeout=600)
    project.started = []
    web = project.container("web")
    project.network = next(
        iter(
            json.loads(
                docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", web).stdout
            )
        )
    )
    # Docker's health is /ready: healthy only once enrolled and listening.
    for service in ("ca", "web-sidecar", "client-sidecar"):
        cid = project.container(service)
        wait_for(f"{service} healthy", lambda c=cid: dockerenv.health(c) == "healthy", 90)
    assert project.admin("web", "/ready")[0] == 200
    assert project.admin("client", "/ready")[0] == 200
    # The client app's requests get the web app's answers.
    wait_for(
        "a 200 in client-app's log",
        lambda: "200 " in project.dc("logs", "--no-color", "client-app"),
        30,
    )
    wait_for(
        "inbound mTLS connections counted by web-sidecar",
        lambda: (
            metric(
                project.metrics("web"),
                "mtls_connections_total",
                direction="inbound",
                security="mtls",
            )
            >= 2
        ),
        30,
    )
    web_metrics = project.metrics("web")
    assert metric(web_metrics, "mtls_connections_total", security="plaintext") == 0
    assert (
        metric(
            web_metrics,
            "mtls_peer_connections_total",
            direction="inbound",
            peer_identity="spiffe://compose.local/client",
        )
        >= 1
    )
    client_metrics = project.metrics("client")
    assert (
        metric(client_metrics, "mtls_connections_total", direction="outbound", security="mtls") >= 2
    )
    assert metric(client_metrics, "mtls_cert_expiry_timestamp_seconds") > time.time()


def _capture(cmd: list[str], pcap: Path, until: object, timeout: float = 30) -> None:
    proc = subprocess.Popen(
        [*cmd, "-U", "-w", str(pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for("capture running", lambda: pcap.exists() and pcap.stat().st_size > 0, 10)
        wait_for("the traffic to capture", until, timeout)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def test_only_tls_crosses_the_compose_network(project: Project, tmp_path: Path) -> None:
    """tcpdump on the compose network's bridge while the apps talk: TLS on 8443 and not one
    byte of the apps' plaintext. The same search finds the markers on the web pod's loopback,
    where the plaintext really is, so the check can fail."""
    bridge = dockerenv.bridge_interface(project.network)
    wire = tmp_path / "bridge.pcap"

    def inbound() -> float:
        return metric(project.metrics("web"), "mtls_connections_total", direction="inbound")

    before = inbound()
    _capture(["tcpdump", "-i", bridge, "-s", "0", "tcp"], wire, lambda: inbound() >= before + 3)
    data = wire.read_bytes()
    for marker in APP_MARKERS:
        assert marker not in data, f"app plaintext {marker!r} crossed the compose network"
    tls = dockerenv.run(
        "tcpdump", "-r", str(wire), "-nn", "tcp port 8443 and (tcp[((tcp[12] & 0xf0) >> 2)] = 0x17)"
    ).stdout
    assert tls.count("\n") >= 1, "no TLS application data records on 8443"

    pid = str(dockerenv.container_state(project.container("web"))["Pid"])
    loop = tmp_path / "web-lo.pcap"
    before = inbound()
    _capture(
        ["nsenter", "-t", pid, "-n", "tcpdump", "-i", "lo", "-s", "0", "tcp port 8080"],
        loop,
        lambda: inbound() >= before + 2,
    )
    inside = loop.read_bytes()
    assert all(marker in inside for marker in APP_MARKERS), "the control capture saw no plaintext"


def test_prometheus_scrapes_the_sidecars(project: Project) -> None:
    base = f"http://127.0.0.1:{project.prometheus_port}/api/v1"

    def query(expr: str) -> list[dict[str, object]]:
        status, body = http_get(f"{base}/query?query={urllib.parse.quote(expr)}")
        assert status == 200, body
        result: list[dict[str, object]] = json.loads(body)["data"]["result"]
        return result

    wait_for(
        "both sidecars up in Prometheus",
        lambda: len([r for r in query('up{job="mtls-sidecar"} == 1')]) == 2,
        90,
    )
    wait_for(
        "mTLS bytes in Prometheus",
        lambda: query('sum(mtls_bytes_total{security="mtls"}) > 0'),
        60,
    )
    status, body = http_get(f"{base}/rules")
    assert status == 200 and '"name"' in body, "the rule files did not load"


def test_docker_stop_drains_under_traffic(project: Project) -> None:
    """`docker stop web-sidecar` while a download is in flight: the sidecar drains, the
    download completes byte for byte, and the sidecar exits 0."""
    size = 16 * 1024 * 1024
    docker(
        "exec",
        "-u",
        "0",
        project.container("web-app"),
        "python",
        "-c",
        f"open('/srv/big.bin','wb').write(bytes(range(256)) * ({size} // 256))",
    )
    reader = (
        "import hashlib, sys, time, urllib.request\n"
        "r = urllib.request.urlopen('http://127.0.0.1:8080/big.bin', timeout=30)\n"
        "print('started', flush=True)\n"
        "h = hashlib.sha256(); n = 0\n"
        "while True:\n"
        "    chunk = r.read(65536)\n"
        "    if not chunk: break\n"
        "    h.update(chunk); n += len(chunk); time.sleep(0.01)\n"
        "print(n, h.hexdigest(), flush=True)\n"
    )
    download = subprocess.Popen(
        ["docker", "exec", project.container("client-app"), "python", "-c", reader],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=project.env,
    )
    assert download.stdout is not None
    assert download.stdout.readline().strip() == "started"
    sidecar = project.container("web-sidecar")
    stopped = subprocess.Popen(["docker", "stop", "-t", "20", sidecar], env=project.env)
    out, err = download.communicate(timeout=60)
    assert stopped.wait(60) == 0
    expected = hashlib.sha256(bytes(range(256)) * (size // 256)).hexdigest()
    assert out.split() == [str(size), expected], (out, err)
    state = dockerenv.container_state(sidecar)
    assert state["ExitCode"] == 0, state
    logs = docker("logs", sidecar).stdout + docker("logs", sidecar).stderr
    assert "drain" in logs.lower(), logs[-2000:]


def test_ca_restart_keeps_used_tokens_and_unhealthy_without_cert(project: Project) -> None:
    """After the CA restarts, the join token web-sidecar enrolled with is still used: a sidecar
    that presents it is refused, never gets a certificate, and Docker calls it unhealthy
    (the image's HEALTHCHECK asks /ready) while /live says the process runs."""
    project.dc("restart", "ca")
    ca = project.container("ca")
    wait_for("ca healthy after restart", lambda: dockerenv.health(ca) == "healthy", 60)
    values = project.dotenv()
    name = f"{project.name}-replay"
    project.started.append(name)
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        project.network,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--health-interval",
        "1s",
        "--health-retries",
        "2",
        "--health-start-period",
        "0s",
        "-e",
        "MTLS_IDENTITY_SOURCE=ca",
        "-e",
        "MTLS_CA_URL=https://ca:8443",
        "-e",
        f"MTLS_CA_FINGERPRINT={values['MTLS_CA_FINGERPRINT']}",
        "-e",
        f"MTLS_CA_TOKEN={values['WEB_JOIN_TOKEN']}",
        "-e",
        "MTLS_IDENTITY=spiffe://compose.local/web",
        "-e",
        "MTLS_INBOUND=0.0.0.0:8443=127.0.0.1:8080",
        "-e",
        "MTLS_ADMIN_LISTEN=0.0.0.0:15000",
        "-e",
        "MTLS_WORKERS=1",
        "-e",
        "MTLS_LOG_FORMAT=text",
        dockerenv.SIDECAR_IMAGE,
    )
    wait_for(
        "the CA's refusal of the used token",
        lambda: (
            "already used"
            in "".join(p for p in (docker("logs", name).stdout, docker("logs", name).stderr))
        ),
        30,
    )
    wait_for("the replaying sidecar unhealthy", lambda: dockerenv.health(name) == "unhealthy", 30)
    ip = dockerenv.container_ip(name)
    assert http_get(f"http://{ip}:15000/live")[0] == 200
    assert http_get(f"http://{ip}:15000/ready")[0] == 503


def test_new_tokens_recreate_the_sidecars_and_the_apps_keep_their_network(
    project: Project,
) -> None:
    """Re-running setup.sh keeps the CA and issues new tokens; `up -d` recreates the sidecars
    with them. The apps are not restarted and are reachable again at once: they live in the
    pod's network namespace (`web`, `client`), not in the sidecar's."""
    app_before = dockerenv.container_state(project.container("web-app"))
    old = project.dotenv()
    out = dockerenv.run("sh", "setup.sh", env=project.env, cwd=project.dir, timeout=900).stdout
    assert "keeping it" in out
    new = project.dotenv()
    assert new["MTLS_CA_FINGERPRINT"] == old["MTLS_CA_FINGERPRINT"]
    assert new["WEB_JOIN_TOKEN"] != old["WEB_JOIN_TOKEN"]
    project.dc("up", "-d", "web-sidecar", "client-sidecar", timeout=300)
    for service in ("web-sidecar", "client-sidecar"):
        cid = project.container(service)
        wait_for(f"{service} healthy again", lambda c=cid: dockerenv.health(c) == "healthy", 90)
    wait_for(
        "inbound mTLS through the new web-sidecar",
        lambda: metric(project.metrics("web"), "mtls_connections_total", direction="inbound") >= 1,
        30,
    )
    app_after = dockerenv.container_state(project.container("web-app"))
    assert app_after["StartedAt"] == app_before["StartedAt"], "web-app was restarted"
    assert app_after["Running"] is True
