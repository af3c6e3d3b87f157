"""A Docker engine and the images the deploy tests run: started, built and cached as needed.

The deploy tests run the real image, the compose example and emulated Kubernetes pods with a
real Docker engine. On the test machines no registry can be reached, so the Python base image
is built from Debian packages with debootstrap (the machine's own apt source) and passed to
the Dockerfile as BASE_IMAGE; a machine that already has `python:3.11-slim-bookworm` gets the
same image from the same recipe, so the tests never depend on a registry. Images are cached
by the daemon between runs, keyed by a hash of their recipe (labels).

CI runs as root and must not skip these tests (.ci/run fails on "DOCKER TEST SKIPPED").
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP_PREFIX = "DOCKER TEST SKIPPED"
BASE_IMAGE = "mtls-test-base:bookworm"
SIDECAR_IMAGE = "mtls-sidecar:0.1.0"
PROMETHEUS_IMAGE = "mtls-test-prometheus:bookworm"
SUITE = "bookworm"
# What the base image holds: Python 3.11 as `python` with venv (what the Dockerfile and the
# demo apps need), CA certificates, and tools the tests run inside containers.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
RECIPE_LABEL = "io.mtls-sidecar.test-recipe"
DOCKERD_LOG = Path(tempfile.gettempdir()) / "mtls-test-dockerd.log"


def run(
    *argv: str,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | str | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, text in and out; on failure raise with its output (for the test log)."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=cwd,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}"
        )
    return proc


def docker(
    *argv: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return run("docker", *argv, check=check, timeout=timeout, env=docker_env())


def docker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The classic builder: BuildKit would try to fetch its frontend and builder images.
    env["DOCKER_BUILDKIT"] = "0"
    env.setdefault("COMPOSE_DOCKER_CLI_BUILD", "0")
    return env


def _engine_up() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode == 0


@functools.cache
def engine() -> str:
    """Make sure a Docker engine answers (start dockerd on vfs if none runs); '' when one does,
    else the reason it cannot (the caller skips with it)."""
    if _engine_up():
        return ""
    if os.geteuid() != 0:
        return "no Docker engine answers and starting dockerd needs root"
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return "no Docker engine answers and dockerd is not installed (make apt installs docker.io)"
    log = DOCKERD_LOG.open("ab")
    # Detached from the test session: it stays up for later runs, like a system service.
    subprocess.Popen(
        [dockerd, "--storage-driver=vfs"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _engine_up():
            return ""
        time.sleep(0.5)
    tail = DOCKERD_LOG.read_text(errors="replace")[-2000:]
    return f"dockerd did not answer within 60 s; its log ends: {tail}"


def require_engine() -> None:
    reason = engine()
    if reason:
        pytest.skip(f"{SKIP_PREFIX}: {reason}")


def _image_label(image: str) -> str | None:
    proc = docker(
        "image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False, timeout=60
    )
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout or "null") or {}
    value = labels.get(RECIPE_LABEL)
    return value if isinstance(value, str) else None


def apt_mirror() -> str:
    """The machine's own Debian mirror (deb822 or one-line sources), for debootstrap."""
    sources = sorted(Path("/etc/apt").glob("sources.list.d/*.sources"))
    for path in sources:
        text = path.read_text()
        if re.search(rf"^Suites:.*\b{SUITE}\b", text, re.M):
            match = re.search(r"^URIs:\s*(\S+)", text, re.M)
            if match and "security" not in match.group(1):
                return match.group(1)
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    return "http://deb.debian.org/debian"


def _host_ca_bundle() -> Path | None:
    for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


@functools.cache
def base_image() -> str:
    """A Debian bookworm image with Python 3.11, made with debootstrap; cached by recipe."""
    require_engine()
    mirror = apt_mirror()
    ca = _host_ca_bundle()
    ca_digest = hashlib.sha256(ca.read_bytes()).hexdigest() if ca else "none"
    recipe = hashlib.sha256(
        json.dumps([SUITE, mirror, BASE_PACKAGES, ca_digest, 1]).encode()
    ).hexdigest()[:16]
    if _image_label(BASE_IMAGE) == recipe:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        pytest.skip(f"{SKIP_PREFIX}: debootstrap is not installed (make apt installs it)")
    with tempfile.TemporaryDirectory(prefix="mtls-rootfs-") as tmp:
        root = Path(tmp) / "root"
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(root),
            mirror,
            timeout=900,
        )
        # The machine's CA bundle (it may hold a TLS-inspecting proxy's root) and pip's use
        # of it, so that pip inside a build reaches the package index as the host does.
        if ca is not None:
            shutil.copyfile(ca, root / "etc/ssl/certs/ca-certificates.crt")
            (root / "etc/pip.conf").write_text(
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                "docker",
                "import",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                "ENV LANG=C.UTF-8",
                "-c",
                f"LABEL {RECIPE_LABEL}={recipe}",
                "-c",
                'CMD ["python3"]',
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    return BASE_IMAGE


@functools.cache
def sidecar_image() -> str:
    """The sidecar image from this checkout's Dockerfile (the daemon's layer cache makes a
    rebuild of an unchanged tree quick)."""
    base = base_image()
    docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        SIDECAR_IMAGE,
        str(REPO),
        timeout=1200,
    )
    return SIDECAR_IMAGE


@functools.cache
def prometheus_image() -> str:
    """Prometheus from Debian's package, laid out like the official image (entrypoint
    prometheus, storage /prometheus owned by nobody)."""
    base = base_image()
    with tempfile.TemporaryDirectory(prefix="mtls-prom-") as tmp:
        Path(tmp, "Dockerfile").write_text(
            f"FROM {base}\n"
            "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y"
            " --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/*"
            " && install -d -o nobody -g nogroup /prometheus\n"
            "USER nobody\n"
            'ENTRYPOINT ["/usr/bin/prometheus"]\n'
        )
        docker("build", "--network", "host", "-t", PROMETHEUS_IMAGE, tmp, timeout=1200)
    return PROMETHEUS_IMAGE


def image_present(image: str) -> bool:
    return docker("image", "inspect", image, check=False, timeout=60).returncode == 0


def container_ip(container: str, network: str | None = None) -> str:
    out = docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    networks: dict[str, dict[str, str]] = json.loads(out)
    if network is not None:
        return networks[network]["IPAddress"]
    for info in networks.values():
        if info.get("IPAddress"):
            return info["IPAddress"]
    raise AssertionError(f"{container} has no IP address: {networks}")


def container_state(container: str) -> dict[str, object]:
    out = docker("inspect", "--format", "{{json .State}}", container).stdout
    state: dict[str, object] = json.loads(out)
    return state


def health(container: str) -> str:
    """Docker's health status of a container ('starting', 'healthy', 'unhealthy', or '')."""
    state = container_state(container)
    info = state.get("Health")
    return str(info.get("Status", "")) if isinstance(info, dict) else ""


def bridge_interface(network: str) -> str:
    """The host's bridge device of a user-defined Docker network (br-<id>)."""
    net_id = docker("network", "inspect", "--format", "{{.Id}}", network).stdout.strip()
    return f"br-{net_id[:12]}"


def wait_for(what: str, predicate: object, timeout: float = 60, interval: float = 0.5) -> object:
    """Poll predicate() until it returns something truthy; fail with `what` after timeout."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, AssertionError, subprocess.SubprocessError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
