"""Fair share of a bounded number of slots among peers: who may start a call now, who waits.

The provider endpoint handles at most `capacity` calls at once for all its peers together.
Without a rule for sharing them, one peer that sends many slow calls takes every slot and
every other peer waits behind it. Here each peer holds at most its *share*: the capacity
divided by the number of peers that hold or want a slot now (so a lone peer may use
everything, and a newcomer gets room as soon as slots free up), and never more than a
fixed `per_peer` cap when one is set (which keeps room free for newcomers even before
anything ends). Requests over the share wait in a queue per peer, first come first
served within a peer, peers served in turn; nothing is ever dropped.

Pure: it takes requests and releases and says which waiting tickets may start; the caller
owns the waiting (futures, threads) and must release every slot it was granted. It never
preempts a call already started.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FairShare(Generic[T]):
    """`capacity` slots shared among peers; `per_peer` (0: none) caps what one peer holds."""

    __slots__ = ("_held", "_load", "_total", "_waiting", "capacity", "per_peer")

    def __init__(self, capacity: int, per_peer: int = 0) -> None:
        if capacity < 1 or per_peer < 0:
            raise ValueError("capacity must be at least 1 and per_peer at least 0")
        self.capacity = capacity
        self.per_peer = per_peer
        self._total = 0
        # slots each peer holds; held plus waiting per peer (a peer is active while > 0)
        self._held: dict[Hashable, int] = {}
        self._load: dict[Hashable, int] = {}
        # per peer, its tickets in order of arrival; dict order is the turn of the peers
        self._waiting: dict[Hashable, deque[T]] = {}

    @property
    def in_use(self) -> int:
        return self._total

    def held(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)

    def waiting(self, peer: Hashable) -> int:
        queue = self._waiting.get(peer)
        return len(queue) if queue else 0

    def share(self) -> int:
        """The most slots one peer may hold now."""
        share = max(1, self.capacity // max(1, len(self._load)))
        return min(share, self.per_peer) if self.per_peer else share

    def try_acquire(self, peer: Hashable) -> bool:
        """Take a slot for `peer` if it may start now (nothing is queued otherwise)."""
        if peer in self._waiting or not self._may_start(peer):
            return False
        self._load[peer] = self._load.get(peer, 0) + 1
        self._start(peer)
        return True

    def acquire(self, peer: Hashable, ticket: T) -> bool:
        """Ask for a slot: True if `peer` holds it now, False if `ticket` waits (a later
        `release` or `cancel` returns it when it may start)."""
        self._load[peer] = self._load.get(peer, 0) + 1
        if peer not in self._waiting and self._may_start(peer):
            self._start(peer)
            return True
        self._waiting.setdefault(peer, deque()).append(ticket)
        return False

    def release(self, peer: Hashable) -> list[T]:
        """Give back one slot `peer` held; the tickets that may start now (their slots taken)."""
        held = self._held[peer] - 1
        if held:
            self._held[peer] = held
        else:
            del self._held[peer]
        self._total -= 1
        self._unload(peer)
        return self._grant()

    def cancel(self, peer: Hashable, ticket: T) -> list[T]:
        """Withdraw a waiting ticket (its caller gave up); the tickets that may start now."""
        queue = self._waiting.get(peer)
        if queue is None or ticket not in queue:
            return []
        queue.remove(ticket)
        if not queue:
            del self._waiting[peer]
        self._unload(peer)
        return self._grant()

    def _may_start(self, peer: Hashable) -> bool:
        return self._total < self.capacity and self._held.get(peer, 0) < self.share()

    def _start(self, peer: Hashable) -> None:
        self._held[peer] = self._held.get(peer, 0) + 1
        self._total += 1

    def _unload(self, peer: Hashable) -> None:
        load = self._load[peer] - 1
        if load:
            self._load[peer] = load
        else:
            del self._load[peer]

    def _grant(self) -> list[T]:
        """Start waiting tickets while slots are free: one per peer under its share, in
        turn; a peer served goes to the back of the turn."""
        granted: list[T] = []
        while self._waiting and self._total < self.capacity:
            progressed = False
            for peer in list(self._waiting):
                if self._total >= self.capacity:
                    break
                if self._held.get(peer, 0) >= self.share():
                    continue
                queue = self._waiting.pop(peer)
                granted.append(queue.popleft())
                self._start(peer)
                if queue:
                    self._waiting[peer] = queue  # to the back of the turn
                progressed = True
            if not progressed:
                break
        return granted
