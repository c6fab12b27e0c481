"""The OCSP answers a stream carries while open (security_server.streams): ours go out in
the background, never holding up the watcher that checks the peer's; the peer's are kept
within a size and, sent alone, within a budget."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import Code
from gateway.v1 import exchange_pb2 as pb
from security_server.streams import (
    MAX_STAPLE_BYTES,
    STAPLES_AHEAD,
    PeerStaples,
    Staples,
    StreamError,
    _watch,
)


async def test_a_blocked_write_holds_up_neither_the_watcher_nor_a_second_staple() -> None:
    """A peer that stops reading blocks every write: the staple being pushed waits, the
    watcher goes on checking (and ends the stream at its limit), and no second write is
    started behind the first."""
    ours = [b"answer 1"]
    started: list[bytes] = []
    never = asyncio.Event()

    async def blocked_write(staple: bytes) -> None:
        started.append(staple)
        await never.wait()

    staples = Staples(lambda: ours[0], blocked_write)
    checks = [0]

    def check() -> None:
        checks[0] += 1

    def push() -> None:
        ours[0] = b"answer 2"  # a newer answer every time: one push after another is due
        staples.push()

    err = await asyncio.wait_for(_watch(check, 0.01, time.monotonic(), 0.2, push), 2.0)
    assert err.code is Code.STREAM_TOO_LONG
    assert checks[0] >= 5
    assert started == [b"answer 2"]  # one write under way, none queued behind it
    staples.cancel()


def test_an_answer_goes_once_with_a_message_and_again_only_when_newer() -> None:
    ours = [b"answer 1"]
    staples = Staples(lambda: ours[0], lambda staple: asyncio.sleep(0))
    assert staples.due() == b"answer 1"
    assert staples.due() == b""
    ours[0] = b"answer 2"
    assert staples.due() == b"answer 2"


def test_a_peer_sending_answers_alone_past_its_budget_ends_the_stream() -> None:
    theirs = PeerStaples(b"")
    alone = pb.StreamMessage(ocsp_staple=b"an answer")
    for _ in range(STAPLES_AHEAD):
        assert theirs.take(alone)
    with pytest.raises(StreamError) as ended:
        theirs.take(alone)
    assert ended.value.error.code is Code.MALFORMED_ENVELOPE
    # a staple with data is kept, and not counted
    data = pb.StreamMessage(data=pb.StreamData(seq=1, body=b"x"), ocsp_staple=b"newest")
    fresh = PeerStaples(b"")
    assert not fresh.take(data) and fresh.latest == b"newest"


def test_an_oversized_answer_ends_the_stream() -> None:
    theirs = PeerStaples(b"held")
    with pytest.raises(StreamError) as ended:
        theirs.take(pb.StreamMessage(ocsp_staple=bytes(MAX_STAPLE_BYTES + 1)))
    assert ended.value.error.code is Code.CERTIFICATE_STATUS_INVALID
    assert theirs.latest == b"held"
