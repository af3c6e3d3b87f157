"""Load a certificate chain and private key into an SSLContext without writing them to disk."""

from __future__ import annotations

import os
import ssl

from ..errors import CertError


def load_cert_chain_from_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Like `ctx.load_cert_chain`, but from bytes.

    `SSLContext.load_cert_chain` only takes paths; an anonymous memory file (memfd, Linux)
    reached through /proc/self/fd gives it one without the key ever touching a filesystem.
    """
    if not hasattr(os, "memfd_create"):
        raise CertError("loading a key from memory needs Linux memfd_create")
    fd = os.memfd_create("mtls-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except ssl.SSLError as exc:
            raise CertError(f"certificate and key do not load into TLS ({exc})") from None
    finally:
        os.close(fd)
