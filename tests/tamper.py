"""The attacker's side of the message log: edit it as someone with database access would.

The log's tables are append-only by the database's own rules (triggers, see
`security_server/migrations`). An attacker who owns the database can switch them off
first; these helpers do exactly that, so that tests show what `audit verify` catches once
the database's own protection is gone.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

TABLES = ("message_log", "timestamp_batches", "log_archives", "log_evidence")


def drop_sqlite_rules(conn: sqlite3.Connection) -> None:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    for name in names:
        conn.execute(f'DROP TRIGGER "{name}"')


def tamper_sqlite(db: Path, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    """Run statements on a SQLite log after dropping its append-only triggers."""
    conn = sqlite3.connect(db)
    try:
        drop_sqlite_rules(conn)
        for statement in statements:
            if isinstance(statement, tuple):
                conn.execute(*statement)
            else:
                conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


async def tamper(url: str, *statements: str) -> None:
    """Run statements on a log (SQLite or PostgreSQL URL) with its append-only rules off."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                for table in TABLES:
                    await conn.execute(sa.text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            else:
                rows = await conn.execute(
                    sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
                )
                for name in [r[0] for r in rows]:
                    await conn.execute(sa.text(f'DROP TRIGGER "{name}"'))
            for statement in statements:
                await conn.execute(sa.text(statement))
            if engine.dialect.name == "postgresql":
                for table in TABLES:
                    await conn.execute(sa.text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
    finally:
        await engine.dispose()


async def reset_postgres_log(url: str) -> None:
    """Remove a message log from a PostgreSQL database: tables, rules and migration version."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for table in (*TABLES, "message_log_version"):
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table} CASCADE"))
            for function in (
                "message_log_refuse",
                "message_log_delete_archived",
                "timestamp_batches_delete_archived",
                "log_evidence_delete_bodies",
            ):
                await conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {function}() CASCADE"))
    finally:
        await engine.dispose()
