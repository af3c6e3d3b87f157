"""The exception hierarchy: every expected failure is a ProxyError with a message for a human."""

from __future__ import annotations

from dataclasses import dataclass


class ProxyError(Exception):
    """Base of every error the sidecar raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration: which variable, what, and a right example."""

    var: str
    message: str
    example: str = ""

    def __str__(self) -> str:
        text = f"{self.var}: {self.message}"
        if self.example:
            text += f" (example: {self.var}={self.example})"
        return text


class ConfigError(ProxyError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class CertError(ProxyError):
    """A certificate, key or trust bundle could not be loaded or is unusable."""


class StartupError(ProxyError):
    """The sidecar cannot start; the message says why."""


class PolicyDenied(ProxyError):
    """The peer authenticated but is not allowed (inbound) or not the expected one (outbound)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
