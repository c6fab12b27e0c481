"""Replay protection shared by the replicas of one server: the `replay_guard` table.

Each replica remembers the message ids it accepted (`gateway.replay.ReplayGuard`), but an
envelope accepted by one replica could be replayed to another. On PostgreSQL, the provider
therefore also *claims* every request's message id in the shared log database before
logging or forwarding it: `INSERT ... ON CONFLICT DO NOTHING RETURNING`, where no row
returned means that some replica claimed the id first, and the request is refused with
`replayed_message`. The primary key decides; no lock is taken beyond the index entry of
the id itself, so replicas never wait for each other unless they race for the same id.

Cost on the data path: claims queued while the previous one was on its way go in one
statement (one round trip for many requests, as the log's group commit), on a connection
of the ledger's own with `synchronous_commit = off`. That is safe: a claim matters only
for a request that is then logged, and the request's record is committed synchronously
afterwards; PostgreSQL flushes its write-ahead log in order, so once the record is
durable, so is the claim before it (and an unflushed claim lost in a crash belongs to a
request that was neither logged nor forwarded). Rows older than twice the replay window
are deleted now and then (the table is not part of any chain and has no triggers).

SQLite is not shared by replicas (the README says so): a second process would need the
database's single write lock for every claim, on the data path. There the in-memory
guard, preloaded from the log at start, is the whole check; this ledger is not used.

Database errors are translated here into `UnavailableError(LOG_UNAVAILABLE)`: without the
check, the request is refused (fail closed).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.errors import Code, TrustError, UnavailableError
from gateway.timeutil import format_time
from security_server.background import stop

log = structlog.get_logger("security_server.replay_ledger")

# table and columns are constants of `message_log.replay_guard`, never input; driver SQL
# (asyncpg's $n): it skips SQLAlchemy's compilation on the data path
_CLAIM = (
    "INSERT INTO replay_guard (message_id, first_seen, chain) "
    "SELECT id, $1, $2 FROM unnest($3::text[]) AS id "
    "ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
)
_PRUNE = sa.text("DELETE FROM replay_guard WHERE first_seen < :horizon")
# most ids claimed in one statement
MAX_CLAIMS = 512


def replayed(message_id: str) -> TrustError:
    return TrustError(
        f"message id {message_id} was already used: the message is a replay or its id is "
        "not unique; send each message with a new id",
        code=Code.REPLAYED_MESSAGE,
    )


class ReplayLedger:
    """Claims of message ids in the shared `replay_guard` table (PostgreSQL only)."""

    def __init__(
        self,
        engine: AsyncEngine,
        chain: str,
        window: timedelta,
        *,
        prune_every: timedelta = timedelta(seconds=60),
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("the shared replay ledger needs PostgreSQL")
        self.engine = engine
        self.chain = chain
        # ids are kept as long as the in-memory guard keeps them
        self.keep = 2 * window
        self.prune_every = prune_every
        self._pending: list[tuple[str, datetime, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._conn: AsyncConnection | None = None
        self._pruned_at: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self.statements = 0
        self.claims = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replay-ledger")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None
        self._refuse(self._pending)
        self._pending.clear()
        await self._drop_connection()

    async def claim(self, message_id: str, now: datetime) -> None:
        """Claim `message_id` for this server; `TrustError(REPLAYED_MESSAGE)` when a replica
        (this one or another) already did, `UnavailableError(LOG_UNAVAILABLE)` when the
        database cannot say."""
        if self._task is None:
            raise self._unavailable()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message_id, now, future))
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:MAX_CLAIMS]
                del self._pending[:MAX_CLAIMS]
                try:
                    await self._claim_batch(batch)
                except BaseException:  # cancelled mid-statement (close): never left waiting
                    self._refuse(batch)
                    raise

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self.engine.connect()
            try:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql("SET synchronous_commit = off")
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except Exception:  # already broken: nothing more to release
                log.debug("replay_ledger_close_failed")

    async def _claim_batch(self, batch: list[tuple[str, datetime, asyncio.Future[None]]]) -> None:
        # each id once in the statement; a second claim of it in this batch is a replay
        ids = list(dict.fromkeys(message_id for message_id, _, _ in batch))
        now = max(moment for _, moment, _ in batch)
        try:
            conn = await self._connection()
            rows = await conn.exec_driver_sql(_CLAIM, (format_time(now), self.chain, ids))
            claimed = {str(r[0]) for r in rows}
        except Exception as exc:  # any failure: refuse these calls, keep the task alive
            log.error("replay_ledger_failed", error=str(exc), kind=type(exc).__name__)
            await self._drop_connection()
            self._refuse(batch)
            return
        if self._pruned_at is None or now - self._pruned_at >= self.prune_every:
            self._pruned_at = now
            await self._prune(conn, now)
        self.statements += 1
        self.claims += len(ids)
        for message_id, _, future in batch:
            if future.done():
                continue
            if message_id in claimed:
                claimed.discard(message_id)
                future.set_result(None)
            else:
                future.set_exception(replayed(message_id))

    async def _prune(self, conn: AsyncConnection, now: datetime) -> None:
        """Delete claims older than `keep`. The batch's claims were decided by the insert
        alone, so a failure here refuses none of them (it only leaves old rows a while)."""
        try:
            await conn.execute(_PRUNE, {"horizon": format_time(now - self.keep)})
        except Exception as exc:  # retried at the next prune; the next claim reconnects
            log.error("replay_ledger_prune_failed", error=str(exc), kind=type(exc).__name__)
            await self._drop_connection()

    def _refuse(self, batch: list[tuple[str, datetime, asyncio.Future[None]]]) -> None:
        """Answer every claim of `batch` not answered yet: the database cannot say."""
        for _, _, future in batch:
            if not future.done():
                future.set_exception(self._unavailable())

    @staticmethod
    def _unavailable() -> UnavailableError:
        return UnavailableError(
            "the replay check cannot reach the message log; the call was not forwarded",
            code=Code.LOG_UNAVAILABLE,
        )
