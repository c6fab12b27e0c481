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

from gateway_demo.pg import TABLES, reset_message_log

__all__ = ["TABLES", "reset_postgres_log", "tamper", "tamper_sqlite"]


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


# a log removed from PostgreSQL: tables, rules and migration version
reset_postgres_log = reset_message_log
