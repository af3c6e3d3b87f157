"""`inject` and the injector webhook against what they must not take in: Windows pods,
pathological YAML (deep nesting, alias bombs), deeply nested JSON, slow clients."""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
from typing import Any

import pytest
import yaml

from proxy.k8s import inject as inj
from proxy.k8s.cli import inject_main
from proxy.k8s.webhook import review_answer
from tests.test_inject import REPO, P, _cli, _deployment, _pod, _review

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
