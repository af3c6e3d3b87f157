"""The master -> worker control channel (the worker's stdin): length-prefixed frames.

A frame is an 8-byte header (two big-endian 32-bit lengths), a JSON object (the message)
and a binary payload (the revoked serials of a CRL, empty for most messages). Nothing in it
depends on a line length or a separator, so no size of a message can break the channel
(a JSON line of a 17.8 MB CRL once overran the worker's 16 MiB line limit: the worker's
reader died, the worker restarted, received the same line and died again). The sizes are
bounded where the data comes in (MAX_CRL_BYTES for revocation lists).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_HEADER = struct.Struct(">II")


def encode(msg: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame: `msg` as JSON, then `payload`."""
    body = json.dumps(msg).encode()
    return _HEADER.pack(len(body), len(payload)) + body + payload


async def read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame as (message, payload); None when the writer closed the channel.

    ValueError when a frame is not a JSON object (the channel stays in step: the lengths
    said where the frame ends)."""
    try:
        head = await reader.readexactly(_HEADER.size)
        body_len, payload_len = _HEADER.unpack(head)
        body = await reader.readexactly(body_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError:
        return None
    msg = json.loads(body)
    if not isinstance(msg, dict):
        raise ValueError("a control message is not a JSON object")
    return msg, payload
