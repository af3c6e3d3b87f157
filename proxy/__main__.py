"""Command line: parse argv, load the settings once, pick the event loop, run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import CertError, ConfigError, ProxyError

if TYPE_CHECKING:
    from .config import Settings

USAGE = """\
usage: mtls-sidecar [COMMAND]

commands:
  run                 run the sidecar from MTLS_* environment variables (the default)
  check               validate the configuration and print it (secrets redacted)
  ca init|issue|token|serve|rotate-root ...
                      the small internal CA (see `mtls-sidecar ca --help`)
  iptables [--print|--apply|--clean]
                      the transparent-mode interception rules
  inject [FLAGS] [FILE...|-]
                      add the sidecar to Kubernetes manifests (YAML on stdout)
  uninject [FILE...|-]
                      take out what `inject` added
  injector --listen ADDR --cert FILE --key FILE
                      the injector as a mutating admission webhook (POST /inject)
  audit --listen ADDR [--workloads FILE] [--kubernetes]
                      the wire auditor (node agent): classifies the connections it sees
  coverage --prometheus URL [--window 7d] [--format text|json|html] [--out FILE]
           [--min-coverage 99.9]
                      the coverage report from Prometheus; exit 1 below the minimum
  policy test --policy FILE LOG...
                      replay conn_closed log lines against a candidate policy file
  demo                a self-contained local demo: CA, app, two sidecars, traffic, metrics
  version             print the version
