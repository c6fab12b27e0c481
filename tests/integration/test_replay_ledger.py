"""The replay guard shared by replicas on PostgreSQL (`security_server.replay_ledger`).

Two ledgers on one new PostgreSQL database stand for two replicas of one server, each with
its own connection, as two processes have.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.errors import Code, GatewayError
from security_server.message_log import migrate
from security_server.replay_ledger import ReplayLedger

from .test_registry_store import POSTGRES, fresh_postgres_database

pytestmark = [
    pytest.mark.skipif(
        not POSTGRES,
        reason="GATEWAY_TEST_POSTGRES_URL is not set: PostgreSQL replay guard tests skipped",
    ),
    pytest.mark.postgres,
]

WINDOW = timedelta(seconds=300)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture
async def engines() -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two engines (two replicas) on one new, migrated PostgreSQL database."""
    async with fresh_postgres_database() as url:
        first, second = create_async_engine(url), create_async_engine(url)
        try:
            await migrate(first)
            yield first, second
        finally:
            await first.dispose()
            await second.dispose()


async def _code(claim: asyncio.Future[None] | asyncio.Task[None]) -> str | None:
    try:
        await claim
    except GatewayError as err:
        return err.code.value
    return None


async def test_an_id_claimed_by_one_replica_is_refused_by_the_other(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """The first claim of an id wins; the same id at the other replica, or twice at once, is
    `replayed_message`; other ids pass."""
    first = ReplayLedger(engines[0], "a", WINDOW)
    second = ReplayLedger(engines[1], "b", WINDOW)
    first.start()
    second.start()
    try:
        await first.claim("m-1", NOW)
        assert await _code(asyncio.ensure_future(second.claim("m-1", NOW))) == "replayed_message"
        assert await _code(asyncio.ensure_future(first.claim("m-1", NOW))) == "replayed_message"
        # two replicas racing for one id: exactly one wins
        race = [asyncio.ensure_future(ledger.claim("m-2", NOW)) for ledger in (first, second)]
        assert sorted(map(str, [await _code(c) for c in race])) == ["None", "replayed_message"]
        # one batch holding an id twice: the second is a replay
        twice = [asyncio.ensure_future(first.claim("m-3", NOW)) for _ in range(2)]
        assert [await _code(c) for c in twice] == [None, "replayed_message"]
        await second.claim("m-4", NOW)
    finally:
        await first.close()
        await second.close()


async def test_old_claims_are_pruned_and_a_broken_database_refuses(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """Claims older than twice the window are deleted (their ids are stale anyway); without
    the database a claim fails closed with `log_unavailable`."""
    ledger = ReplayLedger(engines[0], "a", WINDOW, prune_every=timedelta(0))
    ledger.start()
    try:
        await ledger.claim("old", NOW)
        await ledger.claim("new", NOW + 2 * WINDOW + timedelta(seconds=1))
        async with engines[1].connect() as conn:
            rows = await conn.execute(sa.text("SELECT message_id FROM replay_guard"))
            assert {r[0] for r in rows} == {"new"}
        async with engines[1].connect() as conn:
            await conn.execute(sa.text("ALTER TABLE replay_guard RENAME TO replay_guard_gone"))
            await conn.commit()
        failed = asyncio.ensure_future(ledger.claim("any", NOW + 3 * WINDOW))
        assert await _code(failed) == Code.LOG_UNAVAILABLE.value
    finally:
        await ledger.close()


async def test_a_claim_in_flight_when_the_ledger_closes_is_refused(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """A claim whose statement is under way when the ledger closes (here: waiting on another
    replica's uncommitted claim of the same id) is refused with `log_unavailable`, not left
    waiting for an answer that never comes."""
    ledger = ReplayLedger(engines[0], "a", WINDOW)
    ledger.start()
    async with engines[1].connect() as other:
        await other.execute(
            sa.text("INSERT INTO replay_guard VALUES ('held', :t, 'b')"), {"t": "x"}
        )  # not committed: the ledger's insert of 'held' waits for it
        waiting = asyncio.ensure_future(ledger.claim("held", NOW))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await asyncio.wait_for(ledger.close(), 10)
        assert await asyncio.wait_for(_code(waiting), 5) == Code.LOG_UNAVAILABLE.value
        await other.rollback()


async def test_a_failed_prune_refuses_none_of_the_claims_it_follows(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """Pruning old claims fails (deletes refused) after the claims were inserted: those
    claims stand and their calls go on; the id stays claimed."""
    async with engines[1].begin() as conn:
        await conn.execute(
            sa.text(
                "CREATE FUNCTION no_delete() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'no delete'; END $$"
            )
        )
        await conn.execute(
            sa.text(
                "CREATE TRIGGER no_delete BEFORE DELETE ON replay_guard "
                "FOR EACH STATEMENT EXECUTE FUNCTION no_delete()"
            )
        )
    ledger = ReplayLedger(engines[0], "a", WINDOW, prune_every=timedelta(0))
    ledger.start()
    try:
        await ledger.claim("m-1", NOW)
        await ledger.claim("m-2", NOW + timedelta(seconds=1))
        assert await _code(asyncio.ensure_future(ledger.claim("m-1", NOW))) == "replayed_message"
    finally:
        await ledger.close()


async def test_cost_of_a_claim(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    """Measures a claim alone and claims of 32 concurrent calls (printed for the README);
    fails only if a lone claim takes more than 20 ms."""
    ledger = ReplayLedger(engines[0], "a", WINDOW)
    ledger.start()
    try:
        await ledger.claim("warm", NOW)
        started = time.perf_counter()
        for i in range(200):
            await ledger.claim(f"lone-{i}", NOW)
        lone = (time.perf_counter() - started) / 200
        started = time.perf_counter()
        for round_ in range(50):
            await asyncio.gather(*(ledger.claim(f"c-{round_}-{i}", NOW) for i in range(32)))
        concurrent = (time.perf_counter() - started) / (50 * 32)
        print(
            f"replay claim: {lone * 1e3:.2f} ms alone; {concurrent * 1e3:.3f} ms per call with "
            f"32 at once ({ledger.statements} statements for {ledger.claims} claims)"
        )
        assert lone < 0.02
    finally:
        await ledger.close()
