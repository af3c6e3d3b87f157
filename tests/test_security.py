"""Security properties of a running sidecar: a TLS audit with sslscan, private keys never
exposed, the admin port's defaults and /drain guard, and dropping privileges after binding."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import TD, Pki
from .harness import ROOT, Sidecar, TcpApp, base_env, exchange, free_port, identity_env
from .pki import Identity

SYSTEM_PY = "/usr/bin/python3"
AEAD = ("GCM", "CHACHA20")


def client_ctx(ident: Identity | None, bundle: Path, **kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(bundle)
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def start_inbound(pki: Pki, echo: TcpApp, log: Path, **env: str) -> tuple[Sidecar, int]:
    port = free_port()
    sc = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{echo.port}",
            **env,
        },
        log,
    )
    if "MTLS_ADMIN_LISTEN" in env:
        sc.admin_port = int(env["MTLS_ADMIN_LISTEN"].rsplit(":", 1)[1])
    sc.wait_ready()
    return sc, port


# --- TLS audit ---------------------------------------------------------------------------------


def sslscan(port: int) -> str:
    if not shutil.which("sslscan"):
        pytest.skip("sslscan is not installed (Debian package sslscan)")
    r = subprocess.run(
        ["sslscan", "--no-colour", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def section(report: str, title: str) -> list[str]:
    """The lines of one sslscan section (after its indented title, up to a blank line)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    out = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        out.append(line.strip())
    return out


def protocols(report: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in section(report, "SSL/TLS Protocols:"))


# Named groups we accept in a report: no curve under 256 bits, no binary/brainpool curves,
# nothing under 112-bit security (ffdhe2048 is the floor).
GOOD_GROUPS = {
    "secp256r1",
    "secp384r1",
    "secp521r1",
    "x25519",
    "x448",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
}


def check_groups(report: str) -> list[str]:
    groups = []
    for line in section(report, "Server Key Exchange Group(s):"):
        m = re.match(r"(TLSv1\.[23])\s+(\d+) bits\s+(\S+)", line)
        assert m, line
        version, bits, name = m.group(1), int(m.group(2)), m.group(3)
        assert name in GOOD_GROUPS, line
        assert bits >= 112, line
        groups.append(f"{version} {name}")
    return groups


