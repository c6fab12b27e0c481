"""Remove a message log from a PostgreSQL database (benchmarks and tests start from empty)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

TABLES = ("message_log", "timestamp_batches", "log_archives", "log_evidence", "replay_guard")
FUNCTIONS = (
    "message_log_refuse",
    "message_log_delete_archived",
    "timestamp_batches_delete_archived",
    "log_evidence_delete_bodies",
)


async def reset_message_log(url: str) -> None:
    """Drop the log's tables, append-only rules and migration version from a database."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for table in (*TABLES, "message_log_version"):
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table} CASCADE"))
            for function in FUNCTIONS:
                await conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {function}() CASCADE"))
    finally:
        await engine.dispose()
