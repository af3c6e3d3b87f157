"""`mtls-sidecar ca ...`: init, issue, token, serve, rotate-root, rotate-intermediate, info,
list, revoke, unrevoke.

Exit codes: 0 success; 2 usage or bad input (bad flag, duration, SPIFFE ID, trust domain);
1 any other failure (CA directory missing, unsafe permissions, already exists, rotation
out of order). Expected failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import ipaddress
import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..config import parse_duration
from ..errors import ProxyError
from ..httpguard import positive_int
from .db import CaStore, StoreError, parse_serial, validate_reason
from .issuer import (
    LEAF_TTL,
    cert_pem,
    fingerprint,
    issue_leaf,
    key_pem,
    new_key,
    trust_domain_of,
    validate_spiffe_id,
    validate_trust_domain,
)
from .store import CaDir, write_private, write_public
from .tokens import make_token

MIN_LEAF_TTL = dt.timedelta(seconds=2)
MAX_TOKEN_TTL = dt.timedelta(days=30)


T = TypeVar("T")


class UsageError(ProxyError):
    """Bad command-line input: exit code 2."""


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser that raises ValueError with a message for a human."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_duration = _arg(lambda text: dt.timedelta(seconds=parse_duration(text)))
_spiffe_id = _arg(validate_spiffe_id)
_trust_domain = _arg(validate_trust_domain)


def parse_listen(text: str) -> tuple[str | None, int]:
    """ADDR as host:port, :port (all interfaces) or [v6]:port -> (host or None, port)."""
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d{1,5})", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port, :port or [v6]:port")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port must be 1-65535")
    host = m.group(1) or m.group(2) or None
    return host, port


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (one of {', '.join(_LOG_LEVELS)})"
        )
    return text.upper()


def _dns_name(text: str) -> str:
    """A DNS name or IP address for a certificate SAN (ASCII; IDNs in their xn-- form)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text))
    name = text.rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        hint = ""
        with contextlib.suppress(UnicodeError):
            if not text.isascii():
                hint = f"; write it as {text.encode('idna').decode('ascii')}"
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a DNS name (ASCII letters, digits and '-' in dot-separated "
            f"labels){hint}"
        )
    return name


_reason = _arg(validate_reason)
_serial = _arg(parse_serial)


def _https_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an issuer URL (example: https://kubernetes.default.svc.cluster.local)"
        )
    return text


