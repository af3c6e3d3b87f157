"""A SPIFFE Workload API server for tests: gRPC on a Unix socket, built from the published
workload.proto (the stubs py-spiffe generates and ships), issuing X509-SVIDs from test CAs.

Like a SPIRE agent it requires the `workload.spiffe.io: true` header, streams the whole
state on FetchX509SVID and pushes a new response to every open stream on each change
(rotation, new bundles, federated bundles); `restart()` stops it (open streams break) and
serves again on the same socket, as an agent restart does.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from .pki import Issuer, make_leaf


def der(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


@dataclass
class WorkloadState:
    """What the agent hands out now: the SVID, our bundle, federated bundles."""

    spiffe_id: str
    issuer: Issuer
    bundle: list[x509.Certificate]
    federated: dict[str, list[x509.Certificate]] = field(default_factory=dict)
    version: int = 0
    serial: int = 0
    not_after: dt.datetime | None = None
    response: Any = None


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The test agent. `issue()` makes a new SVID and pushes it; `set_bundle()` and
    `set_federated()` push new bundles; `calls` counts FetchX509SVID calls (and
    `refused` those without the security header)."""

    def __init__(self, socket_path: Path, state: WorkloadState) -> None:
        self.socket_path = socket_path
        self.state = state
        self.cond = threading.Condition()
        self.calls = 0
        self.refused = 0
        self.server: grpc.Server | None = None
        self.stopping = False
        self.issue()

    # --- state ---------------------------------------------------------------------------

    def issue(self, issuer: Issuer | None = None) -> x509.Certificate:
        """A fresh SVID (from `issuer` if given), pushed to every open stream."""
        with self.cond:
            st = self.state
            if issuer is not None:
                st.issuer = issuer
            cert, key = make_leaf(st.issuer, st.spiffe_id)
            st.serial = cert.serial_number
            st.not_after = cert.not_valid_after_utc
            svid = workload_pb2.X509SVID(
                spiffe_id=st.spiffe_id,
                x509_svid=der([cert, *st.issuer.chain]),
                x509_svid_key=key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                bundle=der(st.bundle),
            )
            self._push(svid)
            return cert

    def set_bundle(self, bundle: list[x509.Certificate]) -> None:
        with self.cond:
            self.state.bundle = bundle
            svid = self.state.response.svids[0]
            svid.bundle = der(bundle)
            self._push(svid)

    def set_federated(self, federated: dict[str, list[x509.Certificate]]) -> None:
        with self.cond:
            self.state.federated = federated
            self._push(self.state.response.svids[0])

    def _push(self, svid: Any) -> None:
        st = self.state
        st.response = workload_pb2.X509SVIDResponse(
            svids=[svid],
            federated_bundles={f"spiffe://{td}": der(certs) for td, certs in st.federated.items()},
        )
        st.version += 1
        self.cond.notify_all()

    # --- the gRPC service ----------------------------------------------------------------

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        meta = dict(context.invocation_metadata())
        with self.cond:
            self.calls += 1
        if meta.get("workload.spiffe.io") != "true":
            with self.cond:
                self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        sent = -1

        def news() -> bool:
            return self.state.version != sent or self.stopping or not context.is_active()

        while True:
            with self.cond:
                self.cond.wait_for(news, timeout=1.0)
                if self.stopping or not context.is_active():
                    return
                if self.state.version == sent:
                    continue
                sent = self.state.version
                response = self.state.response
            yield response

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self.server = server

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None
        self.socket_path.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop (open streams break, as when the agent restarts) and serve again."""
        self.stop()
        self.start()
