"""The authorization policy file (MTLS_POLICY_FILE): parse, validate, decide (pure)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import PolicyDenied
from .identity import SpiffeId
from .policy import NOT_SVID, SpiffePattern, parse_pattern

# A policy file is small: these limits refuse hostile input before it is built.
MAX_BYTES = 1_000_000
MAX_DEPTH = 20
MAX_ALIAS_NODES = 1_000
MAX_ROUTES = 1_000
MAX_RULES = 1_000

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyFileError(ValueError):
    """The policy file is unusable; the message names the line (when known) and the reason."""


class _TooComplex(yaml.YAMLError):
    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null", "float", "seq", "map")
)


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing deep nesting and alias expansion beyond the limits above."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliased = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            self._aliased += 1
            if self._aliased > MAX_ALIAS_NODES:
                raise _TooComplex(f"more than {MAX_ALIAS_NODES} YAML aliases", mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooComplex(f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None and node.tag not in _PLAIN_TAGS:
            raise _TooComplex(f"YAML tag {node.tag} is not allowed here", mark)
        return node


@dataclass(frozen=True)
class RouteRule:
    """The rule of one inbound route: who may connect (and from where)."""

    route: str
    allow: tuple[SpiffePattern, ...]
    source_cidrs: tuple[IpNetwork, ...] | None  # None: any source address
    dry_run: bool | None  # None: the file's dry_run


@dataclass(frozen=True)
class Policy:
    """A whole policy file, validated."""

    dry_run: bool
    default: str  # "allow" | "deny": routes with no rule
    inbound: Mapping[str, RouteRule]

    def describe(self) -> dict[str, object]:
        """The effective policy as JSON-able data (what `check` prints)."""
        return {
            "dry_run": self.dry_run,
            "default": self.default,
            "inbound": {
                name: {
                    "allow": [p.text for p in rule.allow],
                    "source_cidrs": (
                        None if rule.source_cidrs is None else [str(n) for n in rule.source_cidrs]
                    ),
                    "dry_run": self.dry_run if rule.dry_run is None else rule.dry_run,
                }
                for name, rule in self.inbound.items()
            },
        }


@dataclass(frozen=True)
class Decision:
    """What the policy says of one connection.

    `allow`: the policy's verdict; `rule`: which rule decided (e.g. 'inbound.api.allow[0]',
    'inbound.api', 'default'); `dry_run`: the verdict is only reported, never enforced.
    """

    allow: bool
    rule: str
    dry_run: bool

    @property
    def enforced_deny(self) -> bool:
        """Whether the connection is refused (a deny that is not dry-run)."""
        return not self.allow and not self.dry_run

    @property
    def label(self) -> str:
        return "allow" if self.allow else "deny"


def decide(policy: Policy, route: str, peer: SpiffeId, source_ip: str | None) -> Decision:
    """Judge one inbound connection on `route` from `peer` at `source_ip`.

    A route with a rule allows a peer matching one of its patterns (and, when the rule
    lists source CIDRs, coming from one of them); anything else on that route is denied by
    the rule as a whole. A route without a rule gets the file's default.
    """
    rule = policy.inbound.get(route)
    if rule is None:
        return Decision(policy.default == "allow", "default", policy.dry_run)
    dry_run = policy.dry_run if rule.dry_run is None else rule.dry_run
    if rule.source_cidrs is not None:
        try:
            ip = ipaddress.ip_address(source_ip or "")
        except ValueError:
            return Decision(False, f"inbound.{route}.source_cidrs", dry_run)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in rule.source_cidrs):
            return Decision(False, f"inbound.{route}.source_cidrs", dry_run)
    for index, pattern in enumerate(rule.allow):
        if pattern.matches(peer):
            return Decision(True, f"inbound.{route}.allow[{index}]", dry_run)
    return Decision(False, f"inbound.{route}", dry_run)


def all_rules(policy: Policy) -> list[str]:
    """Every rule name `decide` can answer with that allows (for 'never matched' reports)."""
    names = [
        f"inbound.{route}.allow[{i}]"
        for route, rule in policy.inbound.items()
        for i in range(len(rule.allow))
    ]
    if policy.default == "allow":
        names.append("default")
    return names


# --- parsing ----------------------------------------------------------------------------


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _fail(node: yaml.Node, message: str) -> PolicyFileError:
    return PolicyFileError(f"{_where(node)}: {message}")


def _scalar(node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(node, f"{what} must be a single value")
    return str(node.value)


def _bool(node: yaml.Node, what: str) -> bool:
    text = _scalar(node, what).lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    raise _fail(node, f"{what} must be true or false, not {node.value!r}")


def _mapping(node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(node, f"{what} must be a mapping")
    out: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = _scalar(key_node, f"a key of {what}")
        if key in seen:
            raise _fail(key_node, f"{what}: key {key!r} appears twice")
        seen.add(key)
        out.append((key, key_node, value_node))
    return out


def _sequence(node: yaml.Node, what: str, limit: int) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise _fail(node, f"{what} must be a list")
    if len(node.value) > limit:
        raise _fail(node, f"{what} has more than {limit} items")
    return list(node.value)


def _route_rule(route: str, node: yaml.Node) -> RouteRule:
    what = f"inbound.{route}"
    allow: tuple[SpiffePattern, ...] | None = None
    cidrs: tuple[IpNetwork, ...] | None = None
    dry_run: bool | None = None
    for key, key_node, value in _mapping(node, what):
        if key == "allow":
            patterns = []
            for item in _sequence(value, f"{what}.allow", MAX_RULES):
                try:
                    patterns.append(parse_pattern(_scalar(item, f"{what}.allow item")))
                except ValueError as exc:
                    raise _fail(item, f"{what}.allow: {exc}") from None
            allow = tuple(patterns)
        elif key == "source_cidrs":
            nets = []
            for item in _sequence(value, f"{what}.source_cidrs", MAX_RULES):
                text = _scalar(item, f"{what}.source_cidrs item")
                try:
                    nets.append(ipaddress.ip_network(text, strict=False))
                except ValueError:
                    raise _fail(
                        item, f"{what}.source_cidrs: {text!r} is not a CIDR (e.g. 10.0.0.0/8)"
                    ) from None
            cidrs = tuple(nets)
        elif key == "dry_run":
            dry_run = _bool(value, f"{what}.dry_run")
        else:
            raise _fail(
                key_node, f"{what}: unknown key {key!r} (known: allow, source_cidrs, dry_run)"
            )
    if allow is None:
        raise _fail(node, f"{what} has no 'allow' list (write 'allow: []' to deny every peer)")
    return RouteRule(route, allow, cidrs, dry_run)


def _document(text: str) -> yaml.Node:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise PolicyFileError(f"the file is larger than {MAX_BYTES} bytes")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
    except _TooComplex as exc:
        line = f"line {exc.mark.line + 1}: " if exc.mark is not None else ""
        raise PolicyFileError(f"{line}{exc.message}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyFileError(f"{line}not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if node is None:
        raise PolicyFileError("the file is empty (write at least 'default: allow' or 'deny')")
    assert isinstance(node, yaml.Node)
    return node


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy file's text; PolicyFileError names the line and reason.

    Schema (deploy/policy.schema.json): `default: allow|deny` (required), `dry_run: bool`
    (default false), `inbound: {ROUTE: {allow: [PATTERN...], source_cidrs: [CIDR...],
    dry_run: bool}}`.
    """
    root = _document(text)
    default: str | None = None
    dry_run = False
    inbound: dict[str, RouteRule] = {}
    for key, key_node, value in _mapping(root, "the policy"):
        if key == "default":
            default = _scalar(value, "default")
            if default not in ("allow", "deny"):
                raise _fail(value, f"default must be 'allow' or 'deny', not {default!r}")
        elif key == "dry_run":
            dry_run = _bool(value, "dry_run")
        elif key == "inbound":
            if isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null"):
                continue
            routes = _mapping(value, "inbound")
            if len(routes) > MAX_ROUTES:
                raise _fail(value, f"inbound has more than {MAX_ROUTES} routes")
            for route, _, rule_node in routes:
                inbound[route] = _route_rule(route, rule_node)
        else:
            raise _fail(key_node, f"unknown key {key!r} (known: default, dry_run, inbound)")
    if default is None:
        raise _fail(root, "'default: allow' or 'default: deny' is required")
    return Policy(dry_run, default, inbound)