def _listen(text: str) -> tuple[str | None, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtls-sidecar ca", description="The small internal CA.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("init", help="create a root CA and an online intermediate in DIR")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--trust-domain", type=_trust_domain, default="cluster.local")
    s.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    s.add_argument(
        "--no-name-constraints",
        dest="name_constraints",
        action="store_false",
        help="leave out the intermediate's URI name constraint (for verifiers such as "
        "rustls-webpki that reject it)",
    )

    s = sub.add_parser("issue", help="offline: issue a leaf certificate and key to files")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--id", type=_spiffe_id, required=True, dest="spiffe_id")
    s.add_argument(
        "--dns", type=_dns_name, action="append", default=[], help="extra DNS SAN (repeatable)"
    )
    s.add_argument("--ttl", type=_duration, default=LEAF_TTL)
    s.add_argument("--out", required=True, help="writes PREFIX.crt, PREFIX.key, PREFIX.bundle.pem")

    s = sub.add_parser("token", help="print a join token for one identity")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--id", type=_spiffe_id, required=True, dest="spiffe_id")
    s.add_argument("--ttl", type=_duration, default=dt.timedelta(hours=1))

    s = sub.add_parser("serve", help="run the enrolment service (HTTPS)")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--listen", type=_listen, default=(None, 8443), help="ADDR (default :8443)")
    s.add_argument(
        "--dns", type=_dns_name, action="append", default=[], help="extra name for the service cert"
    )
    s.add_argument("--leaf-ttl", type=_duration, default=LEAF_TTL, help="default 24h")
    s.add_argument("--log-level", type=_log_level, default="INFO", help=", ".join(_LOG_LEVELS))
    s.add_argument(
        "--max-connections", type=positive_int, default=512, help="open connections (512)"
    )
    s.add_argument(
        "--header-timeout",
        type=_duration,
        default=dt.timedelta(seconds=10),
        help="TLS handshake, and each request's headers (default 10s)",
    )
    s.add_argument(
        "--body-timeout", type=_duration, default=dt.timedelta(seconds=10), help="default 10s"
    )
    s.add_argument(
        "--k8s-issuer",
        type=_https_url,
        help="accept Kubernetes service-account tokens from this issuer (the tokens' iss); "
        "keys from its discovery document unless --k8s-jwks is given",
    )
    s.add_argument("--k8s-jwks", type=Path, help="the cluster's service-account keys (JWKS file)")
    s.add_argument("--k8s-audience", default="mtls-sidecar", help="default mtls-sidecar")
    s.add_argument("--k8s-ca-file", type=Path, help="CA bundle to verify the issuer over HTTPS")
    s.add_argument(
        "--k8s-token-file", type=Path, help="bearer token sent when fetching the issuer's keys"
    )

    s = sub.add_parser("rotate-root", help="one step of root rotation: add, switch, remove")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--stage", choices=("add", "switch", "remove"), required=True)
    s.add_argument(
        "--wait",
        type=_duration,
        default=None,
        help="how long the previous stage must have been in effect (default: 10m before "
        "switch, 24h10m before remove); 0s skips the check",
    )

    s = sub.add_parser(
        "rotate-intermediate", help="replace the issuing intermediate (needs the root key)"
    )
    s.add_argument("--dir", type=Path, required=True)

    s = sub.add_parser("info", help="show trust domain, roots and fingerprints, rotation stage")
    s.add_argument("--dir", type=Path, required=True)

    s = sub.add_parser("list", help="the issuance log: serial, identity, not after, requester")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--json", action="store_true", help="one JSON array instead of a table")

    s = sub.add_parser("revoke", help="revoke a certificate, or every certificate of an identity")
    s.add_argument("--dir", type=Path, required=True)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", type=_serial, help="hex serial, as `ca list` shows it")
    which.add_argument("--id", type=_spiffe_id, dest="spiffe_id", help="SPIFFE ID")
    s.add_argument("--reason", type=_reason, default="unspecified", help="RFC 5280 reason name")

    s = sub.add_parser("unrevoke", help="let a revoked identity enrol and renew again")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--id", type=_spiffe_id, dest="spiffe_id", required=True)
    return p


def _open_store(ca: CaDir) -> CaStore:
    store = ca.store()
    if store.created:
        print(f"created the CA store {store.path}", file=sys.stderr)
    return store


def _refuse_revoked(store: CaStore, spiffe_id: str) -> None:
    found = store.identity_revocation(spiffe_id)
    if found is not None:
        raise StoreError(f"identity {spiffe_id} is revoked ({found[1]}); run ca unrevoke first")


def _check_identity(ca: CaDir, spiffe_id: str) -> None:
    td = trust_domain_of(spiffe_id)
    if td != ca.state.trust_domain:
        raise UsageError(f"{spiffe_id} is not in this CA's trust domain {ca.state.trust_domain}")


def _cmd_init(args: argparse.Namespace) -> int:
    ca = CaDir.init(
        args.dir, args.trust_domain, force=args.force, name_constraints=args.name_constraints
    )
    root = ca.root(1)
    print(f"created CA for trust domain {args.trust_domain} in {args.dir}")
    print(f"root fingerprint (MTLS_CA_FINGERPRINT): {fingerprint(root)}")
    print(
        f"the root key {args.dir / 'root-1.key'} is needed only to rotate; "
        "for real use move it offline"
    )
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    _check_identity(ca, args.spiffe_id)
    if args.ttl < MIN_LEAF_TTL:
        raise UsageError(f"--ttl must be at least {MIN_LEAF_TTL.total_seconds():.0f}s")
    issuer = ca.issuer()
    key = new_key()
    store = _open_store(ca)
    try:
        _refuse_revoked(store, args.spiffe_id)
        leaf = store.issue(
            lambda: issue_leaf(
                issuer,
                key.public_key(),
                spiffe_id=args.spiffe_id,
                dns_names=tuple(args.dns),
                ttl=args.ttl,
            ),
            requester="offline ca issue",
            issuer_gen=ca.state.issuer,
            issuer=issuer.cert,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    prefix = args.out
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    write_private(Path(f"{prefix}.key"), key_pem(key))
    write_public(Path(f"{prefix}.crt"), cert_pem(leaf, issuer.cert))
    write_public(Path(f"{prefix}.bundle.pem"), ca.bundle_pem())
    print(
        f"issued {args.spiffe_id} serial={leaf.serial_number:x} "
        f"not_after={leaf.not_valid_after_utc.isoformat()} -> {prefix}.crt, {prefix}.key, "
        f"{prefix}.bundle.pem"
    )
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    _check_identity(ca, args.spiffe_id)
    ttl: dt.timedelta = args.ttl
    if ttl <= dt.timedelta(0) or ttl > MAX_TOKEN_TTL:
        raise UsageError(f"--ttl must be between 1s and {MAX_TOKEN_TTL.days}d")
    print(make_token(ca.token_secret(), args.spiffe_id, ttl.total_seconds()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..httpguard import Limits
    from .k8s import JwksSource, KeysUnavailable, SaVerifier
    from .service import DEFAULT_SERVER_NAMES, serve

    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if args.leaf_ttl < MIN_LEAF_TTL:
        raise UsageError(f"--leaf-ttl must be at least {MIN_LEAF_TTL.total_seconds():.0f}s")
    for flag in ("header_timeout", "body_timeout"):
        if getattr(args, flag) <= dt.timedelta(0):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    ca = CaDir.open(args.dir)  # fail before binding if the directory is unusable
    sa_verifier = None
    if args.k8s_jwks is not None and args.k8s_issuer is None:
        raise UsageError(
            "--k8s-jwks needs --k8s-issuer, the issuer the tokens name (iss), for example "
            "https://kubernetes.default.svc.cluster.local"
        )
    if args.k8s_issuer is not None:
        try:
            source = JwksSource(
                issuer=args.k8s_issuer,
                jwks_file=args.k8s_jwks,
                ca_file=args.k8s_ca_file,
                bearer_file=args.k8s_token_file,
            )
        except KeysUnavailable as exc:
            raise UsageError(str(exc)) from None
        sa_verifier = SaVerifier(
            source, trust_domain=ca.state.trust_domain, audience=args.k8s_audience
        )
    limits = Limits(
        header_timeout=args.header_timeout.total_seconds(),
        handshake_timeout=args.header_timeout.total_seconds(),
        body_timeout=args.body_timeout.total_seconds(),
        max_connections=args.max_connections,
    )
    host, port = args.listen
    names = [*DEFAULT_SERVER_NAMES, *args.dns]
    if host and host not in ("0.0.0.0", "::"):
        names.append(host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            args.dir,
            host=host,
            port=port,
            leaf_ttl=args.leaf_ttl,
            server_names=tuple(names),
            stop=stop,
            sa_verifier=sa_verifier,
            limits=limits,
        )

    try:
        asyncio.run(main())
    except OSError as exc:
        raise ProxyError(f"cannot listen on {host or '*'}:{port}: {exc.strerror or exc}") from None
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    print(ca.rotate(args.stage, wait=args.wait))
    return 0


def _cmd_rotate_intermediate(args: argparse.Namespace) -> int:
    inter = CaDir.open(args.dir).renew_intermediate()
    print(f"new issuing intermediate, expires {inter.cert.not_valid_after_utc.isoformat()}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    print(CaDir.open(args.dir).describe())
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cmd_list(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    store = _open_store(ca)
    try:
        rows = store.issued()
        revoked_ids = {r.spiffe_id for r in rows if store.identity_revocation(r.spiffe_id)}
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    table = [("SERIAL", "IDENTITY", "NOT AFTER", "REQUESTER", "REVOKED")]
    for r in rows:
        revoked = f"{_when(r.revoked_at)} {r.reason}" if r.revoked else "-"
        table.append((r.serial, r.spiffe_id, _when(r.not_after), r.requester, revoked))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    for identity in sorted(revoked_ids):
        print(f"identity revoked (no enrolment or renewal): {identity}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    store = _open_store(ca)
    try:
        if args.serial:
            row = store.revoke_serial(args.serial, args.reason)
            print(f"revoked serial={row.serial} ({row.spiffe_id}), reason {args.reason}")
        else:
            _check_identity(ca, args.spiffe_id)
            rows = store.revoke_identity(args.spiffe_id, args.reason)
            print(
                f"revoked identity {args.spiffe_id} ({args.reason}): {len(rows)} unexpired "
                "certificate(s); enrolment and renewal refused until ca unrevoke"
            )
            for row in rows:
                print(f"  serial={row.serial} not_after={_when(row.not_after)}")
        try:
            ca.write_crl(store)
        except (OSError, StoreError) as exc:
            reason: object = exc
            if isinstance(exc, OSError):
                reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "read-only"}.get(
                    exc.errno or 0, exc.strerror or exc
                )
            raise ProxyError(
                f"the revocation is recorded, but {args.dir / 'crl.pem'} was not written "
                f"({reason}); a running ca serve publishes the new CRL at /v1/crl as soon as "
                "it can make one"
            ) from None
    finally:
        store.close()
    print(f"CRL written to {args.dir / 'crl.pem'}; a running ca serve publishes it at /v1/crl")
    return 0


def _cmd_unrevoke(args: argparse.Namespace) -> int:
    ca = CaDir.open(args.dir)
    store = _open_store(ca)
    try:
        store.unrevoke_identity(args.spiffe_id)
    finally:
        store.close()
    print(f"{args.spiffe_id} may enrol and renew again (its revoked certificates stay revoked)")
    return 0


_COMMANDS = {
    "init": _cmd_init,
    "issue": _cmd_issue,
    "token": _cmd_token,
    "serve": _cmd_serve,
    "rotate-root": _cmd_rotate,
    "rotate-intermediate": _cmd_rotate_intermediate,
    "info": _cmd_info,
    "list": _cmd_list,
    "revoke": _cmd_revoke,
    "unrevoke": _cmd_unrevoke,
}


def main(argv: list[str]) -> int:
    """Run `mtls-sidecar ca ARGV...`; return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
