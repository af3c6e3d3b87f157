"""A worker's per-peer series: connections, key-exchange groups and refusals, all under the
same capped identity labels (MTLS_PEER_IDENTITY_CAP), so a crowd of peers cannot grow them."""

from __future__ import annotations

import pytest
from prometheus_client import Counter

from proxy import metrics

pytestmark = pytest.mark.unit

TD = "spiffe://peer-metrics.test"


def _value(counter: Counter, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


def _snapshot() -> dict[str, float]:
    """The series these tests touch (the registry is the process's: counted as deltas)."""
    return {
        "a": _value(metrics.PEERS, "inbound", f"{TD}/a"),
        "a pq": _value(metrics.PEER_KEY_EXCHANGE, "inbound", f"{TD}/a", "X25519MLKEM768"),
        "a x": _value(metrics.PEER_KEY_EXCHANGE, "inbound", f"{TD}/a", "X25519"),
        "other": _value(metrics.PEERS, "inbound", "other"),
        "other x": _value(metrics.PEER_KEY_EXCHANGE, "inbound", "other", "X25519"),
        "out a pq": _value(metrics.PEER_KEY_EXCHANGE, "outbound", f"{TD}/a", "X25519MLKEM768"),
        "a refused": _value(metrics.PEER_REJECTIONS, "inbound", f"{TD}/a", "revoked"),
        "other refused": _value(metrics.PEER_REJECTIONS, "inbound", "other", "peer_not_allowed"),
    }


def test_groups_and_refusals_are_counted_per_capped_identity() -> None:
    before = _snapshot()
    peers = metrics.PeerCounters(1)
    bytes_in, bytes_out = peers.connection("inbound", f"{TD}/a", "X25519MLKEM768")
    assert bytes_in is metrics.PEER_BYTES.labels("inbound", f"{TD}/a", "in")
    assert bytes_out is metrics.PEER_BYTES.labels("inbound", f"{TD}/a", "out")
    peers.connection("inbound", f"{TD}/a", "X25519MLKEM768")
    peers.connection("inbound", f"{TD}/a", "X25519")
    peers.connection("outbound", f"{TD}/a", "X25519MLKEM768")
    peers.connection("inbound", f"{TD}/a", None)  # no TLS facts: a connection, no group
    peers.connection("inbound", f"{TD}/b", "X25519")  # beyond the cap of 1: other
    peers.rejection("inbound", f"{TD}/a", "revoked")
    peers.rejection("inbound", f"{TD}/c", "peer_not_allowed")  # beyond the cap too
    peers.rejection("inbound", f"{TD}/c", "peer_not_allowed")
    after = _snapshot()
    delta = {k: after[k] - before[k] for k in before}
    assert delta == {
        "a": 4,
        "a pq": 2,
        "a x": 1,
        "other": 1,
        "other x": 1,
        "out a pq": 1,
        "a refused": 1,
        "other refused": 2,
    }
    # no series was made for an identity beyond the cap
    names = {
        s.labels.get("peer_identity")
        for family in (metrics.PEER_KEY_EXCHANGE, metrics.PEER_REJECTIONS)
        for m in family.collect()
        for s in m.samples
    }
    assert f"{TD}/b" not in names and f"{TD}/c" not in names
