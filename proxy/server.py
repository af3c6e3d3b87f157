"""The master process: binds listeners, holds the identity, runs workers, reloads and drains.

Start-up, step by step:
  1. obtain identity material (files) and check it builds contexts; read federated bundle files;
  2. bind every listener (one SO_REUSEPORT socket per worker), raise the open-file limit;
  3. start the admin server; drop privileges if asked; fetch federated bundle endpoints; in
     CA mode enrol, in spiffe mode wait for the first SVID from the Workload API (/ready
     says why not until then);
  4. start the workers, hand them the material, wait until each one serves.
Shutdown (SIGTERM/SIGINT or POST /drain): /ready turns false, workers stop accepting and
finish open connections up to MTLS_DRAIN_TIMEOUT, then the master exits 0.
SIGHUP and changed files: reload; a bad new set is logged and counted, the old one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from . import control, metrics
from .certsource.federated import Federation
from .certsource.files import CrlFile, FileSource, PolicyFile
from .config import Address, Settings
from .errors import CertError, ProxyError, StartupError
from .listen import bind_listener, drop_privileges, raise_nofile_limit, relisten
from .material import Material, read_file
from .policyfile import Policy
from .revocation import CrlRejected, RevocationList, compact, load_crls, merge
from .routes import Route, routes_for
from .shared import ConnectionCounts
from .tasks import Tasks
from .tls import tls_state_for

log = logging.getLogger("mtls.server")

WORKER_STOP_GRACE = 2.0  # seconds a worker gets to exit at a failed start-up before SIGKILL


def _stop_listening(socks: list[socket.socket]) -> None:
    """Shut listening sockets down: no longer listening in any process that holds a copy, so
    a new client is refused rather than queued (a worker shuts its own down at drain after
    taking what was queued; these are the ones no worker will)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@dataclass
class WorkerProc:
    """One worker process slot: its listening sockets, its process, what it said last."""

    slot: int
    socks: list[socket.socket]
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    refused: str | None = None  # why it refused the current material, if it did


