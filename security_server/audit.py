"""Auditor tools over a security server's message log (`gateway audit verify`).

Verification walks the hash chain, then every time-stamped batch: the Merkle root of the
batch's record hashes must be the stamped one, the RFC 3161 token must verify over it, and
no batch may cover records the chain no longer has (so deleting the newest records, which
the chain alone cannot show, is detected once they were stamped).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway import merkle, tsp
from gateway.audit import ChainBrokenError, ChainedRecord, ChainHead, verify_chain
from gateway.errors import GatewayError
from gateway.timeutil import parse_time
from security_server.message_log import (
    iterate_records,
    log_evidence,
    message_log,
    row_to_record,
    timestamp_batches,
)


async def verify_log(
    url: str,
    progress: Callable[[int, int], None] | None = None,
    cas: list[x509.Certificate] | None = None,
    stale_after: timedelta | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[ChainHead, int]:
    """Verify the whole chain of a log and its time-stamps; return the head and the number of
    records stamped. Raise `ChainBrokenError` naming the first bad record or batch.

    Tokens are checked against `cas`, or else against the CA certificates the server kept
    in the log's evidence. With `stale_after`, records left unstamped for longer than that
    fail verification too (the newest batch's token, deleted with its records' stamps,
    would otherwise pass unnoticed)."""
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
        stamped = await _verify_stamps(engine, head, cas)
        if stale_after is not None and stamped < head.next_seq - 1:
            async with engine.connect() as conn:
                oldest = (
                    await conn.execute(
                        sa.select(message_log.c.logged_at).where(message_log.c.seq == stamped + 1)
                    )
                ).scalar()
            if oldest is not None and parse_time(str(oldest)) < now() - stale_after:
                raise ChainBrokenError(
                    stamped + 1,
                    None,
                    f"and the {head.next_seq - 1 - stamped} record(s) after it are not time-stamped "
                    f"although logged at {oldest}, more than {stale_after} ago: a time-stamp was "
                    "deleted, or the server's TSAs have been failing since",
                )
        return head, stamped
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


async def _verify_stamps(
    engine: AsyncEngine, head: ChainHead, cas: list[x509.Certificate] | None
) -> int:
    """Check every time-stamped batch against the (already verified) chain."""
    async with engine.connect() as conn:
        if cas is None:
            rows = await conn.execute(
                sa.select(log_evidence.c.data).where(log_evidence.c.kind == "ca")
            )
            cas = [x509.load_der_x509_certificate(bytes(r.data)) for r in rows]
        batches = (
            await conn.execute(sa.select(timestamp_batches).order_by(timestamp_batches.c.first_seq))
        ).all()
        stamped = 0
        last = 0
        for batch in batches:
            first, end = int(batch.first_seq), int(batch.last_seq)
            if first != last + 1:
                raise ChainBrokenError(
                    first,
                    None,
                    f"time-stamped batches are not contiguous (previous ended at {last})",
                )
            if end >= head.next_seq:
                raise ChainBrokenError(
                    head.next_seq,
                    None,
                    f"is missing: the batch time-stamped at {batch.gen_time} covers records "
                    f"up to {end}, so records {head.next_seq}..{end} were deleted",
                )
            leaves = [
                bytes(r.hash)
                for r in await conn.execute(
                    sa.select(message_log.c.hash)
                    .where(message_log.c.seq.between(first, end))
                    .order_by(message_log.c.seq)
                )
            ]
            if merkle.root(leaves) != bytes(batch.root):
                raise ChainBrokenError(
                    first,
                    None,
                    f"batch {first}..{end}: its records' Merkle root is not the stamped one",
                )
            try:
                tsp.verify_token(bytes(batch.token), digest=bytes(batch.root), cas=cas)
            except GatewayError as err:
                raise ChainBrokenError(
                    first, None, f"batch {first}..{end}: {err.message}"
                ) from None
            stamped += len(leaves)
            last = end
        return stamped
