"""Identity from the SPIFFE Workload API (SPIRE agent): X509-SVIDs and bundles, streamed.

One FetchX509SVID stream over the agent's Unix socket (gRPC, with the generated stubs of
the published workload.proto that the `spiffe` package ships). Each response carries the
whole state (SVIDs, our trust domain's bundle, federated bundles): it is checked as one unit
and handed on, or refused and the current state kept. When the stream breaks (agent
restart, socket gone) it is opened again with exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The master forks (and execs) worker processes while this gRPC client runs: gRPC's fork
# handlers would run in the child between fork and exec and can crash it there. Nothing
# gRPC is used in a forked child, so they are turned off (read when grpc is imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# gRPC's C core logs to stderr in its own format; what matters is logged here, as JSON.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from .. import metrics
from ..errors import CertError
from ..federation import BundleError, certs_from_der, roots_from_der, to_pem
from ..material import Material, load_material

log = logging.getLogger("mtls.certsource.spiffe")

# The Workload API spec: every call carries this header, or the agent refuses it.
SECURITY_HEADER = (("workload.spiffe.io", "true"),)
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 30.0


class WorkloadApiUpdate:
    """One FetchX509SVID response, parsed: our material and the federated bundles (DER)."""

    def __init__(self, material: Material, federated: dict[str, bytes]) -> None:
        self.material = material
        self.federated = federated


def parse_response(resp: Any, origin: str, want: str | None) -> WorkloadApiUpdate:
    """Our material and the federated bundles from an X509SVIDResponse; raises CertError.

    The first SVID is ours (the spec's default) unless `want` (MTLS_IDENTITY) names another.
    """
    svids = list(resp.svids)
    if not svids:
        raise CertError("the Workload API sent no X509-SVID for this workload")
    svid = svids[0]
    if want is not None:
        chosen = [s for s in svids if s.spiffe_id == want]
        if not chosen:
            ids = ", ".join(s.spiffe_id for s in svids)
            raise CertError(f"the Workload API has no SVID for {want} (it sent: {ids})")
        svid = chosen[0]
    try:
        chain_pem = to_pem(certs_from_der(svid.x509_svid, f"X509-SVID of {svid.spiffe_id}"))
        key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        bundle_pem = to_pem(roots_from_der(svid.bundle, f"bundle of {svid.spiffe_id}"))
    except BundleError as exc:
        raise CertError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise CertError(f"X509-SVID key of {svid.spiffe_id}: {exc}") from None
    material = load_material(chain_pem, key_pem, bundle_pem, origin=origin)
    if material.identity != svid.spiffe_id:
        raise CertError(
            f"the Workload API labelled an SVID {svid.spiffe_id}, but its certificate says "
            f"{material.identity}"
        )
    # The spec keys federated bundles by trust domain ID ("spiffe://example.org").
    federated = {
        str(td).removeprefix("spiffe://").rstrip("/"): bytes(der)
        for td, der in resp.federated_bundles.items()
    }
    for td, der in federated.items():
        try:
            roots_from_der(der, f"federated bundle of {td}")
        except BundleError as exc:
            raise CertError(str(exc)) from None
    return WorkloadApiUpdate(material, federated)


class SpiffeSource:
    """Follows the Workload API's FetchX509SVID stream; hands each good update on.

    `validate` is the master's check of a new material (raises CertError); `on_update`
    receives each accepted update. `first` is set once the first one is accepted.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        validate: Callable[[WorkloadApiUpdate], object],
        on_update: Callable[[WorkloadApiUpdate], None],
        identity: str | None = None,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.socket_path = socket_path
        self.target = f"unix://{socket_path}"
        self._validate = validate
        self._on_update = on_update
        self._identity = identity
        self._backoff_first = backoff_first
        self._backoff_max = backoff_max
        self.first = asyncio.Event()
        self.connected = False
        self.updates = 0

    async def run(self) -> None:
        """Open the stream, follow it, open it again when it breaks (backoff with jitter)."""
        delay = self._backoff_first
        while True:
            got = await self._follow()
            if got:
                delay = self._backoff_first  # it worked for a while: start over
            wait = delay * random.uniform(0.8, 1.2)
            log.info(
                "reconnecting to the Workload API at %s in %.1fs",
                self.target,
                wait,
                extra={"fields": {"event": "workload_api_backoff", "seconds": round(wait, 3)}},
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._backoff_max)

    async def _follow(self) -> bool:
        """One stream, to its end; True if it delivered anything."""
        got = False
        channel = grpc.aio.insecure_channel(self.target)
        try:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
            call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=SECURITY_HEADER)
            async for resp in call:
                if not self.connected:
                    self.connected = True
                    metrics.IDENTITY.set_workload_api(True)
                    log.info(
                        "connected to the Workload API at %s",
                        self.target,
                        extra={"fields": {"event": "workload_api_connected"}},
                    )
                got = True
                self._handle(resp)
            log.warning("the Workload API at %s ended the stream", self.target)
        except grpc.aio.AioRpcError as exc:
            metrics.WORKLOAD_API_ERRORS.labels(exc.code().name.lower()).inc()
            log.error(
                "Workload API at %s: %s (%s)",
                self.target,
                exc.code().name,
                exc.details() or "no details",
                extra={"fields": {"event": "workload_api_error", "code": exc.code().name}},
            )
        finally:
            self.connected = False
            metrics.IDENTITY.set_workload_api(False)
            await channel.close()
        return got

    def _handle(self, resp: Any) -> None:
        try:
            update = parse_response(resp, f"spiffe {self.target}", self._identity)
            self._validate(update)
        except CertError as exc:
            metrics.CERT_RELOADS.labels("error").inc()
            log.error(
                "Workload API update refused, keeping the current identity: %s",
                exc,
                extra={"fields": {"event": "reload_failed"}},
            )
            return
        self.updates += 1
        self._on_update(update)
        self.first.set()
