"""Benchmark certificates: root CA -> intermediate -> ECDSA P-256 client and server leaves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.ca.issuer import cert_pem, issue_leaf, key_pem, make_intermediate, make_root, new_key

TRUST_DOMAIN = "bench.test"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"


@dataclass(frozen=True)
class LeafFiles:
    """Files of one leaf identity, in the forms the proxies want them."""

    spiffe_id: str
    chain: Path  # leaf + intermediate, PEM
    key: Path  # PKCS#8 PEM, unencrypted
    combined: Path  # chain + key in one PEM (haproxy `crt`)


@dataclass(frozen=True)
class BenchCerts:
    """Everything every proxy of the benchmark is configured with."""

    root: Path  # trust bundle: the root CA only
    client: LeafFiles
    server: LeafFiles


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def make_certs(directory: Path) -> BenchCerts:
    """Create the benchmark CA and both leaves in `directory` and return their paths.

    Issued by the sidecar's own CA code (`proxy.ca.issuer`): root -> name-constrained
    intermediate -> 24h ECDSA P-256 SPIFFE leaves with a `localhost` DNS SAN.
    """
    root = make_root(TRUST_DOMAIN, 1)
    inter = make_intermediate(TRUST_DOMAIN, 1, root)
    root_path = _write(directory / "root.pem", cert_pem(root.cert))
    leaves: list[LeafFiles] = []
    for name, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = new_key()
        cert = issue_leaf(inter, key.public_key(), spiffe_id=spiffe_id, dns_names=("localhost",))
        chain = cert_pem(cert, inter.cert)
        private = key_pem(key)
        leaves.append(
            LeafFiles(
                spiffe_id=spiffe_id,
                chain=_write(directory / f"{name}.crt", chain),
                key=_write(directory / f"{name}.key", private, 0o600),
                combined=_write(directory / f"{name}.pem", chain + private, 0o600),
            )
        )
    return BenchCerts(root=root_path, client=leaves[0], server=leaves[1])
