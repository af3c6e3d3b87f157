"""A real Prometheus server on loopback for tests: scrapes given targets every second."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .harness import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


class Prometheus:
    def __init__(
        self, targets: list[str], workdir: Path, rule_files: tuple[Path, ...] = ()
    ) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "mtls-sidecar", "static_configs": [{"targets": targets}]}
            ],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/-/ready", timeout=1
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def scalar(self, expr: str) -> float | None:
        res = self.query(expr)
        if not res:
            return None
        assert len(res) == 1, res
        return float(res[0]["value"][1])

    def wait_value(self, expr: str, want: float, timeout: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout
        got = self.scalar(expr)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.5)
            got = self.scalar(expr)
        return got

    def wait_targets_up(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = self.query('up{job="mtls-sidecar"} == 1')
            if len(up) == n:
                return
            time.sleep(0.5)
        raise AssertionError(f"targets not up: {self.api('targets')}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
