"""Other trust domains' bundles (SPIFFE federation): from the Workload API, from bundle files
(MTLS_FEDERATED_BUNDLES=td=PATH, watched) and from bundle endpoints (td=https://URL, the
https_web profile, fetched every MTLS_BUNDLE_REFRESH or the bundle's refresh hint).

`Federation` holds the newest good bundle of each trust domain and joins it to the identity
material (`combine`). A bad bundle is logged and counted; that domain keeps its last good one
and no other domain is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from .. import metrics
from ..errors import CertError
from ..federation import BundleError, roots_from_der, roots_from_file, roots_from_jwks, to_pem
from ..material import Material, read_file, with_federation
from .files import FileSignature, file_signature

log = logging.getLogger("mtls.certsource.federated")

WATCH_INTERVAL = 1.0
FETCH_TIMEOUT = 10.0
MIN_REFRESH = 1.0


class Federation:
    """The federated bundles in use, per trust domain, and where each came from.

    Configured sources (files, endpoints) win over the Workload API's for the same domain:
    the operator named them. `on_change` is called when any domain's roots change.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, str]],
        *,
        on_change: Callable[[], None],
        refresh: float = 300.0,
        domain_bound: bool = False,
    ) -> None:
        self.sources = list(sources)
        self._on_change = on_change
        self._refresh = refresh
        # Strict per-domain verification whenever federation is in play at all.
        self.domain_bound = domain_bound or bool(self.sources)
        self._configured: dict[str, bytes] = {}  # td -> PEM roots
        self._workload: dict[str, bytes] = {}
        self._times: dict[str, float] = {}  # td -> when its roots last changed
        self._own: tuple[str, bytes] | None = None  # our domain's bundle, for its age
        self._signatures: dict[str, FileSignature | None] = {}
        self._next_fetch: dict[str, float] = {}  # td -> seconds until its endpoint's next fetch

    # --- joining -------------------------------------------------------------------------

    def bundles(self) -> dict[str, bytes]:
        """{trust domain: PEM roots} in use."""
        return {**self._workload, **self._configured}

    def combine(self, material: Material) -> Material:
        """`material` with the federated bundles in use (checked when they arrived)."""
        own = (material.trust_domain, material.bundle_pem)
        if self._own != own:
            self._own = own
            self._times[material.trust_domain] = time.time()
        bundles = self.bundles()
        combined = with_federation(
            material,
            bundles,
            domain_bound=self.domain_bound,
            times={td: t for td, t in self._times.items() if td in bundles or td == own[0]},
        )
        metrics.IDENTITY.set_domains(
            {
                td: (len(roots), self._times.get(td))
                for td, roots in [
                    (combined.trust_domain, combined.roots),
                    *combined.federated_roots.items(),
                ]
            }
        )
        return combined

    def preview(self, material: Material, workload: dict[str, bytes] | None = None) -> Material:
        """What `combine` would make of `material` (with these Workload API bundles, DER,
        if given), changing nothing: the check of new material before it is taken."""
        current = self._workload if workload is None else self._der_to_pem(workload)
        bundles = {**current, **self._configured}
        return with_federation(material, bundles, domain_bound=self.domain_bound)

    @staticmethod
    def _der_to_pem(bundles: dict[str, bytes]) -> dict[str, bytes]:
        try:
            return {
                td: to_pem(roots_from_der(der, f"federated bundle of {td}"))
                for td, der in bundles.items()
            }
        except BundleError as exc:
            raise CertError(str(exc)) from None

    def _set(self, table: dict[str, bytes], td: str, pem: bytes, origin: str) -> bool:
        if table.get(td) == pem:
            return False
        table[td] = pem
        self._times[td] = time.time()
        metrics.BUNDLE_UPDATES.labels(td, "ok").inc()
        log.info(
            "trust bundle of %s updated (%s)",
            td,
            origin,
            extra={"fields": {"event": "bundle_updated", "trust_domain": td, "from": origin}},
        )
        return True

    def _refused(self, td: str, exc: Exception) -> None:
        metrics.BUNDLE_UPDATES.labels(td, "error").inc()
        log.error(
            "trust bundle of %s refused, keeping its current one: %s",
            td,
            exc,
            extra={"fields": {"event": "bundle_refused", "trust_domain": td}},
        )

    def set_workload_bundles(self, bundles: dict[str, bytes]) -> bool:
        """The Workload API's federated bundles (DER, all checked by the source). True if
        anything changed; the caller applies the material it came with."""
        changed = False
        pems = self._der_to_pem(bundles)
        for td in list(self._workload):
            if td not in pems:
                del self._workload[td]
                changed = True
                log.info("the Workload API no longer federates with %s", td)
        for td, pem in pems.items():
            changed |= self._set(self._workload, td, pem, "workload api")
        return changed

    # --- files ---------------------------------------------------------------------------

    def load_file(self, td: str, path: Path) -> bool:
        """Read one bundle file; True if the domain's roots changed."""
        self._signatures[td] = file_signature(path)
        try:
            data = read_file(path, f"trust bundle of {td}")
            pem = to_pem(roots_from_file(data, f"trust bundle file {path} ({td})"))
        except (CertError, BundleError) as exc:
            self._refused(td, exc)
            return False
        return self._set(self._configured, td, pem, f"file {path}")

    def load_files(self) -> None:
        """Read every bundle file (start-up, SIGHUP)."""
        changed = False
        for td, source in self.sources:
            if "://" not in source:
                changed |= self.load_file(td, Path(source))
        if changed:
            self._on_change()

    async def watch_files(self, interval: float = WATCH_INTERVAL) -> None:
        """Poll the bundle files (a Kubernetes secret changes by a symlink swap)."""
        files = [(td, Path(s)) for td, s in self.sources if "://" not in s]
        while files:
            await asyncio.sleep(interval)
            changed = False
            for td, path in files:
                if file_signature(path) != self._signatures.get(td):
                    changed |= self.load_file(td, path)
            if changed:
                self._on_change()

    # --- endpoints -----------------------------------------------------------------------

    async def fetch(self, session: aiohttp.ClientSession, td: str, url: str) -> float:
        """Fetch one bundle endpoint (https_web: the server is checked against the system's
        Web PKI roots); returns seconds until the next fetch."""
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as r:
                if r.status != 200:
                    raise BundleError(f"bundle endpoint {url} answered HTTP {r.status}")
                data = await r.read()
            roots, hint = roots_from_jwks(data, f"bundle from {url} ({td})")
        except (aiohttp.ClientError, TimeoutError, BundleError) as exc:
            self._refused(td, BundleError(f"fetching {url}: {exc}"))
            wait = min(self._refresh, 30.0)
        else:
            if self._set(self._configured, td, to_pem(roots), url):
                self._on_change()
            # The bundle's spiffe_refresh_hint, when it asks for more often than we would.
            wait = max(MIN_REFRESH, min(self._refresh, float(hint) if hint else self._refresh))
        self._next_fetch[td] = wait
        return wait

    async def fetch_first(self) -> None:
        """Fetch every endpoint once (start-up: before serving, so partners connect at once)."""
        endpoints = [(td, s) for td, s in self.sources if "://" in s]
        if not endpoints:
            return
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self.fetch(session, td, url) for td, url in endpoints))

    async def follow_endpoint(self, td: str, url: str) -> None:
        """Fetch one endpoint again and again (after `fetch_first`)."""
        wait = self._next_fetch.get(td, self._refresh)
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(wait)
                wait = await self.fetch(session, td, url)

    def endpoints(self) -> list[tuple[str, str]]:
        return [(td, s) for td, s in self.sources if "://" in s]
