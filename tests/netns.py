"""Network-namespace "hosts" for the transparent-mode proof: topology, processes, pcap, apps.

`Lab` builds hosts as network namespaces, each with one veth (`eth0`) plugged into a bridge
that lives in a namespace of its own (the "wire"), so nothing is ever added to the host's own
network namespace and deleting the namespaces removes every veth and iptables rule with them.
`Capture` runs tcpdump on a bridge port; `read_pcap` and `tcp_streams` parse what it wrote
(classic pcap, Ethernet, IPv4/IPv6, TCP) with `struct` alone.

Run as a module it is the "unchanged app" of the tests, plain sockets and nothing else:
    python -m tests.netns serve --port 8080 --log FILE [--marker M]  echo server
    python -m tests.netns dial HOST PORT HEX              send, half-close, print the reply
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import Samples

ROOT = Path(__file__).resolve().parent.parent
SKIP_PREFIX = "NETNS TEST SKIPPED"
TOOLS = ("ip", "iptables", "iptables-save", "ip6tables", "tcpdump", "curl", "setpriv")


def unavailable() -> str | None:
    """Why namespaces with netfilter cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT
    )


def _must(argv: Sequence[str]) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


@dataclass
class Host:
    """One namespace with `eth0` on the lab bridge; `port` is its veth on the bridge side."""

    name: str
    ns: str
    v4: str
    v6: str
    port: str


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for processes in the namespaces (no MTLS_* leaking in)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
    }
    env.update(extra or {})
    return env


