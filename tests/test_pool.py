"""The outbound pool's choices, in memory: which pooled connection a new app connection takes,
who waits for one being dialled, and who dials alone (proxy/pool.py `Pool`)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.pool import Carrier, Pool

pytestmark = pytest.mark.unit

KEY = ("10.0.0.5", 8443, "spiffe://td.example/db")


class FakeCarrier:
    """What the pool reads of a carrier: its open streams, whether it takes new ones, its key."""

    def __init__(self, streams: int = 0, available: bool = True) -> None:
        self.open_streams = streams
        self.available = available
        self.key = KEY


class Waiter:
    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.got: object = None
        self.alone = False

    def use_carrier(self, carrier: Carrier) -> None:
        self.got = carrier

    def dial_alone(self) -> None:
        self.alone = True


def carrier(**kw: Any) -> Carrier:
    c: Carrier = FakeCarrier(**kw)  # type: ignore[assignment]
    return c


def test_takes_the_least_busy_carrier_with_room() -> None:
    pool = Pool(max_streams=3, idle_timeout=60, max_lifetime=600)
    full, busy, quiet, retiring = (
        carrier(streams=3),
        carrier(streams=2),
        carrier(streams=1),
        carrier(available=False),
    )
    for c in (full, busy, quiet, retiring):
        pool.add(KEY, c)
    assert pool.take(KEY) is quiet
    pool.remove(quiet)
    assert pool.take(KEY) is busy
    pool.remove(busy)
    assert pool.take(KEY) is None  # only a full and a retiring one left
    assert pool.take(("other", 1, None)) is None
    pool.remove(full)
    pool.remove(retiring)
    assert pool.carriers == {}


def test_waiters_get_the_new_carrier_or_dial_alone() -> None:
    pool = Pool(max_streams=3, idle_timeout=60, max_lifetime=600)
    assert not pool.wait(KEY, Waiter())  # nothing is being dialled
    pool.dial_started(KEY)
    first, gone, second, third = Waiter(), Waiter(closed=True), Waiter(), Waiter()
    assert pool.wait(KEY, first)
    assert pool.wait(KEY, gone)
    assert not pool.wait(KEY, third)  # with the dialler, the carrier would be full
    new = carrier(streams=1)  # the dialler's own stream
    pool.dial_done(KEY, new, now=0, ttl=0)
    assert first.got is new and not first.alone
    assert gone.got is None and not gone.alone  # its app went away while it waited
    assert pool.take(KEY) is new
    assert KEY not in pool.dialing
    pool.dial_started(KEY)
    assert pool.wait(KEY, second)
    pool.dial_done(KEY, None, now=0, ttl=0)  # the dial failed
    assert second.alone and second.got is None


def test_a_foreign_upstream_is_dialled_directly_for_a_while() -> None:
    pool = Pool(max_streams=3, idle_timeout=60, max_lifetime=600)
    pool.dial_started(KEY)
    waiter = Waiter()
    assert pool.wait(KEY, waiter)
    pool.dial_done(KEY, None, now=100.0, ttl=60.0)  # answered without our ALPN
    assert waiter.alone
    assert pool.foreign(KEY, 159.0)
    assert not pool.foreign(KEY, 161.0)
    assert not pool.foreign(KEY, 159.0)  # forgotten once expired
