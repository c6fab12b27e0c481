"""Auditor tools over a security server's message log (`gateway audit verify`)."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.audit import ChainedRecord, ChainHead, verify_chain
from security_server.message_log import iterate_records, message_log, row_to_record


async def verify_log(url: str, progress: Callable[[int, int], None] | None = None) -> ChainHead:
    """Verify the whole chain of a log; raise `ChainBrokenError` naming the first bad record."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            total = int(
                (await conn.execute(sa.select(sa.func.count()).select_from(message_log))).scalar()
                or 0
            )
        head = ChainHead()
        batch = []
        done = 0
        async for record in iterate_records(engine):
            batch.append(record)
            if len(batch) >= 5000:
                head = verify_chain(batch, head)
                done += len(batch)
                batch = []
                if progress:
                    progress(done, total)
        head = verify_chain(batch, head)
        if progress:
            progress(done + len(batch), total)
        return head
    finally:
        await engine.dispose()


async def read_records(url: str, message_id: str) -> list[ChainedRecord]:
    """The records of one message, in log order (read-only)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(message_log)
                .where(message_log.c.message_id == message_id)
                .order_by(message_log.c.seq)
            )
            return [row_to_record(r) for r in rows]
    finally:
        await engine.dispose()
