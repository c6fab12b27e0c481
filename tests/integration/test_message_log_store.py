"""The message log store on SQLite and PostgreSQL: group commit, durability, chain across restarts."""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from structlog.testing import capture_logs

from gateway.audit import ChainBrokenError, FieldValue, RecordKind, Role
from gateway.errors import Code, TrustError, UnavailableError
from gateway.records import record
from gateway.settings import database_url
from security_server import search
from security_server.audit import verify_log
from security_server.consumer import ConsumerService
from security_server.message_log import PROBE_TIMEOUT_SECONDS, MessageLog
from security_server.search import SEARCHES_AT_ONCE, Searcher, SearchTooLongError
from tests.tamper import reset_postgres_log, tamper

POSTGRES = os.environ.get("GATEWAY_TEST_POSTGRES_URL")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not POSTGRES,
                reason="GATEWAY_TEST_POSTGRES_URL is not set: PostgreSQL store tests skipped",
            ),
        ),
    ]
)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield database_url(str(tmp_path / "log.db"), base=tmp_path)
        return
    assert POSTGRES is not None
    pg = database_url(POSTGRES, base=tmp_path)
    await reset_postgres_log(pg)
    yield pg
    await reset_postgres_log(pg)


def fields(i: int) -> dict[str, FieldValue]:
    return record(
        kind=RecordKind.REQUEST,
        role=Role.CONSUMER,
        logged_at=datetime.now(UTC),
        message_id=f"m-{i}",
        client="UY/GOV/MSP/clinics",
        service="UY/GOV/DNIC/identity/population/v1",
        purpose="healthcare-identification",
        header=b"{}" + i.to_bytes(4, "big"),
        signature=bytes(range(70)),
        body_sha256="0" * 64,
    )


async def test_concurrent_appends_are_group_committed_and_verify(url: str) -> None:
    """400 concurrent appends get distinct sequence numbers, share transactions, and verify."""
    log = await MessageLog.open(url)
    seqs = await asyncio.gather(*(log.append(fields(i)) for i in range(400)))
    assert sorted(seqs) == list(range(1, 401))
    assert log.batches_written < log.records_written == 400
    await log.close()
    assert (await verify_log(url)).heads["main"].next_seq == 401


async def test_chain_continues_after_reopening(url: str) -> None:
    """A reopened log links its next record to the last one written before."""
    log = await MessageLog.open(url)
    await asyncio.gather(*(log.append(fields(i)) for i in range(10)))
    await log.close()
    log = await MessageLog.open(url)
    assert await log.append(fields(10)) == 11
    await log.close()
    assert (await verify_log(url)).heads["main"].next_seq == 12


async def test_edited_row_is_detected(url: str) -> None:
    """An UPDATE of one row is named by verification."""
    log = await MessageLog.open(url)
    await asyncio.gather(*(log.append(fields(i)) for i in range(5)))
    await log.close()
    await tamper(url, "UPDATE message_log SET purpose = 'marketing' WHERE seq = 3")
    with pytest.raises(ChainBrokenError) as caught:
        await verify_log(url)
    assert caught.value.seq == 3


async def test_unwritable_log_fails_closed_and_recovers(tmp_path: Path) -> None:
    """When the log cannot be written, appends fail with log_unavailable; the writer survives."""
    from gateway.errors import Code, UnavailableError
    from security_server.message_log import metadata

    url = database_url(str(tmp_path / "log.db"), base=tmp_path)
    log = await MessageLog.open(url)
    assert await log.append(fields(0)) == 1
    async with log.engine.begin() as conn:
        await conn.execute(sa.text("DROP TABLE message_log"))
    with capture_logs() as logged, pytest.raises(UnavailableError) as caught:
        await log.append(fields(1))
    assert caught.value.code == Code.LOG_UNAVAILABLE
    # the driver's error, without the statement's parameters (the record's content)
    failures = [e for e in logged if e["event"] == "message_log_write_failed"]
    assert [e["error"] for e in failures] == ["OperationalError: no such table: message_log"]
    assert log.unwritable == "OperationalError: no such table: message_log"
    async with log.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    assert await log.append(fields(2)) == 2  # the writer is still alive
    await log.close()


async def test_probe_notices_a_held_write_lock_within_its_timeout_and_recovers(
    tmp_path: Path,
) -> None:
    """Another connection holding SQLite's write lock: the probe answers unwritable after
    PROBE_TIMEOUT_SECONDS (not the 5 s a write waits), in one line; writable once released."""
    path = tmp_path / "log.db"
    log = await MessageLog.open(database_url(str(path), base=tmp_path))
    try:
        assert await log.probe() and log.unwritable is None
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            assert not await log.probe()
            took = time.monotonic() - started
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert log.unwritable == "OperationalError: database is locked"
        assert 0.9 * PROBE_TIMEOUT_SECONDS <= took < PROBE_TIMEOUT_SECONDS + 1.0, took
        assert await log.probe() and log.unwritable is None
        assert await log.append(fields(0)) == 1
    finally:
        await log.close()


