"""The one settings loader: an MTLS_* mapping in, Settings or every problem at once out."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping

from pydantic import ValidationError

from ..errors import ConfigError, ConfigProblem
from ..proxyproto import check_proxy_protocol_routes
from .checks import file_problems
from .model import ENV_PREFIX, Settings, env_var, example_of, known_variables
from .parse import Address
from .routes import dials_itself, listen_conflict

RULE_FIELDS = (
    "inbound_capture_port",
    "outbound_capture_port",
    "proxy_uid",
    "exclude_inbound_ports",
    "exclude_outbound_ports",
    "exclude_outbound_cidrs",
    "admin_listen",
    "hbone_listen",
)
"""The Settings fields the interception rules (`mtls-sidecar iptables`) are made from."""

SPIFFE_ENDPOINT_SOCKET = "SPIFFE_ENDPOINT_SOCKET"
"""The SPIFFE spec's variable: MTLS_SPIFFE_ENDPOINT_SOCKET's default."""

RULE_VARIABLES = frozenset(env_var(name) for name in RULE_FIELDS)
"""The MTLS_* variables `mtls-sidecar iptables` reads."""


def _texts(env: Mapping[str, str]) -> dict[str, str]:
    """{field name: text} for the variables set in `env`; blank values count as not set."""
    texts: dict[str, str] = {}
    for name in Settings.model_fields:
        value = env.get(env_var(name))
        if value is not None and value.strip():
            texts[name] = value
    # The SPIFFE spec's own variable, as SPIRE's tooling and py-spiffe read it.
    spiffe_socket = env.get(SPIFFE_ENDPOINT_SOCKET)
    if "spiffe_endpoint_socket" not in texts and spiffe_socket and spiffe_socket.strip():
        texts["spiffe_endpoint_socket"] = spiffe_socket
    return texts


def _field_problems(exc: ValidationError) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        ctx = error.get("ctx") or {}
        message = str(ctx["error"]) if "error" in ctx else error["msg"]
        known = name in Settings.model_fields
        problems.append(
            ConfigProblem(env_var(name) if known else ENV_PREFIX + "?", message, example_of(name))
        )
    return problems


def parse_fields(env: Mapping[str, str]) -> tuple[Settings, list[ConfigProblem]]:
    """Each variable parsed on its own: the Settings (bad variables left at their default)
    and one problem per bad variable. No cross-field or file checks."""
    texts = _texts(env)
    try:
        return Settings.model_validate(texts), []
    except ValidationError as exc:
        problems = _field_problems(exc)
    bad = {p.var for p in problems}
    # Fields are validated one by one, so the rest still validates without the bad ones.
    good = {name: text for name, text in texts.items() if env_var(name) not in bad}
    return Settings.model_validate(good), problems


# The variables the kubelet gives every pod for each Service of its namespace
# (enableServiceLinks, on by default): a Service named mtls-ca gives MTLS_CA_SERVICE_HOST,
# MTLS_CA_PORT=tcp://10.0.0.5:8443, MTLS_CA_PORT_8443_TCP_ADDR, ... They are not typos.
_SERVICE_LINK_NAME = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$"
)
_SERVICE_LINK_PORT = re.compile(r"^(tcp|udp|sctp)://\S+:\d+$")


def is_service_link(name: str, value: str) -> bool:
    """Whether NAME=VALUE is one of the Kubernetes Service link variables (docker links had
    the same shape): ignored, not reported as an unknown MTLS_* name."""
    if _SERVICE_LINK_NAME.match(name):
        return True
    return name.endswith("_PORT") and _SERVICE_LINK_PORT.match(value) is not None


def _unknown_problems(env: Mapping[str, str], also_known: Collection[str]) -> list[ConfigProblem]:
    known = known_variables()
    problems: list[ConfigProblem] = []
    for key in env:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or key in known or key in also_known:
            continue
        if is_service_link(key, env[key]):
            continue
        if upper in known:
            message = f"unknown variable; names are upper-case: did you mean {upper}?"
        else:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            message = (
                f"unknown variable; did you mean {close[0]}?"
                if close
                else ("unknown variable (MTLS_* names are reserved for the sidecar's settings)")
            )
        problems.append(ConfigProblem(key, message))
    return problems


def cross_problems(s: Settings, bad: Collection[str] = ()) -> list[ConfigProblem]:
    """Checks that span fields, without touching files. Variables in `bad` (which already
    have a problem) are skipped, since their value here is only the default standing in
    for the bad one."""
    problems: list[ConfigProblem] = []

    def add(name: str, message: str) -> None:
        problems.append(ConfigProblem(env_var(name), message, example_of(name)))

    def ok(*names: str) -> bool:
        return not any(env_var(n) in bad for n in names)

    if not ok("identity_source"):
        pass
    elif s.identity_source == "files":
        for name in ("cert_file", "key_file", "trust_bundle_file"):
            if ok(name) and getattr(s, name) is None:
                add(name, "required when MTLS_IDENTITY_SOURCE=files")
    elif s.identity_source == "spiffe":
        if ok("spiffe_endpoint_socket") and s.spiffe_endpoint_socket is None:
            add(
                "spiffe_endpoint_socket",
                "required when MTLS_IDENTITY_SOURCE=spiffe (or set SPIFFE_ENDPOINT_SOCKET)",
            )
        for name in ("cert_file", "key_file", "trust_bundle_file", "crl_file", "ca_url"):
            if ok(name) and getattr(s, name) is not None:
                add(name, "not used with MTLS_IDENTITY_SOURCE=spiffe (the Workload API gives it)")
    else:
        for name in ("ca_url", "ca_fingerprint", "identity"):
            if ok(name) and getattr(s, name) is None:
                add(name, "required when MTLS_IDENTITY_SOURCE=ca")
        if ok("crl_file") and s.crl_file is not None:
            add(
                "crl_file",
                "only with MTLS_IDENTITY_SOURCE=files; with the CA the sidecar fetches the "
                "CRL itself (every MTLS_BUNDLE_REFRESH)",
            )
        if ok("ca_token", "ca_token_file"):
            if s.ca_token is not None and s.ca_token_file is not None:
                add("ca_token", "set only one of MTLS_CA_TOKEN and MTLS_CA_TOKEN_FILE")
            elif s.ca_token is None and s.ca_token_file is None:
                add("ca_token", "MTLS_IDENTITY_SOURCE=ca needs MTLS_CA_TOKEN or MTLS_CA_TOKEN_FILE")

    if (
        ok("trust_domain", "identity")
        and s.trust_domain is not None
        and s.identity is not None
        and s.identity.trust_domain != s.trust_domain
    ):
        add(
            "trust_domain",
            f"is {s.trust_domain} but MTLS_IDENTITY {s.identity} is in trust domain "
            f"{s.identity.trust_domain}",
        )

    if ok("federated_bundles", "trust_domain", "identity"):
        own = s.effective_trust_domain
        for td, _ in s.federated_bundles:
            if td == own:
                add(
                    "federated_bundles",
                    f"names {td}, this sidecar's own trust domain: its bundle comes from the "
                    "identity source",
                )

    if ok("inbound", "outbound", "transparent") and not (s.inbound or s.outbound or s.transparent):
        add("inbound", "nothing to do: set MTLS_INBOUND, MTLS_OUTBOUND or MTLS_TRANSPARENT=true")

    # Every address this sidecar listens on, with who owns it; the admin port comes last.
    listeners: list[tuple[str, Address]] = []
    if ok("inbound"):
        listeners += [(f"MTLS_INBOUND route {r.name!r}", r.listen) for r in s.inbound]
    if ok("outbound"):
        for route in s.outbound:
            for owner, address in listeners:
                if listen_conflict(route.listen, address):
                    add(
                        "outbound",
                        f"route {route.name!r} listens on {route.listen}, which collides with "
                        f"{owner} on {address}",
                    )
        listeners += [(f"MTLS_OUTBOUND route {r.name!r}", r.listen) for r in s.outbound]

    if s.transparent and ok("transparent"):
        captures = [name for name in ("inbound_capture_port", "outbound_capture_port") if ok(name)]
        if len(captures) == 2 and s.inbound_capture_port == s.outbound_capture_port:
            add(
                "outbound_capture_port",
                f"must differ from MTLS_INBOUND_CAPTURE_PORT (both {s.outbound_capture_port})",
            )
        for name in captures:
            port: int = getattr(s, name)
            for owner, address in listeners:
                if address.port == port:
                    add(name, f"port {port} collides with {owner} listening on {address}")
        listeners += [(env_var(n), Address("", getattr(s, n))) for n in captures]

    if ok("hbone_outbound", "outbound", "transparent") and s.hbone_outbound:
        outbound_names = {r.name for r in s.outbound}
        unknown = sorted(s.hbone_outbound.routes - outbound_names)
        if unknown:
            add(
                "hbone_outbound",
                f"no outbound route named {', '.join(unknown)} (MTLS_OUTBOUND has: "
                f"{', '.join(sorted(outbound_names)) or 'none'})",
            )
        if (s.hbone_outbound.cidrs or s.hbone_outbound.ports) and not s.transparent:
            add(
                "hbone_outbound",
                "CIDRs and ports name original destinations: transparent mode only",
            )

    hbone = s.hbone_address if ok("hbone_listen", "transparent") else None
    if hbone is not None:
        for owner, address in listeners:
            if listen_conflict(hbone, address):
                add("hbone_listen", f"{hbone} collides with {owner} listening on {address}")
        listeners.append(("MTLS_HBONE_LISTEN", hbone))

    if ok("admin_listen"):
        for owner, address in listeners:
            if listen_conflict(s.admin_listen, address):
                add(
                    "admin_listen",
                    f"{s.admin_listen} collides with {owner} listening on {address}",
                )

    if ok("proxy_protocol", "inbound", "transparent", "inbound_capture_port"):
        names = [r.name for r in s.inbound]
        if s.transparent:
            names.append(str(s.inbound_capture_port))  # the capture route's name
        try:
            check_proxy_protocol_routes(s.proxy_protocol, names)
        except ValueError as exc:
            add("proxy_protocol", str(exc))

    # A route whose far end leads, through our own listeners, back to itself dials itself
    # again and again. A route to another of our listeners that ends elsewhere (an outbound
    # route to our own inbound listener, say) is a finite hairpin and allowed; a capture port
    # takes only redirected connections, so dialling it directly never works.
    hops: list[tuple[str, str, str, Address, Address]] = []
    if ok("inbound"):
        hops += [("inbound", r.name, "forwards to", r.listen, r.target) for r in s.inbound]
    if ok("outbound"):
        hops += [("outbound", r.name, "dials", r.listen, r.remote) for r in s.outbound]
    capture_owners = {owner for owner, _ in listeners if owner.endswith("_CAPTURE_PORT")}

    def landing(far: Address) -> tuple[str, Address, int | None] | None:
        """Our listener that `far` reaches: (owner, its address, index into hops or None)."""
        for owner, address in listeners:
            if dials_itself(address, far):
                index = next((i for i, h in enumerate(hops) if h[3] == address), None)
                return owner, address, index
        return None

    for start, (name, route_name, verb, _, far) in enumerate(hops):
        hit = landing(far)
        if hit is None:
            continue
        owner, address, index = hit
        seen = {start}
        loops = owner in capture_owners
        while not loops and index is not None:
            if index in seen:
                loops = True
                break
            seen.add(index)
            nxt = landing(hops[index][4])
            index = nxt[2] if nxt is not None else None
        if loops:
            add(
                name,
                f"route {route_name!r} {verb} {far}, which is this sidecar's own listener "
                f"({owner} on {address}): every connection would loop back into the sidecar",
            )
    return problems


def load_settings(env: Mapping[str, str], *, also_known: Collection[str] = ()) -> Settings:
    """Build Settings from `env` (a mapping of MTLS_* names to text, e.g. os.environ).

    What `run` and `check` use. Raises ConfigError listing every problem at once: bad
    values, missing or conflicting variables, files that do not exist or cannot be read,
    and unknown MTLS_* names (typos). `also_known` names extra MTLS_* variables that other
    parts of the program read, so they are not reported as unknown.
    """
    settings, problems = parse_fields(env)
    bad = {p.var for p in problems}
    problems += cross_problems(settings, bad)
    problems += file_problems(settings, bad)
    problems += _unknown_problems(env, also_known)
    if problems:
        raise ConfigError(problems)
    return settings


def load_rule_settings(env: Mapping[str, str]) -> Settings:
    """The Settings `mtls-sidecar iptables` makes its rules from, checked as `run` would.

    The same parsing and cross-field checks as `load_settings`, judged as transparent mode
    (the rules exist only for it), but without the file checks (an init container has no
    certificate files) and reporting only the variables in RULE_VARIABLES, plus unknown
    MTLS_* names. Raises ConfigError listing every problem at once.
    """
    settings, problems = parse_fields({**env, env_var("transparent"): "true"})
    problems += cross_problems(settings, {p.var for p in problems})
    problems = [p for p in problems if p.var in RULE_VARIABLES]
    problems += _unknown_problems(env, ())
    if problems:
        raise ConfigError(problems)
    return settings