def test_tls_audit_default_tls13_only(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    sc, port = start_inbound(pki, echo, tmp_path / "sc.log")
    try:
        report = sslscan(port)
        assert protocols(report) == {
            "SSLv2": "disabled",
            "SSLv3": "disabled",
            "TLSv1.0": "disabled",
            "TLSv1.1": "disabled",
            "TLSv1.2": "disabled",
            "TLSv1.3": "enabled",
        }, report
        assert "Session renegotiation not supported" in section(report, "TLS renegotiation:")
        ciphers = section(report, "Supported Server Cipher(s):")
        assert ciphers and all(
            line.split()[1] == "TLSv1.3" and any(a in line for a in AEAD) for line in ciphers
        ), ciphers
        groups = check_groups(report)
        assert groups and all(g.startswith("TLSv1.3") for g in groups)
        # sslscan's OpenSSL cannot test compression; a real handshake shows none is used.
        ctx = client_ctx(pki.client, pki.client.bundle)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
            assert s.compression() is None
            assert s.version() == "TLSv1.3"
        print("[figure] sslscan default:\n" + report)
    finally:
        assert sc.stop() == 0


def tls12_suites_accepted(port: int, pki: Pki) -> list[str]:
    """Every TLS 1.2 suite our OpenSSL knows, tried one at a time with a client certificate
    (sslscan cannot enumerate TLS 1.2 suites on an mTLS port: it has no client cert)."""
    r = subprocess.run(
        ["openssl", "ciphers", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"],
        capture_output=True,
        text=True,
        check=True,
    )
    accepted = []
    for name in r.stdout.strip().split(":"):
        ctx = client_ctx(pki.client, pki.client.bundle, maximum_version=ssl.TLSVersion.TLSv1_2)
        try:
            ctx.set_ciphers(f"{name}:@SECLEVEL=0")
        except ssl.SSLError:
            continue  # not usable by this build at all
        try:
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
                s.sendall(b"x")
                assert s.recv(1) == b"x"
                cipher = s.cipher()
                assert cipher is not None
                accepted.append(cipher[0])
        except (ssl.SSLError, OSError):
            continue
    return accepted


def test_tls_audit_with_tls12(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    sc, port = start_inbound(pki, echo, tmp_path / "sc.log", MTLS_MIN_TLS_VERSION="1.2")
    try:
        report = sslscan(port)
        proto = protocols(report)
        assert proto["TLSv1.2"] == "enabled" and proto["TLSv1.3"] == "enabled"
        assert all(proto[v] == "disabled" for v in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"))
        assert "Session renegotiation not supported" in section(report, "TLS renegotiation:")
        check_groups(report)
        suites = tls12_suites_accepted(port, pki)
        assert suites, "no TLS 1.2 suite accepted"
        for suite in suites:
            assert suite.startswith("ECDHE-"), suite
            assert any(a in suite for a in AEAD), suite
        ctx = client_ctx(pki.client, pki.client.bundle, maximum_version=ssl.TLSVersion.TLSv1_2)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
            assert s.version() == "TLSv1.2" and s.compression() is None
        print(f"[figure] TLS 1.2 suites accepted: {suites}")
    finally:
        assert sc.stop() == 0


# --- private keys ------------------------------------------------------------------------------


def key_fragments(key_file: Path) -> list[str]:
    """The PEM armour and every 32-character piece of the key's base64 body (and its DER as
    hex, in case something prints bytes)."""
    text = key_file.read_text()
    body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    frags = ["PRIVATE KEY"]
    frags += [body[i : i + 32] for i in range(0, len(body) - 32, 16)]
    der = base64.b64decode(body)
    frags.append(der[-32:].hex())
    return frags


def test_private_keys_never_exposed(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    """Debug logging, traffic, rejected clients, a good and a bad reload: no log line, /status,
    /metrics, `check` output or worker command line holds any part of either private key."""
    d = tmp_path / "files"
    d.mkdir()
    ident = Identity(d / "tls.crt", d / "tls.key", d / "ca.pem", pki.server.spiffe_id)
    for a, b in ((pki.server.cert, ident.cert), (pki.server.key, ident.key)):
        shutil.copyfile(a, b)
    shutil.copyfile(pki.server.bundle, ident.bundle)
    in_port, out_port = free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(ident),
            "MTLS_INBOUND": f"127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
            "MTLS_LOG_LEVEL": "debug",
        },
        tmp_path / "inbound.log",
    )
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"127.0.0.1:{out_port}=127.0.0.1:{in_port}@{TD}/server",
            "MTLS_LOG_LEVEL": "debug",
            "MTLS_LOG_FORMAT": "text",
        },
        tmp_path / "outbound.log",
    )
    try:
        inbound.wait_ready()
        outbound.wait_ready()
        assert exchange(out_port, b"hello") == b"hello"
        with contextlib.suppress(OSError):  # rejected: no client certificate
            ctx = client_ctx(None, pki.client.bundle)
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", in_port))) as s:
                s.recv(1)
        with socket.create_connection(("127.0.0.1", in_port)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.recv(10)
        # A good reload (new cert and key), then a bad one (key does not match).
        shutil.copyfile(pki.server2.cert, ident.cert)
        shutil.copyfile(pki.server2.key, ident.key)
        inbound.signal(signal.SIGHUP)
        assert inbound.wait_metric("mtls_cert_reloads_total", 1, result="ok") == 1
        shutil.copyfile(pki.client.key, ident.key)
        inbound.signal(signal.SIGHUP)
        assert inbound.wait_metric("mtls_cert_reloads_total", 1, result="error") >= 1
        assert exchange(out_port, b"again") == b"again"
        exposed = {
            "inbound log": inbound.logs(),
            "outbound log": outbound.logs(),
        }
        for name, sc in (("inbound", inbound), ("outbound", outbound)):
            for path in ("/status", "/metrics", "/ready", "/live"):
                exposed[f"{name} {path}"] = sc.get(path)[1]
            for w in json.loads(sc.get("/status")[1])["workers"]:
                cmdline = Path(f"/proc/{w['pid']}/cmdline").read_bytes()
                exposed[f"{name} worker cmdline"] = cmdline.decode(errors="replace")
                environ = Path(f"/proc/{w['pid']}/environ").read_bytes()
                exposed[f"{name} worker environ"] = environ.decode(errors="replace")
        env = base_env()
        env.update({**identity_env(pki.server), "MTLS_INBOUND": ":8443=127.0.0.1:8080"})
        r = subprocess.run(
            [sys.executable, "-m", "proxy", "check"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        exposed["check"] = r.stdout + r.stderr
        assert len(exposed["inbound log"].splitlines()) > 10
        for key in (pki.server.key, pki.server2.key, pki.client.key):
            for frag in key_fragments(key):
                for where, text in exposed.items():
                    assert frag not in text, f"part of {key.name} in {where}"
    finally:
        assert [inbound.stop(), outbound.stop()] == [0, 0]


# --- the admin port ------------------------------------------------------------------------------


def non_loopback_ipv4() -> str | None:
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except OSError:
        return None
    for line in out.splitlines():
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", line)
        if m:
            return m.group(1)
    return None


def post(host: str, port: int, path: str, source: str | None = None) -> tuple[int, str]:
    """POST with an explicit source address (so the sidecar sees a non-loopback peer)."""
    with socket.socket() as s:
        s.settimeout(5)
        if source is not None:
            s.bind((source, 0))
        s.connect((host, port))
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_admin_binds_loopback_by_default(pki: Pki, echo: TcpApp, tmp_path: Path) -> None:
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 15000))
        except OSError:
            pytest.skip("port 15000 (the default admin port) is busy")
    env = base_env()
    env.update(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"127.0.0.1:{free_port()}=127.0.0.1:{echo.port}",
            "MTLS_WORKERS": "1",
        }
    )
    env.pop("MTLS_ADMIN_LISTEN", None)
    log = open(tmp_path / "sc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run"], env=env, cwd=ROOT, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:15000/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection((addr, 15000), timeout=2).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()


@pytest.mark.parametrize("allow", [False, True])
def test_remote_drain_refused_unless_enabled(
    pki: Pki, echo: TcpApp, tmp_path: Path, allow: bool
) -> None:
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    admin = free_port()
    sc, _ = start_inbound(
        pki,
        echo,
        tmp_path / "sc.log",
        MTLS_ADMIN_LISTEN=f"0.0.0.0:{admin}",
        MTLS_ADMIN_ALLOW_REMOTE_DRAIN="true" if allow else "false",
    )
    try:
        # GETs are fine from anywhere the admin port is reachable (probes, scrapes).
        with urllib.request.urlopen(f"http://{addr}:{admin}/live", timeout=5) as r:
            assert r.status == 200
        code, body = post(addr, admin, "/drain", source=addr)
        if not allow:
            assert code == 403, body
            assert "MTLS_ADMIN_ALLOW_REMOTE_DRAIN" in body
            assert sc.get("/ready")[0] == 200  # still serving
            # From loopback the same request is accepted.
            code, body = post("127.0.0.1", admin, "/drain")
        assert code == 202, body
        assert sc.proc.wait(20) == 0
        assert any(
            "POST /drain from" in str(e.get("msg")) and (allow == (addr in str(e.get("msg"))))
            for e in sc.log_events()
        )
    finally:
        sc.stop()


def test_drain_from_loopback_on_a_dual_stack_admin_port(
    pki: Pki, echo: TcpApp, tmp_path: Path
) -> None:
    """MTLS_ADMIN_LISTEN=:PORT listens dual-stack: a POST from 127.0.0.1 arrives as
    ::ffff:127.0.0.1 and is still loopback (issue 22, defect 4)."""
    admin = free_port()
    sc, _ = start_inbound(pki, echo, tmp_path / "sc.log", MTLS_ADMIN_LISTEN=f":{admin}")
    try:
        code, body = post("127.0.0.1", admin, "/drain")
        assert code == 202, body
        assert sc.proc.wait(20) == 0
        assert any(
            "POST /drain from ::ffff:127.0.0.1" in str(e.get("msg")) for e in sc.log_events()
        )
    finally:
        sc.stop()


# --- dropping privileges ------------------------------------------------------------------------


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _free_privileged_port() -> int | None:
    for port in (844, 843, 845, 995, 443):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return None


def test_drop_privileges_after_binding_a_privileged_port(pki: Pki, echo: TcpApp) -> None:
    """Started as root with MTLS_DROP_PRIVILEGES=true: binds a port below 1024, then the master
    and every worker run as uid 1337 (real, effective, saved) and still serve it."""
    if os.getuid() != 0:
        pytest.skip("needs root")
    port = _free_privileged_port()
    if port is None:
        pytest.skip("no free privileged port")
    r = subprocess.run(
        [SYSTEM_PY, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    )
    if r.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("needs a system python3 of our version (the venv may sit under /root)")
    # Workers are started after the switch, as uid 1337: their interpreter, packages and the
    # identity files must be reachable by that uid.
    d = Path(tempfile.mkdtemp(prefix="mtls-drop-"))
    try:
        d.chmod(0o755)
        for src, name in (
            (pki.server.cert, "tls.crt"),
            (pki.server.key, "tls.key"),
            (pki.server.bundle, "ca.pem"),
        ):
            shutil.copyfile(src, d / name)
            (d / name).chmod(0o644)
        os.chown(d / "tls.key", 1337, 1337)
        (d / "tls.key").chmod(0o600)
        site = next((ROOT / ".venv" / "lib").glob("python3.*/site-packages"))
        admin = free_port()
        env = base_env()
        env.update(
            {
                "PYTHONPATH": f"{ROOT}:{site}",
                "MTLS_CERT_FILE": str(d / "tls.crt"),
                "MTLS_KEY_FILE": str(d / "tls.key"),
                "MTLS_TRUST_BUNDLE_FILE": str(d / "ca.pem"),
                "MTLS_INBOUND": f"127.0.0.1:{port}=127.0.0.1:{echo.port}",
                "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                "MTLS_DROP_PRIVILEGES": "true",
                "MTLS_WORKERS": "2",
            }
        )
        log = open(d / "sc.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [SYSTEM_PY, "-m", "proxy", "run"], env=env, cwd="/", stdout=log, stderr=log
        )
        try:
            status: dict[str, object] = {}
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (d / "sc.log").read_text()
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{admin}/status", timeout=1
                    ) as resp:
                        status = json.loads(resp.read())
                    if status.get("ready"):
                        break
                except (OSError, ValueError):
                    pass
                assert time.monotonic() < deadline, (d / "sc.log").read_text()
                time.sleep(0.1)
            workers = status["workers"]
            assert isinstance(workers, list)
            pids = [proc.pid] + [int(w["pid"]) for w in workers]
            assert len(pids) == 3
            for pid in pids:
                assert _uids(pid) == [1337, 1337, 1337, 1337], pid
            ctx = client_ctx(pki.client, pki.client.bundle)
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as s:
                s.sendall(b"privileged")
                assert s.recv(100) == b"privileged"
            assert "dropped privileges to uid 1337" in (d / "sc.log").read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            log.close()
        assert code == 0, (d / "sc.log").read_text()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_check_redacts_the_join_token() -> None:
    """`check` redacts the join token (the other secret a sidecar holds)."""
    env = base_env()
    env.update(
        {
            "MTLS_IDENTITY_SOURCE": "ca",
            "MTLS_CA_URL": "https://ca.example:8443",
            "MTLS_CA_TOKEN": "mtlsjt1.c2VjcmV0LXBheWxvYWQ.c2VjcmV0LW1hYw",
            "MTLS_CA_FINGERPRINT": "ab" * 32,
            "MTLS_IDENTITY": f"{TD}/web",
            "MTLS_INBOUND": ":8443=127.0.0.1:8080",
        }
    )
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "c2VjcmV0" not in r.stdout + r.stderr