@pytest.mark.skipif(not POSTGRES, reason="GATEWAY_TEST_POSTGRES_URL is not set")
async def test_probe_finds_a_read_only_postgresql_database_unwritable(tmp_path: Path) -> None:
    """A PostgreSQL database whose transactions are read-only answers queries, yet the
    probe calls the log unwritable, as the next write finds it; writable once it is not."""
    assert POSTGRES is not None
    server = database_url(POSTGRES, base=tmp_path)
    name = f"gateway_read_only_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")

    async def execute(statement: str) -> None:
        async with admin.connect() as conn:
            await conn.execute(sa.text(statement))

    await execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server).set(database=name).render_as_string(hide_password=False)
        log = await MessageLog.open(url)
        try:
            assert await log.probe() and log.unwritable is None
            await execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await log.engine.dispose()  # the setting holds for new sessions
            assert not await log.probe()
            assert log.unwritable is not None and "takes no writes" in log.unwritable
            with pytest.raises(UnavailableError):
                await log.append(fields(0))
            await execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await log.engine.dispose()
            assert await log.probe() and log.unwritable is None
        finally:
            await log.close()
    finally:
        await execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


async def test_evidence_is_kept_once_and_stamps_are_stored(url: str) -> None:
    """Evidence named by many records is written once, in the records' transactions; a batch
    stamp is stored, and after reopening only the records after it wait for a stamp."""
    log = await MessageLog.open(url)
    log.stamping = True
    certificate = ("certificate", b"DER of a certificate")
    evidence = {"c" * 64: certificate}
    await asyncio.gather(
        *(
            log.append(fields(i), {**evidence, f"{i:064x}": ("body", f"body {i}".encode())})
            for i in range(50)
        )
    )
    assert [seq for seq, _ in log.unstamped] == list(range(1, 51))
    await log.save_stamp(
        {
            "first_seq": 1,
            "last_seq": 30,
            "root": bytes(32),
            "token": b"t",
            "tsa": "x",
            "gen_time": "t",
        }
    )
    assert await log.last_stamped_seq() == 30
    await log.close()
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        kinds = (
            await conn.execute(sa.text("SELECT kind, COUNT(*) FROM log_evidence GROUP BY kind"))
        ).all()
    await engine.dispose()
    assert sorted((str(k), int(n)) for k, n in kinds) == [("body", 50), ("certificate", 1)]
    log = await MessageLog.open(url)
    log.stamping = True
    await log.load_unstamped()
    assert [seq for seq, _ in log.unstamped] == list(range(31, 51))
    await log.close()


# ---- migrations --------------------------------------------------------------------------


def _diff_schema(conn: sa.Connection) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from security_server.message_log import metadata
    from security_server.migrations import VERSION_TABLE

    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "version_table": VERSION_TABLE,
            # other tables (the registry's, on a shared database) are not the log's
            "include_name": lambda name, kind, _parent: kind != "table" or name in metadata.tables,
        },
    )
    return list(compare_metadata(context, metadata))


