"""The proof of transparent mode (issue 4), on the wire.

Three "hosts" as network namespaces on a bridge (its own namespace, the "wire"):
    A 10.77.0.1  meshed client: sidecar + `mtls-sidecar iptables --apply`
    B 10.77.0.2  meshed server: sidecar + rules, echo app on :8080
    C 10.77.0.3  unmeshed: echo app on :9090 and a plain client
The apps are plain sockets dialling each other by IP and port. tcpdump on the bridge port
of the destination records what crossed; the test parses the pcap itself and compares it with
what the sidecars' counters claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import TD, Pki
from .harness import wait_for
from .netns import (
    SKIP_PREFIX,
    Capture,
    Lab,
    NsSidecar,
    as_uid,
    read_pcap,
    tcp_streams,
    tls_records,
    unavailable,
)
from .pki import write_identity

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

PROXY_UID = 1337
APP_B = 8080
APP_C = 9090
MARKER = b"MARKER-5f3a" + secrets.token_hex(8).encode()
# Large enough to span several TLS records and TCP segments.
PAYLOAD = MARKER + b"|" + secrets.token_bytes(40_000) + b"|" + MARKER


class Mesh:
    """The lab plus whatever sidecars currently run in it, restarted on demand with new env."""

    def __init__(self, lab: Lab, workdir: Path, idents: dict[str, dict[str, str]]) -> None:
        self.lab = lab
        self.workdir = workdir
        self.idents = idents
        self.sidecars: dict[str, NsSidecar] = {}
        self.modes: dict[str, dict[str, str]] = {}
        self.starts = 0
        self.prefix = as_uid(PROXY_UID)

    def env(self, host: str, **extra: str) -> dict[str, str]:
        return {
            "MTLS_TRANSPARENT": "true",
            "MTLS_PROXY_UID": str(PROXY_UID),
            "MTLS_HANDSHAKE_TIMEOUT": "5s",
            "MTLS_CONNECT_TIMEOUT": "3s",
            **self.idents[host],
            **extra,
        }

    def sidecar(self, host: str, **modes: str) -> NsSidecar:
        """The sidecar on `host` running with `modes` (MTLS_* overrides), restarted if needed."""
        current = self.sidecars.get(host)
        if current is not None and self.modes.get(host) == modes and current.proc.poll() is None:
            return current
        if current is not None:
            assert current.stop() == 0, f"sidecar on {host} did not stop cleanly:\n{current.logs()}"
        self.starts += 1
        log = self.workdir / f"sidecar-{host}-{self.starts}.log"
        sc = NsSidecar(self.lab, self.lab[host], self.env(host, **modes), log, self.prefix)
        sc.wait_ready()
        self.sidecars[host] = sc
        self.modes[host] = modes
        return sc

    def dial(self, src: str, dst_ip: str, port: int, payload: bytes = PAYLOAD) -> dict[str, Any]:
        """Run the client app on `src`: what it sent and what it got back."""
        proc = self.lab.run(
            src,
            [sys.executable, "-m", "tests.netns", "dial", dst_ip, str(port), payload.hex()],
            timeout=40,
        )
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        result["reply"] = bytes.fromhex(result["reply"])
        return result

    def capture(self, host: str, name: str) -> Capture:
        return Capture(self.lab, self.lab[host].port, self.workdir / f"{name}.pcap")

    def app_log(self, host: str) -> list[dict[str, Any]]:
        path = self.workdir / f"app-{host}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def report(self) -> str:
        """Everything a human needs when an assertion fails: the sidecars' logs, the apps'."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")) + sorted(self.workdir.glob("*.jsonl")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-6000:]}")
        return "\n".join(parts)


