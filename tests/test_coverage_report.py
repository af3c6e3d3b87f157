"""The coverage report's model from canned Prometheus answers, and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.__main__ import main
from proxy.coverage.report import (
    UNIDENTIFIED,
    WIRE_BYTES_PER_CONNECTION,
    WIRE_BYTES_RATIO,
    Edge,
    ReportError,
    build,
    edge_post_quantum,
    exact_increases,
    passes,
    queries,
    to_text,
    unidentified_refusals,
    workload_of,
)

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
    ] == [(f"{TD}/client", f"{TD}/server", 5, 5), (UNIDENTIFIED, f"{TD}/server", 0, 0)]
    assert (r.edges[0].bytes_seen_by_source, r.edges[0].bytes_seen_by_destination) == (1400, 1800)
    # no per-peer group, refusal or auditor metrics (an older sidecar): nothing per edge
    e = r.edges[0]
    assert (e.post_quantum_percent, e.refused_by_source, e.refused_by_destination) == (None, {}, {})
    assert e.wire is None
    # the unknown_ca refusals had no identity: they stay on their route's edge
    assert (r.edges[1].route, r.edges[1].refused_by_destination) == ("api", {"unknown_ca": 3})
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
    row = next(line for line in text.splitlines() if line.startswith(f"{TD}/client "))
    assert row.split()[-4:] == ["-", "-", "-", "-"]  # PQ, refused (src), (dst), wire
    unidentified = next(line for line in text.splitlines() if line.startswith(UNIDENTIFIED))
    assert unidentified.split()[1:3] == [f"{TD}/server", "[api]"]
    # PQ, refused (src), refused (dst), wire
    assert unidentified.split()[-5:] == ["-", "-", "unknown_ca", "3", "-"]
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
    assert ">PQ</th>" in page and "<th>wire</th>" in page and f"{TD}/server [api]" in page


def edge_answers() -> dict[str, list[dict[str, Any]]]:
    """`answers()` from sidecars that count per peer identity its key-exchange groups and
    refusals (the README's example), with a peer refused by each sidecar and one more."""
    ans = answers()
    a = {"instance": A, "job": "mtls-sidecar"}
    b = {"instance": B, "job": "mtls-sidecar"}
    ans["peer_key_exchange:last"] = [
        s(3, direction="outbound", peer_identity=f"{TD}/server", group="X25519MLKEM768", **a),
        s(2, direction="outbound", peer_identity=f"{TD}/server", group="X25519", **a),
        s(4, direction="inbound", peer_identity=f"{TD}/client", group="X25519MLKEM768", **b),
        s(2, direction="inbound", peer_identity=f"{TD}/client", group="X25519", **b),
    ]
    # 1 of the 4 X25519MLKEM768 at B was there before the window: the share is of the window
    ans["peer_key_exchange:start"] = [
        s(1, direction="inbound", peer_identity=f"{TD}/client", group="X25519MLKEM768", **b),
    ]
    ans["rejected:last"] += [
        s(2, direction="inbound", route="api", reason="peer_not_allowed", **b),
        s(1, direction="outbound", route="api", reason="identity_mismatch", **a),
        s(2, direction="outbound", route="api", reason="policy_denied", **a),
    ]
    ans["peer_rejections:last"] = [
        s(2, direction="inbound", peer_identity=f"{TD}/stranger", reason="peer_not_allowed", **b),
        s(1, direction="outbound", peer_identity=f"{TD}/imposter", reason="identity_mismatch", **a),
    ]
    return ans


def test_edges_post_quantum_share_and_refusals() -> None:
    ans = edge_answers()
    # a peer refused before the window only: no edge
    old = s(4, direction="inbound", peer_identity=f"{TD}/old", reason="revoked", instance=B)
    ans["peer_rejections:last"].append(old)
    ans["peer_rejections:start"] = [old]
    r = build(ans, END, W)
    edges = {(e.source, e.destination): e for e in r.edges}
    assert set(edges) == {
        (f"{TD}/client", f"{TD}/imposter"),
        (f"{TD}/client", f"{TD}/server"),
        (f"{TD}/client", UNIDENTIFIED),
        (f"{TD}/stranger", f"{TD}/server"),
        (UNIDENTIFIED, f"{TD}/server"),
    }
    pair = edges[(f"{TD}/client", f"{TD}/server")]
    assert pair.groups_seen_by_source == {"X25519MLKEM768": 3, "X25519": 2}
    assert pair.groups_seen_by_destination == {"X25519MLKEM768": 3, "X25519": 2}
    assert pair.post_quantum_percent == 60.0
    assert pair.refused_by_source == pair.refused_by_destination == {}
    stranger = edges[(f"{TD}/stranger", f"{TD}/server")]
    assert stranger.refused_by_destination == {"peer_not_allowed": 2}
    assert stranger.post_quantum_percent is None  # refused: no connection, no group
    imposter = edges[(f"{TD}/client", f"{TD}/imposter")]
    assert imposter.refused_by_source == {"identity_mismatch": 1}
    # without an identity: the policy's refusals of destinations, and the unknown CA
    assert edges[(f"{TD}/client", UNIDENTIFIED)].refused_by_source == {"policy_denied": 2}
    assert edges[(f"{TD}/client", UNIDENTIFIED)].route == "api"
    assert edges[(UNIDENTIFIED, f"{TD}/server")].refused_by_destination == {"unknown_ca": 3}
    text = to_text(r, 99.9)
    assert "60.000%" in text
    assert "peer_not_allowed 2" in text and "identity_mismatch 1" in text
    assert f"{TD}/client [api]  unidentified" in text
    doc = json.loads(r.to_json())
    d = next(e for e in doc["edges"] if e["source"] == f"{TD}/stranger")
    assert d["refused_by_destination"] == {"peer_not_allowed": 2}
    assert d["route"] is None and d["wire"] is None and d["post_quantum_percent"] is None


@pytest.mark.parametrize(
    ("by_route", "identified", "unidentified"),
    [
        ({"a": 2, "b": 1}, 0, {"a": 2, "b": 1}),  # none identified: exact per route
        ({"a": 3, "b": 0}, 1, {"a": 2}),  # one route refused them all
        ({"a": 2, "b": 1}, 1, {"*": 2}),  # several: the rest cannot be placed
        ({"a": 2}, 2, {}),  # all identified
    ],
)
def test_unidentified_refusals_are_the_route_counter_minus_the_identified(
    by_route: dict[str, float], identified: float, unidentified: dict[str, float]
) -> None:
    assert unidentified_refusals(by_route, identified) == unidentified


def test_a_spiffe_id_is_a_workload_by_the_kubernetes_convention() -> None:
    assert workload_of("spiffe://corp.example/ns/shop/sa/cart") == "shop/cart"
    assert workload_of("spiffe://other.example/ns/shop/sa/cart") == "shop/cart"
    assert workload_of("spiffe://corp.example/cluster/x/ns/shop/sa/cart") == "shop/cart"
    assert workload_of("spiffe://corp.example/client") is None
    assert workload_of("spiffe://corp.example/ns/shop/sa/cart/extra") is None
    assert workload_of("other") is None


WEB, DB = f"{TD}/ns/shop/sa/web", f"{TD}/ns/shop/sa/db"
# the sidecars carried 4 connections and 10,000 bytes on web -> db
ALLOWED = WIRE_BYTES_RATIO * 10_000 + WIRE_BYTES_PER_CONNECTION * 4


def _wire_answers(wire: list[tuple[str, str, str, float, float]]) -> dict[str, Any]:
    """A web -> db edge both sidecars counted, a non-Kubernetes edge, and the auditor's
    series (src, dst, class, connections, bytes), split over two ports."""
    a = {"instance": A, "job": "mtls-sidecar"}
    b = {"instance": B, "job": "mtls-sidecar"}
    ans: dict[str, Any] = {
        "expiry": [s(END + 86400, identity=WEB, **a), s(END + 86400, identity=DB, **b)],
        "connections:last": [s(4, direction="outbound", route="db", security="mtls", **a)],
        "peers:last": [
            s(4, direction="outbound", peer_identity=DB, **a),
            s(4, direction="inbound", peer_identity=WEB, **b),
            s(1, direction="inbound", peer_identity=f"{TD}/legacy", **b),
        ],
        "peer_bytes:last": [
            s(6_000, direction="outbound", peer_identity=DB, flow="out", **a),
            s(4_000, direction="outbound", peer_identity=DB, flow="in", **a),
            s(9_000, direction="inbound", peer_identity=WEB, flow="in", **b),
        ],
        "audit_connections:last": [],
        "audit_bytes:last": [],
    }
    for src, dst, cls, conns, byts in wire:
        for port, share in (("8443", 0.75), ("9443", 0.25)):
            labels = {"class": cls, "src": src, "dst": dst, "dst_port": port}
            ans["audit_connections:last"].append(s(conns * share, **labels))
            ans["audit_bytes:last"].append(s(byts * share, **labels))
    return ans


@pytest.mark.parametrize(
    ("wire", "verdict", "reasons"),
    [
        ([("shop/web", "shop/db", "tls", 4, ALLOWED)], "agrees", []),
        ([("shop/web", "shop/db", "tls", 4, ALLOWED + 4)], "disagrees", ["bytes_not_carried"]),
        (
            [("shop/web", "shop/db", "tls", 4, 9_000), ("shop/web", "shop/db", "plaintext", 4, 4)],
            "disagrees",
            ["plaintext_on_wire"],
        ),
        (
            [("shop/web", "shop/db", "plaintext", 4, 2 * ALLOWED)],
            "disagrees",
            ["plaintext_on_wire", "bytes_not_carried"],
        ),
        ([("shop/db", "shop/web", "tls", 4, 9_000)], "not_seen", []),  # the other way only
    ],
)
def test_the_wire_verdict_per_edge(
    wire: list[tuple[str, str, str, float, float]], verdict: str, reasons: list[str]
) -> None:
    r = build(_wire_answers(wire), END, W)
    edges = {(e.source, e.destination): e for e in r.edges}
    e = edges[(WEB, DB)]
    assert e.wire is not None
    assert (e.wire.source, e.wire.destination) == ("shop/web", "shop/db")
    assert (e.wire.verdict, e.wire.reasons, e.wire.allowed_bytes) == (verdict, reasons, ALLOWED)
    # an identity outside the convention has no workload to match: no verdict
    assert edges[(f"{TD}/legacy", DB)].wire is None
    row = next(line for line in to_text(r, 99.9).splitlines() if line.startswith(WEB))
    assert row.endswith(f"{verdict}: {', '.join(reasons)}" if reasons else verdict)
    doc = json.loads(r.to_json())
    d = next(x for x in doc["edges"] if (x["source"], x["destination"]) == (WEB, DB))
    assert (d["wire"]["verdict"], d["wire"]["reasons"]) == (verdict, reasons)


def test_the_wire_counts_of_a_matched_edge_sum_its_ports() -> None:
    r = build(_wire_answers([("shop/web", "shop/db", "tls", 4, 8_000)]), END, W)
    e = next(x for x in r.edges if (x.source, x.destination) == (WEB, DB))
    assert e.wire is not None
    assert (e.wire.connections, e.wire.bytes) == ({"tls": 4}, {"tls": 8_000})


def test_the_post_quantum_share_is_of_the_connections_with_a_known_group() -> None:
    e = Edge("a", "b", groups_seen_by_source={"X25519": 2}, groups_seen_by_destination={})
    assert edge_post_quantum(e) == 0.0
    e.groups_seen_by_destination = {"SecP256r1MLKEM768": 2, "unknown": 5}
    assert edge_post_quantum(e) == 50.0
    assert edge_post_quantum(Edge("a", "b", groups_seen_by_source={"unknown": 1})) is None


def test_the_readme_example_is_this_report() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert to_text(build(edge_answers(), END, W), 99.9) in readme
