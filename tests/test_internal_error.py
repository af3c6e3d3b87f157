"""A bug of ours while handling one connection must not leave that connection hanging, nor
disturb any other: the connection is reset, counted and logged with its traceback.

The fault is injected into a real sidecar process from outside the product: a
`sitecustomize` module (imported by every Python process at start) wraps `Conn._do` so that
it raises for the connections of one route only."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .conftest import TD, Pki
from .harness import ROOT, Sidecar, TcpApp, exchange, free_port, identity_env, running, wait_for

FAULT = """
import proxy.conn as _conn

_original = _conn.Conn._do


def _do(self, action, first):
    if self.route.name == "boom":
        raise RuntimeError("injected fault")
    return _original(self, action, first)


_conn.Conn._do = _do
"""


def test_a_bug_resets_its_connection_and_nothing_else(pki: Pki, tmp_path: Path) -> None:
    echo = TcpApp("echo")
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAULT)
    in_port, ok_port, boom_port = free_port(), free_port(), free_port()
    inbound = Sidecar(
        {
            **identity_env(pki.server),
            "MTLS_INBOUND": f"web=127.0.0.1:{in_port}=127.0.0.1:{echo.port}",
        },
        tmp_path / "inbound.log",
    )
    remote = f"127.0.0.1:{in_port}@{TD}/server"
    outbound = Sidecar(
        {
            **identity_env(pki.client),
            "MTLS_OUTBOUND": f"ok=127.0.0.1:{ok_port}={remote},boom=127.0.0.1:{boom_port}={remote}",
            "PYTHONPATH": f"{fault}{os.pathsep}{ROOT}",
        },
        tmp_path / "outbound.log",
    )
    try:
        with running(inbound, outbound):
            inbound.wait_ready()
            outbound.wait_ready()
            started = time.monotonic()
            # The reset can come so fast that connect() itself reports it (the first
            # action runs as the connection is accepted), or the send, or the read.
            try:
                with socket.create_connection(("127.0.0.1", boom_port), timeout=10) as s:
                    s.sendall(b"hello")
                    got = s.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            assert got == b"", "the broken connection relayed something"
            # Cut at once: without the guard it hung until the drain at shutdown.
            assert time.monotonic() - started < 5
            assert wait_for(
                lambda: outbound.metric("mtls_internal_errors_total", route="boom") == 1
            )
            assert outbound.metric("mtls_internal_errors_total", route="ok") == 0
            # The worker goes on serving other connections.
            assert exchange(ok_port, b"still here" * 1000) == b"still here" * 1000
            lines = [json.loads(x) for x in outbound.logs().splitlines() if x.startswith("{")]
            errors = [x for x in lines if x.get("event") == "internal_error"]
            assert len(errors) == 1 and errors[0]["route"] == "boom"
            assert "injected fault" in errors[0].get("exc", "")
            closed = [x for x in lines if x.get("event") == "conn_closed" and x["route"] == "boom"]
            assert [x["outcome"] for x in closed] == ["internal_error"]
            assert "Exception in callback" not in outbound.logs()
    finally:
        echo.close()
