"""The one address normalisation behind every loopback/local judgement (proxy/addresses.py)."""

from __future__ import annotations

import pytest

from proxy.addresses import ip_of, is_local_address, is_loopback, is_unspecified, normalize

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.9.8.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # how a dual-stack socket shows an IPv4 loopback peer
        ("::ffff:7f00:1", True),
        ("0:0:0:0:0:ffff:127.0.0.2", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("db.localhost", True),
        ("::ffff:10.0.0.1", False),
        ("10.0.0.1", False),
        ("::", False),
        ("0.0.0.0", False),
        ("2002:7f00:1::", False),  # 6to4 goes to a relay
        ("64:ff9b::7f00:1", False),  # NAT64 goes to a translator
        ("::127.0.0.1", False),  # IPv4-compatible: deprecated, not routed to loopback
        ("example.com", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_normalize_and_unspecified() -> None:
    assert normalize("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize("fe80::1%eth0") == "fe80::1"
    assert normalize("FD00:0:0::5") == "fd00::5"
    assert normalize("DB.Example") == "db.example"
    assert str(ip_of("::ffff:10.1.2.3")) == "10.1.2.3" and ip_of("name") is None
    assert is_unspecified("::ffff:0.0.0.0") and is_unspecified("::") and is_unspecified("0.0.0.0")
    assert not is_unspecified("127.0.0.1") and not is_unspecified("name")


def test_is_local_address_unwraps_mapped_addresses() -> None:
    assert is_local_address("::ffff:127.0.0.1", set())
    assert is_local_address("::ffff:10.0.0.5", {"10.0.0.5"})
    assert is_local_address("10.0.0.5", {"::ffff:10.0.0.5"})
    assert not is_local_address("::ffff:0.0.0.0", {"0.0.0.0"})
    assert not is_local_address("::ffff:10.0.0.6", {"10.0.0.5"})