class Master:
    """Owns the listeners, the identity and the worker processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.routes: list[Route] = routes_for(settings)
        self.material: Material | None = None
        self.workers: list[WorkerProc] = []
        self.draining = False
        self.serving = False  # start-up is over: from now on a worker that dies is restarted
        self.stop = asyncio.Event()
        self.started = time.time()
        self.tasks = Tasks(log)
        self.admin: Any = None
        self.admin_address: Address = settings.admin_listen
        self.files: FileSource | None = None
        self.crl_file: CrlFile | None = None
        self.ca_source: Any = None  # certsource.ca.CaSource in CA mode
        self.spiffe_source: Any = None  # certsource.spiffe.SpiffeSource in spiffe mode
        self.federation: Federation | None = None  # other trust domains' bundles
        self.own: Material | None = None  # the identity source's material, before federation
        self.crl_pem: bytes | None = None  # the last revocation list input seen
        self.revocations: RevocationList | None = None
        self.crl_frame: bytes | None = None  # the list in force, as the workers get it
        self._crl_inbox: bytes | None = None  # the latest list received, not yet taken
        self._crl_task: asyncio.Task[None] | None = None
        self.counts = ConnectionCounts.create(settings.workers)
        self.policy_file: PolicyFile | None = None
        self.policy_frame: bytes | None = None  # MTLS_POLICY_FILE in force, as workers get it

    # --- tasks ---------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro, name)

    # --- identity ------------------------------------------------------------------------

    def validate(self, material: Material) -> None:
        """The one check every material passes before the master takes it (files, CA,
        renewal, reload): the workers build their contexts with the same code."""
        federation = self.federation
        tls_state_for(federation.preview(material) if federation else material, self.settings)

    def on_bundles_changed(self) -> None:
        """A federated trust domain's bundle changed: hand the workers the new set."""
        if self.own is not None:
            self.apply(self.own)

    def apply(self, material: Material) -> None:
        """Make `material` (with the federated bundles in use) current here and in every
        worker."""
        self.own = material
        if self.federation is not None:
            material = self.federation.combine(material)
        self.material = material
        metrics.IDENTITY.set(material.identity, material.not_after.timestamp(), len(material.roots))
        log.info(
            "identity loaded",
            extra={"fields": {"event": "identity_loaded", **material.describe()}},
        )
        for w in self.workers:
            self._send(w, self._material_msg())

    def _material_msg(self) -> dict[str, Any]:
        m = self.material
        assert m is not None
        return {
            "op": "material",
            "chain": m.chain_pem.decode(),
            "key": m.key_pem.decode(),
            "bundle": m.bundle_pem.decode(),
            "origin": m.origin,
            "federated": {td: pem.decode() for td, pem in m.federated},
            "domain_bound": m.domain_bound,
        }

    def on_crl(self, pem: bytes) -> None:
        """A revocation list arrived (CA fetch, MTLS_CRL_FILE): take it in the background
        (`_take_crl`), the latest input first; `crl_settled` waits for that."""
        self._crl_inbox = pem
        if self._crl_task is None or self._crl_task.done():
            self._crl_task = self.spawn(self._take_crls(), "crl-load")

    async def crl_settled(self) -> None:
        """Wait until every revocation list received so far is taken (or refused)."""
        while self._crl_task is not None and not self._crl_task.done():
            await asyncio.wait({self._crl_task})

    async def _take_crls(self) -> None:
        while (pem := self._crl_inbox) is not None:
            self._crl_inbox = None  # one arriving meanwhile is the next (older ones skipped)
            await self._take_crl(pem)

    async def _take_crl(self, pem: bytes) -> None:
        """Check a list against the issuers we trust, all or nothing (in a thread: a
        600,000-entry list takes 1-2 s, and the admin port keeps answering); compare it CA
        by CA with the list in force (a CRL never goes backwards, a trusted CA's CRL never
        disappears: refused parts are counted and logged, the last accepted CRL of that CA
        kept); hand the result to the workers, which refuse its revoked peers and close
        their open connections."""
        material = self.material
        if material is None:
            return
        current = self.revocations
        if pem == self.crl_pem and current is not None:
            # The same input again (a CA fetch every MTLS_BUNDLE_REFRESH): already decided,
            # and not parsed again.
            self._show_crl(current)
            return
        started = time.monotonic()
        try:
            new = await asyncio.to_thread(load_crls, pem, material.issuers)
        except CrlRejected as exc:
            metrics.CRL_RELOADS.labels("error").inc()
            log.error(
                "revocation list refused, keeping the current one: %s",
                exc,
                extra={"fields": {"event": "crl_refused"}},
            )
            return
        current = self.revocations
        self.crl_pem = pem
        merged = merge(current, new, material.issuers)
        for why in merged.refused:
            # A replayed old list, or one without a CA's CRL, would un-revoke certificates.
            metrics.CRL_RELOADS.labels("error").inc()
            log.error(
                "revocation list refused: %s", why, extra={"fields": {"event": "crl_refused"}}
            )
        if not merged.changed:
            if current is not None:
                self._show_crl(current)
            return
        rl = merged.result
        headers, payload = await asyncio.to_thread(compact, rl)
        self._show_crl(rl)
        metrics.CRL_RELOADS.labels("ok").inc()
        self.revocations = rl
        self.crl_frame = control.encode({"op": "crl", "issuers": headers}, payload)
        log.info(
            "revocation list loaded: %d revoked certificate(s), next update %s (%.2fs)",
            len(rl),
            rl.next_update.isoformat() if rl.next_update else "not given",
            time.monotonic() - started,
            extra={"fields": {"event": "crl_loaded", "stale": rl.stale}},
        )
        for w in self.workers:
            self._send_frame(w, self.crl_frame)

    def _show_crl(self, rl: RevocationList) -> None:
        this, nxt = rl.this_update, rl.next_update
        metrics.IDENTITY.set_crl(
            this.timestamp() if this else None, nxt.timestamp() if nxt else None, len(rl)
        )

    def on_policy(self, data: bytes, policy: Policy) -> None:
        """A good MTLS_POLICY_FILE: in force here and in every worker."""
        frame = control.encode({"op": "policy", "text": data.decode()})
        if frame == self.policy_frame:
            return  # SIGHUP with an unchanged file: nothing to judge again
        self.policy_frame = frame
        outbound = (
            f"; {len(policy.outbound)} outbound route rule(s), default {policy.outbound_default}"
            if policy.outbound_default is not None
            else "; outbound not judged by the file"
        )
        log.info(
            "authorization policy loaded: %d inbound route rule(s), default %s%s%s",
            len(policy.inbound),
            policy.default,
            outbound,
            ", dry run" if policy.dry_run else "",
            extra={
                "fields": {
                    "event": "policy_loaded",
                    "routes": sorted(policy.inbound),
                    "outbound_routes": sorted(policy.outbound),
                }
            },
        )
        for w in self.workers:
            self._send_frame(w, self.policy_frame)

    def reload(self, why: str) -> bool:
        """Reload files (and MTLS_CRL_FILE, MTLS_POLICY_FILE); keep the old identity (and
        policy) if the new one is bad. In CA mode, fetch the bundle and the CRL now."""
        if self.policy_file is not None:
            self.policy_file.load(why)
        if self.files is None:
            if self.federation is not None:
                self.federation.load_files()
            if self.ca_source is not None:
                log.info("%s: fetching the trust bundle and revocation list from the CA", why)
                self.ca_source.refresh_now()
            return True
        if self.federation is not None:
            self.federation.load_files()
        ok = self.files.reload(why)
        if self.crl_file is not None:
            self.crl_file.load()
        return bool(ok)

    async def obtain_from_ca(self) -> None:
        from .certsource.ca import CaSource

        s = self.settings
        token = s.ca_token.get_secret_value() if s.ca_token is not None else ""
        if not token and s.ca_token_file is not None:
            token = read_file(s.ca_token_file, "join token").decode().strip()
        assert s.ca_url and s.ca_fingerprint and s.identity
        source = CaSource(
            s.ca_url,
            token,
            s.ca_fingerprint,
            str(s.identity),
            on_update=self._on_ca_update,
            on_crl=self.on_crl,
            token_file=s.ca_token_file,
            bundle_refresh=s.bundle_refresh,
        )
        self.ca_source = source
        delay = 1.0
        while True:
            try:
                material = await source.enroll()
                self.validate(material)
                break
            except (ProxyError, OSError) as exc:
                log.error("enrolment with %s failed: %s (retrying in %.0fs)", s.ca_url, exc, delay)
            except Exception as exc:
                log.error("enrolment with %s failed: %r (retrying in %.0fs)", s.ca_url, exc, delay)
            # Cancelled here (SIGTERM) like anywhere else in start-up.
            await asyncio.sleep(delay)  # the next attempt reads MTLS_CA_TOKEN_FILE again
            delay = min(delay * 2, 60.0)
        self.apply(material)
        try:
            await source.refresh_crl()  # before serving: revoked peers refused from the start
        except CertError as exc:
            log.warning("fetching the revocation list failed (retried with the bundle): %s", exc)
        self.spawn(source.run(), "ca-renewal")

    async def obtain_from_spiffe(self) -> None:
        """Follow the Workload API; start-up goes on once the first SVID is in use (/ready
        says "no certificate yet" until then)."""
        from .certsource.spiffe import SpiffeSource, WorkloadApiUpdate

        s = self.settings
        assert s.spiffe_endpoint_socket is not None
        federation = self.federation
        assert federation is not None

        def validate(update: WorkloadApiUpdate) -> None:
            # The whole update or nothing: its federated bundles are judged with it.
            tls_state_for(federation.preview(update.material, update.federated), s)

        def on_update(update: WorkloadApiUpdate) -> None:
            federation.set_workload_bundles(update.federated)
            if self.own is not None:
                metrics.CERT_RELOADS.labels("ok").inc()
            self.apply(update.material)

        source = SpiffeSource(
            s.spiffe_endpoint_socket,
            validate=validate,
            on_update=on_update,
            identity=str(s.identity) if s.identity is not None else None,
        )
        self.spiffe_source = source
        self.spawn(source.run(), "spiffe-workload-api")
        await source.first.wait()

    def _on_ca_update(self, material: Material) -> None:
        try:
            self.validate(material)
        except CertError as exc:
            metrics.CERT_RELOADS.labels("error").inc()
            log.error("renewed certificate unusable, keeping the current one: %s", exc)
            return
        metrics.CERT_RELOADS.labels("ok").inc()
        self.apply(material)

    # --- readiness -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        m = self.material
        if m is None:
            return False, "no certificate yet"
        if m.not_after.timestamp() <= time.time():
            return False, f"certificate expired at {m.not_after.isoformat()}"
        refused = [w for w in self.workers if w.refused is not None]
        if refused:
            w = refused[0]
            return False, f"worker {w.slot} refused the current certificate: {w.refused}"
        not_ready = [w.slot for w in self.workers if not w.ready]
        if not self.workers or not_ready:
            return False, f"workers not serving yet: {not_ready}"
        if not self.serving:
            return False, "starting"
        return True, "ready"

    # --- workers -------------------------------------------------------------------------

    def _send(self, w: WorkerProc, msg: dict[str, Any]) -> None:
        self._send_frame(w, control.encode(msg))

    def _send_frame(self, w: WorkerProc, frame: bytes) -> None:
        """One length-prefixed frame to the worker's stdin (proxy/control.py): any size."""
        proc = w.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(frame)

    async def _start_worker(self, w: WorkerProc) -> None:
        w.socks = [relisten(s) for s in w.socks]  # a worker that drained ended its listeners
        fds = [s.fileno() for s in w.socks]
        w.ready = False
        w.refused = None
        counts = self.counts
        counts.set(w.slot, 0)  # a restarted worker starts with nothing open
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "_worker",
            ",".join(str(fd) for fd in fds),
            str(counts.workers),
            str(w.slot),
            str(counts.fd),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            pass_fds=[*fds, counts.fd],
        )
        self.spawn(self._read_worker(w, w.proc), f"worker-{w.slot}-replies")
        if self.policy_frame is not None:
            self._send_frame(w, self.policy_frame)  # before anything is served, as the CRL
        if self.crl_frame is not None:
            self._send_frame(w, self.crl_frame)  # first: in force before the worker serves
        if self.material is not None:
            self._send(w, self._material_msg())

    async def _read_worker(self, w: WorkerProc, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the reader's limit: not one of ours
                log.error("worker %d wrote an overlong line to the control channel", w.slot)
                continue
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "ready":
                w.ready = True
                w.refused = None
                log.info("worker %d (pid %d) serving", w.slot, proc.pid)
            elif op == "material_ok":
                w.refused = None
            elif op == "material_error":
                w.refused = str(msg.get("error"))
                metrics.CERT_RELOADS.labels("error").inc()
                log.error("worker %d refused the new material: %s", w.slot, w.refused)

    async def _supervise(self, w: WorkerProc) -> None:
        delay = 1.0
        while True:
            proc = w.proc
            assert proc is not None
            code = await proc.wait()
            w.ready = False
            self.counts.set(w.slot, 0)  # what it held died with it
            self._mark_dead(proc.pid)
            if self.draining:
                return
            w.restarts += 1
            log.error(
                "worker %d (pid %d) exited with %s; restarting in %.0fs",
                w.slot,
                proc.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            if self.draining:
                return
            try:
                await self._start_worker(w)
            except (StartupError, OSError) as exc:
                log.error("worker %d could not be restarted (retrying): %s", w.slot, exc)

    def _mark_dead(self, pid: int) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    async def start_workers(self, socks_per_route: list[list[socket.socket]]) -> None:
        n = self.settings.workers
        self.workers = [
            WorkerProc(slot=i, socks=[socks[i] for socks in socks_per_route]) for i in range(n)
        ]
        for w in self.workers:
            await self._start_worker(w)
        for w in self.workers:
            self.spawn(self._supervise(w), f"worker-{w.slot}-supervisor")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            refused = [w for w in self.workers if w.refused is not None]
            if refused:
                raise StartupError(
                    f"worker {refused[0].slot} refused the certificate: {refused[0].refused}"
                )
            if time.monotonic() > deadline:
                raise StartupError("workers did not start serving in time")
            if any(w.proc is not None and w.proc.returncode is not None for w in self.workers):
                raise StartupError("a worker exited during start-up (see its log above)")
            await asyncio.sleep(0.05)

    # --- lifecycle -----------------------------------------------------------------------

    def request_drain(self, why: str) -> None:
        if not self.draining:
            log.info("%s: draining", why)
            self.draining = True
            self._stop_orphan_listeners()
            self.stop.set()

    def _stop_orphan_listeners(self) -> None:
        """The listeners of a worker that is dead (and is not restarted while draining) have
        no one to end them: end them now, or the kernel queues clients nobody will accept."""
        for w in self.workers:
            if w.proc is None or w.proc.returncode is not None:
                _stop_listening(w.socks)

    def _procs(self) -> list[asyncio.subprocess.Process]:
        return [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]

    async def _drain_workers(self, grace: float) -> None:
        """Tell every worker to drain (message and SIGTERM: either is enough), wait up to
        `grace`, then kill what is left."""
        self.draining = True
        for w in self.workers:
            self._send(w, {"op": "drain"})
        self._stop_orphan_listeners()
        procs = self._procs()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not drain in time: killing it", p.pid)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for w in self.workers:
            _stop_listening(w.socks)  # a worker killed before it could

    def _bind(self) -> list[list[socket.socket]]:
        socks_per_route = []
        for r in self.routes:
            socks = bind_listener(r.listen, self.settings.workers)
            socks_per_route.append(socks)
            # Port 0 becomes the port the kernel picked: logs and /status show that one.
            r.listen = Address(r.listen.host, socks[0].getsockname()[1])
            log.info(
                "listening",
                extra={
                    "fields": {
                        "event": "listening",
                        "direction": r.direction,
                        "route": r.name,
                        "listen": str(r.listen),
                        "target": f"{r.target[0]}:{r.target[1]}" if r.target else "original-dst",
                        "mode": r.mode,
                    }
                },
            )
        return socks_per_route

    async def _start(self) -> None:
        """Start-up, steps 1-4 (see the module docstring)."""
        s = self.settings
        metrics.IDENTITY.set_source(s.identity_source)
        if s.federated_bundles or s.identity_source == "spiffe":
            self.federation = Federation(
                s.federated_bundles,
                on_change=self.on_bundles_changed,
                refresh=s.bundle_refresh,
                domain_bound=s.identity_source == "spiffe",
            )
            self.federation.load_files()
        if s.identity_source == "files":
            assert s.cert_file and s.key_file and s.trust_bundle_file
            self.files = FileSource(
                s.cert_file,
                s.key_file,
                s.trust_bundle_file,
                validate=self.validate,
                on_update=self.apply,
            )
            self.apply(self.files.load())
            if s.crl_file is not None:
                self.crl_file = CrlFile(s.crl_file, on_crl=self.on_crl)
                self.crl_file.load()
        if s.policy_file is not None:
            if s.allow_peers:
                log.warning(
                    "both MTLS_POLICY_FILE and MTLS_ALLOW_PEERS are set: the policy file "
                    "decides who may connect inbound, MTLS_ALLOW_PEERS (%s) is ignored",
                    ",".join(p.text for p in s.allow_peers),
                    extra={"fields": {"event": "allow_peers_ignored"}},
                )
            self.policy_file = PolicyFile(s.policy_file, on_policy=self.on_policy)
            problem = self.policy_file.load()
            if problem is not None:
                raise StartupError(f"MTLS_POLICY_FILE {problem}")
            self.spawn(self.policy_file.run(), "policy-watcher")
        socks_per_route = self._bind()
        raise_nofile_limit(2 * s.max_connections + 64)
        from .admin import start_admin

        self.admin, self.admin_address = await start_admin(self)
        if s.drop_privileges:
            drop_privileges(s.proxy_uid)
        if s.transparent and os.geteuid() != s.proxy_uid:
            # The OUTPUT rule exempts only MTLS_PROXY_UID: as anyone else our own dials would
            # be captured again and loop through us until the connection limit.
            raise StartupError(
                f"transparent mode: running as uid {os.geteuid()}, but the interception rules "
                f"exempt MTLS_PROXY_UID={s.proxy_uid}; run as uid {s.proxy_uid} or start as "
                "root with MTLS_DROP_PRIVILEGES=true"
            )
        federation = self.federation
        if federation is not None:
            await federation.fetch_first()
            self.spawn(federation.watch_files(), "bundle-file-watcher")
            for td, url in federation.endpoints():
                self.spawn(federation.follow_endpoint(td, url), f"bundle-{td}")
        if s.identity_source == "spiffe":
            await self.obtain_from_spiffe()
        elif self.files is None:
            await self.obtain_from_ca()
        else:
            self.spawn(self.files.run(), "file-watcher")
            if self.crl_file is not None:
                self.spawn(self.crl_file.run(), "crl-watcher")
        await self.crl_settled()  # the revocation list is in force before anyone is served
        await self.start_workers(socks_per_route)
        await self.wait_ready()
        self.serving = True
        log.info("ready", extra={"fields": {"event": "ready", "workers": s.workers}})

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT or POST /drain, drain, stop.

        The stop signals are honoured in every state: during enrolment and while waiting
        for the workers too (start-up is cancelled, started workers are stopped).
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_drain, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("SIGHUP"))
        start = asyncio.ensure_future(self._start())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({start, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
                log.info("stopped during start-up")
                await self._drain_workers(WORKER_STOP_GRACE)
                return 0
            try:
                start.result()
            except BaseException:
                # No worker may outlive a failed start-up, holding the ports.
                await self._drain_workers(WORKER_STOP_GRACE)
                raise
            await stopping
            await self._drain_workers(self.settings.drain_timeout + 5.0)
            log.info("stopped")
            return 0
        finally:
            stopping.cancel()
            self.tasks.cancel_all()
            if self.admin is not None:
                await self.admin.cleanup()
