"""`make demo` end to end: the CA, two enrolled sidecars, traffic and metrics (also non-root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .harness import ROOT, base_env


def _demo(
    prefix: list[str], python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, python, "-m", "proxy", "demo"],
        cwd=ROOT,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "both sidecars enrolled and ready" in out
    assert "POST /upload (1 MB) -> 200 api app received 1000000 bytes" in out
    assert "refused, as it should be" in out
    assert (
        'mtls_connections_rejected_total{direction="inbound",reason="not_tls",route="api"} 1.0'
        in out
    )
    assert 'security="mtls"' in out
    assert "every relayed byte crossed the network inside mTLS" in out


def test_demo() -> None:
    _check(_demo([]))


SYSTEM_PY = "/usr/bin/python3"


def _same_python() -> bool:
    if not os.path.exists(SYSTEM_PY):
        return False
    r = subprocess.run(
        [SYSTEM_PY, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() == str(sys.version_info[:2])


@pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv") or not _same_python(),
    reason="needs root (to switch to nobody), setpriv and a system python3 of our version",
)
def test_demo_as_non_root() -> None:
    """As uid 65534. The venv's interpreter may live under /root, so use the system one
    (same minor version) with the venv's packages on the path."""
    site = next((ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
    env = base_env()
    env["PYTHONPATH"] = f"{ROOT}:{site}"
    env["HOME"] = "/tmp"
    r = _demo(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], SYSTEM_PY, env)
    _check(r)
