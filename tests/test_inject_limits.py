"""`inject` and the injector webhook against what they must not take in: Windows pods,
pathological YAML (deep nesting, alias bombs), deeply nested JSON, slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from proxy.k8s import inject as inj
from proxy.k8s.cli import inject_main
from proxy.k8s.webhook import review_answer
from tests.test_ca_store_service import _closed_after
from tests.test_inject import (
    REPO,
    P,
    _cli,
    _deployment,
    _pod,
    _post,
    _ready,
    _review,
    _run,
    _start_injector,
    _stop,
)

# --- Windows pods -----------------------------------------------------------------------------


def _windows(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    template = out["spec"]["template"] if out["kind"] != "Pod" else out
    template["spec"]["os"] = {"name": "windows"}
    return out


def test_windows_pods_are_left_unchanged_with_a_reason() -> None:
    dep = _windows(_deployment())
    for mode in inj.MODES:
        result = inj.inject_report(dep, inj.Options(mode=mode))
        assert result.obj == dep
        assert result.notes == [
            "Deployment shop/web: a Windows pod (spec.os.name: windows), left unchanged: "
            "the sidecar is Linux-only"
        ]
    # A Linux pod that says so is injected as usual.
    linux = copy.deepcopy(dep)
    linux["spec"]["template"]["spec"]["os"] = {"name": "linux"}
    assert inj.is_injected(inj.inject(linux)["spec"]["template"])
    # The CLI: the reason on stderr, the manifest unchanged on stdout.
    code, out, err = _cli(inject_main, ["-"], stdin=yaml.safe_dump(dep))
    assert code == 0 and yaml.safe_load(out) == dep
    assert err == f"mtls-sidecar inject: {result.notes[0]}\n"
    # The webhook: allowed, no patch, the reason as an admission warning.
    pod = _windows(_pod())
    answer = review_answer(_review(pod)["request"], inj.Options())
    assert answer.review["response"] == {
        "uid": "0b6f-42",
        "allowed": True,
        "warnings": [
            "Pod shop/web-7d4b9-*: a Windows pod (spec.os.name: windows), left unchanged: "
            "the sidecar is Linux-only"
        ],
    }
    assert json.dumps(answer.review)  # serialisable as it is sent


# --- pathological YAML ------------------------------------------------------------------------


def _limited_run(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` with 1 GiB of address space: an expansion that would take the
    machine's memory fails the test instead."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit,
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("a:\n" + "".join("  " * i + " b:\n" for i in range(1, 5000)) + "  " * 5000 + " 1\n",
         "nested more than 100 levels deep"),
        ("[" * 5000 + "]" * 5000 + "\n", "nested more than 100 levels deep"),
        ("{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than 100 levels deep"),
    ],
    ids=["block", "flow-sequence", "flow-mapping"],
)  # fmt: skip
def test_deeply_nested_yaml_is_one_line_exit_2(text: str, message: str) -> None:
    for command in ("inject", "uninject"):
        result = _limited_run(command, "-", stdin=text)
        assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
        assert result.stderr.startswith(f"mtls-sidecar {command}: error: stdin: "), result.stderr
        assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    # Within one document, with the anchors and the annotation in the same Pod.
    one_doc = (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    {P}inbound: *a9\n"
    )
    anchors = ['x-a0: &a0 "lol"'] + [
        f"x-a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)
    ]
    bomb = "\n".join(anchors) + "\n" + one_doc + "spec:\n  containers: [{name: w, image: w}]\n"
    for command in ("inject", "uninject"):
        result = _limited_run(command, "-", stdin=bomb)
        assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
        assert len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
        assert "aliases expand to more than 10000 nodes" in result.stderr
    # A few anchors, as hand-written manifests use them, are fine.
    shared = (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n"
        "  - name: a\n    image: a:1\n"
        "    env: &env [{name: X, value: '1'}, {name: Y, value: '2'}]\n"
        "  - name: b\n    image: b:1\n    env: *env\n"
    )
    code, out, err = _cli(inject_main, ["-"], stdin=shared)
    assert code == 0, err
    (pod,) = yaml.safe_load_all(out)
    assert [c["env"] for c in pod["spec"]["containers"]] == [
        [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    ] * 2


def test_an_annotation_must_be_a_string_not_a_structure() -> None:
    dep = _deployment({P + "inbound": [":8443=127.0.0.1:8080"]})  # type: ignore[dict-item]
    with pytest.raises(inj.InjectError, match=r"annotation mtls-sidecar.io/inbound: .*a string"):
        inj.inject(dep)


# --- the webhook: nesting, slow and excess connections ---------------------------------------


@pytest.fixture(scope="module")
def guarded_injector(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], str, ssl.SSLContext]]:
    """The injector with short limits, serving a certificate of our own CA."""
    tmp = tmp_path_factory.mktemp("guarded-injector")
    for args in (
        ["ca", "init", "--dir", str(tmp / "ca"), "--trust-domain", "cluster.local"],
        ["ca", "issue", "--dir", str(tmp / "ca"), "--id",
         "spiffe://cluster.local/ns/mtls-system/sa/mtls-injector", "--dns", "localhost",
         "--ttl", "1d", "--out", str(tmp / "injector")],
    ):  # fmt: skip
        made = _run(*args)
        assert made.returncode == 0, made.stderr
    proc, url = _start_injector(
        tmp / "injector.crt",
        tmp / "injector.key",
        "--header-timeout", "1s",
        "--body-timeout", "1s",
        "--max-connections", "8",
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(tmp / "injector.bundle.pem"))
    try:
        yield proc, url, ctx
    finally:
        _stop(proc)


def _port(url: str) -> int:
    return int(url.rpartition(":")[2])


def test_deeply_nested_json_is_a_400(
    guarded_injector: tuple[subprocess.Popen[str], str, ssl.SSLContext],
) -> None:
    _, url, ctx = guarded_injector
    deep: Any = {"name": "x"}
    for _ in range(150):
        deep = {"a": [deep]}
    pod = _pod()
    pod["spec"]["containers"][0]["x-deep"] = deep
    for body in (
        b"[" * 32000 + b"]" * 32000,
        b'{"apiVersion": ' + b"{" * 30000,
        json.dumps(_review(pod)).encode(),
    ):
        status, answer = _post(url, ctx, body)
        assert status == 400, (status, answer)
        assert "nested more than 100 levels deep" in answer["error"], answer
    # Still serving.
    status, review = _post(url, ctx, json.dumps(_review(_pod())).encode())
    assert status == 200 and review["response"]["allowed"] is True


def test_slow_and_excess_connections_are_closed(
    guarded_injector: tuple[subprocess.Popen[str], str, ssl.SSLContext],
) -> None:
    proc, url, ctx = guarded_injector
    port = _port(url)
    no_verify = ssl.create_default_context()
    no_verify.check_hostname = False
    no_verify.verify_mode = ssl.CERT_NONE

    async def slow() -> tuple[list[float], float]:
        conns = []
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=no_verify)
            conns.append((r, w, time.monotonic()))
        times = await asyncio.gather(*(_closed_after(r, w, t) for r, w, t in conns))
        for _, w, _ in conns:
            w.close()
        # A connection that never starts TLS is closed after the same timeout.
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        return list(times), time.monotonic() - t0

    times, raw = asyncio.run(slow())
    assert all(t < 6 for t in times), times
    assert raw < 6, raw

    async def excess() -> None:
        held = [await asyncio.open_connection("127.0.0.1", port, ssl=no_verify) for _ in range(8)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=no_verify)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for _, w in held:
            w.close()
            await w.wait_closed()

    asyncio.run(excess())
    deadline = time.monotonic() + 10
    while not _ready(url, ctx):  # the held connections are released as their close arrives
        assert time.monotonic() < deadline, "the injector did not serve again"
    log = _log_lines(proc)
    assert any("no complete request within 1s" in line for line in log), log
    assert any("connection limit 8 reached" in line for line in log), log
    assert not any("Traceback" in line for line in log)


def _log_lines(proc: subprocess.Popen[str]) -> list[str]:
    """What the injector logged so far (stderr is a pipe: read what is there)."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    try:
        return proc.stderr.readlines()
    finally:
        os.set_blocking(proc.stderr.fileno(), True)


def test_malformed_http_is_a_400_and_one_line(
    guarded_injector: tuple[subprocess.Popen[str], str, ssl.SSLContext],
) -> None:
    proc, url, ctx = guarded_injector
    for payload in (
        b"GARBAGE\x00\x01 / HTTP/1.1\r\n\r\n",
        b"POST /inject HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ):
        with (
            socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # The injector answers 400 as soon as the header is over its limit and closes:
            # the rest of a long payload may meet a closed connection, the answer is there.
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                tls.sendall(payload)
            assert tls.recv(100).startswith(b"HTTP/1.0 400"), payload[:20]
    deadline = time.monotonic() + 10
    log: list[str] = []
    while not any("bad HTTP request" in line for line in log):
        assert time.monotonic() < deadline, log
        log += _log_lines(proc)
        time.sleep(0.05)  # polling the log, the observable state
    assert not any("Traceback" in line for line in log), log
