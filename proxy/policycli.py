"""`mtls-sidecar policy test`: read a candidate policy and logs, print the replay report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from .identity import parse_spiffe_id
from .policyfile import PolicyFileError, read_policy
from .policyreplay import connections, replay, report

USAGE = """\
usage: mtls-sidecar policy test --policy FILE [--trust-domain TD] [--format text|json] LOG...

Replays the `conn_closed` JSON log lines of LOG files ('-': stdin), inbound and outbound,
against the candidate policy FILE: per route and peer identity (outbound: and destination),
which past connections it would have denied, and which rules never matched. Exit 1 when it
would deny any, 0 when not, 2 on bad input. --trust-domain (default: MTLS_TRUST_DOMAIN) is
the sidecar's own trust domain: an allowing `default` lets in only its identities, as the
running sidecar does; without it, the default is judged for any trust domain.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not argv:
        print(USAGE, end="", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=stdout)
        return 0
    if argv[0] != "test":
        print(
            f"mtls-sidecar policy: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr
        )
        return 2
    parser = _Parser(prog="mtls-sidecar policy test", add_help=False)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--trust-domain", default=os.environ.get("MTLS_TRUST_DOMAIN") or None)
    parser.add_argument("logs", nargs="+")
    try:
        args = parser.parse_args(argv[1:])
    except ValueError as exc:
        print(f"mtls-sidecar policy test: {exc}", file=sys.stderr)
        return 2
    try:
        policy = read_policy(Path(args.policy))
    except PolicyFileError as exc:
        print(f"mtls-sidecar policy test: --policy {exc}", file=sys.stderr)
        return 2
    records: list[dict[str, object]] = []
    for name in args.logs:
        try:
            if name == "-":
                text = stdin.read()
            else:
                text = Path(name).read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            print(f"mtls-sidecar policy test: {name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        records.extend(connections(text.splitlines()))
    own_domain = args.trust_domain
    if own_domain is not None:
        try:
            own_domain = parse_spiffe_id(f"spiffe://{own_domain}").trust_domain
        except ValueError as exc:
            print(f"mtls-sidecar policy test: --trust-domain: {exc}", file=sys.stderr)
            return 2
    result = replay(policy, records, own_domain)
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2), file=stdout)
    else:
        print(report(result, args.policy), end="", file=stdout)
    return 1 if result.denied else 0
