"""Token buckets, refusal counts and their aggregate records, on an injected clock."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from gateway.audit import FieldValue, Role
from gateway.errors import Code, UnavailableError
from gateway_ops.sources import OpenCalls, peer_host, source_of
from security_server.floods import (
    OTHER_SOURCES,
    AggregateFlusher,
    CountedEndpoint,
    RefusalCounter,
    TokenBuckets,
    retry_after,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    """A key gets `burst` tokens at once, then one every 1/rate seconds, with the wait told."""
    clock = Clock()
    buckets = TokenBuckets(2.0, 3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert retry_after(buckets.take("a")) == "1"
    assert buckets.take("b") == 0.0  # another key has its own bucket
    clock.now = 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.now = 100.0  # refills up to the burst only
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_buckets_are_bounded_forgetting_the_least_recently_used() -> None:
    """Past max_keys the least recently used bucket is dropped; memory stays bounded."""
    clock = Clock()
    buckets = TokenBuckets(1.0, 1, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        buckets.take(key)
    buckets.take("a")  # a is used again: b is now the oldest
    for i in range(1000):
        buckets.take(f"x{i}")
    assert len(buckets) == 3


def test_counter_aggregates_per_source_reason_and_holder_with_a_short_digest() -> None:
    """Thousands of refusals become one count per (source, reason, holder); the detail is kept
    only as a 16-digit digest, never as the sender's text."""
    counter = RefusalCounter()
    junk = "x" * 5500
    for i in range(5000):
        counter.add("10.0.0.1", "invalid_token", T0 + timedelta(milliseconds=i), detail=junk)
    counter.add("10.0.0.1", "no_token", T0)
    counter.add("10.0.0.2", "token_rate_limited", T0, who="carla (issuer)")
    counts = {(c.source, c.reason): c for c in counter.drain()}
    assert len(counts) == 3 and len(counter) == 0
    flood = counts[("10.0.0.1", "invalid_token")]
    assert flood.count == 5000 and flood.last == T0 + timedelta(milliseconds=4999)
    assert flood.detail_sha256 is not None and len(flood.detail_sha256) == 16
    assert junk[:32] not in flood.describe()
    assert flood.describe().startswith("count=5000; first=2026-11-30T12:00:00")
    assert counts[("10.0.0.2", "token_rate_limited")].who == "carla (issuer)"


def test_counter_is_bounded_counting_new_sources_together() -> None:
    """Past max_keys, new sources are counted under "other": no count is lost, memory bounded."""
    counter = RefusalCounter(max_keys=2)
    for i in range(100):
        counter.add(f"10.0.{i}.1", "no_token", T0)
    counts = counter.drain()
    assert len(counts) == 3
    assert sum(c.count for c in counts) == 100
    assert any(c.source == OTHER_SOURCES and c.count == 98 for c in counts)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50312", "127.0.0.1"),
        ("ipv6:[::1]:50312", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("unix:/tmp/sock", "unix"),
        (None, "unknown"),
    ],
)
def test_peer_host_drops_the_port(peer: str | None, host: str) -> None:
    """A source is an address, whatever port each connection uses."""
    assert peer_host(peer) == host


def test_peer_host_is_bounded_whatever_the_peer_string() -> None:
    """A source key (kept in a bucket and a record) is at most 64 characters, bracketed
    addresses included."""
    assert len(peer_host("ipv6:[" + "a" * 5000 + "]:5000")) == 64
    assert len(peer_host("[" + "b" * 5000 + "]")) == 64


async def test_flusher_writes_one_record_per_count_and_keeps_what_it_could_not_write() -> None:
    """Each interval's counts become refusal-aggregate records; a count the log refuses
    is put back and written with the next flush (and at close): none is lost."""
    written: list[Mapping[str, FieldValue]] = []
    fail = True

    async def append(fields: Mapping[str, FieldValue]) -> int:
        if fail:
            raise UnavailableError("busy", code=Code.LOG_UNAVAILABLE)
        written.append(fields)
        return len(written)

    counter = RefusalCounter()
    flusher = AggregateFlusher(
        append,
        [CountedEndpoint(counter=counter, role=Role.AUDITOR, method="GET /audit/v1/records")],
        interval=10.0,
        clock=lambda: T0,
    )
    counter.add("10.0.0.1", "no_token", T0, count=7)
    assert await flusher.flush() == 0
    counter.add("10.0.0.1", "no_token", T0 + timedelta(seconds=1), count=3)
    fail = False
    await flusher.close()
    assert len(written) == 1
    r = written[0]
    assert (r["kind"], r["role"], r["peer"], r["error_code"], r["status"]) == (
        "refusal-aggregate",
        "auditor",
        "10.0.0.1",
        "no_token",
        "refused",
    )
    assert str(r["error_message"]).startswith("count=10; ")
    assert r["client"] is None


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:5000", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::9]:6000", "2001:db8:1:2::/64"),  # the same /64
        ("ipv6:[::ffff:10.1.2.3]:5000", "10.1.2.3"),
        ("ipv6:%5B2001:db8:1:2::7%5D:5000", "2001:db8:1:2::/64"),  # as gRPC 1.85 writes it
        ("ipv6:%5B::1%5D:45414", "::/64"),
        ("unix:/run/x.sock", "unix"),
        (None, "unknown"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(peer: str | None, source: str) -> None:
    assert source_of(peer) == source


def test_open_calls_are_bounded_per_source_and_given_back() -> None:
    calls = OpenCalls(2)
    assert calls.take("a") and calls.take("a")
    assert not calls.take("a")  # its limit: nothing counted
    assert calls.take("b")
    calls.give("a")
    assert calls.take("a") and calls.held("a") == 2
    calls.give("a")
    calls.give("a")
    assert calls.held("a") == 0
    unlimited = OpenCalls(0)
    assert all(unlimited.take("a") for _ in range(1000))
