"""The effective configuration as `check` prints it: env-var names, env-var syntax, no secrets."""

from __future__ import annotations

from pydantic import SecretStr

from .model import DURATION_FIELDS, PORT_LIST_FIELDS, Settings, env_var
from .parse import format_duration, format_port_list


def _jsonable(name: str, value: object) -> object:
    if name == "proxy_protocol_id_tlv" and isinstance(value, int):
        return f"0x{value:02X}"
    if value is None or isinstance(value, bool | int | str):
        if name in DURATION_FIELDS and isinstance(value, int | float):
            return format_duration(value)
        return value
    if isinstance(value, float):
        return format_duration(value) if name in DURATION_FIELDS else value
    if isinstance(value, SecretStr):
        return "***"
    if name == "federated_bundles" and isinstance(value, list):
        return ",".join(f"{td}={source}" for td, source in value)
    if name in PORT_LIST_FIELDS and isinstance(value, list):
        return format_port_list(value)
    if isinstance(value, list):
        return [str(item) for item in value]
    if name == "hbone_listen" and getattr(value, "port", None) == 0:
        return "off"
    if isinstance(value, frozenset):  # MTLS_PROXY_PROTOCOL's route names
        return ",".join(sorted(str(item) for item in value))
    return str(value)


def redacted(settings: Settings) -> dict[str, object]:
    """The effective configuration as JSON-able values keyed by env-var name.

    Secrets (MTLS_CA_TOKEN) show as '***'; durations in duration syntax ('5m'); routes,
    addresses and identities in their env-var syntax. MTLS_TRUST_DOMAIN shows the effective
    trust domain (None: taken from the certificate at run time).
    """
    out: dict[str, object] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name == "trust_domain":
            value = settings.effective_trust_domain
        out[env_var(name)] = _jsonable(name, value)
    return out
