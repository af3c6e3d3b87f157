"""The small internal CA: issuing certificates, join tokens, the enrolment service, rotation.

Modules: `issuer` (certificate building, CSR checks; pure), `tokens` (join tokens),
`store` (the CA directory on disk and root rotation), `db` (the SQLite store: issuance log,
revocations, used nonces), `crl` (CRL building; pure), `k8s` (service-account tokens),
`service` (the HTTPS enrolment service), `memcert` (TLS keys loaded from memory), `cli`
(`mtls-sidecar ca ...`).
"""

from __future__ import annotations

from .issuer import CsrRejected, Issuer, fingerprint, issue_leaf, make_intermediate, make_root
from .store import CaDir, CaDirError
from .tokens import TokenClaims, TokenRejected, make_token, verify_token

__all__ = [
    "CaDir",
    "CaDirError",
    "CsrRejected",
    "Issuer",
    "TokenClaims",
    "TokenRejected",
    "fingerprint",
    "issue_leaf",
    "make_intermediate",
    "make_root",
    "make_token",
    "verify_token",
]
