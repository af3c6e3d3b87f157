"""The CA's embedded store (SQLite in the CA directory): issuance log, revocations, used nonces.

One file, `ca.db` (mode 0600, WAL journal), shared safely by every process working on the
directory (`ca serve`, `ca issue`, `ca revoke`, a second `ca serve`): each change is one short
transaction, and a join token's nonce is claimed with an INSERT on a unique key in the same
transaction that records the certificate, so one token yields one certificate, ever.
Each thread has its own connection; a storage fault (disk full, read-only, locked, I/O error)
is a StoreUnavailable with the cause in words, never a raw sqlite3 error.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from cryptography import x509

from ..errors import CertError

DB_FILE = "ca.db"
SCHEMA_VERSION = 1
# Another process holding the write lock (a concurrent issuance) is waited for this long.
BUSY_TIMEOUT_MS = 5000

# RFC 5280 section 5.3.1 reason codes, by the names the RFC gives them. certificateHold
# (a reversible suspension) and removeFromCRL (delta CRLs only) do not fit a revocation
# that is final, so they are refused.
REASONS = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
    "aACompromise",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY,           -- lowercase hex, no leading zeros
    spiffe_id TEXT NOT NULL,
    not_before REAL NOT NULL,
    not_after REAL NOT NULL,
    requester TEXT NOT NULL,           -- how it was obtained (token nonce, renewal, ...)
    issuer_gen INTEGER NOT NULL,       -- generation of the issuing intermediate
    issuer_key_id TEXT NOT NULL,       -- its subject key identifier, hex
    issued_at REAL NOT NULL,
    revoked_at REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS issued_by_id ON issued (spiffe_id);
CREATE TABLE IF NOT EXISTS revoked_ids (
    spiffe_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS used_nonces (
    nonce TEXT PRIMARY KEY, expires_at REAL NOT NULL, used_at REAL NOT NULL
);
"""


class StoreError(CertError):
    """The store cannot be opened or a change to it is refused; the message says why."""


class NonceUsed(StoreError):
    """A join token whose nonce was already claimed (here or by another process)."""


class IdentityRevoked(StoreError):
    """An issuance for an identity that `ca revoke --id` revoked."""


def validate_reason(text: str) -> str:
    """Return the RFC 5280 reason name matching `text` (case-insensitive), else ValueError."""
    for name in REASONS:
        if name.lower() == text.strip().lower():
            return name
    raise ValueError(f"unknown revocation reason {text!r} (one of: {', '.join(REASONS)})")


def serial_hex(serial: int) -> str:
    """The form serials take in the store, logs and `ca list`."""
    return f"{serial:x}"


