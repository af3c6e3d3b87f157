"""`python -m proxy.ca ...`: the same as `mtls-sidecar ca ...`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
