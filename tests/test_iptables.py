"""The interception rule generator: golden outputs, --apply/--clean logic, real rules in a netns."""

from __future__ import annotations

import io
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy import iptables
from proxy.config import load_rule_settings, load_settings
from proxy.iptables import RuleConfig, main, nft_ruleset, restore_script, rules

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent

EXCLUSIONS_ENV = {
    "MTLS_INBOUND_CAPTURE_PORT": "16006",
    "MTLS_OUTBOUND_CAPTURE_PORT": "16001",
    "MTLS_PROXY_UID": "2000",
    "MTLS_EXCLUDE_INBOUND_PORTS": "22, 9090,22",
    "MTLS_EXCLUDE_OUTBOUND_PORTS": "53,5432",
    "MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.96.0.0/12,169.254.169.254/32,fd00:10:96::/112",
    "MTLS_ADMIN_LISTEN": "0.0.0.0:15020",
    "MTLS_HBONE_LISTEN": ":16008",
}


def check_golden(name: str, text: str) -> None:
    """Compare `text` with tests/golden/NAME; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs (UPDATE_GOLDEN=1 rewrites it)"


def run_main(argv: list[str], env: Mapping[str, str], **kw: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, env, stdout=out, stderr=err, **kw)  # type: ignore[arg-type]
    return rc, out.getvalue(), err.getvalue()


# --- golden outputs -------------------------------------------------------------------------


def test_print_default_golden() -> None:
    rc, out, err = run_main(["--print"], {})
    assert (rc, err) == (0, "")
    check_golden("iptables_default.txt", out)


def test_print_is_the_default_action() -> None:
    assert run_main([], {}) == run_main(["--print"], {})


def test_print_exclusions_golden() -> None:
    rc, out, err = run_main(["--print"], EXCLUSIONS_ENV)
    assert (rc, err) == (0, "")
    check_golden("iptables_exclusions.txt", out)


def test_print_nft_golden() -> None:
    assert run_main(["--print", "--nft"], {})[1] == nft_ruleset(RuleConfig())
    check_golden("iptables_nft_default.txt", run_main(["--print", "--nft"], {})[1])
    check_golden("iptables_nft_exclusions.txt", run_main(["--print", "--nft"], EXCLUSIONS_ENV)[1])


def test_print_one_family() -> None:
    rc, out, _ = run_main(["--print", "--family", "ipv6"], {})
    assert rc == 0
    assert "::1/128" in out and "127.0.0.1" not in out and out.count("*nat") == 1


# --- the rules themselves -------------------------------------------------------------------


def cfg_from_env(env: Mapping[str, str]) -> RuleConfig:
    return RuleConfig.from_settings(load_rule_settings(env))


def cfg_exclusions() -> RuleConfig:
    return cfg_from_env(EXCLUSIONS_ENV)


def test_rules_are_runnable_argv_for_the_nat_table() -> None:
    for family in ("ipv4", "ipv6"):
        argvs = rules(RuleConfig(), family)
        assert all(a[:2] == ["-t", "nat"] for a in argvs)
        assert [a[3] for a in argvs[:4]] == list(iptables.CHAINS)
        assert all(a[2] == "-N" for a in argvs[:4]) and all(a[2] == "-A" for a in argvs[4:])


def test_jump_rules_are_tagged_and_tcp_only() -> None:
    jumps = [a for a in rules(RuleConfig(), "ipv4") if a[3] in ("PREROUTING", "OUTPUT")]
    assert len(jumps) == 2
    for argv in jumps:
        assert argv[4:6] == ["-p", "tcp"]
        assert argv[6:10] == ["-m", "comment", "--comment", "mtls-sidecar"]


def test_rules_match_print_script() -> None:
    cfg = cfg_exclusions()
    for family in ("ipv4", "ipv6"):
        script = restore_script(cfg, family)
        from_rules = [" ".join(a[2:]) for a in rules(cfg, family) if a[2] == "-A"]
        assert [ln for ln in script.splitlines() if ln.startswith("-A")] == from_rules


def test_outbound_order_uid_first_redirect_last() -> None:
    out = [a[4:] for a in rules(cfg_exclusions(), "ipv4") if a[2:4] == ["-A", "MTLS_OUTPUT"]]
    assert out[0] == ["-m", "owner", "--uid-owner", "2000", "-j", "RETURN"]
    assert out[-1] == ["-p", "tcp", "-j", "MTLS_OUT_REDIRECT"]
    assert ["-d", "127.0.0.1/32", "-j", "RETURN"] in out
    assert ["-o", "lo", "-j", "RETURN"] in out


def test_cidrs_only_of_their_family() -> None:
    cfg = cfg_exclusions()
    v4 = " ".join(" ".join(a) for a in rules(cfg, "ipv4"))
    v6 = " ".join(" ".join(a) for a in rules(cfg, "ipv6"))
    assert "10.96.0.0/12" in v4 and "169.254.169.254/32" in v4 and "fd00:10:96::/112" not in v4
    assert "fd00:10:96::/112" in v6 and "10.96.0.0/12" not in v6
    assert "-d ::1/128" in v6


def test_inbound_returns_capture_admin_and_excluded_ports_once() -> None:
    inbound = [a for a in rules(cfg_exclusions(), "ipv4") if a[3] == "MTLS_INBOUND"]
    dports = [a[a.index("--dport") + 1] for a in inbound if "--dport" in a]
    assert dports == ["16006", "16001", "15020", "16008", "22", "9090"]
    assert inbound[-1][-2:] == ["-j", "MTLS_IN_REDIRECT"]
    no_admin = RuleConfig(admin_port=None, hbone_port=None, exclude_inbound_ports=(15006,))
    assert no_admin.inbound_return_ports() == [15006, 15001]


def test_rules_rejects_unknown_family() -> None:
    with pytest.raises(ValueError, match="family"):
        rules(RuleConfig(), "ipx")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"inbound_capture_port": 0},
        {"outbound_capture_port": 70000},
        {"exclude_inbound_ports": (65536,)},
        {"proxy_uid": -1},
        {"inbound_capture_port": 15001},
    ],
)
def test_rule_config_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RuleConfig(**kwargs)  # type: ignore[arg-type]


def test_from_settings_reads_same_names() -> None:
    settings = SimpleNamespace(
        inbound_capture_port=16006,
        outbound_capture_port=16001,
        proxy_uid=2000,
        exclude_inbound_ports=[22, 9090],
        exclude_outbound_ports=(53, 5432),
        exclude_outbound_cidrs=["10.96.0.0/12", ipaddress.ip_network("fd00:10:96::/112")],
        admin_listen=SimpleNamespace(host="0.0.0.0", port=15020),
        hbone_address=SimpleNamespace(host="", port=16008),
    )
    cfg = RuleConfig.from_settings(settings)
    assert cfg == RuleConfig(
        16006,
        16001,
        2000,
        (22, 9090),
        (53, 5432),
        (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:10:96::/112")),
        15020,
        16008,
    )
    # The env helper and Settings agree on the same inputs: the lead's swap is a one-liner.
    assert cfg.inbound_return_ports() == cfg_exclusions().inbound_return_ports()
    assert RuleConfig.from_settings(SimpleNamespace(**{**vars(settings), "admin_listen": None}))


def test_from_settings_of_the_loaded_settings(tmp_path: Path) -> None:
    """The rules come from the same Settings `run` loads from the same env."""
    files = {}
    for var in ("MTLS_CERT_FILE", "MTLS_KEY_FILE", "MTLS_TRUST_BUNDLE_FILE"):
        (tmp_path / var).touch()
        files[var] = str(tmp_path / var)
    base = {"MTLS_IDENTITY_SOURCE": "files", "MTLS_TRANSPARENT": "true", **files}
    for env in ({}, EXCLUSIONS_ENV):
        settings = load_settings({**base, **env})
        assert RuleConfig.from_settings(settings) == cfg_from_env(env)


def test_config_errors_all_reported_exit_2() -> None:
    env = {
        "MTLS_INBOUND_CAPTURE_PORT": "http",
        "MTLS_PROXY_UID": "root",
        "MTLS_EXCLUDE_OUTBOUND_PORTS": "53,x",
        "MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.0.0.0/33",
        "MTLS_ADMIN_LISTEN": "localhost",
    }
    rc, out, err = run_main(["--print"], env)
    assert rc == 2 and out == ""
    for var in env:
        assert f"config error: {var}:" in err


def test_capture_ports_must_differ() -> None:
    rc, _, err = run_main([], {"MTLS_OUTBOUND_CAPTURE_PORT": "15006"})
    assert rc == 2 and "must differ" in err


def test_cidr_host_bits_are_refused_as_check_does() -> None:
    rc, out, err = run_main(["--print"], {"MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.0.0.1/8"})
    assert (rc, out) == (2, "")
    assert err == (
        "mtls-sidecar iptables: config error: MTLS_EXCLUDE_OUTBOUND_CIDRS: '10.0.0.1/8' has "
        "host bits set; did you mean 10.0.0.0/8? (example: "
        "MTLS_EXCLUDE_OUTBOUND_CIDRS=169.254.169.254/32,10.96.0.0/12)\n"
    )
    cfg = cfg_from_env({"MTLS_EXCLUDE_OUTBOUND_CIDRS": "10.0.0.0/8, 192.0.2.7"})
    assert [str(n) for n in cfg.exclude_outbound_cidrs] == ["10.0.0.0/8", "192.0.2.7/32"]


def test_reads_only_its_variables_but_catches_typos() -> None:
    # Variables the rules do not read are `run`'s business; a typo in any MTLS_* name is not.
    rc, _, err = run_main(["--print"], {"MTLS_WORKERS": "many", "MTLS_INBOUND": "x"})
    assert (rc, err) == (0, "")
    rc, _, err = run_main(["--print"], {"MTLS_EXCLUDE_OUTBOUND_CIDR": "10.0.0.0/8"})
    assert rc == 2
    assert "MTLS_EXCLUDE_OUTBOUND_CIDR: unknown variable; did you mean " in err


def test_admin_port_zero_is_not_excluded() -> None:
    assert cfg_from_env({"MTLS_ADMIN_LISTEN": "127.0.0.1:0"}).admin_port is None


def test_hbone_port_is_never_captured() -> None:
    """Peers dial HBONE (15008 by default in transparent mode) directly: the inbound rules
    return it before the redirect, wherever MTLS_HBONE_LISTEN puts it; 'off' drops it."""
    for env, port in (({}, "15008"), ({"MTLS_HBONE_LISTEN": "0.0.0.0:17008"}, "17008")):
        cfg = cfg_from_env(env)
        inbound = [a for a in rules(cfg, "ipv4") if a[3] == "MTLS_INBOUND"]
        dports = [a[a.index("--dport") + 1] for a in inbound if "--dport" in a]
        assert port in dports
        assert inbound.index(next(a for a in inbound if port in a)) < len(inbound) - 1
        assert f"{port} }} return" in nft_ruleset(cfg)
    off = cfg_from_env({"MTLS_HBONE_LISTEN": "off"})
    assert off.hbone_port is None and 15008 not in off.inbound_return_ports()


# --- apply / clean against a fake iptables ------------------------------------------------


class FakeIptables:
    """Records every command; answers from a table of (argv predicate -> result)."""

    def __init__(self, bin_dir: Path, *, existing_jumps: bool = False, listing: str = "") -> None:
        self.bin_dir = bin_dir
        self.calls: list[tuple[list[str], str | None]] = []
        self.existing_jumps = existing_jumps
        self.listing = listing
        self.fail: dict[str, tuple[int, str]] = {}  # binary basename -> (rc, stderr)

    def __call__(
        self, argv: Sequence[str], stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append((argv, stdin))
        name = os.path.basename(argv[0])
        if name in self.fail:
            rc, err = self.fail[name]
            return subprocess.CompletedProcess(argv, rc, "", err)
        if "-C" in argv:
            return subprocess.CompletedProcess(argv, 0 if self.existing_jumps else 1, "", "")
        if argv[-2:] == ["nat", "-S"]:
            return subprocess.CompletedProcess(argv, 0, self.listing, "")
        return subprocess.CompletedProcess(argv, 0, "", "")

    def commands(self, binary: str) -> list[list[str]]:
        return [a[1:] for a, _ in self.calls if os.path.basename(a[0]) == binary]


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    for name in (
        "iptables-nft",
        "iptables-nft-restore",
        "ip6tables-nft",
        "ip6tables-nft-restore",
        "nft",
    ):
        path = tmp_path / name
        path.write_text("#!/bin/sh\nexit 99\n")
        path.chmod(0o755)
    return tmp_path


def test_apply_is_one_restore_per_family_with_missing_jumps(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin)
    rc, out, err = run_main(["--apply"], {"PATH": str(fake_bin)}, run=fake)
    assert (rc, out, err) == (0, "", "")
    restores = [(a, s) for a, s in fake.calls if a[0].endswith("-restore")]
    assert [os.path.basename(a[0]) for a, _ in restores] == [
        "iptables-nft-restore",
        "ip6tables-nft-restore",
    ]
    assert restores[0][0][1:] == ["-w", "--noflush"]
    assert restores[0][1] == restore_script(RuleConfig(), "ipv4")
    assert restores[1][1] == restore_script(RuleConfig(), "ipv6")
    checks = [c for c in fake.commands("iptables-nft") if "-C" in c]
    tag = ["-m", "comment", "--comment", "mtls-sidecar"]
    assert checks == [
        ["-w", "-t", "nat", "-C", "PREROUTING", "-p", "tcp", *tag, "-j", "MTLS_INBOUND"],
        ["-w", "-t", "nat", "-C", "OUTPUT", "-p", "tcp", *tag, "-j", "MTLS_OUTPUT"],
    ]


def test_apply_again_adds_no_jumps(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin, existing_jumps=True)
    assert run_main(["--apply"], {"PATH": str(fake_bin)}, run=fake)[0] == 0
    scripts = [s for a, s in fake.calls if a[0].endswith("-restore")]
    assert scripts and all(s is not None and "-A PREROUTING" not in s for s in scripts)
    assert all(s is not None and "-A OUTPUT" not in s for s in scripts)
    assert all(s is not None and ":MTLS_OUTPUT - [0:0]" in s for s in scripts)


def test_apply_prefers_nft_backend(fake_bin: Path) -> None:
    for name in ("iptables", "iptables-restore"):
        (fake_bin / name).write_text("#!/bin/sh\nexit 99\n")
        (fake_bin / name).chmod(0o755)
    fake = FakeIptables(fake_bin)
    assert run_main(["--apply", "--family", "ipv4"], {"PATH": str(fake_bin)}, run=fake)[0] == 0
    assert {os.path.basename(a[0]) for a, _ in fake.calls} == {
        "iptables-nft",
        "iptables-nft-restore",
    }


def test_missing_iptables_exit_1(tmp_path: Path) -> None:
    rc, out, err = run_main(["--apply"], {"PATH": str(tmp_path)})
    assert rc == 1 and out == ""
    assert "error: iptables-nft or iptables not found on PATH" in err


def test_not_permitted_exit_1_with_hint(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin)
    fake.fail["iptables-nft"] = (
        4,
        "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: "
        "Permission denied (you must be root)\n",
    )
    rc, _, err = run_main(["--apply"], {"PATH": str(fake_bin)}, run=fake)
    assert rc == 1
    assert "Permission denied (you must be root)" in err and "CAP_NET_ADMIN" in err
    assert not [a for a, _ in fake.calls if a[0].endswith("-restore")]


def test_ipv6_unusable_is_a_warning(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin)
    fake.fail["ip6tables-nft"] = (3, "ip6tables: Table does not exist (do you need to insmod?)")
    rc, _, err = run_main(["--apply"], {"PATH": str(fake_bin)}, run=fake)
    assert rc == 0
    assert "warning: IPv6 skipped" in err and "no NAT support" in err
    assert [os.path.basename(a[0]) for a, _ in fake.calls if a[0].endswith("-restore")] == [
        "iptables-nft-restore"
    ]
    # Asked for IPv6 alone, the same failure is an error.
    assert run_main(["--apply", "--family", "ipv6"], {"PATH": str(fake_bin)}, run=fake)[0] == 1


def test_restore_refused_is_an_error(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin)
    fake.fail["iptables-nft-restore"] = (2, "iptables-restore: line 9 failed")
    rc, _, err = run_main(["--apply"], {"PATH": str(fake_bin)}, run=fake)
    assert rc == 1 and "line 9 failed" in err


LISTING = textwrap.dedent(
    """\
    -P PREROUTING ACCEPT
    -P INPUT ACCEPT
    -P OUTPUT ACCEPT
    -P POSTROUTING ACCEPT
    -N DOCKER
    -N MTLS_INBOUND
    -N MTLS_IN_REDIRECT
    -N MTLS_OUTPUT
    -N MTLS_OUT_REDIRECT
    -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
    -A PREROUTING -p tcp -m comment --comment mtls-sidecar -j MTLS_INBOUND
    -A OUTPUT -p tcp -m comment --comment "not ours" -j DOCKER
    -A OUTPUT -p tcp -m comment --comment mtls-sidecar -j MTLS_OUTPUT
    -A MTLS_INBOUND -p tcp -j MTLS_IN_REDIRECT
    """
)


def test_clean_deletes_only_tagged_jumps_and_own_chains(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin, listing=LISTING)
    rc, _, err = run_main(["--clean", "--family", "ipv4"], {"PATH": str(fake_bin)}, run=fake)
    assert (rc, err) == (0, "")
    changes = [c[3:] for c in fake.commands("iptables-nft") if c[3] in ("-D", "-F", "-X")]
    tag = ["-m", "comment", "--comment", "mtls-sidecar"]
    assert changes == [
        ["-D", "PREROUTING", "-p", "tcp", *tag, "-j", "MTLS_INBOUND"],
        ["-D", "OUTPUT", "-p", "tcp", *tag, "-j", "MTLS_OUTPUT"],
        *(["-F", c] for c in iptables.CHAINS),
        *(["-X", c] for c in iptables.CHAINS),
    ]


def test_clean_on_clean_table_changes_nothing(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin, listing="-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n")
    assert run_main(["--clean"], {"PATH": str(fake_bin)}, run=fake)[0] == 0
    assert not [a for a, _ in fake.calls if {"-D", "-F", "-X"} & set(a)]


def test_nft_apply_and_clean_are_one_transaction(fake_bin: Path) -> None:
    fake = FakeIptables(fake_bin)
    assert run_main(["--apply", "--nft"], {"PATH": str(fake_bin)}, run=fake)[0] == 0
    assert run_main(["--clean", "--nft"], {"PATH": str(fake_bin)}, run=fake)[0] == 0
    (apply_argv, apply_in), (clean_argv, clean_in) = fake.calls
    assert apply_argv[1:] == clean_argv[1:] == ["-f", "-"]
    reset = "add table inet mtls_sidecar\ndelete table inet mtls_sidecar\n"
    assert apply_in == reset + nft_ruleset(RuleConfig())
    assert clean_in == reset


def test_nft_missing_exit_1(tmp_path: Path) -> None:
    rc, _, err = run_main(["--apply", "--nft"], {"PATH": str(tmp_path)})
    assert rc == 1 and "nft not found" in err


# --- real rules in a network namespace --------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why the real netfilter tests cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in ("ip", "iptables", "iptables-save", "ip6tables", "ip6tables-save", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace (lo up), removed afterwards whatever happens."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"NETNS TEST SKIPPED (real netfilter not tested): {reason}")
    name = f"mtlstest-ipt-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"NETNS TEST SKIPPED: ip netns add failed: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,
    )


def main_in_ns(ns: str, argv: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    code = (
        "import os, sys; from proxy.iptables import main; sys.exit(main(sys.argv[1:], os.environ))"
    )
    full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
    proc = in_ns(ns, "env", "-i", *(f"{k}={v}" for k, v in full_env.items()),
                 sys.executable, "-c", code, *argv)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def nat_table(ns: str, save: str) -> str:
    """iptables-save of the nat table without the timestamp comments."""
    proc = in_ns(ns, save, "-t", "nat")
    assert proc.returncode == 0, proc.stderr
    return "".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith("#"))


def own_lines(saved: str) -> list[str]:
    return [ln for ln in saved.splitlines() if "MTLS_" in ln]


@pytest.mark.netns
@pytest.mark.parametrize("env", [{}, EXCLUSIONS_ENV], ids=["default", "exclusions"])
def test_apply_idempotent_and_clean_in_netns(netns: str, env: dict[str, str]) -> None:
    saves = {"ipv4": "iptables-save", "ipv6": "ip6tables-save"}
    # Somebody else's rules in the same table must survive apply and clean untouched.
    for tool in ("iptables", "ip6tables"):
        pre = in_ns(netns, tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
        assert pre.returncode == 0, pre.stderr
    before = {f: nat_table(netns, s) for f, s in saves.items()}

    rc, output = main_in_ns(netns, ["--apply"], env)
    assert rc == 0, output
    applied = {f: nat_table(netns, s) for f, s in saves.items()}
    cfg = cfg_from_env(env)
    for family in ("ipv4", "ipv6"):
        # What is in the kernel is exactly what --print shows (same spelling, same order).
        printed = own_lines(restore_script(cfg, family))
        assert own_lines(applied[family]) == printed
        assert "-A OUTPUT -p udp -j RETURN" in applied[family]

    rc, output = main_in_ns(netns, ["--apply"], env)
    assert rc == 0, output
    assert {f: nat_table(netns, s) for f, s in saves.items()} == applied

    for _ in range(2):  # clean twice: the second run finds nothing and is still fine
        rc, output = main_in_ns(netns, ["--clean"], env)
        assert rc == 0, output
        assert {f: nat_table(netns, s) for f, s in saves.items()} == before


@pytest.mark.netns
def test_legacy_backend_in_netns(netns: str) -> None:
    if shutil.which("iptables-legacy") is None or shutil.which("iptables-legacy-save") is None:
        pytest.skip("iptables-legacy is not installed")
    before = nat_table(netns, "iptables-legacy-save")
    for _ in range(2):
        rc, output = main_in_ns(netns, ["--apply", "--backend", "legacy"], EXCLUSIONS_ENV)
        assert rc == 0, output
        saved = nat_table(netns, "iptables-legacy-save")
        assert own_lines(saved) == own_lines(restore_script(cfg_exclusions(), "ipv4"))
    assert not own_lines(nat_table(netns, "iptables-nft-save"))
    for _ in range(2):
        rc, output = main_in_ns(netns, ["--clean", "--backend", "legacy"], EXCLUSIONS_ENV)
        assert rc == 0, output
        assert nat_table(netns, "iptables-legacy-save") == before


@pytest.mark.netns
def test_apply_after_config_change_replaces_rules(netns: str) -> None:
    assert main_in_ns(netns, ["--apply"], {})[0] == 0
    assert main_in_ns(netns, ["--apply"], EXCLUSIONS_ENV)[0] == 0
    saved = nat_table(netns, "iptables-save")
    assert own_lines(saved) == own_lines(restore_script(cfg_exclusions(), "ipv4"))


@pytest.mark.netns
def test_nft_apply_and_clean_in_netns(netns: str) -> None:
    for _ in range(2):
        rc, output = main_in_ns(netns, ["--apply", "--nft"], EXCLUSIONS_ENV)
        assert rc == 0, output
    listed = in_ns(netns, "nft", "list", "table", "inet", "mtls_sidecar")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("redirect to :16001") == 1
    assert "meta skuid 2000 return" in listed.stdout
    for _ in range(2):
        rc, output = main_in_ns(netns, ["--clean", "--nft"], EXCLUSIONS_ENV)
        assert rc == 0, output
    assert in_ns(netns, "nft", "list", "table", "inet", "mtls_sidecar").returncode != 0
