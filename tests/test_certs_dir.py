"""`make certs`: a CA and two identities made with our own commands, usable by `check`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .harness import ROOT, base_env


def test_make_certs_writes_usable_identities(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    for _ in range(2):  # a second run keeps the CA and issues fresh leaves
        subprocess.run(
            ["make", "-s", "certs", f"CERTS_DIR={out}", f"VPY={sys.executable}", "STAMP="],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    assert sorted(p.name for p in out.iterdir()) == [
        "ca",
        "client.bundle.pem",
        "client.crt",
        "client.key",
        "web.bundle.pem",
        "web.crt",
        "web.key",
    ]
    assert (out / "web.key").stat().st_mode & 0o077 == 0
    for name, sid in (("web", "web"), ("client", "client")):
        env = base_env()
        env.update(
            {
                "MTLS_IDENTITY_SOURCE": "files",
                "MTLS_CERT_FILE": str(out / f"{name}.crt"),
                "MTLS_KEY_FILE": str(out / f"{name}.key"),
                "MTLS_TRUST_BUNDLE_FILE": str(out / f"{name}.bundle.pem"),
                "MTLS_INBOUND": "127.0.0.1:18443=127.0.0.1:18080",
            }
        )
        proc = subprocess.run(
            [sys.executable, "-m", "proxy", "check"], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)["certificate"]
        assert shown["identity"] == f"spiffe://demo.example/ns/demo/sa/{sid}"


def test_certs_dir_keeps_only_its_readme_in_git() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "certs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["certs/README.md"]
