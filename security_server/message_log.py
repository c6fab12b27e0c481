"""The message log: one durable, hash-chained record per request, response and refusal.

`append` returns only when the record is committed (fail closed: the caller forwards or
answers nothing before). Durability at speed comes from group commit: one writer task
takes every record queued while the previous transaction was committing, chains them in
order and writes them in one transaction (one fsync). SQLite runs in WAL mode with
`synchronous=FULL`; its transactions run in one dedicated thread through a synchronous
SQLAlchemy engine, one hand-off per batch (measured: 0.93 ms per single-record commit,
against 1.6 ms through the async engine and aiosqlite, whose every statement is a
hand-off). Reads, and every operation on other databases, use the async engine.

Beside the chain, two tables hold what the evidence of a record needs and the chain does not
carry: `log_evidence` keeps certificates, OCSP responses and (when `log.store_bodies` is on)
bodies, each once, under its SHA-256, written in the same transaction as the records that
name it (so the chain vouches for them through those digests); `timestamp_batches` keeps
each RFC 3161 token with the range of records and the Merkle root it stamps.

Data-path records (requests, responses, refusals) have priority over the records of the
auditor API and of counted refusals (`append_audit`): those wait in a bounded queue of their
own and go into a transaction only in the room the data-path records leave, at most
`AUDIT_PER_BATCH` a transaction; when the queue is full they are refused at once.

Database errors are translated here into `UnavailableError(LOG_UNAVAILABLE)`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.audit import CHAIN_NAME, RECORD_FIELDS, ChainedRecord, ChainHead, FieldValue
from gateway.errors import Code, UnavailableError
from gateway.timeutil import format_time
from gateway_ops.readiness import failure_reason

log = structlog.get_logger("security_server.message_log")

metadata = sa.MetaData()

_BINARY = {"header", "signature"}

# one hash chain per writer: a server has one chain ("main"); replicas sharing one database
# each write their own (`log.chain`), so that no lock is shared on the data path
message_log = sa.Table(
    "message_log",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
    *(
        sa.Column(name, sa.LargeBinary if name in _BINARY else sa.Text, nullable=True)
        for name in RECORD_FIELDS
    ),
    sa.Index("ix_message_log_message_id", "message_id"),
    sa.Index("ix_message_log_subject", "subject_ref", "logged_at"),
    sa.Index("ix_message_log_time", "logged_at", "chain", "seq"),
)

# certificates, OCSP responses and bodies that records name by their SHA-256
log_evidence = sa.Table(
    "log_evidence",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# one RFC 3161 token per batch of records: the Merkle root of records first_seq..last_seq
timestamp_batches = sa.Table(
    "timestamp_batches",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("first_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("token", sa.LargeBinary, nullable=False),
    sa.Column("tsa", sa.Text, nullable=False),
    sa.Column("gen_time", sa.Text, nullable=False),
)

# the archive files a chain's oldest records moved into, in order: number n holds records
# first_seq..last_seq, its file's SHA-256, and the SHA-256 of archive n-1 it links to
log_archives = sa.Table(
    "log_archives",
    metadata,
    sa.Column("chain", sa.String(64), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("prev_sha256", sa.String(64), nullable=False),
    # the last record a time-stamp in this archive covers (0: none): once a chain is
    # stamped, its records are archived only with their tokens
    sa.Column("stamped_last_seq", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
)

# most audit records (auditor queries, refusal aggregates) written in one transaction, after
# its data-path records: they never grow a data-path commit by more than this
AUDIT_PER_BATCH = 16

# message ids the provider accepted, shared by the replicas of one server so that none
# accepts an envelope another already did (`security_server.replay_ledger`); not part of
# any chain, so rows older than the replay window are simply deleted
replay_guard = sa.Table(
    "replay_guard",
    metadata,
    sa.Column("message_id", sa.String(256), primary_key=True),
    sa.Column("first_seen", sa.Text, nullable=False),
    sa.Column("chain", sa.String(64), nullable=False),
    sa.Index("ix_replay_guard_first_seen", "first_seen"),
)

# the longest a probe of the log waits (for SQLite's write lock, for a PostgreSQL answer):
# past it the log counts as unwritable. Much shorter than the 5 s a write waits for the lock
# (the driver's default busy timeout), since the probe runs in the writer's thread and
# writes queue behind it: a lock held by another connection is noticed within
# `watch_writable`'s interval plus this, and delays no write by more than this.
PROBE_TIMEOUT_SECONDS = 1.0

# whether a PostgreSQL session can write: a server answers SELECT 1 just as well when it is
# a standby (after a failover) or its transactions are read-only by default
_POSTGRESQL_WRITABLE = (
    "SELECT current_setting('transaction_read_only') = 'off' AND NOT pg_is_in_recovery()"
)

# what a record asks to be kept beside it: {sha256 hex: (kind, bytes)}
Evidence = Mapping[str, tuple[str, bytes]]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def row_to_record(row: Any) -> ChainedRecord:
    m = row._mapping
    return ChainedRecord(
        chain=str(m["chain"]),
        seq=int(m["seq"]),
        prev_hash=bytes(m["prev_hash"]),
        hash=bytes(m["hash"]),
        fields={
            name: (bytes(m[name]) if isinstance(m[name], bytes | memoryview) else m[name])
            for name in RECORD_FIELDS
        },
    )


CHAIN_PATTERN = re.compile(CHAIN_NAME)


def check_chain_name(chain: str) -> str:
    """A chain's name: it names archive files, so letters, digits, '.', '_' and '-' only."""
    if not CHAIN_PATTERN.fullmatch(chain):
        raise ValueError(
            f"log.chain {chain!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return chain


class ChainInUseError(RuntimeError):
    """Another process writes this chain: two writers would fork it."""


async def migrate(engine: AsyncEngine) -> None:
    """Bring the log's schema to the newest migration (see `security_server.migrations`)."""
    from security_server.migrations import upgrade

    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: upgrade(sync))


