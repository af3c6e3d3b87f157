"""Kubernetes integration: the manifest injector (`inject`, `uninject`) and its webhook."""
