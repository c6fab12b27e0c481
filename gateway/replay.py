"""Replay protection: remember message ids for as long as a message may be accepted.

A provider accepts a message only if its signed creation time is within the allowed clock
skew of its own clock, so it needs to remember ids only for twice that window. Pure: the
current time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime, timedelta

from gateway.errors import Code, TrustError


class ReplayGuard:
    def __init__(self, window: timedelta) -> None:
        self.window = window
        self._seen: OrderedDict[str, datetime] = OrderedDict()

    def check_fresh(self, created_at: datetime, now: datetime) -> None:
        """Raise `TrustError(STALE_MESSAGE)` if the creation time is outside the window."""
        if abs(now - created_at) > self.window:
            raise TrustError(
                f"the message was created at {created_at.isoformat()}, outside the "
                f"{int(self.window.total_seconds())} s this server accepts; check the clocks",
                code=Code.STALE_MESSAGE,
            )

    def remember(self, message_id: str, now: datetime) -> None:
        """Record a message id; raise `TrustError(REPLAYED_MESSAGE)` if it was seen already."""
        self._expire(now)
        if message_id in self._seen:
            raise TrustError(
                f"message id {message_id} was already used: the message is a replay or its "
                "id is not unique; send each message with a new id",
                code=Code.REPLAYED_MESSAGE,
            )
        self._seen[message_id] = now

    def preload(self, message_ids: Iterable[str], now: datetime) -> None:
        for message_id in message_ids:
            self._seen.setdefault(message_id, now)

    def _expire(self, now: datetime) -> None:
        horizon = now - 2 * self.window
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon:
                break
            del self._seen[oldest_id]
