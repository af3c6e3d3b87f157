"""Identity from three files (cert-manager, SPIRE helper, Vault agent), watched and reloaded.

Shaped like the CA source: `load()` gives the first material, `run()` follows changes and
hands each new, validated set to `on_update`; a bad set is logged and counted and the old
one stays (all or nothing).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .. import metrics
from ..errors import CertError
from ..material import Material, load_material_files, read_file
from ..policyfile import MAX_BYTES as MAX_POLICY_BYTES
from ..policyfile import Policy, PolicyFileError, policy_from_bytes
from ..revocation import MAX_CRL_BYTES, too_big

log = logging.getLogger("mtls.certsource.files")

WATCH_INTERVAL = 1.0
WATCH_RETRIES = 3  # extra attempts after a failed reload of changed files

FileSignature = tuple[int, int, int, int]
Signature = tuple[FileSignature | None, ...]


def file_signature(path: Path) -> FileSignature | None:
    """What tells that a watched file changed (device, inode, mtime, size), or None when it
    cannot be stat'ed: a rewrite in place and a rename over it (atomic updates) both show."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FileSource:
    """MTLS_CERT_FILE, MTLS_KEY_FILE and MTLS_TRUST_BUNDLE_FILE, checked as one unit.

    `validate` is the same check the master applies to any material before accepting it
    (it raises CertError); `on_update` receives each new material that passed it.
    """

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        bundle_file: Path,
        *,
        validate: Callable[[Material], object],
        on_update: Callable[[Material], None],
        interval: float = WATCH_INTERVAL,
        retries: int = WATCH_RETRIES,
    ) -> None:
        self.paths = (cert_file, key_file, bundle_file)
        self._validate = validate
        self._on_update = on_update
        self._interval = interval
        self._retries = retries
        self._material: Material | None = None
        self._signature: Signature | None = None

    @property
    def material(self) -> Material | None:
        """The material in use, or None before `load`."""
        return self._material

    def _stat(self) -> Signature:
        return tuple(file_signature(path) for path in self.paths)

    def read(self) -> Material:
        """Read and validate the three files; raises CertError naming what is wrong."""
        material = load_material_files(*self.paths)
        self._validate(material)
        return material

    def load(self) -> Material:
        """The first material (start-up): raises CertError if the files are unusable."""
        self._signature = self._stat()
        material = self.read()
        self._material = material
        return material

    def reload(self, why: str) -> bool:
        """Read the files again; hand a new, valid set on. False (old set kept) on failure."""
        try:
            material = self.read()
        except CertError as exc:
            metrics.CERT_RELOADS.labels("error").inc()
            log.error(
                "reload (%s) failed, keeping the current certificate: %s",
                why,
                exc,
                extra={"fields": {"event": "reload_failed"}},
            )
            return False
        old = self._material
        if (
            old is not None
            and old.chain_pem == material.chain_pem
            and old.key_pem == material.key_pem
            and old.bundle_pem == material.bundle_pem
        ):
            return True
        metrics.CERT_RELOADS.labels("ok").inc()
        log.info("reloaded certificate and trust bundle (%s)", why)
        self._material = material
        self._on_update(material)
        return True

    async def run(self) -> None:
        """Poll the three files: secrets mounted by Kubernetes change by a symlink swap,
        which a stat of the path sees and inotify on the file does not."""
        if self._signature is None:
            self._signature = self._stat()
        retries = 0
        while True:
            await asyncio.sleep(self._interval)
            sig = self._stat()
            if sig != self._signature:
                self._signature = sig
                retries = 0 if self.reload("files changed") else self._retries
            elif retries:
                # The three files are read one after another: a read can fall between the
                # writer's updates (a new certificate with the old key). Try again a few times
                # even if nothing changes any more.
                retries = 0 if self.reload("retry after a failed reload") else retries - 1


class CrlFile:
    """MTLS_CRL_FILE: PEM CRLs, watched like the identity files. Each change is handed to
    `on_crl`, which checks it (all or nothing) and keeps the last good list on failure."""

    def __init__(
        self, path: Path, *, on_crl: Callable[[bytes], None], interval: float = WATCH_INTERVAL
    ) -> None:
        self.path = path
        self._on_crl = on_crl
        self._interval = interval
        self._signature: FileSignature | None = None

    def _stat(self) -> FileSignature | None:
        return file_signature(self.path)

    def load(self) -> None:
        """Read the file now (start-up, SIGHUP); a missing, empty or oversized file is
        logged and counted, the current list kept."""
        self._signature = sig = self._stat()
        if sig is not None and sig[3] > MAX_CRL_BYTES:
            # Refused before reading: the master would hold it, then parse it, for nothing.
            metrics.CRL_RELOADS.labels("error").inc()
            log.error(
                "MTLS_CRL_FILE %s refused, keeping the current list: %s",
                self.path,
                too_big(sig[3]),
                extra={"fields": {"event": "crl_refused"}},
            )
            return
        try:
            data = read_file(self.path, "revocation list")
        except CertError as exc:
            metrics.CRL_RELOADS.labels("error").inc()
            log.error("cannot read MTLS_CRL_FILE, keeping the current list: %s", exc)
            return
        self._on_crl(data)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            sig = self._stat()
            if sig != self._signature:
                self.load()


class PolicyFile:
    """MTLS_POLICY_FILE, watched like the identity files and reloaded all or nothing: each
    good version is handed to `on_policy` (its bytes); a broken one is logged with the line
    and the reason and counted (mtls_policy_reloads_total{result="error"}), and the policy
    in force stays."""

    def __init__(
        self,
        path: Path,
        *,
        on_policy: Callable[[bytes, Policy], None],
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self.path = path
        self._on_policy = on_policy
        self._interval = interval
        self._signature: FileSignature | None = None

    def _stat(self) -> FileSignature | None:
        return file_signature(self.path)

    def load(self, why: str = "start") -> str | None:
        """Read the file now (start-up, SIGHUP, a change): None when it is in force, else
        why not (also logged and counted)."""
        self._signature = self._stat()
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_POLICY_BYTES + 1)
            policy = policy_from_bytes(data, str(self.path))
        except OSError as exc:
            return self._refused(why, PolicyFileError(f"{self.path}: {exc.strerror or exc}"))
        except PolicyFileError as exc:
            return self._refused(why, exc)
        metrics.POLICY_RELOADS.labels("ok").inc()
        self._on_policy(data, policy)
        return None

    def _refused(self, why: str, exc: PolicyFileError) -> str:
        metrics.POLICY_RELOADS.labels("error").inc()
        log.error(
            "MTLS_POLICY_FILE refused (%s), keeping the policy in force: %s",
            why,
            exc,
            extra={"fields": {"event": "policy_refused", "error": str(exc)}},
        )
        return str(exc)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._stat() != self._signature:
                self.load("file changed")