def policy_from_bytes(data: bytes, name: str) -> Policy:
    """Parse a policy file's bytes; the error names the file, the line and the reason."""
    if len(data) > MAX_BYTES:
        raise PolicyFileError(f"{name}: the file is larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    try:
        return parse_policy(text)
    except PolicyFileError as exc:
        raise PolicyFileError(f"{name}: {exc}") from None


def read_policy(path: Path) -> Policy:
    """Read and parse the policy file at `path` (PolicyFileError names what is wrong)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise PolicyFileError(f"{path} does not exist") from None
    except PermissionError:
        raise PolicyFileError(f"{path} is not readable by uid {os.getuid()}") from None
    except OSError as exc:
        raise PolicyFileError(f"{path}: {exc.strerror}") from None
    return policy_from_bytes(data, str(path))


def policy_check(
    policy: Policy,
    route: str,
    source_ip: str | None,
    on_decision: Callable[[SpiffeId, Decision], None],
) -> Callable[[SpiffeId | None], None]:
    """The identity check of one inbound connection (a flow.PeerCheck) under `policy`.

    Decides once per peer identity (the handshake and its end both ask), tells
    `on_decision` (to count and log it), and raises PolicyDenied('peer_not_allowed') for an
    enforced deny; a dry-run deny returns. A certificate without a SPIFFE ID is 'bad_cert'.
    """
    decided: list[tuple[SpiffeId, Decision]] = []

    def check(peer: SpiffeId | None) -> None:
        if peer is None:
            raise PolicyDenied("bad_cert", f"peer certificate {NOT_SVID}")
        if decided and decided[0][0] == peer:
            decision = decided[0][1]
        else:
            decision = decide(policy, route, peer, source_ip)
            decided[:] = [(peer, decision)]
            on_decision(peer, decision)
        if decision.enforced_deny:
            raise PolicyDenied("peer_not_allowed", deny_message(peer, route, decision))

    return check


def deny_message(peer: SpiffeId, route: str, decision: Decision) -> str:
    """Why `peer` is (or in dry-run would be) denied on `route`, in words."""
    return (
        f"peer identity {peer} is not allowed on route {route} by policy rule {decision.rule} "
        "(MTLS_POLICY_FILE)"
    )
