"""`inject` and the injector webhook against what they must not take in: Windows pods,
pathological YAML (deep nesting, alias bombs), deeply nested JSON, slow clients."""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from proxy.k8s import inject as inj
from proxy.k8s.cli import inject_main
from proxy.k8s.webhook import review_answer
from tests.test_inject import _cli, _deployment, _pod, _review

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