def iptables_cli(
    lab: Lab, host: str, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`mtls-sidecar iptables ARGS` run on `host`, as an init container would."""
    return lab.run(host, [sys.executable, "-m", "proxy", "iptables", *args], env)


def own_rules(lab: Lab, host: str, save: str) -> list[str]:
    """The -A lines of the nat table that mention our chains, as iptables-save prints them."""
    proc = lab.run(host, [save, "-t", "nat"])
    assert proc.returncode == 0, proc.stderr
    return [ln for ln in proc.stdout.splitlines() if ln.startswith("-A") and "MTLS_" in ln]


def leftover_rules(lab: Lab, host: str, flags: list[str]) -> list[str]:
    """Rules of ours still in `host`'s nat tables (iptables and ip6tables, or the nft table)."""
    if "--nft" in flags:
        proc = lab.run(host, ["nft", "list", "table", "inet", "mtls_sidecar"])
        return [f"{host}: table inet mtls_sidecar"] if proc.returncode == 0 else []
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        out += [f"{host}: {rule}" for rule in own_rules(lab, host, save)]
    return out


@contextlib.contextmanager
def build_mesh(
    pki: Pki, workdir: Path, hosts: list[str], flags: list[str] | None = None
) -> Iterator[Mesh]:
    """The lab with rules applied on A and B (`iptables --apply [flags]`) and the apps running.

    Everything is removed afterwards, and checked to be: `--clean` left no rule of ours and
    no namespace is left.
    """
    flags = flags or []
    reason = unavailable()
    if reason:
        pytest.skip(f"{SKIP_PREFIX} (transparent-mode proof not run): {reason}")
    # The sidecars run as PROXY_UID and their file watchers re-read the certificates: they
    # must be readable by that uid, so they live in a directory of their own (pytest's tmp
    # dirs are 0700 root).
    certdir = Path(tempfile.mkdtemp(prefix="mtls-proof-pki-"))
    certdir.chmod(0o755)
    idents: dict[str, dict[str, str]] = {}
    for host, sa in (("a", "client"), ("b", "server")):
        ident = write_identity(certdir, host, pki.inter, [pki.root.cert], f"{TD}/ns/proof/sa/{sa}")
        os.chown(ident.key, PROXY_UID, PROXY_UID)
        idents[host] = {
            "MTLS_IDENTITY_SOURCE": "files",
            "MTLS_CERT_FILE": str(ident.cert),
            "MTLS_KEY_FILE": str(ident.key),
            "MTLS_TRUST_BUNDLE_FILE": str(ident.bundle),
        }
    try:
        lab = Lab(hosts)
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(certdir, ignore_errors=True)
        pytest.skip(f"{SKIP_PREFIX}: cannot build the namespaces: {exc}")
    m = Mesh(lab, workdir, idents)
    left: list[str] = []
    try:
        for host in ("a", "b"):
            proc = iptables_cli(lab, host, ["--apply", *flags], m.env(host))
            assert proc.returncode == 0, f"iptables --apply on {host}: {proc.stderr}"
        for host, port in (("b", APP_B), ("c", APP_C)):
            if host not in hosts:
                continue
            log = open(workdir / f"app-{host}.out", "ab")  # noqa: SIM115 - closed with the lab
            app_log = str(workdir / f"app-{host}.jsonl")
            argv = [sys.executable, "-m", "tests.netns", "serve", "--port", str(port),
                    "--log", app_log, "--marker", MARKER.decode()]  # fmt: skip
            lab.popen(host, argv, log)
        yield m
    finally:
        for sc in m.sidecars.values():
            sc.stop()
        # --clean must leave nothing of ours (deleting the namespaces would hide it).
        for host in ("a", "b"):
            if iptables_cli(lab, host, ["--clean", *flags], m.env(host)).returncode != 0:
                left.append(f"iptables --clean failed on {host}")
            left += leftover_rules(lab, host, flags)
        lab.close()
        shutil.rmtree(certdir, ignore_errors=True)
    left += [f"namespace {ns}" for ns in lab.leftovers()]
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # Logs and captures stay in pytest's tmp dir for a look after a failure.
    with build_mesh(pki, tmp_path_factory.mktemp("proof"), ["a", "b", "c"]) as m:
        yield m


@pytest.fixture
def show_logs(mesh: Mesh) -> Iterator[None]:
    """Print every log of the lab after the test: pytest shows it only when the test failed."""
    yield
    print(mesh.report())


Flow = tuple[str, int, str, int]


def streams_between(pcap: bytes, src: str, dst: str) -> dict[Flow, bytes]:
    """The reassembled bytes `src` sent to `dst`, per connection, from a capture."""
    out = {}
    for flow, st in tcp_streams(read_pcap(pcap)).items():
        if flow[0] == src and flow[2] == dst:
            assert st.gaps == 0, f"the capture lost segments of {flow}"
            out[flow] = bytes(st.data)
    return out


def tls_only(pcap: bytes, a: str, b: str) -> dict[Flow, list[tuple[int, int]]]:
    """Assert every byte between hosts `a` and `b` in the capture is a TLS record; return them."""
    streams = {**streams_between(pcap, a, b), **streams_between(pcap, b, a)}
    assert streams, f"no TCP payload between {a} and {b} in the capture"
    out = {}
    for flow, data in streams.items():
        try:
            out[flow] = tls_records(data)
        except ValueError as exc:
            raise AssertionError(f"{flow} is not TLS-only: {exc}") from None
    return out


def delta(before: float, sc: NsSidecar, name: str, want: float, **labels: str) -> float:
    """How much `name` grew since `before`, once it reached `before + want` (or 5 s passed)."""
    return sc.wait_metric(name, before + want, **labels) - before


# --- the proof ----------------------------------------------------------------------------


def test_rules_applied_by_the_cli(mesh: Mesh) -> None:
    """`mtls-sidecar iptables --apply` installed exactly what `--print` shows (IPv4 and IPv6)."""
    printed = iptables_cli(mesh.lab, "a", ["--print"], mesh.env("a")).stdout
    v4_text, _, v6_text = printed.partition("# mtls-sidecar ipv6")
    for save, text in (("iptables-save", v4_text), ("ip6tables-save", v6_text)):
        expected = [ln for ln in text.splitlines() if ln.startswith("-A")]
        assert sorted(own_rules(mesh.lab, "a", save)) == sorted(expected)
    assert f"-A MTLS_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN" in printed


def test_meshed_to_meshed_is_mtls_on_the_wire(mesh: Mesh, show_logs: None) -> None:
    a, b = mesh.sidecar("a"), mesh.sidecar("b")
    ip_a, ip_b = mesh.lab["a"].v4, mesh.lab["b"].v4
    # The sidecar really runs as the exempt uid (else its own dials would be captured).
    status = Path(f"/proc/{a.proc.pid}/status").read_text()
    assert f"Uid:\t{PROXY_UID}\t" in status
    out_before = a.metric("mtls_connections_total", direction="outbound", security="mtls")
    in_before = b.metric("mtls_connections_total", direction="inbound", security="mtls")
    bytes_before = b.metric("mtls_bytes_total", direction="inbound", security="mtls", flow="in")
    plain_before = b.metric("mtls_connections_total", security="plaintext")
    cap = mesh.capture("b", "a-to-b")
    result = mesh.dial("a", ip_b, APP_B)
    pcap = cap.stop()

    assert result["error"] is None and result["reply"] == PAYLOAD, result["error"]
    # The app on B got A's plain bytes, from its own sidecar over loopback.
    last = mesh.app_log("b")[-1]
    assert last["peer"] in ("127.0.0.1", "::ffff:127.0.0.1") and last["received"] == len(PAYLOAD)
    # The wire: no marker anywhere in the capture, and every byte each way a TLS record.
    assert MARKER not in pcap
    records = tls_only(pcap, ip_a, ip_b)
    assert len(records) == 2, records  # one connection, both directions
    for flow, recs in records.items():
        assert 23 in {t for t, _ in recs}, f"{flow}: no application data records"
    from_a = next(r for f, r in records.items() if f[0] == ip_a)
    assert from_a[0][0] == 22  # it starts with the ClientHello
    # All of the payload (plus record overhead) crossed A -> B as TLS application data.
    assert sum(n for t, n in from_a if t == 23) > len(PAYLOAD)
    # The counters agree.
    assert delta(out_before, a, "mtls_connections_total", 1, direction="outbound",
                 security="mtls") == 1  # fmt: skip
    assert delta(in_before, b, "mtls_connections_total", 1, direction="inbound",
                 security="mtls") == 1  # fmt: skip
    assert delta(bytes_before, b, "mtls_bytes_total", len(PAYLOAD), direction="inbound",
                 security="mtls", flow="in") == len(PAYLOAD)  # fmt: skip
    assert b.metric("mtls_connections_total", security="plaintext") == plain_before
    assert b.metric("mtls_peer_connections_total", direction="inbound",
                    peer_identity=f"{TD}/ns/proof/sa/client") >= 1  # fmt: skip
    closed = [e for e in a.log_events() if e.get("event") == "conn_closed"][-1]
    assert closed["target"] == f"{ip_b}:{APP_B}" and closed["security"] == "mtls"
    assert closed["peer_identity"] == f"{TD}/ns/proof/sa/server"


def test_meshed_to_meshed_over_ipv6(mesh: Mesh, show_logs: None) -> None:
    mesh.sidecar("a")
    b = mesh.sidecar("b")
    ip_a, ip_b = mesh.lab["a"].v6, mesh.lab["b"].v6
    before = b.metric("mtls_connections_total", direction="inbound", security="mtls")
    cap = mesh.capture("b", "a-to-b-v6")
    result = mesh.dial("a", ip_b, APP_B)
    pcap = cap.stop()
    assert result["error"] is None and result["reply"] == PAYLOAD
    assert MARKER not in pcap
    assert len(tls_only(pcap, ip_a, ip_b)) == 2
    assert delta(before, b, "mtls_connections_total", 1, direction="inbound",
                 security="mtls") == 1  # fmt: skip


def test_unmeshed_to_strict_is_refused(mesh: Mesh, show_logs: None) -> None:
    b = mesh.sidecar("b")
    ip_c = mesh.lab["c"].v4
    served = len(mesh.app_log("b"))
    before = b.metric("mtls_connections_rejected_total", direction="inbound", reason="not_tls")
    plain_before = b.metric("mtls_connections_total", security="plaintext")
    result = mesh.dial("c", mesh.lab["b"].v4, APP_B)
    # Refused: the client gets nothing back (a close or a reset), the app never sees it.
    assert result["connected"] and result["reply"] == b"", result
    assert delta(before, b, "mtls_connections_rejected_total", 1, direction="inbound",
                 reason="not_tls") == 1  # fmt: skip
    assert b.metric("mtls_connections_total", security="plaintext") == plain_before
    assert len(mesh.app_log("b")) == served
    rejected = [e for e in b.log_events() if e.get("event") == "rejected"]
    assert rejected[-1]["reason"] == "not_tls"
    assert rejected[-1]["peer"].startswith(ip_c + ":")


@pytest.mark.parametrize("mode", ["permissive", "audit"])
def test_unmeshed_to_permissive_or_audit_counts_plaintext(
    mesh: Mesh, show_logs: None, mode: str
) -> None:
    b = mesh.sidecar("b", MTLS_INBOUND_MODE=mode)
    ip_b, ip_c = mesh.lab["b"].v4, mesh.lab["c"].v4
    labels = {"direction": "inbound", "security": "plaintext"}
    conns = b.metric("mtls_connections_total", **labels)
    bin_ = b.metric("mtls_bytes_total", flow="in", **labels)
    bout = b.metric("mtls_bytes_total", flow="out", **labels)
    cap = mesh.capture("b", f"c-to-b-{mode}")
    result = mesh.dial("c", ip_b, APP_B)
    pcap = cap.stop()

    assert result["error"] is None and result["reply"] == PAYLOAD
    # The counter tells the truth: the payload did cross in the clear, both ways...
    assert MARKER in pcap
    sent = streams_between(pcap, ip_c, ip_b)
    back = streams_between(pcap, ip_b, ip_c)
    assert list(sent.values()) == [PAYLOAD] and list(back.values()) == [PAYLOAD]
    # ...and exactly those bytes are counted as plaintext, each way.
    assert delta(conns, b, "mtls_connections_total", 1, **labels) == 1
    assert delta(bin_, b, "mtls_bytes_total", len(PAYLOAD), flow="in", **labels) == len(PAYLOAD)
    assert delta(bout, b, "mtls_bytes_total", len(PAYLOAD), flow="out", **labels) == len(PAYLOAD)
    events = b.log_events()
    audit = [e for e in events if e.get("event") == "audit_plaintext"]
    if mode == "audit":
        assert audit, "audit mode logged no 'would be rejected' line"
        assert "would be rejected" in audit[-1]["msg"]
        assert audit[-1]["peer"].startswith(ip_c + ":")
    else:
        assert not audit
    closed = [e for e in events if e.get("event") == "conn_closed"][-1]
    assert closed["security"] == "plaintext" and closed["bytes_in"] == len(PAYLOAD)
    # A meshed client still gets mTLS from the same permissive/audit sidecar.
    mesh.sidecar("a")
    mtls = b.metric("mtls_connections_total", direction="inbound", security="mtls")
    assert mesh.dial("a", ip_b, APP_B)["reply"] == PAYLOAD
    assert delta(mtls, b, "mtls_connections_total", 1, direction="inbound", security="mtls") == 1


def test_meshed_to_unmeshed_strict_fails_closed(mesh: Mesh, show_logs: None) -> None:
    a = mesh.sidecar("a", MTLS_OUTBOUND_MODE="strict")
    ip_a, ip_c = mesh.lab["a"].v4, mesh.lab["c"].v4
    served = len(mesh.app_log("c"))
    rejected = a.metric("mtls_connections_rejected_total", direction="outbound", reason="not_tls")
    plain = a.metric("mtls_connections_total", direction="outbound", security="plaintext")
    cap = mesh.capture("c", "a-to-c-strict")
    result = mesh.dial("a", ip_c, APP_C)
    pcap = cap.stop()

    # The app sees a close and nothing else; not one of its bytes left host A.
    assert result["connected"] and result["reply"] == b"", result
    assert MARKER not in pcap
    sent = streams_between(pcap, ip_a, ip_c)
    assert len(sent) == 1
    for data in sent.values():
        assert tls_records(data)[0][0] == 22  # the sidecar's ClientHello, no app byte
    new = mesh.app_log("c")[served:]
    assert len(new) == 1 and not new[0]["marker"] and new[0]["head"].startswith("1603")
    assert delta(rejected, a, "mtls_connections_rejected_total", 1, direction="outbound",
                 reason="not_tls") == 1  # fmt: skip
    assert a.metric("mtls_connections_total", direction="outbound", security="plaintext") == plain
    event = [e for e in a.log_events() if e.get("event") == "rejected"][-1]
    assert event["direction"] == "outbound" and event["reason"] == "not_tls"


def test_meshed_to_unmeshed_permissive_falls_back_and_counts(mesh: Mesh, show_logs: None) -> None:
    a = mesh.sidecar("a", MTLS_OUTBOUND_MODE="permissive")
    ip_a, ip_c = mesh.lab["a"].v4, mesh.lab["c"].v4
    served = len(mesh.app_log("c"))
    labels = {"direction": "outbound", "security": "plaintext"}
    conns = a.metric("mtls_connections_total", **labels)
    bout = a.metric("mtls_bytes_total", flow="out", **labels)
    bin_ = a.metric("mtls_bytes_total", flow="in", **labels)
    mtls = a.metric("mtls_connections_total", direction="outbound", security="mtls")
    cap = mesh.capture("c", "a-to-c-permissive")
    first = mesh.dial("a", ip_c, APP_C)
    second = mesh.dial("a", ip_c, APP_C)  # remembered: straight to plaintext
    pcap = cap.stop()

    assert first["error"] is None and first["reply"] == PAYLOAD, first
    assert second["error"] is None and second["reply"] == PAYLOAD, second
    # On the wire: one TLS probe (a ClientHello, no app byte), then the payload in the clear,
    # twice; and the counters say exactly that.
    sent = sorted(streams_between(pcap, ip_a, ip_c).values(), key=len)
    assert len(sent) == 3 and sent[1:] == [PAYLOAD, PAYLOAD]
    assert MARKER not in sent[0] and tls_records(sent[0])[0][0] == 22
    assert delta(conns, a, "mtls_connections_total", 2, **labels) == 2
    assert delta(bout, a, "mtls_bytes_total", 2 * len(PAYLOAD), flow="out",
                 **labels) == 2 * len(PAYLOAD)  # fmt: skip
    assert delta(bin_, a, "mtls_bytes_total", 2 * len(PAYLOAD), flow="in",
                 **labels) == 2 * len(PAYLOAD)  # fmt: skip
    assert a.metric("mtls_connections_total", direction="outbound", security="mtls") == mtls
    fallbacks = [e for e in a.log_events() if e.get("event") == "plaintext_fallback"]
    assert len(fallbacks) == 1, "the second connection should not have probed TLS again"
    assert fallbacks[0]["target"] == f"{ip_c}:{APP_C}"
    # The unmeshed app saw the probe and the payload twice (logged as each one ends).
    new = mesh.app_log("c")[served:]
    assert sorted(c["marker"] for c in new) == [False, True, True], new
    # Meshed destinations are still reached over mTLS from a permissive sidecar.
    mesh.sidecar("b")
    assert mesh.dial("a", mesh.lab["b"].v4, APP_B)["reply"] == PAYLOAD
    assert delta(mtls, a, "mtls_connections_total", 1, direction="outbound", security="mtls") == 1


def test_loop_to_own_capture_port_is_refused(mesh: Mesh, show_logs: None) -> None:
    """An app dialling its sidecar's capture port must not make the sidecar dial itself."""
    a = mesh.sidecar("a")
    before = a.metric("mtls_connections_rejected_total", reason="loop_detected")
    result = mesh.dial("a", mesh.lab["a"].v4, 15001)
    assert result["reply"] == b""
    assert delta(before, a, "mtls_connections_rejected_total", 1, reason="loop_detected") == 1
    assert a.proc.poll() is None


def test_pooled_streams_go_to_local_addresses_only(mesh: Mesh, show_logs: None) -> None:
    """A client of our own on C speaks the reuse wire format to B's app port (redirected to
    B's sidecar): a stream to B's address is served; one naming C's address, or B's admin
    port, is refused and counted (never an open relay)."""
    b = mesh.sidecar("b")
    before = {
        r: b.metric("mtls_connections_rejected_total", reason=r)
        for r in ("bad_destination", "loop_detected")
    }
    ident = mesh.idents["a"]
    argv = [sys.executable, "-m", "tests.netns", "mux-probe", mesh.lab["b"].v4, str(APP_B),
            ident["MTLS_CERT_FILE"], ident["MTLS_KEY_FILE"], ident["MTLS_TRUST_BUNDLE_FILE"],
            mesh.lab["c"].v4]  # fmt: skip
    proc = mesh.lab.run("c", argv, timeout=40)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {
        "alpn": "mtls-sidecar/1",
        "accept": True,
        "echo": "hello over a stream",
        "other_host": "05",  # RESET bad_destination
        "own_port": "05",
    }
    for reason in ("bad_destination", "loop_detected"):
        assert delta(before[reason], b, "mtls_connections_rejected_total", 1, reason=reason) == 1
    served = [e for e in b.log_events() if e.get("event") == "conn_closed" and e.get("pooled")]
    assert served and served[-1]["target"] == f"127.0.0.1:{APP_B}"


def test_pooled_streams_do_not_reach_excluded_inbound_ports(mesh: Mesh, show_logs: None) -> None:
    """A port in MTLS_EXCLUDE_INBOUND_PORTS is not captured: raw TCP to it from outside never
    reaches a service bound to loopback there, and neither may a stream naming 127.0.0.1 at
    that port (refused as `bad_destination`, counted)."""
    excluded = 7799
    b = mesh.sidecar("b", MTLS_EXCLUDE_INBOUND_PORTS=str(excluded))
    before = b.metric("mtls_connections_rejected_total", reason="bad_destination")
    ident = mesh.idents["a"]
    argv = [sys.executable, "-m", "tests.netns", "mux-probe", mesh.lab["b"].v4, str(APP_B),
            ident["MTLS_CERT_FILE"], ident["MTLS_KEY_FILE"], ident["MTLS_TRUST_BUNDLE_FILE"],
            mesh.lab["c"].v4, "--excluded", str(excluded)]  # fmt: skip
    proc = mesh.lab.run("c", argv, timeout=40)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["excluded"] == "05", got  # RESET bad_destination, not dialled
    name = "mtls_connections_rejected_total"
    # other host and excluded port (their lines share the one-a-second rate limit per reason)
    assert delta(before, b, name, 2, reason="bad_destination") == 2


def test_a_pooled_connection_to_a_silent_peer_is_let_go_within_seconds(
    mesh: Mesh, show_logs: None
) -> None:
    """B's packets stop arriving (dropped on B): the idle pooled connection from A is found
    dead within seconds, not after the kernel's 15 minutes. Two guards race for it, both
    set to 20 s: TCP keepalive with TCP_USER_TIMEOUT (retired as `broken`) and, on
    mtls-sidecar/2, unanswered PINGs (retired as `unresponsive`); either one is right."""
    a = mesh.sidecar("a", MTLS_WORKERS="1")
    mesh.sidecar("b")
    assert mesh.dial("a", mesh.lab["b"].v4, APP_B)["reply"] == PAYLOAD
    open_ = {"direction": "outbound", "state": "open"}
    assert a.wait_metric("mtls_pool_connections", 1, **open_) == 1
    reasons = ("broken", "unresponsive")

    def retired() -> float:
        return sum(a.metric("mtls_pool_retired_total", reason=r) for r in reasons)

    before = retired()
    rule = ["INPUT", "-s", mesh.lab["a"].v4, "-p", "tcp", "-j", "DROP"]
    assert mesh.lab.run("b", ["iptables", "-w", "-I", *rule]).returncode == 0
    try:
        t0 = time.monotonic()
        gone = wait_for(lambda: a.metric("mtls_pool_connections", **open_) == 0, timeout=45)
        assert gone, f"still open after {time.monotonic() - t0:.0f}s"
        assert time.monotonic() - t0 < 35  # 10 s idle + keepalive probes to 20 s, + margin
        assert wait_for(lambda: retired() == before + 1, timeout=5), retired() - before
    finally:
        mesh.lab.run("b", ["iptables", "-w", "-D", *rule])


def test_hbone_between_hosts_goes_to_port_15008_and_is_tls_only(
    mesh: Mesh, show_logs: None
) -> None:
    """A dials HBONE for B's app port (MTLS_HBONE_OUTBOUND=8080): the captured connection
    goes to B's port 15008 (which B's rules leave alone), as a CONNECT for B's address and
    the app's port; B's sidecar hands it to its app on loopback. Only TLS on the wire."""
    a = mesh.sidecar("a", MTLS_HBONE_OUTBOUND=str(APP_B))
    b = mesh.sidecar("b")
    ip_a, ip_b = mesh.lab["a"].v4, mesh.lab["b"].v4
    cap = mesh.capture("b", "a-to-b-hbone")
    result = mesh.dial("a", ip_b, APP_B)
    pcap = cap.stop()
    assert result["error"] is None and result["reply"] == PAYLOAD, result["error"]
    assert MARKER not in pcap
    records = tls_only(pcap, ip_a, ip_b)
    assert {f[3] for f in records if f[0] == ip_a} == {15008}  # the HBONE port, not 8080
    served = [e for e in b.log_events() if e.get("event") == "conn_closed" and e.get("pooled")]
    assert served and served[-1]["target"] == f"127.0.0.1:{APP_B}"
    assert served[-1]["bytes_in"] == len(PAYLOAD) and served[-1]["route"] == "15006"
    dialled = [e for e in a.log_events() if e.get("event") == "conn_closed"][-1]
    assert dialled["pooled"] and dialled["target"] == f"{ip_b}:{APP_B}"
    assert a.metric("mtls_pool_streams_total", direction="outbound") >= 1


def test_nft_backend_meshed_to_meshed(pki: Pki, tmp_path: Path) -> None:
    """The same interception with `iptables --apply --nft` (one inet table, IPv4 and IPv6)."""
    with build_mesh(pki, tmp_path, ["a", "b"], ["--nft"]) as m:
        try:
            m.sidecar("a")
            b = m.sidecar("b")
            before = b.metric("mtls_connections_total", direction="inbound", security="mtls")
            for ip_a, ip_b in ((m.lab["a"].v4, m.lab["b"].v4), (m.lab["a"].v6, m.lab["b"].v6)):
                cap = m.capture("b", f"nft-{ip_b}")
                result = m.dial("a", ip_b, APP_B)
                pcap = cap.stop()
                assert result["error"] is None and result["reply"] == PAYLOAD
                assert MARKER not in pcap
                assert len(tls_only(pcap, ip_a, ip_b)) == 2
            assert delta(before, b, "mtls_connections_total", 2, direction="inbound",
                         security="mtls") == 2  # fmt: skip
        finally:
            print(m.report())
