"""The provider's fair share of call slots among peers (pure scheduler, no I/O)."""

from __future__ import annotations

import pytest

from gateway.fair_share import FairShare


def test_a_lone_peer_may_use_every_slot_and_then_waits() -> None:
    """Alone, a peer gets the whole capacity; its next request waits, and starts on release."""
    share: FairShare[str] = FairShare(4)
    assert all(share.acquire("slow", f"s{i}") for i in range(4))
    assert not share.acquire("slow", "s4")
    assert share.release("slow") == ["s4"]
    assert share.in_use == 4


def test_a_slow_peer_holding_every_slot_cannot_keep_a_newcomer_waiting() -> None:
    """When a slow peer holds every slot, each slot it frees goes to the waiting newcomer
    until both hold half, although the slow peer asked first and asks again."""
    share: FairShare[str] = FairShare(4)
    for i in range(4):
        assert share.acquire("slow", f"s{i}")
    for i in range(4, 12):
        assert not share.acquire("slow", f"s{i}")
    assert not share.acquire("fast", "f0")
    assert not share.acquire("fast", "f1")
    assert not share.acquire("fast", "f2")
    # the share is now 2 each: the first two slots freed go to the newcomer
    assert share.release("slow") == ["f0"]
    assert share.release("slow") == ["f1"]
    assert share.held("fast") == 2 and share.held("slow") == 2
    # at its share, the newcomer waits its turn too; the slow peer gets the next free slot
    assert share.release("slow") == ["s4"]
    assert share.release("fast") == ["f2"]


def test_many_peers_each_get_their_share_in_turn() -> None:
    """With three peers waiting for six slots, the slots are dealt two each, in turn."""
    share: FairShare[str] = FairShare(6)
    for i in range(6):
        assert share.acquire("a", f"a{i}")
    for peer in ("b", "c"):
        for i in range(3):
            assert not share.acquire(peer, f"{peer}{i}")
    granted = [ticket for _ in range(4) for ticket in share.release("a")]
    assert granted == ["b0", "c0", "b1", "c1"]
    assert {p: share.held(p) for p in "abc"} == {"a": 2, "b": 2, "c": 2}
    assert share.waiting("b") == 1 and share.waiting("c") == 1


def test_a_fixed_cap_keeps_room_for_newcomers_before_anything_ends() -> None:
    """With `per_peer` set, one peer never holds more, so another starts at once."""
    share: FairShare[str] = FairShare(10, per_peer=3)
    assert [share.acquire("slow", f"s{i}") for i in range(5)] == [True] * 3 + [False] * 2
    assert share.acquire("fast", "f0")
    assert share.in_use == 4


def test_a_withdrawn_ticket_is_never_started_and_its_peer_stops_counting() -> None:
    """A waiting ticket whose caller gave up is dropped: the freed slot goes to others, and
    the share no longer counts its peer."""
    share: FairShare[str] = FairShare(4)
    for i in range(2):
        assert share.acquire("a", f"a{i}")
    for i in range(2):
        assert share.acquire("b", f"b{i}")
    assert not share.acquire("c", "c0")
    assert not share.acquire("a", "a2")
    assert share.share() == 1
    assert share.cancel("c", "c0") == []
    assert share.share() == 2
    assert share.cancel("c", "c0") == []  # already gone: nothing happens
    assert share.release("a") == ["a2"]
    assert share.release("b") == []


def test_try_acquire_takes_a_free_slot_and_never_queues() -> None:
    """`try_acquire` starts a call within the share and otherwise leaves no ticket behind."""
    share: FairShare[str] = FairShare(2)
    assert share.try_acquire("a") and share.try_acquire("a")
    assert not share.try_acquire("a")
    assert share.waiting("a") == 0 and share.in_use == 2
    assert share.release("a") == []
    assert share.try_acquire("b")
    assert not share.acquire("b", "b1")  # b's share is 1 of 2 while a holds one
    assert share.release("a") == ["b1"]


def test_invalid_capacity_is_refused() -> None:
    """A capacity under one or a negative cap is a configuration error."""
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        FairShare(0)
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        FairShare(3, per_peer=-1)
