"""The coverage report's model from canned Prometheus answers, and the command's errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.coverage.report import ReportError, build, exact_increases, passes, queries, to_text

pytestmark = pytest.mark.unit

END = 1_800_000_000.0
W = 3600
A, B = "127.0.0.1:1", "127.0.0.1:2"
TD = "spiffe://corp.example"


def s(value: float, **labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [END, str(value)]}


def test_exact_increase_counts_from_zero_for_a_series_born_in_the_window() -> None:
    last = [s(10, route="a"), s(7, route="b"), s(9, route="c")]
    start = [s(4, __name__="x", route="a")]  # b was born inside the window
    resets = [s(0, route="a"), s(0, route="b"), s(1, route="c")]
    increase = [s(6.3, route="a"), s(7.9, route="b"), s(12.5, route="c")]
    got = {
        labels["route"]: (v, ok) for labels, v, ok in exact_increases(last, start, resets, increase)
    }
    assert got == {"a": (6.0, True), "b": (7.0, True), "c": (12.5, False)}


def answers() -> dict[str, list[dict[str, Any]]]:
    """Two sidecars: A (client, outbound) and B (server, inbound, permissive)."""
    a = {"instance": A, "job": "mtls-sidecar"}
    b = {"instance": B, "job": "mtls-sidecar"}
    return {
        "expiry": [
            s(END + 1800, identity=f"{TD}/client", **a),
            s(END + 86400, identity=f"{TD}/server", **b),
        ],
        "connections:last": [
            s(5, direction="outbound", route="api", security="mtls", **a),
            s(5, direction="inbound", route="api", security="mtls", **b),
            s(2, direction="inbound", route="api", security="plaintext", **b),
        ],
        "bytes:last": [
            s(900, direction="outbound", route="api", security="mtls", flow="out", **a),
            s(900, direction="outbound", route="api", security="mtls", flow="in", **a),
            s(900, direction="inbound", route="api", security="mtls", flow="in", **b),
            s(900, direction="inbound", route="api", security="mtls", flow="out", **b),
            s(100, direction="inbound", route="api", security="plaintext", flow="in", **b),
            s(100, direction="inbound", route="api", security="plaintext", flow="out", **b),
        ],
        "bytes:start": [
            s(400, direction="outbound", route="api", security="mtls", flow="out", **a),
        ],
        "peers:last": [
            s(5, direction="outbound", peer_identity=f"{TD}/server", **a),
            s(5, direction="inbound", peer_identity=f"{TD}/client", **b),
        ],
        "peer_bytes:last": [
            s(900, direction="outbound", peer_identity=f"{TD}/server", flow="out", **a),
            s(900, direction="outbound", peer_identity=f"{TD}/server", flow="in", **a),
            s(900, direction="inbound", peer_identity=f"{TD}/client", flow="in", **b),
            s(900, direction="inbound", peer_identity=f"{TD}/client", flow="out", **b),
        ],
        "peer_bytes:start": [
            s(400, direction="outbound", peer_identity=f"{TD}/server", flow="out", **a),
        ],
        "rejected:last": [s(3, direction="inbound", route="api", reason="unknown_ca", **b)],
        "handshakes:last": [
            s(3, direction="outbound", group="X25519MLKEM768", resumed="no", **a),
            s(1, direction="outbound", group="X25519", resumed="no", **a),
        ],
    }


def test_report_numbers() -> None:
    r = build(answers(), END, W)
    assert r.exact
    assert (r.connections.mtls, r.connections.plaintext) == (10, 2)
    assert (r.bytes.mtls, r.bytes.plaintext) == (3200, 200)
    assert r.coverage_percent == pytest.approx(100 * 3200 / 3400)
    assert r.refusals == {"unknown_ca": 3}
    assert (r.handshakes, r.post_quantum_handshakes, r.post_quantum_percent) == (4, 3, 75.0)
    assert [
        (e.source, e.destination, e.seen_by_source, e.seen_by_destination) for e in r.edges
    ] == [(f"{TD}/client", f"{TD}/server", 5, 5)]
    assert (r.edges[0].bytes_seen_by_source, r.edges[0].bytes_seen_by_destination) == (1400, 1800)
    server = next(x for x in r.routes if x.direction == "inbound")
    assert server.identity == f"{TD}/server"
    assert (server.bytes.mtls, server.bytes.plaintext, server.refused) == (1800, 200, 3)
    assert [(c.identity, c.expires_in_window) for c in r.certificates] == [
        (f"{TD}/client", True),
        (f"{TD}/server", False),
    ]
    assert r.wire is None
    assert passes(r, 90) and not passes(r, 99.9)
    text = to_text(r, 99.9)
    assert "FAIL" in text and "94.118%" in text and "X25519MLKEM768: 3" in text
    doc = json.loads(r.to_json())
    assert doc["bytes"] == {"mtls": 3200, "plaintext": 200}
    assert doc["edges"][0]["seen_by_destination"] == 5


def test_wire_auditor_section() -> None:
    ans = answers()
    ans["audit_connections:last"] = [
        s(5, **{"class": "tls"}, src="client", dst="server", dst_port="8443"),
        s(4, **{"class": "plaintext"}, src="batch", dst="db", dst_port="5432"),
    ]
    ans["audit_bytes:last"] = [
        s(2000, **{"class": "tls"}, src="client", dst="server", dst_port="8443"),
        s(500, **{"class": "plaintext"}, src="batch", dst="db", dst_port="5432"),
    ]
    r = build(ans, END, W)
    assert r.wire is not None
    assert r.wire.coverage_percent == 80.0
    assert not r.wire.agrees  # 4 plaintext connections on the wire, the sidecars admit 2
    assert [(e.src, e.dst, e.connections, e.bytes) for e in r.wire.plaintext_edges] == [
        ("batch", "db", 4, 500)
    ]
    assert json.loads(r.to_json())["wire"]["plaintext_edges"][0]["class"] == "plaintext"
    assert "DISAGREES" in to_text(r, 99.9)


def test_no_traffic_does_not_pass_and_no_metrics_is_an_error() -> None:
    r = build({"expiry": answers()["expiry"]}, END, W)
    assert r.coverage_percent is None and not passes(r, 0)
    with pytest.raises(ReportError, match="no mtls-sidecar metrics"):
        build({}, END, W)


def test_queries_use_the_window() -> None:
    q = queries(W)
    assert q["bytes:last"] == "last_over_time(mtls_bytes_total[3600s])"
    assert q["bytes:start"] == "mtls_bytes_total offset 3600s"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prometheus", "ftp://x"], "is not an http(s):// URL"),
        (
            ["--prometheus", "http://127.0.0.1:1", "--window", "7x"],
            "--window: '7x' is not a duration",
        ),
        (["--prometheus", "http://127.0.0.1:1", "--min-coverage", "101"], "between 0 and 100"),
        (["--prometheus", "http://127.0.0.1:1"], "is unreachable"),
        ([], "the following arguments are required: --prometheus"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["coverage", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_html_is_one_page_with_two_charts_and_the_tables() -> None:
    from proxy.coverage.html import to_html

    r = build(answers(), END, W)
    r.coverage_over_time = [(END - 600, 100.0), (END - 300, 90.0)]
    page = to_html(r, 99.9)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "<script" not in page and "<link" not in page
    assert "94.118%" in page and "FAIL" in page and f"{TD}/client" in page
    assert "unknown_ca" in page and "X25519MLKEM768" in page
