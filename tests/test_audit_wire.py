"""The wire auditor against real traffic (issue 26), in network namespaces.

The lab of the transparent-mode proof (tests/test_transparent_proof.py): hosts as namespaces
on a bridge that lives in a "wire" namespace of its own, which plays the node.
    A 10.77.0.1  meshed client: sidecar in transparent mode
    B 10.77.0.2  meshed server: sidecar in transparent mode, echo app on :8080, and an echo
                 app on :9091, a port excluded from interception (MTLS_EXCLUDE_INBOUND_PORTS)
    C 10.77.0.3  no sidecar: plain clients, `openssl s_client`
The auditor runs in the wire namespace (the bridge calls netfilter, as Kubernetes nodes do with
br_netfilter) with a workload map of the three pods. Each test makes one kind of connection and
reads what the auditor made of it from its /connections and /metrics, waiting on that state.
"""

from __future__ import annotations

import json
import secrets
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Pki
from .harness import parse_metrics, sum_samples
from .netns import Lab
from .promserver import PROMETHEUS
from .test_transparent_proof import APP_B, Mesh, build_mesh, iptables_cli

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

EXCLUDED = 9091
AUDIT_PORT = 9100
BIG = 1_000_000
WORKLOADS = """\
workloads:
  - {ip: 10.77.0.1, namespace: proof, pod: a-5d8f, service_account: client}
  - {ip: 10.77.0.2, namespace: proof, pod: b-7c2e, service_account: server}
  - {ip: 10.77.0.3, namespace: legacy, pod: c-0001, service_account: default}
"""