Release = Callable[[], Awaitable[None]]


async def hold_exclusive(engine: AsyncEngine, key: str, lock_suffix: str) -> Release | None:
    """Take a lock no other process can hold at once, without waiting; return how to release
    it, or None when another process holds it. PostgreSQL: a session advisory lock on a
    connection of its own. SQLite: an exclusive lock on the file `DATABASE + lock_suffix`
    (an in-memory database is this process's alone)."""
    if engine.dialect.name == "postgresql":
        conn = await engine.connect()
        params = {"key": key}
        try:
            got = (
                await conn.execute(
                    sa.text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), params
                )
            ).scalar()
            await conn.commit()
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return None

        async def release_lock() -> None:
            try:
                await conn.execute(
                    sa.text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), params
                )
                await conn.commit()
            finally:
                await conn.close()

        return release_lock
    database = engine.url.database
    if not database or database == ":memory:":

        async def nothing() -> None:
            return None

        return nothing
    fd = os.open(database + lock_suffix, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None

    async def release_file() -> None:
        os.close(fd)

    return release_file


async def _claim_chain(engine: AsyncEngine, chain: str) -> Release:
    """Make sure no other process writes `chain`, for as long as the claim is held."""
    release = await hold_exclusive(engine, f"gateway-message-log:{chain}", f".{chain}.lock")
    if release is None:
        raise ChainInUseError(
            f"another process is writing chain {chain!r} of this message log; give every "
            "replica its own log.chain (two writers would fork the chain)"
        )
    return release


async def chain_head(engine: AsyncEngine, chain: str) -> ChainHead:
    """Where `chain` ends: its newest record, or the end of its newest archive."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(message_log.c.seq, message_log.c.hash)
                .where(message_log.c.chain == chain)
                .order_by(message_log.c.seq.desc())
                .limit(1)
            )
        ).first()
        archived = (
            await conn.execute(
                sa.select(log_archives.c.last_seq, log_archives.c.last_hash)
                .where(log_archives.c.chain == chain)
                .order_by(log_archives.c.number.desc())
                .limit(1)
            )
        ).first()
    candidates = [(int(r[0]), bytes(r[1])) for r in (row, archived) if r is not None]
    if not candidates:
        return ChainHead()
    seq, last = max(candidates)
    return ChainHead(next_seq=seq + 1, last_hash=last)


async def chain_names(engine: AsyncEngine) -> list[str]:
    """Every chain the log holds, in records or in archives."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.union(
                sa.select(message_log.c.chain).distinct(),
                sa.select(log_archives.c.chain).distinct(),
                sa.select(timestamp_batches.c.chain).distinct(),
            )
        )
        return sorted(str(r[0]) for r in rows)