def parse_serial(text: str) -> str:
    """Normalise a serial typed by a user (hex, optional 0x and colons) or raise ValueError."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a hexadecimal serial number") from None
    if value <= 0:
        raise ValueError(f"{text!r} is not a certificate serial (must be positive)")
    return serial_hex(value)


@dataclass(frozen=True)
class Issued:
    """One row of the issuance log."""

    serial: str
    spiffe_id: str
    not_before: float
    not_after: float
    requester: str
    issuer_gen: int
    issuer_key_id: str
    issued_at: float
    revoked_at: float | None
    reason: str | None

    @property
    def revoked(self) -> bool:
        """True once revoked."""
        return self.revoked_at is not None

    def to_json(self) -> dict[str, object]:
        """The entry as `ca list --json` prints it (times in ISO 8601, UTC)."""

        def iso(t: float | None) -> str | None:
            return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()

        return {
            "serial": self.serial,
            "identity": self.spiffe_id,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "requester": self.requester,
            "issuer_generation": self.issuer_gen,
            "issuer_key_id": self.issuer_key_id,
            "issued_at": iso(self.issued_at),
            "revoked_at": iso(self.revoked_at),
            "reason": self.reason,
        }


def key_id_of(cert: x509.Certificate) -> str:
    """Hex subject key identifier of a CA certificate (computed if the extension is absent)."""
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    return ski.digest.hex()


def describe_fault(exc: sqlite3.Error) -> str:
    """What a SQLite error means for someone running the CA, in a few words."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return "the disk is full"
    if name.startswith("SQLITE_READONLY"):
        return "the store is read-only"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return (
            f"another process has held its write lock for over {BUSY_TIMEOUT_MS / 1000:g}s "
            "(a long `ca` command, or a sqlite3 shell left in a transaction?)"
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return "it cannot be opened (is its directory read-only, or the disk full?)"
    if name.startswith("SQLITE_IOERR"):
        return "a disk I/O error (is the disk full or read-only?)"
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return "the file is damaged"
    return str(exc)


class StoreUnavailable(StoreError):
    """The store cannot be used now (disk full, read-only, locked, I/O error): a fault of the
    storage, not of the request. The service answers 503; retrying later may work."""

    def __init__(self, path: Path, cause: str, detail: str = "") -> None:
        self.cause = cause
        extra = f" ({detail})" if detail and detail not in cause else ""
        super().__init__(f"CA store {path} is unavailable: {cause}{extra}")

    @property
    def busy(self) -> bool:
        """True when it is only waiting for another process's write lock."""
        return self.cause.startswith("another process has held")


P = ParamSpec("P")
R = TypeVar("R")


def _faults(method: Callable[Concatenate[CaStore, P], R]) -> Callable[Concatenate[CaStore, P], R]:
    """Turn SQLite's errors in a public CaStore method into StoreUnavailable; after any fault
    but a busy lock, this thread's connection is dropped, so that the next call opens a fresh
    one (a store that was read-only or missing works again once it is fixed)."""

    @functools.wraps(method)
    def wrapper(self: CaStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            fault = self._fault(exc)
        raise fault

    return wrapper


class CaStore:
    """The SQLite store of one CA directory. Creates (migrates to) it on first open.

    Each thread uses a connection of its own (SQLite serialises writers across connections
    and processes by its lock), so the service can run store calls in a thread pool, off its
    event loop. Every public method raises StoreUnavailable when the storage fails."""

    def __init__(self, path: Path, *, connect: bool = True) -> None:
        """Open (creating, or migrating) the store; with connect=False, only on first use."""
        self.path = path
        self.created = False
        self._ready = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        if connect:
            self.ensure_open()

    @classmethod
    def for_dir(cls, ca_dir: Path, *, connect: bool = True) -> CaStore:
        """The store of the CA directory `ca_dir` (created on first use)."""
        return cls(ca_dir / DB_FILE, connect=connect)

    def ensure_open(self) -> None:
        """Create or migrate the store if that was not done yet; StoreUnavailable if the
        storage does not allow it now."""
        try:
            self._conn()
        except (sqlite3.Error, OSError) as exc:
            raise self._fault(exc) from None

    def _fault(self, exc: sqlite3.Error | OSError) -> StoreUnavailable:
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOSPC:
                cause = "the disk is full"
            elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                cause = "the store is read-only"
            else:
                cause = f"{exc.strerror or exc}"
            return StoreUnavailable(self.path, cause, exc.strerror or "")
        cause = describe_fault(exc)
        if not cause.startswith("another process has held"):
            self._drop()
            cause = self._diagnose() or cause
        return StoreUnavailable(self.path, cause, str(exc))

    def _diagnose(self) -> str | None:
        """For SQLite's vaguer errors (cannot open, I/O error): is the disk full or
        read-only? None when neither."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return "no file descriptor is left to open it (the open-file limit)"
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        if st.f_flag & os.ST_RDONLY:
            return "the store is read-only (a read-only filesystem)"
        if st.f_bavail == 0:
            return "the disk is full"
        return None

    def _connect(self) -> sqlite3.Connection:
        if not self._ready and not self.path.exists():
            # Create it 0600 before SQLite touches it; SQLite gives -wal/-shm the same mode.
            with contextlib.suppress(FileExistsError):  # another process was first
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.fchmod(fd, 0o600)
                os.close(fd)
                self.created = True
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA synchronous = FULL")
            if not self._ready:
                self._setup(db)
        except BaseException:
            db.close()
            raise
        with self._lock:
            self._connections.append(db)
        return db

    def _setup(self, db: sqlite3.Connection) -> None:
        """Create the store's tables; a store already at our schema is only read, so that a
        read-only store can still be read."""
        with self._lock:
            if self._ready:
                return
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            except sqlite3.OperationalError:  # no table yet
                row = None
            if row is None or row[0] < SCHEMA_VERSION:
                self._create(db)
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer mtls-sidecar (schema {row[0]}); "
                    "upgrade this one"
                )
            self._ready = True

    def _create(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                db.execute("INSERT INTO meta VALUES ('revision', 0)")
                db.execute("INSERT INTO meta VALUES ('crl_number', 0)")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        return self._conn()

    def _drop(self) -> None:
        """Forget this thread's connection (after a fault); the next call opens a new one."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            with self._lock:
                if db in self._connections:
                    self._connections.remove(db)
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def release(self) -> None:
        """Close this thread's connection (a thread that is done with the store)."""
        self._drop()

    def close(self) -> None:
        """Close every connection (the last one to close folds the WAL back into ca.db)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._local = threading.local()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock at once: concurrent writers (other processes)
        # queue on the busy timeout instead of failing halfway through.
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")  # may fail too (disk full): then roll back, below
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    # -- reading --------------------------------------------------------------------------

    @_faults
    def revision(self) -> int:
        """Changes on every revocation change: lets a running service notice a `ca revoke`."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        return int(row[0])

    def _rows(self, where: str = "", args: tuple[object, ...] = ()) -> list[Issued]:
        cur = self._db.execute(
            "SELECT serial, spiffe_id, not_before, not_after, requester, issuer_gen, "
            f"issuer_key_id, issued_at, revoked_at, reason FROM issued {where} "
            "ORDER BY issued_at, serial",
            args,
        )
        return [Issued(*row) for row in cur.fetchall()]

    @_faults
    def issued(self) -> list[Issued]:
        """The whole issuance log, oldest first."""
        return self._rows()

    def _get(self, serial: str) -> Issued | None:
        rows = self._rows("WHERE serial = ?", (serial,))
        return rows[0] if rows else None

    @_faults
    def get(self, serial: str) -> Issued | None:
        """The log entry of one serial (hex), if we issued it."""
        return self._get(serial)

    @_faults
    def is_serial_revoked(self, serial: str) -> bool:
        """True when the certificate with this serial (hex) was revoked."""
        row = self._db.execute(
            "SELECT revoked_at FROM issued WHERE serial = ?", (serial,)
        ).fetchone()
        return row is not None and row[0] is not None

    def _identity_revocation(self, spiffe_id: str) -> tuple[float, str] | None:
        row = self._db.execute(
            "SELECT revoked_at, reason FROM revoked_ids WHERE spiffe_id = ?", (spiffe_id,)
        ).fetchone()
        return None if row is None else (float(row[0]), str(row[1]))

    @_faults
    def identity_revocation(self, spiffe_id: str) -> tuple[float, str] | None:
        """(revoked_at, reason) when `spiffe_id` is revoked, else None."""
        return self._identity_revocation(spiffe_id)

    @_faults
    def revoked_by(self, issuer_key_id: str, *, now: float | None = None) -> list[Issued]:
        """Revoked, unexpired certificates of one intermediate: the entries of its CRL."""
        now = time.time() if now is None else now
        return self._rows(
            "WHERE issuer_key_id = ? AND revoked_at IS NOT NULL AND not_after > ?",
            (issuer_key_id, now),
        )

    @_faults
    def next_crl_number(self) -> int:
        """A CRL number larger than any given out before, by any process on this store."""
        with self._write() as db:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'crl_number'")
            row = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
        return int(row[0])

    # -- changing -------------------------------------------------------------------------

    @_faults
    def issue(
        self,
        sign: Callable[[], x509.Certificate],
        *,
        requester: str,
        issuer_gen: int,
        issuer: x509.Certificate,
        nonce: tuple[str, float] | None = None,
        now: float | None = None,
    ) -> x509.Certificate:
        """Sign a certificate with `sign` and record it, in one transaction.

        With `nonce` = (token nonce, token expiry), the nonce is claimed first; if any process
        claimed it before, NonceUsed is raised and nothing is signed. Identity revocation is
        re-checked inside the transaction, so a `ca revoke --id` racing an enrolment wins.
        """
        now = time.time() if now is None else now
        with self._write() as db:
            if nonce is not None:
                db.execute("DELETE FROM used_nonces WHERE expires_at <= ?", (now,))
                try:
                    db.execute("INSERT INTO used_nonces VALUES (?, ?, ?)", (*nonce, now))
                except sqlite3.IntegrityError:
                    raise NonceUsed("token was already used") from None
            cert = sign()
            identity = _spiffe_id(cert)
            revoked = db.execute(
                "SELECT reason FROM revoked_ids WHERE spiffe_id = ?", (identity,)
            ).fetchone()
            if revoked is not None:
                raise IdentityRevoked(f"identity {identity} is revoked ({revoked[0]})")
            db.execute(
                "INSERT INTO issued VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (
                    serial_hex(cert.serial_number),
                    identity,
                    cert.not_valid_before_utc.timestamp(),
                    cert.not_valid_after_utc.timestamp(),
                    requester,
                    issuer_gen,
                    key_id_of(issuer),
                    now,
                ),
            )
        return cert

    @_faults
    def revoke_serial(self, serial: str, reason: str, *, now: float | None = None) -> Issued:
        """Revoke one certificate by serial; raise StoreError if unknown or already revoked."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = self._get(serial)
            if row is None:
                raise StoreError(f"no certificate with serial {serial} in the issuance log")
            if row.revoked:
                raise StoreError(f"certificate {serial} is already revoked ({row.reason})")
            db.execute(
                "UPDATE issued SET revoked_at = ?, reason = ? WHERE serial = ?",
                (now, reason, serial),
            )
            self._bump(db)
        found = self._get(serial)
        assert found is not None
        return found

    @_faults
    def revoke_identity(
        self, spiffe_id: str, reason: str, *, now: float | None = None
    ) -> list[Issued]:
        """Revoke every unexpired certificate of `spiffe_id` and refuse it new ones until
        `unrevoke_identity`; return the certificates revoked now."""
        now = time.time() if now is None else now
        with self._write() as db:
            if self._identity_revocation(spiffe_id) is not None:
                raise StoreError(f"identity {spiffe_id} is already revoked")
            targets = [
                r.serial
                for r in self._rows(
                    "WHERE spiffe_id = ? AND revoked_at IS NULL AND not_after > ?",
                    (spiffe_id, now),
                )
            ]
            db.execute("INSERT INTO revoked_ids VALUES (?, ?, ?)", (spiffe_id, now, reason))
            db.executemany(
                "UPDATE issued SET revoked_at = ?, reason = ? WHERE serial = ?",
                [(now, reason, s) for s in targets],
            )
            self._bump(db)
        return [r for s in targets if (r := self._get(s)) is not None]

    @_faults
    def unrevoke_identity(self, spiffe_id: str) -> None:
        """Let `spiffe_id` enrol and renew again (its revoked certificates stay revoked)."""
        with self._write() as db:
            cur = db.execute("DELETE FROM revoked_ids WHERE spiffe_id = ?", (spiffe_id,))
            if cur.rowcount == 0:
                raise StoreError(f"identity {spiffe_id} is not revoked")
            self._bump(db)

    @_faults
    def used_nonces(self) -> int:
        """How many join-token nonces are remembered (tokens used and not yet expired)."""
        row = self._db.execute("SELECT count(*) FROM used_nonces").fetchone()
        return int(row[0])


def _spiffe_id(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return next(u for u in uris if u.startswith("spiffe://"))
