"""`mtls-sidecar iptables`: the NAT rules that send a pod's TCP through the transparent sidecar.

What the rules do, per address family (nat table):

    PREROUTING -p tcp -> MTLS_INBOUND        (tagged with -m comment --comment mtls-sidecar)
    OUTPUT     -p tcp -> MTLS_OUTPUT         (tagged likewise)

    MTLS_INBOUND: the capture ports, the admin port and MTLS_EXCLUDE_INBOUND_PORTS RETURN;
                  everything else -> MTLS_IN_REDIRECT (REDIRECT to the inbound capture port)
    MTLS_OUTPUT:  the proxy's own UID RETURNs (so the sidecar's dials are never captured: no
                  loop); loopback RETURNs (-d 127.0.0.1/32 or ::1/128, and -o lo);
                  MTLS_EXCLUDE_OUTBOUND_PORTS and MTLS_EXCLUDE_OUTBOUND_CIDRS RETURN;
                  everything else -> MTLS_OUT_REDIRECT (REDIRECT to the outbound capture port)

Loopback is exempt as a whole, on purpose and simpler than Istio: an app that dials its own
pod IP is routed over `lo` and never leaves the host, so there is nothing to encrypt; it is
not captured (and not counted) at all.

`--apply` is one atomic `iptables-restore --noflush` transaction per family (own chains
created or flushed, jump rules added only when `iptables -C` does not find them), so it can
run any number of times. `--clean` deletes the tagged jump rules and the own chains, and
nothing else.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from .config import load_rule_settings
from .errors import ConfigError

__all__ = [
    "CHAINS",
    "COMMENT",
    "Family",
    "RuleConfig",
    "main",
    "nft_ruleset",
    "restore_script",
    "rules",
]

Family = Literal["ipv4", "ipv6"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

COMMENT = "mtls-sidecar"
INBOUND = "MTLS_INBOUND"
IN_REDIRECT = "MTLS_IN_REDIRECT"
OUTPUT = "MTLS_OUTPUT"
OUT_REDIRECT = "MTLS_OUT_REDIRECT"
# Own chains, in the order iptables-save lists them (by name), so --print matches it.
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, OUT_REDIRECT)
NFT_TABLE = "mtls_sidecar"

_LOOPBACK = {"ipv4": "127.0.0.1/32", "ipv6": "::1/128"}


@dataclass(frozen=True)
class RuleConfig:
    """Everything the interception rules depend on; build it with `from_settings`."""

    inbound_capture_port: int = 15006
    outbound_capture_port: int = 15001
    proxy_uid: int = 1337
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[Network, ...] = ()
    admin_port: int | None = 15000
    # HBONE (MTLS_HBONE_LISTEN, 15008 in transparent mode): peers dial it directly.
    hbone_port: int | None = 15008

    def __post_init__(self) -> None:
        ports = [self.inbound_capture_port, self.outbound_capture_port]
        ports += [*self.exclude_inbound_ports, *self.exclude_outbound_ports]
        if self.admin_port is not None:
            ports.append(self.admin_port)
        if self.hbone_port is not None:
            ports.append(self.hbone_port)
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range 1-65535")
        if self.proxy_uid < 0:
            raise ValueError(f"proxy uid {self.proxy_uid} is negative")
        if self.inbound_capture_port == self.outbound_capture_port:
            raise ValueError("the inbound and outbound capture ports must differ")

    @classmethod
    def from_settings(cls, settings: Any) -> RuleConfig:
        """Read the rule inputs from a `proxy.config.Settings` (same attribute names).

        `admin_listen` is an address with a `.port` (or None when the admin server is off);
        port 0 (picked at start-up) cannot be excluded and is left out.
        """
        admin = getattr(settings, "admin_listen", None)
        if admin is not None and not admin.port:
            admin = None
        hbone = getattr(settings, "hbone_address", None)
        return cls(
            inbound_capture_port=int(settings.inbound_capture_port),
            outbound_capture_port=int(settings.outbound_capture_port),
            proxy_uid=int(settings.proxy_uid),
            exclude_inbound_ports=tuple(int(p) for p in settings.exclude_inbound_ports),
            exclude_outbound_ports=tuple(int(p) for p in settings.exclude_outbound_ports),
            exclude_outbound_cidrs=tuple(
                ipaddress.ip_network(str(c), strict=False) for c in settings.exclude_outbound_cidrs
            ),
            admin_port=None if admin is None else int(admin.port),
            hbone_port=None if hbone is None else int(hbone.port),
        )

    def inbound_return_ports(self) -> list[int]:
        """Ports never redirected inbound: capture ports, admin port, the HBONE port, then
        the exclusions."""
        ports = [self.inbound_capture_port, self.outbound_capture_port]
        if self.admin_port is not None:
            ports.append(self.admin_port)
        if self.hbone_port is not None:
            ports.append(self.hbone_port)
        return _unique([*ports, *self.exclude_inbound_ports])

    def cidrs(self, family: Family) -> list[Network]:
        """The excluded outbound CIDRs of one address family."""
        version = 4 if family == "ipv4" else 6
        return [n for n in self.exclude_outbound_cidrs if n.version == version]


def _unique(items: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(items))


def _jump_rules() -> list[list[str]]:
    tag = ["-m", "comment", "--comment", COMMENT]
    return [
        ["-A", "PREROUTING", "-p", "tcp", *tag, "-j", INBOUND],
        ["-A", "OUTPUT", "-p", "tcp", *tag, "-j", OUTPUT],
    ]


def _redirect(chain: str, port: int) -> list[str]:
    return ["-A", chain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port)]


def _chain_rules(cfg: RuleConfig, family: Family) -> list[list[str]]:
    """The rules inside the own chains, in iptables-save's canonical spelling and order."""
    out: list[list[str]] = []
    for port in cfg.inbound_return_ports():
        out.append(["-A", INBOUND, "-p", "tcp", "-m", "tcp", "--dport", str(port), "-j", "RETURN"])
    out.append(["-A", INBOUND, "-p", "tcp", "-j", IN_REDIRECT])
    out.append(_redirect(IN_REDIRECT, cfg.inbound_capture_port))
    out.append(["-A", OUTPUT, "-m", "owner", "--uid-owner", str(cfg.proxy_uid), "-j", "RETURN"])
    out.append(["-A", OUTPUT, "-d", _LOOPBACK[family], "-j", "RETURN"])
    out.append(["-A", OUTPUT, "-o", "lo", "-j", "RETURN"])
    for port in _unique(cfg.exclude_outbound_ports):
        out.append(["-A", OUTPUT, "-p", "tcp", "-m", "tcp", "--dport", str(port), "-j", "RETURN"])
    for net in cfg.cidrs(family):
        out.append(["-A", OUTPUT, "-d", str(net), "-j", "RETURN"])
    out.append(["-A", OUTPUT, "-p", "tcp", "-j", OUT_REDIRECT])
    out.append(_redirect(OUT_REDIRECT, cfg.outbound_capture_port))
    return out