class MessageLog:
    def __init__(
        self,
        engine: AsyncEngine,
        head: ChainHead,
        max_batch: int,
        chain: str,
        audit_queue: int = 256,
    ) -> None:
        self.engine = engine
        self.head = head
        self.max_batch = max_batch
        self.chain = chain
        self._pending: list[tuple[Mapping[str, FieldValue], Evidence, asyncio.Future[int]]] = []
        # audit records waiting (lower priority, bounded: see `append_audit`)
        self._audit: list[tuple[Mapping[str, FieldValue], Evidence, asyncio.Future[int]]] = []
        self.audit_queue = audit_queue
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        # releases the claim this process holds on the chain (see `_claim_chain`)
        self._claim: Release | None = None
        # the insert, compiled once for this database's dialect: the hot path skips
        # SQLAlchemy's per-execution compilation and parameter processing
        compiled = message_log.insert().compile(dialect=engine.dialect)
        self._insert_sql = str(compiled)
        order = compiled.positiontup
        if order is not None:
            self._insert_params: Any = lambda rows: [tuple(row[k] for k in order) for row in rows]
        else:
            self._insert_params = lambda rows: rows
        dialect = engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            insert: Any = sqlite_insert if dialect == "sqlite" else postgresql_insert
            keep = insert(log_evidence).on_conflict_do_nothing()
        else:  # pragma: no cover - the two databases we support
            raise ValueError(f"the message log supports SQLite and PostgreSQL, not {dialect}")
        keep_compiled = keep.compile(dialect=engine.dialect)
        self._evidence_sql = str(keep_compiled)
        keep_order = keep_compiled.positiontup
        self._evidence_params: Any = (
            (lambda rows: [tuple(row[k] for k in keep_order) for row in rows])
            if keep_order is not None
            else (lambda rows: rows)
        )
        # evidence already written (certificates and OCSP responses; bodies are not remembered)
        self._known_evidence: set[str] = set()
        # (seq, hash) of records written and not yet handed to the timestamper
        self.unstamped: list[tuple[int, bytes]] = []
        # set by the timestamper: without one, nothing is queued for it
        self.stamping = False
        self.wrote = asyncio.Event()
        # SQLite: one dedicated writer thread runs each batch's transaction in a single
        # hand-off (half the commit latency of the async engine's several hand-offs);
        # other databases: the async engine
        self._sync_engine: sa.Engine | None = None
        self._sync_conn: sa.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        if engine.dialect.name == "sqlite":
            self._sync_engine = sa.create_engine(
                engine.url.set(drivername="sqlite"), poolclass=sa.pool.NullPool
            )
            event.listen(self._sync_engine, "connect", _sqlite_pragmas)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="message-log-writer")
        self.batches_written = 0
        self.records_written = 0
        # why the last write or probe failed (readiness names it); None while writable
        self.unwritable: str | None = None
        # told the size and duration of each commit (metrics)
        self.on_commit: Callable[[int, float], None] | None = None
        # (seq, hash) of the last record known durable: what a checkpoint may vouch for
        self.durable: tuple[int, bytes] = (head.next_seq - 1, head.last_hash)

    @classmethod
    async def open(
        cls, url: str, *, chain: str = "main", max_batch: int = 512, audit_queue: int = 256
    ) -> MessageLog:
        """Open the log, migrate its schema, claim `chain` for this process and find its head.

        `ChainInUseError` when another process already writes that chain."""
        check_chain_name(chain)
        engine = create_async_engine(url)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await migrate(engine)
            claim = await _claim_chain(engine, chain)
            head = await chain_head(engine, chain)
        except BaseException:
            await engine.dispose()
            raise
        self = cls(engine, head, max_batch, chain, audit_queue)
        self._claim = claim
        self._writer = asyncio.create_task(self._write_loop(), name="message-log-writer")
        return self

    async def close(self) -> None:
        if self._writer is not None:
            # the writer drains what is queued, then stops
            self._closing = True
            self._wake.set()
            await self._writer
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)
            self._executor.shutdown()
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        if self._claim is not None:
            await self._claim()
            self._claim = None
        await self.engine.dispose()

    @property
    def queued(self) -> int:
        """Records waiting to be written: the exchanges' and the audit records."""
        return len(self._pending) + len(self._audit)

    async def append(
        self, fields: Mapping[str, FieldValue], evidence: Evidence | None = None
    ) -> int:
        """Append one record, and the evidence it names; return its sequence number once durable."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((fields, evidence or {}, future))
        self._wake.set()
        return await future

    async def append_audit(self, fields: Mapping[str, FieldValue]) -> int:
        """Append a record of the auditor API or of counted refusals, with lower priority
        than the data path; `UnavailableError(LOG_UNAVAILABLE)` at once when
        `audit_queue` such records already wait."""
        if len(self._audit) >= self.audit_queue:
            raise UnavailableError(
                "the message log is busy with exchanges; this record waits for none",
                code=Code.LOG_UNAVAILABLE,
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._audit.append((fields, {}, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._audit:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                room = min(self.max_batch - len(batch), AUDIT_PER_BATCH)
                if room > 0 and self._audit:
                    batch += self._audit[:room]
                    del self._audit[:room]
                await self._write_batch(batch)
            if self._closing:
                return

    async def _insert(self, params: Any, evidence: Any) -> None:
        if self._executor is None:
            async with self.engine.begin() as conn:
                if evidence:
                    await conn.exec_driver_sql(self._evidence_sql, evidence)
                await conn.exec_driver_sql(self._insert_sql, params)
        else:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._insert_sync, params, evidence
            )

    def _insert_sync(self, params: Any, evidence: Any) -> None:
        """In the writer thread: one transaction on a connection kept open for it."""
        assert self._sync_engine is not None
        if self._sync_conn is None:
            self._sync_conn = self._sync_engine.connect()
        try:
            with self._sync_conn.begin():
                if evidence:
                    self._sync_conn.exec_driver_sql(self._evidence_sql, evidence)
                self._sync_conn.exec_driver_sql(self._insert_sql, params)
        except Exception:
            self._sync_conn.close()
            self._sync_conn = None
            raise

    async def probe(self) -> bool:
        """Open a write transaction that writes nothing, to learn whether the log can be
        written now (a locked or read-only SQLite file, a PostgreSQL server gone or not
        answering), waiting at most PROBE_TIMEOUT_SECONDS; the answer is kept in
        `unwritable` for readiness. True when writable."""
        try:
            if self._executor is None:
                async with asyncio.timeout(PROBE_TIMEOUT_SECONDS), self.engine.begin() as conn:
                    writable = (await conn.exec_driver_sql(_POSTGRESQL_WRITABLE)).scalar()
                if not writable:
                    self.unwritable = (
                        "the database takes no writes: a read-only transaction or a standby"
                    )
                    return False
            else:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._probe_sync)
        except TimeoutError:
            self.unwritable = f"no answer within {PROBE_TIMEOUT_SECONDS:g} s"
            return False
        except Exception as exc:  # what a write would meet
            self.unwritable = failure_reason(exc)
            return False
        self.unwritable = None
        return True

    def _probe_sync(self) -> None:
        """In the writer thread: take SQLite's write lock (as a write would), then let go;
        waiting for it no longer than PROBE_TIMEOUT_SECONDS (see there)."""
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(PROBE_TIMEOUT_SECONDS * 1000)}")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql("ROLLBACK")

    async def watch_writable(self, interval: float = 2.0) -> None:
        """Probe every `interval` seconds, until cancelled, so that readiness follows the
        log even while no call is written (and turns ready again once it can be)."""
        while True:
            await asyncio.sleep(interval)
            await self.probe()

    async def save_stamp(self, row: Mapping[str, Any]) -> None:
        """Store one batch's time-stamp (through the writer's own connection on SQLite)."""
        if self._executor is None:
            async with self.engine.begin() as conn:
                await conn.execute(timestamp_batches.insert(), [{**row, "chain": self.chain}])
            return

        def write() -> None:
            assert self._sync_engine is not None
            if self._sync_conn is None:
                self._sync_conn = self._sync_engine.connect()
            with self._sync_conn.begin():
                self._sync_conn.execute(timestamp_batches.insert(), [{**row, "chain": self.chain}])

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, write)
        except Exception:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)
            raise

    async def last_stamped_seq(self) -> int:
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(
                    sa.select(sa.func.max(timestamp_batches.c.last_seq)).where(
                        timestamp_batches.c.chain == self.chain
                    )
                )
            ).scalar()
        return int(value or 0)

    async def load_unstamped(self) -> None:
        """Queue for the timestamper every record after the last stamped batch.

        Call it at start-up, before any record is appended: records written meanwhile would
        be queued twice."""
        if self._pending or self.unstamped:
            raise RuntimeError("load_unstamped must run before any record is appended")
        after = await self.last_stamped_seq()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(message_log.c.seq, message_log.c.hash)
                .where(message_log.c.chain == self.chain, message_log.c.seq > after)
                .order_by(message_log.c.seq)
            )
            self.unstamped[:0] = [(int(r.seq), bytes(r.hash)) for r in rows]
        if self.unstamped:
            self.wrote.set()

    def _close_sync(self) -> None:
        if self._sync_conn is not None:
            self._sync_conn.close()
            self._sync_conn = None

    async def _write_batch(
        self, batch: list[tuple[Mapping[str, FieldValue], Evidence, asyncio.Future[int]]]
    ) -> None:
        saved = ChainHead(self.head.next_seq, self.head.last_hash)
        records = [self.head.link(fields) for fields, _, _ in batch]
        rows = [
            {
                "chain": self.chain,
                "seq": r.seq,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
                **r.fields,
            }
            for r in records
        ]
        extra: dict[str, tuple[str, bytes]] = {}
        for _, evidence, _ in batch:
            for sha, item in evidence.items():
                if sha not in self._known_evidence:
                    extra[sha] = item
        evidence_rows = [
            {"sha256": sha, "kind": kind, "data": data} for sha, (kind, data) in extra.items()
        ]
        started = time.perf_counter()
        try:
            await self._insert(
                self._insert_params(rows),
                self._evidence_params(evidence_rows) if evidence_rows else None,
            )
        except Exception as exc:  # any failure: refuse these calls, keep the writer alive
            self.head = saved
            self.unwritable = failure_reason(exc)
            log.error(
                "message_log_write_failed",
                # the driver's error alone: SQLAlchemy's text carries the statement's
                # parameters, i.e. the records' headers, signatures and subject pseudonyms
                error=self.unwritable,
                kind=type(exc).__name__,
                database_error=isinstance(exc, SQLAlchemyError | OSError),
                records=len(batch),
            )
            error = UnavailableError(
                "the message log cannot be written; the call was not forwarded",
                code=Code.LOG_UNAVAILABLE,
            )
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self.batches_written += 1
        self.records_written += len(batch)
        self.unwritable = None
        if self.on_commit is not None:
            self.on_commit(len(batch), time.perf_counter() - started)
        self.durable = (records[-1].seq, records[-1].hash)
        if len(self._known_evidence) > 100_000:
            self._known_evidence.clear()
        self._known_evidence.update(sha for sha, (kind, _) in extra.items() if kind != "body")
        if self.stamping:
            self.unstamped.extend((r.seq, r.hash) for r in records)
            self.wrote.set()
        for record, (_, _, future) in zip(records, batch, strict=True):
            if not future.done():
                future.set_result(record.seq)

    async def recent_message_ids(self, since: datetime, role: str) -> set[str]:
        """Message ids of requests accepted in this role since a moment (for replay checks)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(message_log.c.message_id).where(
                    message_log.c.role == role,
                    message_log.c.kind == "request",
                    message_log.c.logged_at >= format_time(since),
                )
            )
            return {r.message_id for r in rows}

    async def exchanges_under(self, message_id: str, role: str) -> set[tuple[str, str]]:
        """The (client, service) of the requests this log holds under `message_id` in `role`
        (its index on message_id); `UnavailableError(LOG_UNAVAILABLE)` when it cannot be
        read."""
        try:
            async with self.engine.connect() as conn:
                found = await conn.execute(
                    sa.select(message_log.c.client, message_log.c.service)
                    .where(
                        message_log.c.message_id == message_id,
                        message_log.c.role == role,
                        message_log.c.kind == "request",
                    )
                    .distinct()
                )
                return {(str(r.client), str(r.service)) for r in found}
        except sa.exc.SQLAlchemyError as exc:
            raise UnavailableError(
                f"the message log cannot be read ({failure_reason(exc)}); retry later",
                code=Code.LOG_UNAVAILABLE,
            ) from None

    async def records(self, *, message_id: str | None = None) -> list[ChainedRecord]:
        """Records of every chain (this process's and other replicas'), oldest first."""
        query = sa.select(message_log).order_by(
            message_log.c.logged_at, message_log.c.chain, message_log.c.seq
        )
        if message_id is not None:
            query = query.where(message_log.c.message_id == message_id)
        async with self.engine.connect() as conn:
            return [row_to_record(r) for r in await conn.execute(query)]


async def iterate_records(
    engine: AsyncEngine, chain: str, *, after: int = 0, batch: int = 5000
) -> AsyncIterator[ChainedRecord]:
    """Every record of one chain after `after`, in sequence order, read in batches (for
    verification of large logs)."""
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(message_log)
                    .where(message_log.c.chain == chain, message_log.c.seq > after)
                    .order_by(message_log.c.seq)
                    .limit(batch)
                )
            ).all()
        if not rows:
            return
        for row in rows:
            yield row_to_record(row)
        after = int(rows[-1].seq)
