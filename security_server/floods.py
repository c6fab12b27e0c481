"""Floods made cheap: per-key token buckets, and refusals counted into one record per
(source, reason) and interval instead of one chained record each.

`TokenBuckets` and `RefusalCounter` are pure code (the clock is passed in) and bounded in
memory whatever the traffic; `AggregateFlusher` is the thin async shell that writes the
counts to the message log at each interval and at shutdown. Nothing here may keep text an
attacker chose: keys are peer addresses and stable codes, and a request's detail (such as
a junk token) is kept only as a short digest of its last occurrence.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

import structlog

from gateway.audit import FieldValue, RecordKind, Role
from gateway.errors import GatewayError
from gateway.records import record
from gateway.timeutil import format_time
from security_server.background import every, stop

log = structlog.get_logger("security_server.floods")

# the key under which counts go once a counter holds `max_keys` distinct keys
OTHER_SOURCES = "other"
_DIGEST_HEX = 16


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One token bucket per key: `rate` tokens a second, at most `burst` saved up.

    At most `max_keys` buckets are kept; the least recently used goes first (a source it
    forgets starts again with a full bucket, so the bound costs at most one burst)."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float], max_keys: int = 10_000
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a token bucket needs rate > 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when it had one, else the seconds until it will."""
        now = self.clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
            bucket = _Bucket(float(self.burst), now)
        else:
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.stamp = now
        self._buckets[key] = bucket  # now the most recently used
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalCount:
    """How many requests of one source were refused for one reason within one interval."""

    source: str
    reason: str
    # the authenticated principal, when there is one (a rate-limited token's holder)
    who: str | None
    count: int
    first: datetime
    last: datetime
    # the first 16 hex digits of the SHA-256 of the last refused request's detail
    detail_sha256: str | None

    def describe(self) -> str:
        """The record's error_message: fixed fields, nothing the sender chose."""
        text = f"count={self.count}; first={format_time(self.first)}; last={format_time(self.last)}"
        if self.detail_sha256:
            text += f"; detail_sha256={self.detail_sha256}"
        return text


def digest(detail: str | bytes) -> str:
    data = detail.encode("utf-8", "replace") if isinstance(detail, str) else detail
    return hashlib.sha256(data).hexdigest()[:_DIGEST_HEX]


class RefusalCounter:
    """Counts refusals per (source, reason, who) until drained; at most `max_keys` keys,
    after which new sources are counted together under source "other"."""

    def __init__(self, *, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._counts: dict[tuple[str, str, str | None], RefusalCount] = {}
        self.total = 0

    def add(
        self,
        source: str,
        reason: str,
        now: datetime,
        *,
        who: str | None = None,
        detail: str | bytes | None = None,
        count: int = 1,
    ) -> None:
        key = (source[:64], reason[:64], None if who is None else who[:256])
        if key not in self._counts and len(self._counts) >= self.max_keys:
            key = (OTHER_SOURCES, key[1], None)
        sha = None if detail is None else digest(detail)
        self.total += count
        held = self._counts.get(key)
        if held is None:
            self._counts[key] = RefusalCount(
                source=key[0],
                reason=key[1],
                who=key[2],
                count=count,
                first=now,
                last=now,
                detail_sha256=sha,
            )
        else:
            self._counts[key] = replace(
                held,
                count=held.count + count,
                last=max(held.last, now),
                detail_sha256=sha or held.detail_sha256,
            )

    def merge(self, count: RefusalCount) -> None:
        """Put back a count that could not be written (it goes with the next interval's)."""
        key = (count.source, count.reason, count.who)
        held = self._counts.get(key)
        self._counts[key] = (
            count
            if held is None
            else replace(
                held,
                count=held.count + count.count,
                first=min(held.first, count.first),
                last=max(held.last, count.last),
                detail_sha256=held.detail_sha256 or count.detail_sha256,
            )
        )

    def drain(self) -> list[RefusalCount]:
        counts = list(self._counts.values())
        self._counts.clear()
        return counts

    def __len__(self) -> int:
        return len(self._counts)


def aggregate_record(
    count: RefusalCount, role: Role, method: str | None, now: datetime
) -> dict[str, FieldValue]:
    """The message log record of one count (kind `refusal-aggregate`)."""
    return record(
        kind=RecordKind.REFUSAL_AGGREGATE,
        role=role,
        logged_at=now,
        message_id=uuid.uuid4().hex,
        method=method,
        user_id=count.who,
        peer=count.source,
        status="refused",
        error_code=count.reason,
        error_message=count.describe(),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CountedEndpoint:
    """One endpoint's counter, with the role and method its aggregate records carry."""

    counter: RefusalCounter
    role: Role
    method: str | None = None


Append = Callable[[Mapping[str, FieldValue]], Awaitable[int]]


class AggregateFlusher:
    """Writes every endpoint's counts as aggregate records each `interval` seconds and at
    `close` (a clean stop loses none). A count that cannot be written is put back."""

    def __init__(
        self,
        append: Append,
        endpoints: list[CountedEndpoint],
        *,
        interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.append = append
        self.endpoints = endpoints
        self.interval = interval
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(
            every(self.interval, self.flush, name="refusal-aggregates"), name="refusal-aggregates"
        )

    async def flush(self) -> int:
        """Write what is counted; return how many records were written."""
        written = 0
        for endpoint in self.endpoints:
            counts = endpoint.counter.drain()
            if not counts:
                continue
            now = self.clock()
            results = await asyncio.gather(
                *(
                    self.append(aggregate_record(c, endpoint.role, endpoint.method, now))
                    for c in counts
                ),
                return_exceptions=True,
            )
            for count, result in zip(counts, results, strict=True):
                if isinstance(result, BaseException):
                    # any failure: the count goes with the next interval's, never lost
                    endpoint.counter.merge(count)
                    if not isinstance(result, GatewayError):
                        log.error("refusal_aggregate_failed", kind=type(result).__name__)
                else:
                    written += 1
                    log.info(
                        "refusals_aggregated",
                        role=endpoint.role.value,
                        source=count.source,
                        reason=count.reason,
                        count=count.count,
                    )
            if written < len(counts):
                log.error("refusal_aggregates_not_logged", pending=len(counts) - written)
        return written

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        await self.flush()
