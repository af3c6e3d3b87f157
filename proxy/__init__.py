"""mtls-sidecar: a mutual-TLS sidecar proxy with a small internal CA."""

__version__ = "0.1.0"
