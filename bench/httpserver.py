"""The benchmark's HTTP app: a tiny uvloop responder, fast enough not to be the bottleneck.

Run as `python -m bench.httpserver --port PORT`. Answers every GET with a 13-byte body, honours
`Connection: close` (answers, then closes), keeps every other connection open and idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import cast

BODY = b"Hello, world\n"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
MAX_PENDING = 64 * 1024


class HttpResponder(asyncio.Protocol):
    """One connection: answer each complete request head; no bodies expected."""

    __slots__ = ("buffer", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buffer = self.buffer + data if self.buffer else data
        replies: list[bytes] = []
        close = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            buffer = buffer[end + 4 :]
            if b"lose" in head and b"connection: close" in head.lower():
                replies.append(CLOSE)
                close = True
                break
            replies.append(KEEP_ALIVE)
        self.buffer = buffer
        if replies:
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
        if close or len(buffer) > MAX_PENDING:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    server = await loop.create_server(
        HttpResponder, host, port, backlog=4096, reuse_port=True, reuse_address=True
    )
    async with server:
        await stop


def _worker(host: str, port: int) -> None:
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, only slower
        asyncio.run(serve(host, port))
    else:
        uvloop.run(serve(host, port))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve, in `--workers` processes sharing the port (SO_REUSEPORT)."""
    parser = argparse.ArgumentParser(prog="python -m bench.httpserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    children: list[int] = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            _worker(args.host, args.port)
            os._exit(0)
        children.append(pid)
    try:
        _worker(args.host, args.port)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
