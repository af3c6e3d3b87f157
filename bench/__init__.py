"""Benchmark: mtls-sidecar side by side with stunnel, haproxy and no proxy."""
