"""The CA directory on disk: layout, permissions, state (ca.json) and root rotation stages.

Layout of DIR (mode 0700):
  ca.json                   trust domain, roots in the bundle, issuing generation, stage
  root-N.crt / root-N.key   root CA of generation N (the key may be moved offline)
  intermediate-N.crt/.key   online issuing CA of generation N, signed by root-N
  intermediate-N.prev.crt/.key  the intermediate replaced by rotate-intermediate (its leaves
                            still renew, and it signs their CRL)
  token_secret              HMAC key for join tokens
  ca.db                     the store: issuance log, revocations, used join tokens (0600)
  crl.pem                   the current CRLs, followed by the intermediates that signed them
Every key file is written mode 0600; a directory whose key files are readable by group or
others, or which others can write to, is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import CertError
from . import tokens
from .crl import Revoked, build_crl, crl_bundle_pem
from .db import DB_FILE, CaStore, key_id_of
from .issuer import (
    Issuer,
    cert_pem,
    fingerprint,
    key_pem,
    make_intermediate,
    make_root,
    validate_trust_domain,
)

STATE_FILE = "ca.json"
SECRET_FILE = "token_secret"
CRL_FILE = "crl.pem"
FORMAT = 1

STAGE_STABLE = "stable"  # one root, issuing with its intermediate
STAGE_ADDED = "added"  # two roots in the bundle, still issuing with the old one
STAGE_SWITCHED = "switched"  # two roots in the bundle, issuing with the new one

# How long a rotation stage must have been in effect before the next one, by default.
# add -> switch: every sidecar must have fetched the two-root bundle (they refresh it every
# 5 minutes and on each renewal). switch -> remove: every leaf of the old intermediate must
# have expired (default leaf TTL 24h) and been renewed by the new one.
DEFAULT_WAIT_BEFORE_SWITCH = dt.timedelta(minutes=10)
DEFAULT_WAIT_BEFORE_REMOVE = dt.timedelta(hours=24, minutes=10)
INTERMEDIATE_WARNING = dt.timedelta(days=30)


class CaDirError(CertError):
    """The CA directory is missing, unsafe or inconsistent; the message says how to fix it."""


@dataclass(frozen=True)
class CaState:
    """The contents of ca.json."""

    trust_domain: str
    bundle: tuple[int, ...]  # generations whose roots are trusted, oldest first
    issuer: int  # generation whose intermediate signs leaves
    stage: str = STAGE_STABLE
    stage_since: float = field(default_factory=time.time)
    name_constraints: bool = True  # intermediates limited to the trust domain's URIs

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "trust_domain": self.trust_domain,
                "bundle": list(self.bundle),
                "issuer": self.issuer,
                "stage": self.stage,
                "stage_since": self.stage_since,
                "name_constraints": self.name_constraints,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, where: Path) -> CaState:
        try:
            raw: Any = json.loads(text)
            if raw.get("format") != FORMAT:
                raise CaDirError(f"{where}: unknown format {raw.get('format')!r}")
            state = cls(
                trust_domain=str(raw["trust_domain"]),
                bundle=tuple(int(g) for g in raw["bundle"]),
                issuer=int(raw["issuer"]),
                stage=str(raw["stage"]),
                stage_since=float(raw["stage_since"]),
                name_constraints=bool(raw.get("name_constraints", True)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CaDirError(f"{where} is damaged ({type(exc).__name__}: {exc})") from None
        if not state.bundle or state.issuer not in state.bundle:
            raise CaDirError(f"{where} is inconsistent: issuer {state.issuer} not in bundle")
        return state


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with `mode` set from creation on."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have cleared bits; set exactly
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A full disk: leave no half-written temporary file taking space.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (key, token secret) mode 0600."""
    _write_file(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or state file mode 0644."""
    _write_file(path, data, 0o644)


def _mode_problem(path: Path, *, is_dir: bool) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if is_dir and mode & 0o022:
        return (
            f"CA directory {path} is writable by group or others (mode {mode:04o}); "
            f"run: chmod 700 {path}"
        )
    if not is_dir and mode & 0o077:
        return (
            f"CA file {path} is accessible by group or others (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    return None


class CaDir:
    """A CA directory: read its state and material, and make the rotation steps."""

    def __init__(self, path: Path, state: CaState) -> None:
        self.path = path
        self.state = state

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls, path: Path, trust_domain: str, *, force: bool = False, name_constraints: bool = True
    ) -> CaDir:
        """Create a root, an intermediate and a token secret in `path` (generation 1)."""
        validate_trust_domain(trust_domain)
        if (path / STATE_FILE).exists() and not force:
            raise CaDirError(
                f"{path} already holds a CA ({path / STATE_FILE}); "
                "refusing to overwrite it (pass --force to replace it and everything it issued)"
            )
        if path.exists() and not path.is_dir():
            raise CaDirError(f"{path} exists and is not a directory")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        if force:
            for old in path.glob("*"):
                if old.name.startswith(("root-", "intermediate-", DB_FILE)) or old.name in (
                    STATE_FILE,
                    SECRET_FILE,
                    CRL_FILE,
                ):
                    old.unlink()
        state = CaState(
            trust_domain=trust_domain, bundle=(1,), issuer=1, name_constraints=name_constraints
        )
        ca = cls(path, state)
        ca._create_generation(1)
        write_private(path / SECRET_FILE, tokens.new_secret().hex().encode() + b"\n")
        ca._save_state(state)
        store = ca.store()
        try:
            ca.write_crl(store)
        finally:
            store.close()
        return ca

    @classmethod
    def open(cls, path: Path) -> CaDir:
        """Open an existing CA directory, refusing unsafe permissions."""
        if not path.is_dir():
            raise CaDirError(f"CA directory {path} does not exist (create it with: ca init)")
        state_path = path / STATE_FILE
        if not state_path.exists():
            raise CaDirError(f"{path} is not a CA directory (no {STATE_FILE}; run: ca init)")
        problems = [_mode_problem(path, is_dir=True)]
        for secret in sorted([*path.glob("*.key"), path / SECRET_FILE, path / DB_FILE]):
            problems.append(_mode_problem(secret, is_dir=False))
        found = [p for p in problems if p]
        if found:
            raise CaDirError("; ".join(found))
        try:
            text = state_path.read_text()
        except OSError as exc:
            raise CaDirError(f"{state_path}: {exc.strerror}") from None
        return cls(path, CaState.from_json(text, state_path))

    def state_stamp(self) -> tuple[int, int]:
        """Changes whenever ca.json is replaced (lets a running service notice a rotation)."""
        st = (self.path / STATE_FILE).stat()
        return (st.st_mtime_ns, st.st_ino)

    # -- reading material -------------------------------------------------------------------

    def _read(self, name: str) -> bytes:
        p = self.path / name
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise CaDirError(f"{p} is missing") from None
        except OSError as exc:
            raise CaDirError(f"{p}: {exc.strerror}") from None

    def _cert(self, name: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self._read(name))
        except ValueError as exc:
            raise CaDirError(f"{self.path / name} is not a PEM certificate ({exc})") from None

    def _key(self, name: str) -> ec.EllipticCurvePrivateKey:
        p = self.path / name
        if not p.exists() and name.startswith("root-"):
            raise CaDirError(
                f"root key {p} is not here (moved offline?); bring it back for this step"
            )
        problem = _mode_problem(p, is_dir=False)
        if problem:
            raise CaDirError(problem)
        try:
            key = serialization.load_pem_private_key(self._read(name), password=None)
        except (ValueError, TypeError) as exc:
            raise CaDirError(f"{p} is not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaDirError(f"{p} is not an ECDSA key")
        return key

    def root(self, generation: int) -> x509.Certificate:
        return self._cert(f"root-{generation}.crt")

    def intermediate(self, generation: int) -> x509.Certificate:
        return self._cert(f"intermediate-{generation}.crt")

    def issuer_for(self, generation: int) -> Issuer:
        """The intermediate of `generation` with its key."""
        return Issuer(self.intermediate(generation), self._key(f"intermediate-{generation}.key"))

    def issuer(self) -> Issuer:
        """The intermediate that signs new leaves now."""
        return self.issuer_for(self.state.issuer)

    def roots(self) -> list[x509.Certificate]:
        """The trusted roots, oldest first."""
        return [self.root(g) for g in self.state.bundle]

    def bundle_pem(self) -> bytes:
        return cert_pem(*self.roots())

    def trusted_intermediates(self) -> list[x509.Certificate]:
        """Intermediates whose roots are in the bundle: leaves they signed may renew.

        Includes the previous intermediate of a generation after `renew_intermediate`, so
        leaves it signed can still renew.
        """
        found = [self.intermediate(g) for g in self.state.bundle]
        for g in self.state.bundle:
            if (self.path / f"intermediate-{g}.prev.crt").exists():
                found.append(self._cert(f"intermediate-{g}.prev.crt"))
        return found

    def crl_issuers(self) -> list[tuple[int, Issuer]]:
        """(generation, intermediate with key) for every trusted intermediate that can sign a
        CRL: the current one of each generation in the bundle, and a previous one whose key
        was kept by rotate-intermediate."""
        found = [(g, self.issuer_for(g)) for g in self.state.bundle]
        for g in self.state.bundle:
            prev = f"intermediate-{g}.prev"
            if (self.path / f"{prev}.crt").exists() and (self.path / f"{prev}.key").exists():
                found.append((g, Issuer(self._cert(f"{prev}.crt"), self._key(f"{prev}.key"))))
        return found

    def make_crl(self, store: CaStore, *, now: dt.datetime | None = None) -> bytes:
        """Fresh CRLs of every issuing intermediate from `store`, PEM, with their issuers."""
        now = now or dt.datetime.now(dt.UTC)
        crls = []
        issuers = self.crl_issuers()
        for _, issuer in issuers:
            entries = [
                Revoked(
                    serial=int(row.serial, 16),
                    revoked_at=dt.datetime.fromtimestamp(row.revoked_at or 0, dt.UTC),
                    reason=row.reason or "unspecified",
                )
                for row in store.revoked_by(key_id_of(issuer.cert), now=now.timestamp())
            ]
            crls.append(build_crl(issuer, entries, number=store.next_crl_number(), now=now))
        return crl_bundle_pem(crls, [i.cert for _, i in issuers])

    def write_crl(self, store: CaStore, *, now: dt.datetime | None = None) -> bytes:
        """Make the CRLs and write them to crl.pem (mode 0644); return the PEM."""
        pem = self.make_crl(store, now=now)
        write_public(self.path / CRL_FILE, pem)
        return pem

    def crl_pem(self) -> bytes:
        """The CRLs last written to crl.pem (CaDirError if missing or unreadable)."""
        return self._read(CRL_FILE)

    def store(self) -> CaStore:
        """The SQLite store of this directory (created on first use: an old directory
        migrates the first time a command needs it)."""
        return CaStore.for_dir(self.path)

    def token_secret(self) -> bytes:
        text = self._read(SECRET_FILE).strip()
        try:
            secret = bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise CaDirError(f"{self.path / SECRET_FILE} is damaged (expected hex)") from None
        if len(secret) < 16:
            raise CaDirError(f"{self.path / SECRET_FILE} is too short")
        return secret

    def describe(self) -> str:
        """A human summary: trust domain, roots with fingerprints, issuer, stage."""
        lines = [f"CA directory {self.path}", f"trust domain: {self.state.trust_domain}"]
        for g in self.state.bundle:
            root = self.root(g)
            mark = " (issuing)" if g == self.state.issuer else ""
            lines.append(
                f"root G{g}{mark}: fingerprint {fingerprint(root)}, "
                f"expires {root.not_valid_after_utc.isoformat()}"
            )
        inter = self.intermediate(self.state.issuer)
        expires = inter.not_valid_after_utc
        lines.append(f"issuing intermediate expires {expires.isoformat()}")
        if expires - dt.datetime.now(dt.UTC) < INTERMEDIATE_WARNING:
            lines.append("WARNING: the issuing intermediate expires soon; run rotate-intermediate")
        since = dt.datetime.fromtimestamp(self.state.stage_since, dt.UTC).isoformat()
        lines.append(f"rotation stage: {self.state.stage} (since {since})")
        return "\n".join(lines)

    # -- changing -------------------------------------------------------------------------

    def _create_generation(self, generation: int) -> None:
        td = self.state.trust_domain
        root = make_root(td, generation)
        inter = make_intermediate(
            td, generation, root, name_constraints=self.state.name_constraints
        )
        write_private(self.path / f"root-{generation}.key", key_pem(root.key))
        write_public(self.path / f"root-{generation}.crt", cert_pem(root.cert))
        write_private(self.path / f"intermediate-{generation}.key", key_pem(inter.key))
        write_public(self.path / f"intermediate-{generation}.crt", cert_pem(inter.cert))

    def renew_intermediate(self) -> Issuer:
        """Replace the issuing intermediate with a fresh one (new key, new year) under the
        same root; needs the root key. Leaves of the old one keep verifying and renewing.
        """
        g = self.state.issuer
        root = Issuer(self.root(g), self._key(f"root-{g}.key"))
        old = self.intermediate(g)
        inter = make_intermediate(
            self.state.trust_domain, g, root, name_constraints=self.state.name_constraints
        )
        old_key = self._key(f"intermediate-{g}.key")
        write_public(self.path / f"intermediate-{g}.prev.crt", cert_pem(old))
        # Kept to sign the CRL of the leaves it issued until they expire (at most a leaf TTL).
        write_private(self.path / f"intermediate-{g}.prev.key", key_pem(old_key))
        write_private(self.path / f"intermediate-{g}.key", key_pem(inter.key))
        write_public(self.path / f"intermediate-{g}.crt", cert_pem(inter.cert))
        self._save_state(self.state)  # a new ca.json tells a running service to reload
        return inter

    def _save_state(self, state: CaState) -> None:
        # ca.json is replaced last and atomically: a running service sees old or new, whole.
        write_public(self.path / STATE_FILE, state.to_json().encode() + b"\n")
        self.state = state

    def rotate(
        self, stage: str, *, wait: dt.timedelta | None = None, now: float | None = None
    ) -> str:
        """Make one root-rotation step (add, switch, remove); return what to do next.

        `wait` is how long the previous step must have been in effect (defaults above);
        pass timedelta(0) to skip the check.
        """
        now = time.time() if now is None else now
        st = self.state
        since = now - st.stage_since

        def too_early(needed: dt.timedelta, what: str) -> None:
            if since < needed.total_seconds():
                left = needed.total_seconds() - since
                raise CaDirError(
                    f"stage '{st.stage}' began {since:.0f}s ago; {what} "
                    f"(wait {left:.0f}s more, or pass --wait with the time you know is enough)"
                )

        if stage == "add":
            if st.stage != STAGE_STABLE:
                raise CaDirError(f"a rotation is already under way (stage '{st.stage}')")
            new = max(st.bundle) + 1
            self._create_generation(new)
            self._save_state(
                replace(st, bundle=(*st.bundle, new), stage=STAGE_ADDED, stage_since=now)
            )
            fp = fingerprint(self.root(new))
            return (
                f"added root G{new} (fingerprint {fp}); the trust bundle now holds "
                f"{len(st.bundle) + 1} roots and leaves are still issued by G{st.issuer}.\n"
                "Next, once every sidecar has the new bundle (they refresh it every 5 minutes "
                "and on each renewal): rotate-root --stage switch"
            )
        if stage == "switch":
            if st.stage != STAGE_ADDED:
                raise CaDirError(f"switch follows add; the rotation stage is '{st.stage}'")
            too_early(
                wait if wait is not None else DEFAULT_WAIT_BEFORE_SWITCH,
                "sidecars may not have the new root yet",
            )
            new = max(st.bundle)
            self.issuer_for(new)  # fail now, not in the service, if its key is unusable
            self._save_state(replace(st, issuer=new, stage=STAGE_SWITCHED, stage_since=now))
            return (
                f"leaves are now issued by G{new}.\n"
                "Next, once every leaf of the old issuer has expired (one leaf lifetime, 24h "
                "by default): rotate-root --stage remove"
            )
        if stage == "remove":
            if st.stage != STAGE_SWITCHED:
                raise CaDirError(f"remove follows switch; the rotation stage is '{st.stage}'")
            too_early(
                wait if wait is not None else DEFAULT_WAIT_BEFORE_REMOVE,
                "leaves of the old issuer may still be valid",
            )
            old = [g for g in st.bundle if g != st.issuer]
            self._save_state(replace(st, bundle=(st.issuer,), stage=STAGE_STABLE, stage_since=now))
            for g in old:
                # The old keys can no longer mint anything trusted; do not leave them lying about.
                for name in (
                    f"intermediate-{g}.key",
                    f"intermediate-{g}.prev.key",
                    f"root-{g}.key",
                ):
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()
            fp = fingerprint(self.root(st.issuer))
            return (
                f"removed root(s) {', '.join(f'G{g}' for g in old)}; the trust bundle holds "
                f"G{st.issuer} only.\nNew sidecars must use MTLS_CA_FINGERPRINT={fp}"
            )
        raise CaDirError(f"unknown rotation stage {stage!r} (add, switch or remove)")
