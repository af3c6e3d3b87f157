"""Structured logging: one JSON object (or one key=value line) per event, on stderr."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return {k: v for k, v in fields.items() if v is not None} if isinstance(fields, dict) else {}


def _ts(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "msg": ..., <fields>}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`<ts> <level> <msg> key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), f"{record.levelname.lower():7}", record.getMessage()]
        parts += [f"{k}={v}" for k, v in _fields(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per scrape; keep it for debugging only.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )


class RateLimit:
    """At most one event per `interval` seconds; counts the ones it held back."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -float("inf")
        self.suppressed = 0

    def allow(self, now: float | None = None) -> int | None:
        """None when this event (at `now`, default: the clock) is to be held back; else how
        many were held back before it."""
        now = self._clock() if now is None else now
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        held, self.suppressed = self.suppressed, 0
        return held


class BadRequestFilter(logging.Filter):
    """aiohttp logs each malformed request (an oversized header, garbage) as an ERROR with a
    traceback: on a reachable admin port anyone could fill the log. Make it one warning line
    without traceback, at most one per second (saying how many were held back)."""

    def __init__(self, what: str, interval: float = 1.0) -> None:
        super().__init__()
        self.what = what
        self.limit = RateLimit(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__module__ != "aiohttp.http_exceptions":
            return True
        held = self.limit.allow()
        if held is None:
            return False
        detail = str(getattr(exc, "message", "") or type(exc).__name__).splitlines()[0][:200]
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "%s: bad HTTP request (%s)%s"
        record.args = (self.what, detail, f"; {held} more held back" if held else "")
        record.exc_info = None
        record.exc_text = None
        return True
