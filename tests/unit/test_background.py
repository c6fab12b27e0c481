"""Background jobs of the security server: a round that fails does not end the job."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from gateway.audit import FieldValue, Role
from gateway.identifiers import SecurityServerId
from security_server.background import every, stop
from security_server.checkpoints import CheckpointSender
from security_server.floods import AggregateFlusher, CountedEndpoint, RefusalCounter
from security_server.settings import CheckpointsSection

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


async def test_a_failing_round_is_logged_and_the_next_one_runs() -> None:
    """`every` goes on after a round that raised, and `stop` ends it."""
    rounds: list[int] = []
    done = asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("the first round fails")
        if len(rounds) == 3:
            done.set()

    task = asyncio.ensure_future(every(0.001, work, name="test", first_at_once=True))
    await asyncio.wait_for(done.wait(), 5)
    await stop(task)
    assert task.done() and rounds[:3] == [0, 1, 2]


class _Log:
    chain = "main"
    durable = (3, b"\x01" * 32)


class _FlakySigner:
    """Fails its first signature (a key on a device that hiccups, say)."""

    def __init__(self) -> None:
        self.calls = 0
        self.signed = asyncio.Event()

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("signing device busy")
        self.signed.set()
        return b"signature"


async def test_checkpoints_go_on_after_a_round_that_raised() -> None:
    """An unexpected error in one round of the checkpoint sender does not stop it for good
    (which would leave the log without checkpoints, unseen)."""
    signer = _FlakySigner()
    sender = CheckpointSender(
        message_log=cast(Any, _Log()),
        server=SecurityServerId.parse("UY/GOV/MSP/ss1"),
        signer=cast(Any, signer),
        addresses=[],
        settings=CheckpointsSection(
            interval_seconds=0.001, heartbeat_seconds=0.001, timeout_seconds=1
        ),
        clock=lambda: T0,
    )
    task = asyncio.ensure_future(sender.run())
    try:
        await asyncio.wait_for(signer.signed.wait(), 5)
    finally:
        await stop(task)
    assert signer.calls >= 2


async def test_a_final_checkpoint_that_raises_does_not_stop_the_shutdown() -> None:
    """At shutdown an unexpected error in the last send is logged; close returns (the
    server's remaining clean-up runs) and the channels are closed."""
    sender = CheckpointSender(
        message_log=cast(Any, _Log()),
        server=SecurityServerId.parse("UY/GOV/MSP/ss1"),
        signer=cast(Any, _FlakySigner()),
        addresses=["127.0.0.1:9"],
        settings=CheckpointsSection(),
        clock=lambda: T0,
    )
    sender._call("127.0.0.1:9")  # a channel opened by an earlier round
    await sender.close()
    assert sender._channels == {}


async def test_a_count_that_fails_unexpectedly_is_kept_for_the_next_flush() -> None:
    """An append failing with something other than a gateway error loses no count, and
    the other endpoints' counts are written all the same."""
    written: list[Mapping[str, FieldValue]] = []

    async def append(fields: Mapping[str, FieldValue]) -> int:
        if fields["peer"] == "10.0.0.1" and not written:
            raise RuntimeError("unexpected")
        written.append(fields)
        return len(written)

    first, second = RefusalCounter(), RefusalCounter()
    flusher = AggregateFlusher(
        append,
        [
            CountedEndpoint(counter=first, role=Role.CONSUMER),
            CountedEndpoint(counter=second, role=Role.AUDITOR),
        ],
        interval=10.0,
        clock=lambda: T0,
    )
    first.add("10.0.0.1", "missing_metadata", T0, count=5)
    second.add("10.0.0.2", "no_token", T0, count=2)
    assert await flusher.flush() == 1
    assert [r["peer"] for r in written] == ["10.0.0.2"]
    assert await flusher.flush() == 1
    assert written[1]["peer"] == "10.0.0.1"
    assert str(written[1]["error_message"]).startswith("count=5;")
