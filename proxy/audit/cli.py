"""`mtls-sidecar audit`: parse the flags, load the workload map, run the agent."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config.parse import parse_address, parse_duration
from ..errors import ProxyError
from .agent import AgentConfig
from .kube import SA_DIR, KubeSettings, settings_from
from .tracker import Limits
from .workloads import MapError, parse_map


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtls-sidecar audit",
        description="The wire auditor: classify every TCP connection crossing this node.",
    )
    p.add_argument("--listen", required=True, help="admin address: /metrics /ready /connections")
    p.add_argument(
        "--workloads",
        type=Path,
        help="static IP -> workload map (YAML); with --kubernetes too, its entries win for "
        "their addresses",
    )
    p.add_argument(
        "--kubernetes",
        action="store_true",
        help="keep the IP -> workload map from the Kubernetes API (list and watch pods), as an "
        "in-cluster client: $KUBERNETES_SERVICE_HOST/PORT, the pod's service-account token "
        "and CA; needs get/list/watch on pods",
    )
    p.add_argument(
        "--kubernetes-api", metavar="URL", help="the API server (default: in-cluster, https)"
    )
    p.add_argument(
        "--kubernetes-token-file",
        type=Path,
        metavar="PATH",
        help=f"bearer token, read again on every reconnect (default: {SA_DIR}/token)",
    )
    p.add_argument(
        "--kubernetes-ca-file",
        type=Path,
        metavar="PATH",
        help=f"CA the API server's certificate is verified with (default: {SA_DIR}/ca.crt)",
    )
    p.add_argument(
        "--node",
        help="this node's name: with `node:` in the map, a connection between pods on two "
        "nodes is counted on one of them only (default: $NODE_NAME)",
    )
    p.add_argument("--nflog-group", type=int, default=27)
    p.add_argument("--packets", type=int, default=8, help="packets per direction logged")
    p.add_argument("--head-bytes", type=int, default=2048, help="payload bytes kept per side")
    p.add_argument("--poll", default="1s", help="conntrack poll interval")
    p.add_argument(
        "--exact-within",
        default="30s",
        help="bytes of a connection that ends within this are exact (SYN/FIN sequence "
        "numbers); longer ones are counted as they go from conntrack, retransmissions in",
    )
    p.add_argument("--max-edges", type=int, default=200)
    p.add_argument("--max-ports", type=int, default=64)
    p.add_argument(
        "--ignore-ports",
        default="",
        help="comma-separated destination ports never audited (e.g. 15000, the admin port)",
    )
    p.add_argument("--no-rules", action="store_true", help="the nft rules are installed by others")
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    return p


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> AgentConfig:
    """The agent's configuration; ValueError says what is wrong."""
    listen = parse_address(args.listen, allow_zero=True)
    poll = parse_duration(args.poll)
    hold = parse_duration(args.exact_within)
    ignore = frozenset(int(p) for p in args.ignore_ports.split(",") if p.strip())
    if any(not 0 < p < 65536 for p in ignore):
        raise ValueError("--ignore-ports: ports are 1-65535")
    if not 2 <= args.packets <= 64 or not 16 <= args.head_bytes <= 16384:
        raise ValueError("--packets 2..64, --head-bytes 16..16384")
    workloads = {}
    if args.workloads:
        try:
            workloads = parse_map(args.workloads.read_text())
        except (OSError, MapError) as exc:
            raise ValueError(f"--workloads {args.workloads}: {exc}") from None
    kubernetes: KubeSettings | None = None
    overrides = {
        "--kubernetes-api": args.kubernetes_api,
        "--kubernetes-token-file": args.kubernetes_token_file,
        "--kubernetes-ca-file": args.kubernetes_ca_file,
    }
    if args.kubernetes:
        kubernetes = settings_from(
            env,
            api=args.kubernetes_api,
            token_file=args.kubernetes_token_file,
            ca_file=args.kubernetes_ca_file,
        )
    elif given := [flag for flag, value in overrides.items() if value is not None]:
        raise ValueError(f"{', '.join(given)} without --kubernetes")
    return AgentConfig(
        listen=listen,
        group=args.nflog_group,
        limits=Limits(budget=args.packets, head_bytes=args.head_bytes, hold=hold),
        poll=poll,
        workloads=workloads,
        kubernetes=kubernetes,
        max_edges=args.max_edges,
        max_ports=args.max_ports,
        install_rules=not args.no_rules,
        ignore_ports=ignore,
        node=args.node or env.get("NODE_NAME") or None,
    )


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        print(f"mtls-sidecar audit: {exc}", file=sys.stderr)
        return 2
    import uvloop

    from ..logs import setup_logging
    from .agent import Agent

    setup_logging(args.log_level, args.log_format)
    try:
        return uvloop.run(Agent(config).run())
    except (ProxyError, OSError) as exc:
        print(f"mtls-sidecar audit: cannot start: {exc}", file=sys.stderr)
        return 1
