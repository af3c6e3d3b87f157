"""What HBONE's HTTP/2 costs in memory: a client and a server `proxy.hbone.HboneConnection` in
one process, no sockets, no TLS. Bulk: 256 MiB on one stream in 1 MiB sends (the receiver
hands every byte back, as the sidecar does once its app took them). Streams: 10,000 CONNECT
streams, 100 at a time, each answered 200, 5 bytes each way, then ended both ways.

    .venv/bin/python -m bench.h2_cost [--rounds 3] [--impl h2|jh2] [--no-validate]

`--impl jh2` runs the same code on `jh2` (a fork of h2 on PyPI, with a compiled HPACK), by
making `import h2` (and hyperframe, hpack) resolve to jh2's modules before proxy.hbone is
imported. jh2 refuses a CONNECT without `:path` (h2 < 4.2's rule), so it carries HBONE only
with header validation off both ways: `--no-validate` (which --impl jh2 needs), also for h2 to
compare like with like. Figures are per second of this process's CPU time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Any

_H2_MODULES = (
    *("config", "connection", "events", "exceptions", "settings", "errors", "stream"),
    *("windows", "utilities", "frame_buffer"),
)


def use_jh2() -> None:
    """Make `h2`, `hyperframe` and `hpack` (and their modules) jh2's."""
    jh2 = importlib.import_module("jh2")
    sys.modules["h2"] = jh2
    for sub in _H2_MODULES:
        sys.modules[f"h2.{sub}"] = importlib.import_module(f"jh2.{sub}")
    for lib in ("hyperframe", "hyperframe.frame", "hpack"):
        sys.modules[lib] = importlib.import_module(f"jh2.{lib}")


def no_header_validation() -> None:
    """Every H2Configuration made from now on validates no headers, either way."""
    config: Any = importlib.import_module("h2.config")
    base = config.H2Configuration

    class NoValidation(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["validate_inbound_headers"] = False
            kwargs["validate_outbound_headers"] = False
            super().__init__(*args, **kwargs)

    config.H2Configuration = NoValidation


def _pump(a: Any, b: Any) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until neither side has any to send; the events each side got."""
    got_a: list[Any] = []
    got_b: list[Any] = []
    moved = True
    while moved:
        moved = False
        if out := a.data_to_send():
            got_b += b.receive(out)
            moved = True
        if out := b.data_to_send():
            got_a += a.receive(out)
            moved = True
    return got_a, got_b


def _pair() -> tuple[Any, Any]:
    from proxy.hbone import HboneConnection

    client, server = HboneConnection(client=True), HboneConnection(client=False)
    _pump(client, server)
    return client, server


def bulk(total: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """Gbit/s per CPU second for `total` bytes on one stream in `chunk`-byte sends."""
    from proxy.hbone import Data

    client, server = _pair()
    sid = client.open(("127.0.0.1", 80), None)
    _pump(client, server)
    server.respond(sid, 200)
    _pump(client, server)
    payload = memoryview(os.urandom(chunk))
    sent = got = 0
    started = time.process_time()
    while sent < total:
        n = client.send(sid, payload[: min(chunk, total - sent)])
        sent += n
        for ev in server.receive(client.data_to_send()):
            if isinstance(ev, Data):
                got += len(ev.data)
                server.consumed(sid, ev.flow)
        answer = server.data_to_send()
        if answer:
            client.receive(answer)
        if not n and not answer:
            raise RuntimeError("bulk transfer stuck: no window and nothing to send")
    cpu = time.process_time() - started
    if got != total:
        raise RuntimeError(f"received {got} of {total} bytes")
    return total * 8 / cpu / 1e9


def streams(count: int = 10_000, batch: int = 100) -> float:
    """Streams per CPU second: opened, answered 200, 5 bytes each way, ended both ways."""
    from proxy.hbone import StreamEnded, StreamOpened

    client, server = _pair()
    ended = 0
    started = time.process_time()
    for first in range(0, count, batch):
        sids = [
            client.open(("127.0.0.1", 80), ("10.0.0.1", 40000 + i))
            for i in range(min(batch, count - first))
        ]
        for ev in _pump(client, server)[1]:
            if isinstance(ev, StreamOpened):
                server.respond(ev.sid, 200)
        _pump(client, server)
        for sid in sids:
            client.send(sid, b"hello")
            client.end(sid)
        _pump(client, server)
        for sid in sids:
            server.send(sid, b"world")
            server.end(sid)
        got_client, _ = _pump(client, server)
        ended += sum(isinstance(ev, StreamEnded) for ev in got_client)
    cpu = time.process_time() - started
    if ended != count:
        raise RuntimeError(f"{ended} of {count} streams ended")
    return count / cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2_cost", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impl", choices=("h2", "jh2"), default="h2")
    parser.add_argument("--no-validate", action="store_true")
    args = parser.parse_args(argv)
    if "proxy.hbone" in sys.modules:
        parser.error("proxy.hbone is already imported: run this as its own process")
    if args.impl == "jh2":
        if not args.no_validate:
            parser.error("jh2 refuses CONNECT without :path: it needs --no-validate")
        use_jh2()
    if args.no_validate:
        no_header_validation()
    lib = importlib.import_module("h2")
    name = f"{args.impl} {getattr(lib, '__version__', '?')}"
    name += ", no header validation" if args.no_validate else ""
    for n in range(args.rounds):
        print(
            f"{name} round {n + 1}: bulk {bulk():.2f} Gbit/s per CPU second, "
            f"streams {streams():,.0f} per CPU second",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
