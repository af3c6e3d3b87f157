"""`mtls-sidecar coverage`: the coverage report an auditor can sign, from Prometheus."""
