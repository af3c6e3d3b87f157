"""The authorization policy file (MTLS_POLICY_FILE): parse, validate, decide (pure)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

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
_R = TypeVar("_R")


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


_DNS_NAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


@dataclass(frozen=True)
class Destination:
    """Where an outbound connection may go: an address range (or one DNS name, as an
    explicit route's remote names it), and a port range. `network` and `name` both None:
    any host; `ports` None: any port."""

    text: str
    network: IpNetwork | None
    name: str | None
    ports: tuple[int, int] | None

    def matches(self, host: str, port: int) -> bool:
        """Whether (host, port) is this destination. A host given by name matches only a
        name rule, an address only a network rule: names are never resolved here."""
        return self.covers(Where.of(host, port))

    def covers(self, where: Where) -> bool:
        """`matches`, for a destination parsed once for every rule it is held against."""
        if self.ports is not None and not self.ports[0] <= where.port <= self.ports[1]:
            return False
        if self.name is not None:
            return where.ip is None and where.name == self.name
        if self.network is not None:
            return where.ip is not None and where.ip in self.network
        return True


@dataclass(frozen=True, slots=True)
class Where:
    """An outbound destination as the rules see it: its address (None: a DNS name), its
    name (lower-case, no final dot) and port."""

    name: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    port: int

    @staticmethod
    def of(host: str, port: int) -> Where:
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
                host.strip("[]")
            )
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return Where(host.lower().rstrip("."), ip, port)


def _ports(text: str, whole: str) -> tuple[int, int] | None:
    if text == "*":
        return None
    low, dash, high = text.partition("-")
    try:
        lo = int(low)
        hi = int(high) if dash else lo
    except ValueError:
        raise ValueError(
            f"{whole!r}: port {text!r} is not a port, a range LOW-HIGH or '*'"
        ) from None
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"{whole!r}: ports must be 1-65535, the range low to high")
    return lo, hi


def parse_destination(text: str) -> Destination:
    """Parse an outbound `to`: `CIDR`, `CIDR:PORT`, `[V6CIDR]:PORT`, `NAME:PORT`, `*:PORT`,
    `*`; PORT is a number, `LOW-HIGH` or `*` (absent: any port). ValueError says what is
    wrong."""
    whole = text.strip()
    if not whole:
        raise ValueError("the destination is empty")
    host, ports = whole, None
    if whole.startswith("["):
        end = whole.find("]")
        if end < 0:
            raise ValueError(f"{whole!r}: '[' without ']'")
        host, rest = whole[1:end], whole[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{whole!r}: ']' must be followed by ':PORT'")
            ports = _ports(rest[1:], whole)
    elif whole.count(":") == 1:
        host, _, port_text = whole.partition(":")
        ports = _ports(port_text, whole)
    if host == "*":
        return Destination(whole, None, None, ports)
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        name = host.lower().rstrip(".")
        if ":" in host or "/" in host or _DNS_NAME.fullmatch(name) is None:
            raise ValueError(
                f"{whole!r} is neither an address range (e.g. 10.0.0.0/8, [fd00::/8]:443) nor "
                "a DNS name"
            ) from None
        return Destination(whole, None, name, ports)
    return Destination(whole, network, None, ports)


@dataclass(frozen=True)
class OutboundEntry:
    """One `allow` entry of an outbound rule: destinations (None: any) and the remote
    identities allowed there (None: any the route accepts)."""

    to: tuple[Destination, ...] | None
    peers: tuple[SpiffePattern, ...] | None

    def reaches(self, where: Where) -> bool:
        return self.to is None or any(d.covers(where) for d in self.to)

    def admits(self, peer: SpiffeId) -> bool:
        return self.peers is None or any(p.matches(peer) for p in self.peers)


@dataclass(frozen=True)
class OutboundRule:
    """The rule of one outbound route (or '*': routes without their own rule)."""

    route: str
    allow: tuple[OutboundEntry, ...]
    dry_run: bool | None  # None: the file's dry_run


@dataclass(frozen=True)
class Policy:
    """A whole policy file, validated."""

    dry_run: bool
    default: str  # "allow" | "deny": inbound routes with no rule
    inbound: Mapping[str, RouteRule]
    # Outbound: None when the file says nothing of it (outbound is not judged by the file);
    # else "allow" | "deny" for routes with no rule (and no '*' rule).
    outbound_default: str | None = None
    outbound: Mapping[str, OutboundRule] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        """The effective policy as JSON-able data (what `check` prints)."""
        out: dict[str, object] = {
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
            "outbound_default": self.outbound_default,
            "outbound": {
                name: {
                    "allow": [
                        {
                            "to": None if e.to is None else [d.text for d in e.to],
                            "peers": None if e.peers is None else [p.text for p in e.peers],
                        }
                        for e in rule.allow
                    ],
                    "dry_run": self.dry_run if rule.dry_run is None else rule.dry_run,
                }
                for name, rule in self.outbound.items()
            },
        }
        return out


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


def decide(
    policy: Policy,
    route: str,
    peer: SpiffeId,
    source_ip: str | None,
    own_domain: str | None = None,
) -> Decision:
    """Judge one inbound connection on `route` from `peer` at `source_ip`.

    A route with a rule allows a peer matching one of its patterns (and, when the rule
    lists source CIDRs, coming from one of them); anything else on that route is denied by
    the rule as a whole. A route without a rule gets the file's default; an allowing default
    lets in identities of `own_domain` only (when known), as MTLS_ALLOW_PEERS does: a
    federated trust domain's peers get in only where a pattern names them.
    """
    rule = policy.inbound.get(route)
    if rule is None:
        if policy.default == "allow" and own_domain and peer.trust_domain != own_domain:
            return Decision(False, "default.trust_domain", policy.dry_run)
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


def _outbound_rule(policy: Policy, route: str) -> OutboundRule | None:
    rule = policy.outbound.get(route)
    return rule if rule is not None else policy.outbound.get("*")


def decide_destination(policy: Policy, route: str, host: str, port: int) -> Decision | None:
    """Judge where an outbound connection on `route` goes, before it is dialled (None: the
    file says nothing of outbound): `decide_outbound` without a remote identity."""
    return decide_outbound(policy, route, host, port, None)


def decide_outbound(
    policy: Policy, route: str, host: str, port: int, peer: SpiffeId | None
) -> Decision | None:
    """Judge an outbound connection on `route` to (host, port) whose remote presented
    `peer` (None: judge the destination only, as before dialling or for a plaintext
    connection); None when the file says nothing of outbound.

    The route's rule is its own, else the '*' rule, else `outbound_default` decides. Allowed
    by the first entry that lists the destination and (if it lists peers) the identity;
    denied as `outbound.ROUTE.to` when no entry lists the destination, `outbound.ROUTE.peers`
    when the entries that do list other identities."""
    if policy.outbound_default is None:
        return None
    rule = _outbound_rule(policy, route)
    if rule is None:
        return Decision(policy.outbound_default == "allow", "outbound_default", policy.dry_run)
    dry_run = policy.dry_run if rule.dry_run is None else rule.dry_run
    where = Where.of(host, port)
    reached = False
    for index, entry in enumerate(rule.allow):
        if not entry.reaches(where):
            continue
        reached = True
        if peer is None or entry.admits(peer):
            return Decision(True, f"outbound.{rule.route}.allow[{index}]", dry_run)
    return Decision(False, f"outbound.{rule.route}.{'peers' if reached else 'to'}", dry_run)


def all_rules(policy: Policy) -> list[str]:
    """Every rule name the decisions can answer with that allows (for 'never matched'
    reports)."""
    names = [
        f"inbound.{route}.allow[{i}]"
        for route, rule in policy.inbound.items()
        for i in range(len(rule.allow))
    ]
    if policy.default == "allow":
        names.append("default")
    names += [
        f"outbound.{route}.allow[{i}]"
        for route, rule in policy.outbound.items()
        for i in range(len(rule.allow))
    ]
    if policy.outbound_default == "allow":
        names.append("outbound_default")
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


def _patterns(node: yaml.Node, what: str) -> tuple[SpiffePattern, ...]:
    patterns = []
    for item in _sequence(node, what, MAX_RULES):
        try:
            patterns.append(parse_pattern(_scalar(item, f"{what} item")))
        except ValueError as exc:
            raise _fail(item, f"{what}: {exc}") from None
    return tuple(patterns)


def _destinations(node: yaml.Node, what: str) -> tuple[Destination, ...]:
    items = [node] if isinstance(node, yaml.ScalarNode) else _sequence(node, what, MAX_RULES)
    out = []
    for item in items:
        try:
            out.append(parse_destination(_scalar(item, f"{what} item")))
        except ValueError as exc:
            raise _fail(item, f"{what}: {exc}") from None
    return tuple(out)


def _outbound_entry(what: str, node: yaml.Node) -> OutboundEntry:
    to: tuple[Destination, ...] | None = None
    peers: tuple[SpiffePattern, ...] | None = None
    for key, key_node, value in _mapping(node, what):
        if key == "to":
            to = _destinations(value, f"{what}.to")
        elif key == "peers":
            peers = _patterns(value, f"{what}.peers")
        else:
            raise _fail(key_node, f"{what}: unknown key {key!r} (known: to, peers)")
    if to is None and peers is None:
        raise _fail(
            node, f"{what} names neither 'to' nor 'peers' (write to: '*' to allow any destination)"
        )
    return OutboundEntry(to, peers)


def _outbound_rule_node(route: str, node: yaml.Node) -> OutboundRule:
    what = f"outbound.{route}"
    allow: tuple[OutboundEntry, ...] | None = None
    dry_run: bool | None = None
    for key, key_node, value in _mapping(node, what):
        if key == "allow":
            allow = tuple(
                _outbound_entry(f"{what}.allow[{i}]", item)
                for i, item in enumerate(_sequence(value, f"{what}.allow", MAX_RULES))
            )
        elif key == "dry_run":
            dry_run = _bool(value, f"{what}.dry_run")
        else:
            raise _fail(key_node, f"{what}: unknown key {key!r} (known: allow, dry_run)")
    if allow is None:
        raise _fail(
            node, f"{what} has no 'allow' list (write 'allow: []' to deny every destination)"
        )
    return OutboundRule(route, allow, dry_run)


def _routes(node: yaml.Node, what: str, build: Callable[[str, yaml.Node], _R]) -> dict[str, _R]:
    """The rules of `inbound` or `outbound`, by route (an empty key is as no rules)."""
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
        return {}
    routes = _mapping(node, what)
    if len(routes) > MAX_ROUTES:
        raise _fail(node, f"{what} has more than {MAX_ROUTES} routes")
    return {route: build(route, rule_node) for route, _, rule_node in routes}


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
    dry_run: bool}}`, `outbound_default: allow|deny` (required with `outbound`),
    `outbound: {ROUTE|*: {allow: [{to: DEST|[DEST...], peers: [PATTERN...]}...], dry_run:
    bool}}`.
    """
    root = _document(text)
    default: str | None = None
    dry_run = False
    inbound: dict[str, RouteRule] = {}
    outbound_default: str | None = None
    outbound: dict[str, OutboundRule] = {}
    outbound_node: yaml.Node | None = None
    for key, key_node, value in _mapping(root, "the policy"):
        if key in ("default", "outbound_default"):
            verdict = _scalar(value, key)
            if verdict not in ("allow", "deny"):
                raise _fail(value, f"{key} must be 'allow' or 'deny', not {verdict!r}")
            if key == "default":
                default = verdict
            else:
                outbound_default = verdict
        elif key == "outbound":
            outbound_node = key_node
            outbound = _routes(value, "outbound", _outbound_rule_node)
        elif key == "dry_run":
            dry_run = _bool(value, "dry_run")
        elif key == "inbound":
            inbound = _routes(value, "inbound", _route_rule)
        else:
            raise _fail(
                key_node,
                f"unknown key {key!r} (known: default, dry_run, inbound, outbound_default, "
                "outbound)",
            )
    if default is None:
        raise _fail(root, "'default: allow' or 'default: deny' is required")
    if outbound_node is not None and outbound_default is None:
        raise _fail(
            outbound_node,
            "outbound rules need 'outbound_default: allow' or 'outbound_default: deny' (the "
            "verdict for outbound routes without a rule)",
        )
    return Policy(dry_run, default, inbound, outbound_default, outbound)


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
    own_domain: str | None = None,
) -> Callable[[SpiffeId | None], None]:
    """The identity check of one inbound connection (a flow.PeerCheck) under `policy`
    (`own_domain`: see `decide`).

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
            decision = decide(policy, route, peer, source_ip, own_domain)
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


def outbound_check(
    policy: Policy,
    route: str,
    target: tuple[str, int],
    base: Callable[[SpiffeId | None], None],
    on_decision: Callable[[SpiffeId, Decision], None],
) -> Callable[[SpiffeId | None], None]:
    """The identity check of one outbound connection to `target` (a flow.PeerCheck) under
    `policy`: first `base` (the route's expected identity or trust domain), then the
    policy's rules. Decides once per identity, tells `on_decision`, and raises
    PolicyDenied('policy_denied') for an enforced deny; a dry-run deny returns."""
    decided: list[tuple[SpiffeId, Decision]] = []
    host, port = target

    def check(peer: SpiffeId | None) -> None:
        base(peer)
        if peer is None:  # base refuses it; kept for the type
            raise PolicyDenied("bad_cert", f"remote certificate {NOT_SVID}")
        if decided and decided[0][0] == peer:
            decision: Decision | None = decided[0][1]
        else:
            decision = decide_outbound(policy, route, host, port, peer)
            if decision is None:
                return
            decided[:] = [(peer, decision)]
            on_decision(peer, decision)
        if decision is not None and decision.enforced_deny:
            message = outbound_deny_message(peer, route, target, decision)
            raise PolicyDenied("policy_denied", message)

    return check


def hostport(target: tuple[str, int]) -> str:
    """'host:port', an IPv6 address in brackets."""
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def destination_deny_message(route: str, target: tuple[str, int], decision: Decision) -> str:
    """Why a destination is (or in dry-run would be) denied on outbound `route`, in words."""
    return (
        f"destination {hostport(target)} is not allowed on outbound route {route} by policy "
        f"rule {decision.rule} (MTLS_POLICY_FILE)"
    )


def outbound_deny_message(
    peer: SpiffeId, route: str, target: tuple[str, int], decision: Decision
) -> str:
    """Why a remote identity is (or in dry-run would be) denied on outbound `route`."""
    return (
        f"remote identity {peer} at {hostport(target)} is not allowed on outbound route "
        f"{route} by policy rule {decision.rule} (MTLS_POLICY_FILE)"
    )