def rules(cfg: RuleConfig, family: Family) -> list[list[str]]:
    """The iptables argv lists (without the binary) that set up interception on a clean table.

    Each list runs as `iptables|ip6tables ARGV`: first `-t nat -N` for the own chains, then
    the two tagged jump rules, then the own chains' rules. `--apply` does not run them one
    by one (see `restore_script`) but applies exactly these rules.
    """
    if family not in ("ipv4", "ipv6"):
        raise ValueError(f"family must be 'ipv4' or 'ipv6', not {family!r}")
    out = [["-t", "nat", "-N", chain] for chain in CHAINS]
    out += [["-t", "nat", *rule] for rule in _jump_rules()]
    out += [["-t", "nat", *rule] for rule in _chain_rules(cfg, family)]
    return out


def _line(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def restore_script(
    cfg: RuleConfig, family: Family, jumps: Sequence[Sequence[str]] | None = None
) -> str:
    """An iptables-restore script for the nat table (the `--print` text, minus the header).

    Declaring the own chains creates them, or flushes them under `--noflush`; `jumps` are the
    jump rules to add (default: both; `--apply` passes only the missing ones).
    """
    if family not in ("ipv4", "ipv6"):
        raise ValueError(f"family must be 'ipv4' or 'ipv6', not {family!r}")
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS]
    lines += [_line(j) for j in (_jump_rules() if jumps is None else jumps)]
    lines += [_line(r) for r in _chain_rules(cfg, family)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def print_script(cfg: RuleConfig, families: Sequence[Family] = ("ipv4", "ipv6")) -> str:
    """The `--print` output: one commented iptables-restore section per family."""
    tools = {"ipv4": "iptables", "ipv6": "ip6tables"}
    parts = []
    for family in families:
        parts.append(
            f"# mtls-sidecar {family} nat rules ({tools[family]}-restore format; "
            "apply with: mtls-sidecar iptables --apply)\n" + restore_script(cfg, family)
        )
    return "".join(parts)


def nft_ruleset(cfg: RuleConfig) -> str:
    """The same interception as an nftables `table inet mtls_sidecar` (IPv4 and IPv6 at once).

    Load it with `nft -f`; `mtls-sidecar iptables --apply --nft` replaces the table atomically.
    """

    def port_set(ports: Sequence[int]) -> str:
        return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"

    def net_set(nets: Sequence[Network]) -> str:
        return str(nets[0]) if len(nets) == 1 else "{ " + ", ".join(map(str, nets)) + " }"

    outbound = [
        f"meta skuid {cfg.proxy_uid} return",
        "ip daddr 127.0.0.1 return",
        "ip6 daddr ::1 return",
        'oifname "lo" return',
    ]
    if cfg.exclude_outbound_ports:
        outbound.append(f"tcp dport {port_set(_unique(cfg.exclude_outbound_ports))} return")
    if v4 := cfg.cidrs("ipv4"):
        outbound.append(f"ip daddr {net_set(v4)} return")
    if v6 := cfg.cidrs("ipv6"):
        outbound.append(f"ip6 daddr {net_set(v6)} return")
    outbound.append(f"meta l4proto tcp redirect to :{cfg.outbound_capture_port}")

    def chain(name: str, body: Sequence[str]) -> list[str]:
        return [f"\tchain {name} {{", *(f"\t\t{line}" for line in body), "\t}"]

    lines = [f"table inet {NFT_TABLE} {{"]
    lines += chain(
        "prerouting",
        [
            "type nat hook prerouting priority dstnat; policy accept;",
            "meta l4proto tcp jump inbound",
        ],
    )
    lines += chain(
        "output",
        ["type nat hook output priority -100; policy accept;", "meta l4proto tcp jump outbound"],
    )
    lines += chain(
        "inbound",
        [
            f"tcp dport {port_set(cfg.inbound_return_ports())} return",
            f"meta l4proto tcp redirect to :{cfg.inbound_capture_port}",
        ],
    )
    lines += chain("outbound", outbound)
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- running iptables -------------------------------------------------------------------


class ToolError(Exception):
    """iptables/nft is missing, not permitted, or refused the rules; the message says which."""


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=60
    )


