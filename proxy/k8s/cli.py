"""`mtls-sidecar inject` / `uninject`: manifests from files or stdin, YAML on stdout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from .inject import MODES, InjectError, Options, Result, inject_report, uninject_report


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose what is injected (shared by `inject` and `injector`)."""
    d = Options()
    parser.add_argument("--mode", choices=MODES, default=d.mode, help="default: %(default)s")
    parser.add_argument("--image", default=d.image, help="sidecar image (default: %(default)s)")
    parser.add_argument("--ca-url", default=d.ca_url, help="enrolment service (%(default)s)")
    parser.add_argument(
        "--ca-fingerprint",
        default=d.ca_fingerprint,
        help="sha256 of the CA root (default: from ConfigMap mtls-ca-trust, key fingerprint, "
        "in the workload's namespace)",
    )
    parser.add_argument(
        "--trust-domain", default=d.trust_domain, help="SPIFFE trust domain (%(default)s)"
    )
    parser.add_argument(
        "--token-audience",
        default=d.token_audience,
        help="audience of the projected service-account token (%(default)s)",
    )
    parser.add_argument(
        "--token-expiration",
        type=int,
        default=d.token_expiration_seconds,
        metavar="SECONDS",
        help="lifetime of the projected token, at least 600 (%(default)s)",
    )


def options_from(args: argparse.Namespace) -> Options:
    """Options from parsed flags; the values themselves are checked when injecting."""
    if args.token_expiration < 600:  # the API server refuses shorter projected tokens
        raise InjectError(f"--token-expiration {args.token_expiration}: must be at least 600")
    return Options(
        mode=args.mode,
        image=args.image,
        ca_url=args.ca_url,
        ca_fingerprint=args.ca_fingerprint,
        trust_domain=args.trust_domain,
        token_audience=args.token_audience,
        token_expiration_seconds=args.token_expiration,
    )


# Kubernetes objects nest about 15 levels deep; PyYAML's composer recurses once per level, so
# without a limit a few thousand levels end in a RecursionError.
MAX_DEPTH = 100
# Nodes that aliases may add beyond those written out: generous for anchors shared between
# containers, far below what a "billion laughs" expands into.
MAX_ALIAS_NODES = 10_000


class _TooComplex(yaml.YAMLError):
    """Input over a limit of _LimitedLoader; the message says which."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than MAX_DEPTH and aliases that together
    stand for more than MAX_ALIAS_NODES nodes, while composing, before anything is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliased = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)
            self._aliased += self._sizes.get(id(node), 1)
            if self._aliased > MAX_ALIAS_NODES:
                raise _TooComplex(f"YAML aliases expand to more than {MAX_ALIAS_NODES} nodes", mark)
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooComplex(f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(c), 1) for c in children)
        return node


def load_manifests(text: str) -> list[Any]:
    """The non-empty documents of a YAML (or JSON) stream, within the limits above."""
    loader = _LimitedLoader(text)
    try:
        docs = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
        return docs
    finally:
        loader.dispose()


def _read(paths: Sequence[str], stdin: TextIO) -> list[tuple[str, list[Any]]]:
    out = []
    for path in paths or ["-"]:
        name = "stdin" if path == "-" else path
        try:
            if path == "-":
                text = stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            docs = load_manifests(text)
        except OSError as exc:
            raise InjectError(f"{name}: cannot read ({exc.strerror or exc})") from None
        except _TooComplex as exc:
            at = f" (line {exc.mark.line + 1})" if exc.mark is not None else ""
            raise InjectError(f"{name}: refused{at}: {exc.message}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InjectError(f"{name}: not YAML{at}: {problem}") from None
        out.append((name, docs))
    return out


def _run(
    prog: str,
    argv: Sequence[str],
    inject: bool,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    parser = argparse.ArgumentParser(
        prog=f"mtls-sidecar {prog}",
        description="Add the sidecar to Kubernetes manifests"
        if inject
        else "Take out what `mtls-sidecar inject` added",
    )
    if inject:
        add_option_flags(parser)
    parser.add_argument("files", nargs="*", metavar="FILE", help="YAML/JSON files, - = stdin")
    args = parser.parse_args(list(argv))
    try:
        options = options_from(args) if inject else None
        results: list[Result] = []
        for name, docs in _read(args.files, stdin):
            for doc in docs:
                try:
                    results.append(inject_report(doc, options) if inject else uninject_report(doc))
                except InjectError as exc:
                    raise InjectError(f"{name}: {exc}") from None
    except InjectError as exc:
        # Nothing on stdout: a pipe into `kubectl apply` applies nothing half-done.
        print(f"mtls-sidecar {prog}: error: {exc}", file=stderr)
        return 2
    for result in results:
        for note in result.notes:
            print(f"mtls-sidecar {prog}: {note}", file=stderr)
    yaml.safe_dump_all([r.obj for r in results], stdout, sort_keys=False, default_flow_style=False)
    return 0


def inject_main(
    argv: Sequence[str],
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`mtls-sidecar inject [flags] [FILE...|-]`: exit 0, or 2 with one line on stderr."""
    return _run(
        "inject", argv, True, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    )


def uninject_main(
    argv: Sequence[str],
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`mtls-sidecar uninject [FILE...|-]`: exit 0, or 2 with one line on stderr."""
    return _run(
        "uninject", argv, False, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    )