"""


def _settings(env: Mapping[str, str]) -> Settings | None:
    """The settings, or None after listing every problem on stderr."""
    from .config import load_settings

    try:
        return load_settings(env)
    except ConfigError as exc:
        n = len(exc.problems)
        print(f"mtls-sidecar: invalid configuration ({n} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None


def check(env: Mapping[str, str]) -> int:
    """`mtls-sidecar check`: every problem at once (exit 2), or the effective config (exit 0)."""
    from .certsource.files import FileSource
    from .config import redacted
    from .tls import tls_state_for

    settings = _settings(env)
    if settings is None:
        return 2
    out: dict[str, object] = {"config": redacted(settings)}
    from .routes import routes_for

    routes = routes_for(settings)
    out["proxy_protocol_routes"] = [r.name for r in routes if r.proxy_protocol]
    out["accept_proxy_protocol_routes"] = [r.name for r in routes if r.accept_proxy]
    if settings.identity_source == "files":
        assert settings.cert_file and settings.key_file and settings.trust_bundle_file
        # The reader `run` starts from, with the check the master applies to every material
        # (Master.validate: the TLS contexts built), so check refuses what run would.
        files = FileSource(
            settings.cert_file,
            settings.key_file,
            settings.trust_bundle_file,
            validate=lambda material: tls_state_for(material, settings),
            on_update=lambda material: None,
        )
        try:
            material = files.read()
        except CertError as exc:
            print(f"mtls-sidecar: invalid identity files: {exc}", file=sys.stderr)
            return 2
        out["certificate"] = material.describe()
    if not _federated_files_ok(settings):
        return 2
    if settings.policy_file is not None:
        from .policyfile import PolicyFileError, read_policy

        try:
            out["policy"] = read_policy(settings.policy_file).describe()
        except PolicyFileError as exc:
            print(f"mtls-sidecar: MTLS_POLICY_FILE {exc}", file=sys.stderr)
            return 2
        if settings.allow_peers:
            # As `run` warns at start (event=allow_peers_ignored): valid, but not what it says.
            print(
                "mtls-sidecar: warning: both MTLS_POLICY_FILE and MTLS_ALLOW_PEERS are set: the "
                "policy file decides who may connect inbound, MTLS_ALLOW_PEERS is ignored",
                file=sys.stderr,
            )
    print(json.dumps(out, indent=2, default=str))
    return 0


def _federated_files_ok(settings: Settings) -> bool:
    """`check`: each MTLS_FEDERATED_BUNDLES file must be a usable bundle (as `run` reads it).
    Bundle endpoints are fetched only by `run`."""
    from .federation import BundleError, roots_from_file

    ok = True
    for td, source in settings.federated_bundles:
        if "://" in source:
            continue
        try:
            roots_from_file(Path(source).read_bytes(), f"trust bundle file {source} ({td})")
        except (OSError, BundleError) as exc:
            print(f"mtls-sidecar: MTLS_FEDERATED_BUNDLES: {exc}", file=sys.stderr)
            ok = False
    return ok


METRICS_DIR_PREFIX = "mtls-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of sidecars that died without cleaning up (kill -9):
    each is named after its master's pid; a directory whose pid is gone is stale."""
    try:
        tmp = tempfile.gettempdir()  # FileNotFoundError when no temp dir is writable
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        if not name.startswith(METRICS_DIR_PREFIX):
            continue
        pid_text = name[len(METRICS_DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        path = os.path.join(tmp, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def run(env: Mapping[str, str]) -> int:
    """`mtls-sidecar run`: the master process."""
    settings = _settings(env)
    if settings is None:
        return 2
    if settings.policy_file is not None:
        from .policyfile import PolicyFileError, read_policy

        try:
            read_policy(settings.policy_file)
        except PolicyFileError as exc:
            print(f"mtls-sidecar: cannot start: MTLS_POLICY_FILE {exc}", file=sys.stderr)
            return 2
    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    # Metrics are written by every worker into files that /metrics sums (multi-process
    # mode); prometheus-client picks that mode from this variable.
    _remove_stale_metrics_dirs()
    try:
        metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    except OSError as exc:
        # The only thing the sidecar writes to disk (read-only root filesystems need a /tmp).
        print(
            f"mtls-sidecar: cannot start: no writable temporary directory for the metrics "
            f"files ({exc}); set TMPDIR to a writable directory, e.g. a memory-backed /tmp",
            file=sys.stderr,
        )
        return 1
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    if settings.drop_privileges and os.getuid() == 0:
        os.chown(metrics_dir, settings.proxy_uid, settings.proxy_uid)
    import uvloop

    from .server import Master

    try:
        return uvloop.run(Master(settings).run())
    except CertError as exc:
        print(f"mtls-sidecar: cannot start: {exc}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"mtls-sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker(argv: list[str], env: Mapping[str, str]) -> int:
    """Internal: a worker process started by the master (`_worker FDS WORKERS SLOT COUNTS_FD`)."""
    import uvloop

    from .config import load_settings
    from .logs import setup_logging
    from .routes import routes_for
    from .shared import ConnectionCounts
    from .worker import worker_main

    settings = load_settings(env)
    setup_logging(settings.log_level, settings.log_format)
    fds = [int(fd) for fd in argv[0].split(",") if fd]
    routes = routes_for(settings)
    counts = ConnectionCounts(int(argv[3]), int(argv[1]))
    listeners = list(zip(routes, fds, strict=True))
    return uvloop.run(worker_main(settings, listeners, counts, int(argv[2])))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd = args[0] if args else "run"
    rest = args[1:]
    env = os.environ
    try:
        if cmd in ("-h", "--help", "help"):
            print(USAGE, end="")
            return 0
        if cmd in ("version", "--version"):
            print(f"mtls-sidecar {__version__}")
            return 0
        if cmd == "run":
            return run(env)
        if cmd == "check":
            return check(env)
        if cmd == "_worker":
            return worker(rest, env)
        if cmd == "ca":
            from .ca.cli import main as ca_main

            return ca_main(rest)
        if cmd == "iptables":
            from .iptables import main as iptables_main

            return iptables_main(rest, env)
        if cmd == "inject":
            from .k8s.cli import inject_main

            return inject_main(rest)
        if cmd == "uninject":
            from .k8s.cli import uninject_main

            return uninject_main(rest)
        if cmd == "injector":
            from .k8s.webhook import main as injector_main

            return injector_main(rest)
        if cmd == "audit":
            from .audit.cli import main as audit_main

            return audit_main(rest)
        if cmd == "coverage":
            from .coverage.cli import main as coverage_main

            return coverage_main(rest)
        if cmd == "policy":
            from .policycli import main as policy_main

            return policy_main(rest)
        if cmd == "demo":
            from .demo import main as demo_main  # type: ignore[import-not-found,unused-ignore]

            return int(demo_main(rest))
    except KeyboardInterrupt:
        return 130
    print(f"mtls-sidecar: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