class Auditor:
    """`mtls-sidecar audit` in the lab's wire namespace; its admin port read with curl there."""

    def __init__(self, lab: Lab, workdir: Path, extra: list[str] | None = None) -> None:
        self.lab = lab
        self.log_path = workdir / "auditor.log"
        wl = workdir / "workloads.yaml"
        wl.write_text(WORKLOADS)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "proxy", "audit", "--listen", f"127.0.0.1:{AUDIT_PORT}",
                "--workloads", str(wl), "--poll", "200ms", "--ignore-ports", "15000",
                *(extra or [])]  # fmt: skip
        self.proc = lab.popen(lab.bridge_ns, argv, self._log)
        deadline = time.monotonic() + 20
        while self.curl("/ready")[0] != 200:
            assert self.proc.poll() is None, f"auditor exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"auditor not ready:\n{self.logs()}"
            time.sleep(0.1)

    def curl(self, path: str) -> tuple[int, str]:
        proc = self.lab.run(
            self.lab.bridge_ns,
            [
                "curl",
                "-s",
                "-m",
                "5",
                "-w",
                "\n%{http_code}",
                f"http://127.0.0.1:{AUDIT_PORT}{path}",
            ],
        )
        body, _, code = proc.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def connections(self) -> list[dict[str, Any]]:
        code, body = self.curl("/connections")
        assert code == 200, body
        return list(json.loads(body))

    def metric(self, name: str, **labels: str) -> float:
        code, body = self.curl("/metrics")
        assert code == 200, body
        return sum_samples(parse_metrics(body), name, labels)

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], after: int, timeout: float = 20.0
    ) -> dict[str, Any]:
        """The first connection classified after the first `after` that `match`es."""
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.connections()[after:] if match(c)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no such connection: {self.connections()}"
            time.sleep(0.2)

    def wait_bytes(self, key: list[Any], at_least: int, timeout: float = 20.0) -> int:
        """The bytes counted for connection `key`, once at least `at_least` (or time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            got = next(int(c["bytes"]) for c in self.connections() if c["key"] == key)
            if got >= at_least or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self._log.close()
        return int(self.proc.returncode)


RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules"


class NsPrometheus:
    """A real Prometheus in the wire namespace (the node), scraping the auditor on loopback and
    the sidecars' admin ports over the bridge, with the auditor's rules evaluated every second."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        assert PROMETHEUS is not None, "prometheus missing: `make apt` installs it"
        self.lab = lab
        d = workdir / "prometheus"
        d.mkdir()
        rules = d / "mtls-audit.yml"
        text = (RULES / "mtls-audit.yml").read_text()
        rules.write_text(
            text.replace("interval: 30s", "interval: 1s").replace("for: 2m", "for: 1s")
        )
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "mtls-audit",
                 "static_configs": [{"targets": [f"127.0.0.1:{AUDIT_PORT}"]}]},
                {"job_name": "mtls-sidecar",
                 "static_configs": [{"targets": [f"{lab[h].v4}:15000" for h in ("a", "b")]}]},
            ],
        }  # fmt: skip
        (d / "prometheus.yml").write_text(json.dumps(config))
        self._log = open(d / "prometheus.log", "ab")  # noqa: SIM115 - closed in stop()
        argv = [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'data'}", "--web.listen-address=127.0.0.1:9090",
                "--log.level=warn"]  # fmt: skip
        self.proc = lab.popen(lab.bridge_ns, argv, self._log)

    def query(self, expr: str) -> list[dict[str, Any]]:
        proc = self.lab.run(
            self.lab.bridge_ns,
            ["curl", "-s", "-m", "5", "--data-urlencode", f"query={expr}",
             "http://127.0.0.1:9090/api/v1/query"],
        )  # fmt: skip
        if proc.returncode != 0 or not proc.stdout:
            return []
        body = json.loads(proc.stdout)
        return list(body["data"]["result"]) if body.get("status") == "success" else []

    def wait(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The result of `expr` once it is not empty."""
        deadline = time.monotonic() + timeout
        while not (got := self.query(expr)):
            assert self.proc.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"{expr}: still empty after {timeout}s"
            time.sleep(0.5)
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self._log.close()


class Audited:
    def __init__(self, mesh: Mesh, auditor: Auditor, prom: NsPrometheus) -> None:
        self.mesh = mesh
        self.auditor = auditor
        self.prom = prom
        self.lab = mesh.lab

    def ip(self, host: str) -> str:
        return self.lab[host].v4


@pytest.fixture(scope="module")
def audited(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    workdir = tmp_path_factory.mktemp("audit")
    with build_mesh(pki, workdir, ["a", "b", "c"]) as mesh:
        lab = mesh.lab
        # The node: its bridge hands bridged IP packets to netfilter (br_netfilter, as
        # Kubernetes requires), and it has an address of its own (Prometheus scrapes from it).
        for argv in (
            ["ip", "link", "set", "br0", "type", "bridge", "nf_call_iptables", "1",
             "nf_call_ip6tables", "1"],
            ["ip", "addr", "add", "10.77.0.254/24", "dev", "br0"],
        ):  # fmt: skip
            proc = lab.run(lab.bridge_ns, argv)
            assert proc.returncode == 0, proc.stderr
        # B's port EXCLUDED goes around its sidecar: rules re-applied with the exclusion.
        env_b = mesh.env("b", MTLS_EXCLUDE_INBOUND_PORTS=str(EXCLUDED))
        assert iptables_cli(lab, "b", ["--clean"], env_b).returncode == 0
        proc = iptables_cli(lab, "b", ["--apply"], env_b)
        assert proc.returncode == 0, proc.stderr
        log = open(workdir / "app-b-excluded.out", "ab")  # noqa: SIM115 - closed with the lab
        lab.popen("b", [sys.executable, "-m", "tests.netns", "serve", "--port", str(EXCLUDED),
                        "--log", str(workdir / "app-b-excluded.jsonl")], log)  # fmt: skip
        auditor = Auditor(lab, workdir)
        prom = NsPrometheus(lab, workdir)
        try:
            mesh.sidecar("a", MTLS_ADMIN_LISTEN="0.0.0.0:15000")
            mesh.sidecar(
                "b", MTLS_ADMIN_LISTEN="0.0.0.0:15000", MTLS_EXCLUDE_INBOUND_PORTS=str(EXCLUDED)
            )
            yield Audited(mesh, auditor, prom)
        finally:
            prom.stop()
            auditor.stop()
            print(f"--- auditor ---\n{auditor.logs()[-8000:]}")
            print(mesh.report())
        # The auditor took its rules away when it stopped.
        left = lab.run(lab.bridge_ns, ["nft", "list", "table", "inet", "mtls_audit"])
        assert left.returncode != 0, "the auditor left its nft table behind"


# The client app: connect, send a file's bytes, half-close, read to EOF; print what came back.
# Sends from a thread while the main thread reads the echo: sending all of a big payload
# before reading would deadlock once the echo's and our socket buffers are full.
_CLIENT = """
import json, socket, sys, threading
data = open(sys.argv[3], "rb").read()
reply = bytearray()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    def send():
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    while chunk := s.recv(65536):
        reply += chunk
    sender.join()
print(json.dumps({"sent": len(data), "reply": len(reply),
                  "echoed": bytes(reply) == data}))
"""


def _dial(
    au: Audited, src: str, dst: str, port: int, payload: bytes, v6: bool = False
) -> dict[str, Any]:
    """Send `payload` from host `src` to `dst:port` and read the reply (the apps are echoes)."""
    path = au.mesh.workdir / f"payload-{secrets.token_hex(4)}"
    path.write_bytes(payload)
    addr = au.lab[dst].v6 if v6 else au.ip(dst)
    try:
        proc = au.lab.run(
            src, [sys.executable, "-c", _CLIENT, addr, str(port), str(path)], timeout=60
        )
    finally:
        path.unlink()
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    assert result["echoed"], result
    return result


def _between(au: Audited, src: str, dst: str, port: int) -> Callable[[dict[str, Any]], bool]:
    def match(c: dict[str, Any]) -> bool:
        return bool(c["key"][0] == au.ip(src) and c["key"][2:] == [au.ip(dst), port])

    return match


def _within_1pct(got: int, want: int) -> None:
    assert want <= got <= want * 1.01, f"counted {got} bytes for {want} the apps sent"


def test_our_mtls_between_sidecars(audited: Audited) -> None:
    """A -> B:8080 through both sidecars: TLS 1.3 with the post-quantum hybrid group.

    First in the module: the sidecars keep this connection and reuse it for later A -> B
    streams, so this is the one test that sees it open."""
    au = audited
    before = len(au.auditor.connections())
    payload = secrets.token_bytes(2 * BIG)
    _dial(au, "a", "b", APP_B, payload)
    conn = au.auditor.wait_for(_between(au, "a", "b", APP_B), before)
    assert (conn["class"], conn["protocol"], conn["tls_version"]) == ("tls", "tls", "1.3"), conn
    assert conn["selected_group"] == "X25519MLKEM768"
    assert conn["offered_groups"][:3] == ["X25519MLKEM768", "X25519", "P-256"]
    # The wire carried the app's bytes plus TLS's own (handshake, record headers, tags).
    # The sidecars keep this connection open: its bytes come from conntrack once it is older
    # than --exact-within (30 s). They are the wire's: the app's bytes plus TLS's and the reuse
    # protocol's own (handshake with certificates and ML-KEM shares, record headers and tags,
    # frame headers, window and PING frames), and any retransmission: a few per cent at most
    # (3.6 % seen once on a loaded machine, where the exact windows of mtls-sidecar/2 cut
    # some reads short: more, smaller records).
    got = au.auditor.wait_bytes(conn["key"], 2 * len(payload), timeout=90)
    assert 2 * len(payload) <= got <= 2 * len(payload) * 1.05, got
    assert au.auditor.metric("mtls_audit_tls_key_exchange_total", group="X25519MLKEM768") >= 1


ALERT = 'ALERTS{alertname="MtlsAuditDisagrees",alertstate="firing"}'


def test_alert_fires_for_plaintext_around_a_sidecar(audited: Audited) -> None:
    """A real Prometheus scraping the sidecars and the auditor: quiet while every connection
    is mTLS, MtlsAuditDisagrees firing once plaintext goes around B's sidecar."""
    au, prom = audited, audited.prom
    prom.wait("count(up == 1) == 3")
    _dial(au, "a", "b", APP_B, b"mtls only" * 1000)
    # Both sides scraped after the mTLS connection, the rules evaluated on them: quiet.
    prom.wait('mtls_audit_connections_total{class="tls"}')
    prom.wait("mtls:sidecar_carried_bytes:rate5m > 0")
    prom.wait("mtls_audit:plaintext_connections:increase10m == 0")
    assert prom.query(ALERT) == []
    _dial(au, "c", "b", EXCLUDED, b"GET /around HTTP/1.1\r\nHost: b\r\n\r\n")
    (alert,) = prom.wait(ALERT)
    assert alert["metric"]["disagreement"] == "plaintext_not_counted"
    assert prom.query("mtls:sidecar_plaintext_connections:increase10m")[0]["value"][1] == "0"


def test_plaintext_http_around_a_sidecar(audited: Audited) -> None:
    """C (no sidecar) -> B's excluded port: plaintext HTTP the sidecars never saw."""
    au = audited
    before = len(au.auditor.connections())
    request = b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % BIG
    payload = request + secrets.token_bytes(BIG)
    _dial(au, "c", "b", EXCLUDED, payload)  # echoed: the apps sent 2 x payload
    conn = au.auditor.wait_for(_between(au, "c", "b", EXCLUDED), before)
    assert (conn["class"], conn["protocol"]) == ("plaintext", "http1"), conn
    assert conn["src_workload"] == "legacy/c-0001" and conn["dst_workload"] == "proof/b-7c2e"
    assert "client_head" not in conn  # payload bytes go to the log only, never the admin port
    _within_1pct(au.auditor.wait_bytes(conn["key"], 2 * len(payload)), 2 * len(payload))
    # Logged with its first bytes in hex, truncated: never the payload beyond them.
    event = next(
        e for e in au.auditor.log_events()
        if e.get("event") == "audit_plaintext" and e["src"] == conn["src"]
    )  # fmt: skip
    assert event["client_head"] == request[:32].hex()
    # The echo's first bytes, unless the server's ACKs of the upload used up its packets.
    assert event["server_head"] in ("", request[:32].hex())
    assert au.auditor.metric(
        "mtls_audit_connections_total", src="legacy/default", dst="proof/server",
        dst_port=str(EXCLUDED), protocol="http1",
    ) >= 1  # fmt: skip


def test_coverage_report_shows_what_went_around_the_mesh(audited: Audited) -> None:
    """`mtls-sidecar coverage` against the node's Prometheus (sidecars and auditor): the
    plaintext around B's sidecar is listed as the wire's, and the wire disagrees with the
    sidecars, which counted no plaintext."""
    au, prom = audited, audited.prom
    labels = {"class": "plaintext", "dst_port": str(EXCLUDED)}
    before = au.auditor.metric("mtls_audit_connections_total", **labels)
    _dial(au, "c", "b", EXCLUDED, b"GET /report HTTP/1.1\r\nHost: b\r\n\r\n")
    deadline = time.monotonic() + 60
    while au.auditor.metric("mtls_audit_connections_total", **labels) <= before:
        assert time.monotonic() < deadline, "the auditor did not count the connection"
        time.sleep(0.2)
    want = au.auditor.metric("mtls_audit_connections_total", **labels)
    sel = f'mtls_audit_connections_total{{class="plaintext",dst_port="{EXCLUDED}"}}'
    prom.wait(f"sum({sel}) == {want}")
    proc = au.lab.run(
        au.lab.bridge_ns,
        [sys.executable, "-m", "proxy", "coverage", "--prometheus", "http://127.0.0.1:9090",
         "--window", "15m", "--format", "json", "--min-coverage", "0"],
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    wire = doc["wire"]
    assert wire is not None and wire["agrees"] is False
    assert doc["connections"]["plaintext"] == 0  # the sidecars never saw it
    assert wire["connections"]["tls"] >= 1 and wire["connections"]["plaintext"] >= want
    around = [e for e in wire["plaintext_edges"] if e["dst_port"] == str(EXCLUDED)]
    assert [(e["src"], e["dst"]) for e in around] == [("legacy/default", "proof/server")]
    assert around[0]["connections"] == want
    # The sidecars' own edge A -> B is there too, by SPIFFE ID, and the wire agrees with it:
    # its IDs name the map's workloads (/ns/proof/sa/client -> proof/client), and between
    # those two the auditor saw only TLS, no more bytes than the sidecars carried.
    ab = [
        e
        for e in doc["edges"]
        if e["source"].endswith("/ns/proof/sa/client")
        and e["destination"].endswith("/ns/proof/sa/server")
    ]
    assert len(ab) == 1 and ab[0]["seen_by_source"] >= 1, doc["edges"]
    wire_ab = ab[0]["wire"]
    assert wire_ab is not None, ab
    assert (wire_ab["verdict"], wire_ab["reasons"]) == ("agrees", []), wire_ab
    assert wire_ab["connections"].get("tls", 0) >= 1, wire_ab


def test_foreign_tls_client(audited: Audited) -> None:
    """`openssl s_client` from C to B's sidecar: TLS, with the groups it offered (refused
    later by the sidecar for want of a client certificate; the wire shows TLS all the same)."""
    au = audited
    before = len(au.auditor.connections())
    au.lab.run("c", ["sh", "-c", f"openssl s_client -connect {au.ip('b')}:{APP_B} "
                     "-groups P-384:X25519 -brief </dev/null"])  # fmt: skip
    conn = au.auditor.wait_for(_between(au, "c", "b", APP_B), before)
    assert (conn["class"], conn["tls_version"]) == ("tls", "1.3"), conn
    assert conn["offered_groups"] == ["P-384", "X25519"]
    assert conn["selected_group"] in ("P-384", "X25519")


def _proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    import socket

    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs


def test_proxy_header_connection(audited: Audited) -> None:
    au = audited
    before = len(au.auditor.connections())
    payload = _proxy_v2("192.0.2.7", au.ip("b"), 40000, EXCLUDED) + b"GET / HTTP/1.1\r\n\r\n"
    _dial(au, "c", "b", EXCLUDED, payload)
    conn = au.auditor.wait_for(_between(au, "c", "b", EXCLUDED), before)
    assert (conn["class"], conn["protocol"]) == ("plaintext", "proxy+http1"), conn
    _within_1pct(au.auditor.wait_bytes(conn["key"], 2 * len(payload)), 2 * len(payload))


def test_silent_connection(audited: Audited) -> None:
    au = audited
    before = len(au.auditor.connections())
    _dial(au, "c", "b", EXCLUDED, b"")
    conn = au.auditor.wait_for(_between(au, "c", "b", EXCLUDED), before)
    assert (conn["class"], conn["protocol"]) == ("empty", "none"), conn
    assert conn["bytes"] == 0


def test_plaintext_over_ipv6(audited: Audited) -> None:
    au = audited
    before = len(au.auditor.connections())
    payload = b"GET /v6 HTTP/1.1\r\n\r\n" + secrets.token_bytes(300_000)
    _dial(au, "c", "b", EXCLUDED, payload, v6=True)
    src, dst = au.lab["c"].v6, au.lab["b"].v6
    conn = au.auditor.wait_for(
        lambda c: c["key"][0] == src and c["key"][2:] == [dst, EXCLUDED], before
    )
    assert (conn["class"], conn["protocol"]) == ("plaintext", "http1"), conn
    assert conn["src"] == f"[{src}]:{conn['key'][1]}"
    _within_1pct(au.auditor.wait_bytes(conn["key"], 2 * len(payload)), 2 * len(payload))


def test_garbage_is_named_and_survived(audited: Audited) -> None:
    """Bytes shaped like a TLS record header with nonsense after it, then random bytes: each
    connection named, the auditor still up, nothing counted as malformed (the kernel's
    messages were fine; the payload is only ever classified)."""
    au = audited
    for payload, klass in (
        (b"\x16\x03\x03\x00\x30\x01\xff\xff\xff" + secrets.token_bytes(40), "tls"),
        (b"\x00" + secrets.token_bytes(5000), "plaintext"),
    ):
        before = len(au.auditor.connections())
        _dial(au, "c", "b", EXCLUDED, payload)
        conn = au.auditor.wait_for(_between(au, "c", "b", EXCLUDED), before)
        assert conn["class"] == klass, conn
    assert au.auditor.proc.poll() is None
    assert au.auditor.metric("mtls_audit_malformed_total") == 0


def test_cost_is_per_connection(audited: Audited) -> None:
    """The kernel hands over a few packets per connection, however many bytes it carries."""
    au = audited
    packets = au.auditor.metric("mtls_audit_packets_total")
    before = len(au.auditor.connections())
    _dial(au, "c", "b", EXCLUDED, b"x" * (4 * BIG))
    au.auditor.wait_for(_between(au, "c", "b", EXCLUDED), before)
    handed = au.auditor.metric("mtls_audit_packets_total") - packets
    # 8 per direction at most, plus the FINs (and an RST) logged whenever they come.
    assert handed <= 2 * 8 + 3, f"{handed} packets handed over for one connection"