_NO_PERMISSION_HINT = (
    "run it as root or with CAP_NET_ADMIN (in Kubernetes: an init container with "
    "securityContext.capabilities.add [NET_ADMIN, NET_RAW])"
)


@dataclass
class _Tool:
    """One family's iptables binary and its -restore companion."""

    family: Family
    binary: str
    restore: str
    run: Runner = _run

    def call(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run([self.binary, "-w", *args], stdin)

    def check(self, *args: str) -> str:
        proc = self.call(*args)
        if proc.returncode != 0:
            raise ToolError(self._failed(args, proc))
        return proc.stdout

    def _failed(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> str:
        cmd = shlex.join([os.path.basename(self.binary), *args])
        err = (proc.stderr or proc.stdout).strip() or "no message"
        text = f"`{cmd}` failed (exit {proc.returncode}): {err}"
        lowered = err.lower()
        if "permission denied" in lowered or "must be root" in lowered:
            text += f"; {_NO_PERMISSION_HINT}"
        elif "table does not exist" in lowered or "can't initialize" in lowered:
            text += "; the kernel has no NAT support for this family (nf_nat / nft_nat modules)"
        return text

    def probe(self) -> None:
        self.check("-t", "nat", "-S", "PREROUTING")

    def apply(self, cfg: RuleConfig) -> None:
        missing = [j for j in _jump_rules() if self.call("-t", "nat", "-C", *j[1:]).returncode]
        script = restore_script(cfg, self.family, jumps=missing)
        proc = self.run([self.restore, "-w", "--noflush"], script)
        if proc.returncode != 0:
            raise ToolError(self._failed(["--noflush", "<rules>"], proc))

    def clean(self) -> None:
        listing = self.check("-t", "nat", "-S")
        for line in listing.splitlines():
            argv = shlex.split(line)
            if (
                len(argv) > 2
                and argv[0] == "-A"
                and argv[1] in ("PREROUTING", "OUTPUT")
                and f"--comment {COMMENT}" in shlex.join(argv)
                and argv[-1] in CHAINS
            ):
                self.check("-t", "nat", "-D", *argv[1:])
        existing = {a.split()[1] for a in listing.splitlines() if a.startswith("-N ")}
        present = [c for c in CHAINS if c in existing]
        # Flush all before deleting any: MTLS_INBOUND still references MTLS_IN_REDIRECT.
        for chain in present:
            self.check("-t", "nat", "-F", chain)
        for chain in present:
            self.check("-t", "nat", "-X", chain)


_CANDIDATES = {
    ("nft", "ipv4"): ("iptables-nft", "iptables"),
    ("nft", "ipv6"): ("ip6tables-nft", "ip6tables"),
    ("legacy", "ipv4"): ("iptables-legacy",),
    ("legacy", "ipv6"): ("ip6tables-legacy",),
}


def _find_tool(family: Family, path: str | None, run: Runner, backend: str = "nft") -> _Tool:
    """Locate the binaries: `iptables-nft` first (else plain `iptables`), or the legacy ones."""
    candidates = _CANDIDATES[(backend, family)]
    for name in candidates:
        binary = shutil.which(name, path=path)
        if binary is None:
            continue
        restore = os.path.join(os.path.dirname(binary), f"{name}-restore")
        if not os.access(restore, os.X_OK):
            restore = shutil.which(f"{name}-restore", path=path) or ""
        if not restore:
            raise ToolError(f"found {binary} but not {name}-restore; install the iptables package")
        return _Tool(family, binary, restore, run)
    names = " or ".join(candidates)
    raise ToolError(f"{names} not found on PATH; install the iptables package (iptables-nft)")


def _nft_apply(cfg: RuleConfig, path: str | None, run: Runner, clean: bool) -> None:
    nft = shutil.which("nft", path=path)
    if nft is None:
        raise ToolError("nft not found on PATH; install the nftables package")
    # "add table" makes the delete valid when the table is absent; the whole file is one
    # transaction, so the old table is replaced without a moment of no rules.
    script = f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
    if not clean:
        script += nft_ruleset(cfg)
    proc = run([nft, "-f", "-"], script)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip() or "no message"
        text = f"`nft -f -` failed (exit {proc.returncode}): {err}"
        if "permission denied" in err.lower() or "operation not permitted" in err.lower():
            text += f"; {_NO_PERMISSION_HINT}"
        raise ToolError(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtls-sidecar iptables",
        description="Print, apply or remove the transparent-mode NAT rules, from MTLS_* env vars.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--print",
        dest="action",
        action="store_const",
        const="print",
        help="write the rules to stdout (default)",
    )
    action.add_argument(
        "--apply",
        dest="action",
        action="store_const",
        const="apply",
        help="install the rules; safe to run again",
    )
    action.add_argument(
        "--clean",
        dest="action",
        action="store_const",
        const="clean",
        help="remove exactly the rules --apply added; safe to run again",
    )
    parser.add_argument(
        "--nft",
        action="store_true",
        help="use an nftables table (inet mtls_sidecar) instead of iptables",
    )
    parser.add_argument("--backend", choices=("nft", "legacy"), default="nft",
                        help="iptables backend: nft (iptables-nft, the default) or legacy "
                        "(iptables-legacy, for hosts whose other rules are legacy)")  # fmt: skip
    parser.add_argument("--family", choices=("ipv4", "ipv6", "all"), default="all",
                        help="address families to handle (default: all; IPv6 is skipped with "
                        "a warning when ip6tables is unusable)")  # fmt: skip
    parser.set_defaults(action="print")
    return parser


def main(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    run: Runner = _run,
) -> int:
    """`mtls-sidecar iptables [--print | --apply | --clean] [--nft | --backend B] [--family F]`.

    The inputs come from `env` through the settings loader `run` uses (`load_rule_settings`:
    same parsing, same cross-field checks, same messages; no file checks). Exit 0 on
    success, 1 when iptables/nft is missing, not permitted or refuses the rules, 2 on
    configuration errors (each listed).
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = _parser().parse_args(list(argv))
    try:
        cfg = RuleConfig.from_settings(load_rule_settings(env))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mtls-sidecar iptables: config error: {problem}", file=err)
        return 2
    families: list[Family] = ["ipv4", "ipv6"] if args.family == "all" else [args.family]
    if args.action == "print":
        out.write(nft_ruleset(cfg) if args.nft else print_script(cfg, families))
        return 0
    path = env.get("PATH")
    try:
        if args.nft:
            _nft_apply(cfg, path, run, clean=args.action == "clean")
            return 0
        for family in families:
            try:
                tool = _find_tool(family, path, run, args.backend)
                tool.probe()
            except ToolError as exc:
                # A host without IPv6 NAT is common; a host without IPv4 NAT is a failure.
                if family == "ipv6" and args.family == "all":
                    print(f"mtls-sidecar iptables: warning: IPv6 skipped: {exc}", file=err)
                    continue
                raise
            if args.action == "apply":
                tool.apply(cfg)
            else:
                tool.clean()
    except ToolError as exc:
        print(f"mtls-sidecar iptables: error: {exc}", file=err)
        return 1
    return 0
