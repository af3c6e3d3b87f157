"""The one configuration loader: typed Settings from an injected MTLS_* mapping.

`parse` holds the value parsers, `routes` the route syntax and checks, `model` the pydantic
Settings model, `load` the loader (every problem at once), `checks` the checks that touch
files, `show` the redacted view `check` prints.
"""

from __future__ import annotations

from .checks import file_problem, file_problems
from .load import (
    RULE_FIELDS,
    RULE_VARIABLES,
    cross_problems,
    load_rule_settings,
    load_settings,
    parse_fields,
)
from .model import ENV_PREFIX, Settings, env_var, example_of, known_variables
from .parse import (
    MAX_DURATION,
    Address,
    IPNetwork,
    format_duration,
    format_port_list,
    parse_address,
    parse_bool,
    parse_ca_url,
    parse_choice,
    parse_cidrs,
    parse_duration,
    parse_fingerprint,
    parse_int,
    parse_path,
    parse_port,
    parse_port_list,
)
from .routes import (
    InboundRoute,
    OutboundRoute,
    dials_itself,
    format_routes,
    listen_conflict,
    parse_inbound,
    parse_outbound,
)
from .show import redacted

__all__ = [
    "ENV_PREFIX",
    "MAX_DURATION",
    "RULE_FIELDS",
    "RULE_VARIABLES",
    "Address",
    "IPNetwork",
    "InboundRoute",
    "OutboundRoute",
    "Settings",
    "cross_problems",
    "dials_itself",
    "env_var",
    "example_of",
    "file_problem",
    "file_problems",
    "format_duration",
    "format_port_list",
    "format_routes",
    "known_variables",
    "listen_conflict",
    "load_rule_settings",
    "load_settings",
    "parse_address",
    "parse_bool",
    "parse_ca_url",
    "parse_choice",
    "parse_cidrs",
    "parse_duration",
    "parse_fields",
    "parse_fingerprint",
    "parse_inbound",
    "parse_int",
    "parse_outbound",
    "parse_path",
    "parse_port",
    "parse_port_list",
    "redacted",
]