class Lab:
    """Hosts as namespaces joined by a bridge in a namespace of its own; `close` removes all.

    Addresses: 10.77.0.<n>/24 and fd77::<n>/64 on each host's eth0 (n = 1, 2, ...).
    """

    def __init__(self, names: Sequence[str], prefix: str | None = None) -> None:
        self.prefix = prefix or f"mtlsp-{os.getpid()}-{secrets.token_hex(2)}"
        self.bridge_ns = f"{self.prefix}-wire"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _must(["ip", "netns", "add", ns])
        self._made.append(ns)
        _must(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _build(self, names: Sequence[str]) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _must(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _must(["ip", "-n", br, "link", "set", "br0", "up"])
        for n, name in enumerate(names, start=1):
            ns = f"{self.prefix}-{name}"
            host = Host(name, ns, f"10.77.0.{n}", f"fd77::{n}", f"v{name}")
            self._add_ns(ns)
            # Created in the wire namespace with its peer directly in the host: no veth ever
            # exists in the namespace the test runs in.
            _must(["ip", "-n", br, "link", "add", host.port, "type", "veth",
                   "peer", "name", "eth0", "netns", ns])  # fmt: skip
            _must(["ip", "-n", br, "link", "set", host.port, "master", "br0"])
            _must(["ip", "-n", br, "link", "set", host.port, "up"])
            _must(["ip", "-n", ns, "addr", "add", f"{host.v4}/24", "dev", "eth0"])
            _must(["ip", "-n", ns, "-6", "addr", "add", f"{host.v6}/64", "dev", "eth0", "nodad"])
            _must(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self.hosts[name] = host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def argv(self, host: Host | str, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """`argv` run in a host (by Host or name) or in a namespace (by its full name)."""
        if isinstance(host, str):
            host = self.hosts.get(host, host)
        ns = host.ns if isinstance(host, Host) else host
        return ["ip", "netns", "exec", ns, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                *argv]  # fmt: skip

    def run(
        self,
        host: Host | str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(host, argv, clean_env(env)), timeout)

    def popen(
        self,
        host: Host | str,
        argv: Sequence[str],
        log: IO[bytes],
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        # `ip netns exec` and `env` both exec: the pid is the command's own.
        proc = subprocess.Popen(
            self.argv(host, argv, clean_env(env)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process we started or that runs in our namespaces, delete them all."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self._made):
            # Anything still inside (a sidecar worker, say) would keep the namespace alive.
            pids = _run(["ip", "netns", "pids", ns]).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns])
        self._made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (for the cleanup assertion)."""
        listed = _run(["ip", "netns", "list"]).stdout.split("\n")
        return [ln.split()[0] for ln in listed if ln.startswith(self.prefix)]


# --- the sidecar in a namespace ---------------------------------------------------------------


def as_uid(uid: int) -> list[str]:
    """The argv prefix that runs a command as `uid` (and gid), with no supplementary groups.

    When that uid cannot reach this Python (a pyenv or venv under a 0700 home, as on some CI
    images) the command also gets the one ambient capability CAP_DAC_READ_SEARCH, so it can
    read its interpreter and libraries; it changes nothing about the sockets it opens, which
    still belong to `uid`, and that is what the iptables owner match looks at.
    """
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    probe = _run([*prefix, "sh", "-c", 'exec "$0" -c "import proxy"', sys.executable])
    if probe.returncode != 0:
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return prefix


class NsSidecar:
    """`python -m proxy run` inside a host namespace; admin and metrics read with curl there.

    `prefix` goes before the command (e.g. `as_uid(1337)`: the sidecar must run as
    MTLS_PROXY_UID so the OUTPUT rule does not capture its own dials).
    """

    def __init__(
        self,
        lab: Lab,
        host: Host,
        env: Mapping[str, str],
        log_path: Path,
        prefix: Sequence[str] = (),
    ) -> None:
        self.lab = lab
        self.host = host
        self.log_path = log_path
        self.env = {
            "MTLS_WORKERS": "1",
            "MTLS_LOG_FORMAT": "json",
            "MTLS_LOG_LEVEL": "info",
            "MTLS_ADMIN_LISTEN": "127.0.0.1:15000",
            **env,
        }
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [*prefix, sys.executable, "-m", "proxy", "run"]
        self.proc = lab.popen(host, argv, self._log, self.env)

    def curl(self, path: str) -> tuple[int, str]:
        proc = self.lab.run(
            self.host,
            ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://127.0.0.1:15000{path}"],
        )
        body, _, code = proc.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sidecar on {self.host.name} exited with {self.proc.returncode}:\n"
                    + self.logs()
                )
            if self.curl("/ready")[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError(
            f"sidecar on {self.host.name} not ready after {timeout}s:\n{self.logs()}"
        )

    def metrics(self) -> Samples:
        from .harness import parse_metrics  # lazily: the in-namespace apps import this module

        code, body = self.curl("/metrics")
        assert code == 200, f"/metrics on {self.host.name}: {code} {body[:200]}"
        return parse_metrics(body)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from .harness import sum_samples

        return sum_samples(self.metrics(), name, labels)

    def wait_metric(self, name: str, value: float, **labels: str) -> float:
        """Poll up to 5 s until the metric equals `value` (bytes are counted at close)."""
        deadline = time.monotonic() + 5.0
        got = self.metric(name, **labels)
        while got != value and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.metric(name, **labels)
        return got

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    out.append(event)
        return out

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


# --- packet capture -----------------------------------------------------------------------


class Capture:
    """tcpdump on one bridge port of the lab's wire namespace, written to a pcap file."""

    def __init__(self, lab: Lab, iface: str, path: Path) -> None:
        self.path = path
        # -Z root: Debian's tcpdump otherwise drops to user tcpdump and may not write `path`.
        # --immediate-mode: otherwise packets wait in the kernel ring for up to a second and
        # the last ones are lost when tcpdump is stopped.
        argv = ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s", "0", "-Z", "root",
                "-w", str(path), "tcp"]  # fmt: skip
        self.proc = subprocess.Popen(
            lab.argv(lab.bridge_ns, argv, clean_env()),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        lab.procs.append(self.proc)
        self.stderr = b""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        while b"listening on" not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"tcpdump did not start: {self.stderr.decode(errors='replace')}"
                )
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                self.stderr += os.read(self.proc.stderr.fileno(), 4096)

    def stop(self) -> bytes:
        """Let the last FIN/ACKs pass (the pcap file has stopped growing for 0.3 s: tcpdump
        writes each packet at once), stop tcpdump, return the pcap file's bytes. A packet
        that arrives while tcpdump stops is counted by its filter but not written, so the
        capture is stopped in a quiet moment."""
        size, quiet_since = -1, time.monotonic()
        deadline = quiet_since + 5
        while time.monotonic() < deadline:
            now_size = self.path.stat().st_size if self.path.exists() else 0
            if now_size != size:
                size, quiet_since = now_size, time.monotonic()
            elif time.monotonic() - quiet_since >= 0.3:
                break
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                _, err = self.proc.communicate(timeout=10)
                self.stderr += err
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        stats = self.stderr.decode(errors="replace")
        captured = re.search(r"(\d+) packets? captured", stats)
        passed = re.search(r"(\d+) packets? received by filter", stats)
        dropped = re.search(r"(\d+) packets? dropped by kernel", stats)
        # A proof over a partial capture is no proof.
        assert captured and passed and dropped, stats
        assert captured[1] == passed[1] and dropped[1] == "0", f"tcpdump lost packets: {stats}"
        return self.path.read_bytes()


@dataclass
class Segment:
    """One captured TCP segment."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    flags: int
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)

    @property
    def rst(self) -> bool:
        return bool(self.flags & 0x04)


_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<",  # microseconds, little-endian
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanoseconds
    b"\xa1\xb2\x3c\x4d": ">",
}
_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113


def read_pcap(data: bytes) -> list[Segment]:
    """Every TCP segment of a classic pcap file (Ethernet or Linux cooked), in file order."""
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError("not a classic pcap file")
    endian = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype not in (_LINKTYPE_ETHERNET, _LINKTYPE_LINUX_SLL):
        raise ValueError(f"unsupported pcap link type {linktype}")
    out: list[Segment] = []
    pos = 24
    while pos + 16 <= len(data):
        _sec, _frac, caplen, _origlen = struct.unpack_from(endian + "IIII", data, pos)
        frame = data[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        if linktype == _LINKTYPE_ETHERNET:
            off, ethertype = 14, struct.unpack_from("!H", frame, 12)[0]
            while ethertype == 0x8100:  # VLAN tag
                ethertype = struct.unpack_from("!H", frame, off + 2)[0]
                off += 4
        else:
            off, ethertype = 16, struct.unpack_from("!H", frame, 14)[0]
        seg = _ip_tcp(frame[off:], ethertype)
        if seg is not None:
            out.append(seg)
    return out


def _ip_tcp(pkt: bytes, ethertype: int) -> Segment | None:
    if ethertype == 0x0800 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack_from("!H", pkt, 2)[0] or len(pkt)  # 0 on TSO super-packets
        if pkt[9] != 6:
            return None
        src = str(ipaddress.IPv4Address(pkt[12:16]))
        dst = str(ipaddress.IPv4Address(pkt[16:20]))
        tcp = pkt[ihl:total]
    elif ethertype == 0x86DD and len(pkt) >= 40:
        if pkt[6] != 6:  # no extension headers on this lab's traffic
            return None
        plen = struct.unpack_from("!H", pkt, 4)[0] or len(pkt) - 40
        src = str(ipaddress.IPv6Address(pkt[8:24]))
        dst = str(ipaddress.IPv6Address(pkt[24:40]))
        tcp = pkt[40 : 40 + plen]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    data_off = (tcp[12] >> 4) * 4
    return Segment(src, sport, dst, dport, seq, tcp[13], bytes(tcp[data_off:]))


Flow = tuple[str, int, str, int]


@dataclass
class Stream:
    """The bytes one side of a TCP connection sent, reassembled by sequence number."""

    data: bytearray = field(default_factory=bytearray)
    gaps: int = 0
    segments: int = 0


def tcp_streams(segments: Sequence[Segment]) -> dict[Flow, Stream]:
    """Reassemble each direction of each connection (retransmissions and overlaps dropped)."""
    isn: dict[Flow, int] = {}
    pieces: dict[Flow, list[tuple[int, bytes]]] = {}
    for s in segments:
        flow = (s.src, s.sport, s.dst, s.dport)
        if s.syn:
            isn[flow] = s.seq
        if s.payload:
            pieces.setdefault(flow, []).append((s.seq, s.payload))
    out: dict[Flow, Stream] = {}
    for flow, items in pieces.items():
        base = isn[flow] + 1 if flow in isn else min(seq for seq, _ in items)
        stream = Stream(segments=len(items))
        for offset, payload in sorted(((seq - base) % 2**32, p) for seq, p in items):
            end = len(stream.data)
            if offset > end:
                stream.gaps += 1
                continue
            stream.data += payload[end - offset :]
        out[flow] = stream
    return out


TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
_MAX_RECORD = 2**14 + 2048  # TLSCiphertext.length limit (RFC 8446 5.2, RFC 5246 6.2.3)


def tls_records(data: bytes) -> list[tuple[int, int]]:
    """Split a byte stream into TLS records [(content type, length)]; ValueError if it is not.

    Every byte must belong to a well-formed record (type 20-23, version 3.x, sane length) and
    the stream must end on a record boundary.
    """
    records = []
    pos = 0
    while pos < len(data):
        if pos + 5 > len(data):
            raise ValueError(f"truncated record header at offset {pos}: {data[pos : pos + 5]!r}")
        ctype, major, minor, length = data[pos], data[pos + 1], data[pos + 2], 0
        length = struct.unpack_from("!H", data, pos + 3)[0]
        if ctype not in TLS_CONTENT_TYPES or major != 3 or minor > 4 or length > _MAX_RECORD:
            raise ValueError(f"not a TLS record at offset {pos}: {data[pos : pos + 16]!r}")
        if pos + 5 + length > len(data):
            raise ValueError(f"record at offset {pos} runs past the end of the stream")
        records.append((ctype, length))
        pos += 5 + length
    return records


# --- the apps: plain sockets, nothing else -------------------------------------------------


def _serve(port: int, log_path: Path, marker: bytes) -> None:
    """Echo server on all interfaces (dual stack); one JSON line per finished connection.

    The line says how many bytes arrived, how they began, and whether `marker` was in them.
    """
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(64)
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def handle(conn: socket.socket, peer: Any) -> None:
        received = bytearray()
        error = None
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    received += data
                    conn.sendall(data)
            except OSError as exc:
                error = type(exc).__name__
        with lock:
            entry = {"peer": peer[0], "received": len(received), "head": received[:16].hex(),
                     "marker": marker in received, "error": error}  # fmt: skip
            log.write(json.dumps(entry) + "\n")

    print(f"serving on {port}", flush=True)
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def _dial(host: str, port: int, payload: bytes, timeout: float) -> dict[str, Any]:
    """Connect, send, half-close, read until EOF: what the app saw, as a dict."""
    reply = bytearray()
    result: dict[str, Any] = {"connected": False, "error": None}
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            result["connected"] = True
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while data := s.recv(65536):
                reply += data
    except OSError as exc:
        result["error"] = type(exc).__name__
    result["reply"] = reply.hex()
    return result


class MuxClient:
    """Speaks `mtls-sidecar/1` (README "Wire format") to an inbound sidecar: a client of our
    own, written from the documented format rather than from proxy/mux.py."""

    def __init__(
        self,
        host: str,
        port: int,
        cert: str,
        key: str,
        ca: str,
        *,
        alpn: tuple[str, ...] = ("mtls-sidecar/1",),
    ) -> None:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(list(alpn))
        raw = socket.create_connection((host, port), timeout=10)
        self.sock = ctx.wrap_socket(raw)
        self.alpn = self.sock.selected_alpn_protocol()
        self.buf = b""

    def send(self, kind: int, sid: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!II", kind << 24 | len(payload), sid) + payload)

    def open(self, sid: int, host: str, port: int) -> None:
        def addr(h: str, p: int) -> bytes:
            return bytes([len(h)]) + h.encode() + p.to_bytes(2, "big")

        self.send(1, sid, addr(host, port) + addr("10.9.9.9", 4242))

    def frame(self) -> tuple[int, int, bytes]:
        while len(self.buf) < 8:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        word, sid = struct.unpack("!II", self.buf[:8])
        n = word & 0xFFFFFF
        while len(self.buf) < 8 + n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        payload, self.buf = self.buf[8 : 8 + n], self.buf[8 + n :]
        return word >> 24, sid, payload

    def until(self, kind: int, sid: int) -> bytes:
        while True:
            got_kind, got_sid, payload = self.frame()
            if (got_kind, got_sid) == (kind, sid):
                return payload


def _mux_probe(
    host: str, port: int, tls: list[str], other: str, excluded: int = 0
) -> dict[str, Any]:
    """Over one pooled connection to `host:port`: a stream to that destination (echoed?), one
    to `other` (another host), one to the sidecar's own admin port, and with `excluded` one to
    127.0.0.1 at that port; what came back for each."""
    c = MuxClient(host, port, *tls)
    out: dict[str, Any] = {"alpn": c.alpn}
    c.open(1, host, port)
    c.send(3, 1, b"hello over a stream")  # DATA
    out["accept"] = c.frame()[:2] == (2, 1)
    got = b""
    while len(got) < 19:
        kind, sid, payload = c.frame()
        if (kind, sid) == (3, 1):
            got += payload
    out["echo"] = got.decode()
    c.send(4, 1)  # EOF
    c.until(4, 1)
    c.open(3, other, port)
    out["other_host"] = c.until(5, 3).hex()  # RESET code
    c.open(5, host, 15000)
    out["own_port"] = c.until(5, 5).hex()
    if excluded:
        c.open(7, "127.0.0.1", excluded)
        while True:
            kind, sid, payload = c.frame()
            if sid == 7 and kind in (2, 5):  # ACCEPT: delivered; RESET: refused (its code)
                out["excluded"] = "accepted" if kind == 2 else payload.hex()
                break
    c.sock.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netns")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--log", type=Path, required=True)
    serve.add_argument("--marker", default="MARKER-")
    dial = sub.add_parser("dial")
    dial.add_argument("host")
    dial.add_argument("port", type=int)
    dial.add_argument("payload_hex")
    dial.add_argument("--timeout", type=float, default=15.0)
    probe = sub.add_parser("mux-probe")
    probe.add_argument("host")
    probe.add_argument("port", type=int)
    probe.add_argument("cert")
    probe.add_argument("key")
    probe.add_argument("ca")
    probe.add_argument("other")
    probe.add_argument("--excluded", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        _serve(args.port, args.log, args.marker.encode())
        return 0
    if args.cmd == "mux-probe":
        tls = [args.cert, args.key, args.ca]
        print(json.dumps(_mux_probe(args.host, args.port, tls, args.other, args.excluded)))
        return 0
    print(json.dumps(_dial(args.host, args.port, bytes.fromhex(args.payload_hex), args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