def _revision(conn: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

    from security_server.migrations import VERSION_TABLE

    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()


async def test_migrations_yield_exactly_the_log_metadata(url: str) -> None:
    """After the migrations, alembic finds no difference between the database and the
    log's tables, and the database is at the newest revision; reopening keeps it there."""
    from alembic.script import ScriptDirectory

    from security_server.migrations import alembic_config

    for _ in range(2):
        log = await MessageLog.open(url)
        await log.append(fields(0))
        async with log.engine.connect() as conn:
            assert await conn.run_sync(_diff_schema) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert await conn.run_sync(_revision) == head
        await log.close()
    assert (await verify_log(url)).heads["main"].next_seq == 3


async def test_the_database_refuses_edits_and_deletions(url: str) -> None:
    """Without an archive, the database's own rules refuse UPDATE and DELETE of records."""
    log = await MessageLog.open(url)
    await log.append(fields(0))
    await log.close()
    engine = create_async_engine(url)
    try:
        for statement in (
            "UPDATE message_log SET purpose = 'marketing'",
            "DELETE FROM message_log",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()
    assert (await verify_log(url)).heads["main"].next_seq == 2


async def test_audit_records_wait_behind_the_data_path_in_a_bounded_queue(tmp_path: Path) -> None:
    """Audit records (auditor queries, refusal aggregates) go into a transaction only after
    the data-path records queued with them, and past `audit_queue` are refused at once."""
    log = await MessageLog.open(
        database_url(str(tmp_path / "log.db"), base=tmp_path), max_batch=8, audit_queue=4
    )
    # the audit records are queued first, then the data-path ones, before the writer runs
    audit = [asyncio.ensure_future(log.append_audit(fields(1000 + i))) for i in range(4)]
    data = [asyncio.ensure_future(log.append(fields(i))) for i in range(20)]
    await asyncio.sleep(0)
    with pytest.raises(UnavailableError):
        await log.append_audit(fields(2000))
    data_seqs, audit_seqs = await asyncio.gather(asyncio.gather(*data), asyncio.gather(*audit))
    assert max(data_seqs) < min(audit_seqs), (data_seqs, audit_seqs)
    await log.close()


async def test_an_evidence_bundle_covers_one_exchange_in_one_scope(url: str) -> None:
    """A client chooses its message ids: when two exchanges share one in a log, no bundle is
    made of them together, and a member auditor's bundle holds its own member's records
    only (a member that is neither's client nor provider gets none)."""
    from gateway.errors import AuditError
    from security_server.evidence import export_records

    log = await MessageLog.open(url)
    mine = fields(1) | {"message_id": "shared"}
    theirs = fields(2) | {
        "message_id": "shared",
        "client": "UY/GOV/BPS/benefits",
        "service": "UY/GOV/MSP/clinics/vaccination/v1",
    }
    await log.append(mine)
    await log.append(theirs)
    await log.close()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            with pytest.raises(AuditError, match="names 2 exchanges"):
                await export_records(conn, "shared")
            with pytest.raises(AuditError, match="no request or response"):
                await export_records(conn, "shared", member="UY/GOV/OTHER")
            for member in ("UY/GOV/DNIC", "UY/GOV/BPS"):  # one exchange each: past the check
                with pytest.raises(AuditError) as failed:
                    await export_records(conn, "shared", member=member)
                assert "exchanges" not in str(failed.value)  # it stops at the missing evidence
    finally:
        await engine.dispose()


async def test_auditor_searches_hold_at_most_their_share_of_the_logs_connections(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many searches at once (one token's burst) hold at most SEARCHES_AT_ONCE connections,
    so the data path's writes go on meanwhile; on PostgreSQL a statement past its time is
    stopped with SearchTooLongError. (A red-team review held a write for 28 s with 60
    searches on a 3-million-record PostgreSQL log.)"""
    log = await MessageLog.open(url)
    searcher = Searcher(log.engine)
    most = [0]

    async def slow_search() -> None:
        async with searcher.connection() as conn:
            most[0] = max(most[0], searcher.running)
            await conn.execute(sa.text("SELECT 1"))
            await asyncio.sleep(0.1)

    try:
        searches = [asyncio.create_task(slow_search()) for _ in range(20)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await log.append(fields(1))  # while the searches queue
        written_in = time.monotonic() - started
        await asyncio.gather(*searches)
        assert most[0] == SEARCHES_AT_ONCE
        assert written_in < 0.5, written_in
        if log.engine.dialect.name == "postgresql":
            monkeypatch.setattr(search, "SEARCH_STATEMENT_SECONDS", 0.2)
            with pytest.raises(SearchTooLongError, match="narrow it"):
                async with searcher.connection() as conn:
                    await conn.execute(sa.text("SELECT pg_sleep(2)"))
    finally:
        await log.close()


async def test_a_callers_message_id_of_another_exchange_is_refused_by_its_server(
    url: str,
) -> None:
    """The consumer's check of a message id its caller chose (ConsumerService.claim_id)
    against a real log: the id of another client's or service's request is refused; the
    same client and service may try again (the provider decides); twins under way are
    refused; a released id is free again."""
    log = await MessageLog.open(url)
    await log.append(fields(1))  # m-1: UY/GOV/MSP/clinics -> population
    # what claim_id reads of the consumer's service: its claims and its node's log
    service = cast(
        ConsumerService, SimpleNamespace(claimed_ids=set(), node=SimpleNamespace(log=log))
    )

    def call(client: str, service_id: str) -> Any:
        return SimpleNamespace(
            header=SimpleNamespace(message_id="m-1", client=client, service=service_id)
        )

    claim = functools.partial(ConsumerService.claim_id, service, {"gateway-id": "m-1"})
    population = "UY/GOV/DNIC/identity/population/v1"
    try:
        with pytest.raises(TrustError, match="names another exchange") as other_client:
            await claim(call("UY/GOV/MSP/billing", population))
        assert other_client.value.code is Code.REPLAYED_MESSAGE
        with pytest.raises(TrustError, match="names another exchange"):
            await claim(call("UY/GOV/MSP/clinics", "UY/GOV/MSP/clinics/vaccination/v1"))
        assert await claim(call("UY/GOV/MSP/clinics", population)) is True
        with pytest.raises(TrustError):  # its twin, while it is under way
            await claim(call("UY/GOV/MSP/clinics", population))
        service.claimed_ids.discard("m-1")
        assert await claim(call("UY/GOV/MSP/clinics", population)) is True
        assert await ConsumerService.claim_id(service, {}, call("x", "y")) is False  # ours
    finally:
        await log.close()
