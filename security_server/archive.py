"""Retention: move a chain's oldest records into archive files, then prune the database.

`archive_old_records` takes the records of one chain logged before a cut-off, never
splitting a time-stamped batch and never taking records not yet stamped (when the chain
is stamped at all), writes them with their batches and evidence into the chain's next
archive file (see `gateway.archive`), and only then, in one transaction, registers the
file in `log_archives` and deletes the archived rows (the database's triggers refuse to
delete any record that no registered archive holds). A crash between the two steps leaves
an unregistered file, which the next run overwrites; the records stay in the database.

Each security server archives its own chain every `log.archive_interval_seconds` when
`log.retention_days` is set (`Archiver`); `gateway audit archive` does the same on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway import archive as fmt
from gateway.timeutil import format_time
from security_server.background import every
from security_server.message_log import (
    hold_exclusive,
    log_archives,
    log_evidence,
    message_log,
    row_to_record,
    timestamp_batches,
)
from security_server.private_files import open_private

log = structlog.get_logger("security_server.archive")


@dataclass(frozen=True, slots=True)
class Archived:
    number: int
    first_seq: int
    last_seq: int
    path: Path


class ArchivingBusyError(RuntimeError):
    """Another process is archiving this chain right now."""


async def archive_old_records(
    engine: AsyncEngine,
    chain: str,
    folder: Path,
    *,
    before: datetime,
    now: datetime,
    max_records: int = 100_000,
    progress: Callable[[int], None] | None = None,
) -> list[Archived]:
    """Archive every record of `chain` logged before `before`, in files of at most
    `max_records` (more when one time-stamped batch is larger); return the files written,
    oldest first. `ArchivingBusyError` when another process archives the chain."""
    done: list[Archived] = []
    async with _archiving(engine, chain):
        while True:
            written = await _archive_one(engine, chain, folder, before, now, max_records)
            if written is None:
                return done
            done.append(written)
            if progress:
                progress(written.last_seq - written.first_seq + 1)


@contextlib.asynccontextmanager
async def _archiving(engine: AsyncEngine, chain: str) -> AsyncIterator[None]:
    """One archiver per chain at a time: two would write the same file."""
    release = await hold_exclusive(
        engine, f"gateway-message-log-archive:{chain}", f".{chain}.archive.lock"
    )
    if release is None:
        raise ArchivingBusyError(f"another process is archiving chain {chain!r} right now")
    try:
        yield
    finally:
        await release()


async def _last_archive(conn: AsyncConnection, chain: str) -> tuple[int, int, str]:
    """(number, last archived seq, file SHA-256) of the chain's newest archive."""
    row = (
        await conn.execute(
            sa.select(log_archives.c.number, log_archives.c.last_seq, log_archives.c.sha256)
            .where(log_archives.c.chain == chain)
            .order_by(log_archives.c.number.desc())
            .limit(1)
        )
    ).first()
    return (0, 0, fmt.NO_ARCHIVE) if row is None else (int(row[0]), int(row[1]), str(row[2]))


async def _upper_bound(
    conn: AsyncConnection, chain: str, after: int, before: datetime, max_records: int
) -> int | None:
    """The last seq to archive next: old enough, within `max_records`, whole batches only."""
    rows = (
        await conn.execute(
            sa.select(message_log.c.seq, message_log.c.logged_at)
            .where(message_log.c.chain == chain, message_log.c.seq > after)
            .order_by(message_log.c.seq)
            .limit(max_records)
        )
    ).all()
    cutoff = format_time(before)
    last = None
    for row in rows:
        if str(row.logged_at) >= cutoff:
            break
        last = int(row.seq)
    if last is None:
        return None
    batches = [
        (int(b[0]), int(b[1]))
        for b in await conn.execute(
            sa.select(timestamp_batches.c.first_seq, timestamp_batches.c.last_seq)
            .where(timestamp_batches.c.chain == chain, timestamp_batches.c.last_seq > after)
            .order_by(timestamp_batches.c.first_seq)
        )
    ]
    if not batches and not await _was_stamped(conn, chain):
        return last  # a chain never time-stamped: by time alone
    # a stamped chain: whole batches only, and nothing not stamped yet
    fits = [end for _, end in batches if end <= last]
    if fits:
        return max(fits)
    if batches and last == after + max_records:
        # the next batch alone is larger than an archive file may be: take it whole once
        # its newest record is old enough, rather than never archiving again
        end = batches[0][1]
        newest = (
            await conn.execute(
                sa.select(message_log.c.logged_at).where(
                    message_log.c.chain == chain, message_log.c.seq == end
                )
            )
        ).scalar()
        if newest is not None and str(newest) < cutoff:
            return end
    return None


async def _was_stamped(conn: AsyncConnection, chain: str) -> bool:
    """Whether an archive of this chain holds time-stamps (its batches left the database)."""
    stamped = (
        await conn.execute(
            sa.select(sa.func.max(log_archives.c.stamped_last_seq)).where(
                log_archives.c.chain == chain
            )
        )
    ).scalar()
    return bool(stamped)


async def _archive_one(
    engine: AsyncEngine,
    chain: str,
    folder: Path,
    before: datetime,
    now: datetime,
    max_records: int,
) -> Archived | None:
    async with engine.connect() as conn:
        number, after, prev_sha = await _last_archive(conn, chain)
        last = await _upper_bound(conn, chain, after, before, max_records)
        if last is None:
            return None
        records = [
            row_to_record(r)
            for r in await conn.execute(
                sa.select(message_log)
                .where(message_log.c.chain == chain, message_log.c.seq.between(after + 1, last))
                .order_by(message_log.c.seq)
            )
        ]
        batches = [
            fmt.Batch(
                first_seq=int(b.first_seq),
                last_seq=int(b.last_seq),
                root=bytes(b.root),
                token=bytes(b.token),
                tsa=str(b.tsa),
                gen_time=str(b.gen_time),
            )
            for b in await conn.execute(
                sa.select(timestamp_batches)
                .where(
                    timestamp_batches.c.chain == chain,
                    timestamp_batches.c.first_seq > after,
                    timestamp_batches.c.last_seq <= last,
                )
                .order_by(timestamp_batches.c.first_seq)
            )
        ]
        wanted = {sha for r in records for sha in fmt.evidence_names(r.fields)}
        evidence: dict[str, tuple[str, bytes]] = {}
        named = sorted(wanted)
        for i in range(0, len(named), 500):
            for e in await conn.execute(
                sa.select(log_evidence).where(log_evidence.c.sha256.in_(named[i : i + 500]))
            ):
                evidence[str(e.sha256)] = (str(e.kind), bytes(e.data))
        for e in await conn.execute(sa.select(log_evidence).where(log_evidence.c.kind == "ca")):
            evidence[str(e.sha256)] = (str(e.kind), bytes(e.data))
    item = fmt.Archive(
        chain=chain,
        number=number + 1,
        first_seq=after + 1,
        last_seq=last,
        prev_sha256=prev_sha,
        created_at=format_time(now),
        records=records,
        batches=batches,
        evidence=evidence,
    )
    if records[0].seq != after + 1 or records[-1].seq != last or len(records) != last - after:
        raise RuntimeError(f"chain {chain}: records {after + 1}..{last} are not all present")
    path = folder / fmt.file_name(chain, item.number)
    # encoding and writing a large file would stall the server's event loop
    data = await asyncio.to_thread(_encode_and_write, item, path)
    stamped_last = max((b.last_seq for b in batches), default=0)
    bodies = [sha for sha, (kind, _) in evidence.items() if kind == "body"]
    async with engine.begin() as conn:
        await conn.execute(
            log_archives.insert(),
            [
                {
                    "chain": chain,
                    "number": item.number,
                    "first_seq": item.first_seq,
                    "last_seq": item.last_seq,
                    "last_hash": records[-1].hash,
                    "file_name": path.name,
                    "sha256": fmt.sha256_hex(data),
                    "prev_sha256": prev_sha,
                    "stamped_last_seq": stamped_last,
                    "created_at": item.created_at,
                }
            ],
        )
        await conn.execute(
            timestamp_batches.delete().where(
                timestamp_batches.c.chain == chain, timestamp_batches.c.last_seq <= last
            )
        )
        await conn.execute(
            message_log.delete().where(message_log.c.chain == chain, message_log.c.seq <= last)
        )
        if bodies:
            # bodies no record left in the database names (retention is for personal data)
            still = {
                str(r[0])
                for r in await conn.execute(
                    sa.select(message_log.c.body_sha256)
                    .where(message_log.c.body_sha256.in_(bodies))
                    .distinct()
                )
            }
            gone = [sha for sha in bodies if sha not in still]
            if gone:
                await conn.execute(
                    log_evidence.delete().where(
                        log_evidence.c.sha256.in_(gone), log_evidence.c.kind == "body"
                    )
                )
    log.info(
        "records_archived",
        chain=chain,
        archive=path.name,
        first_seq=item.first_seq,
        last_seq=item.last_seq,
    )
    return Archived(item.number, item.first_seq, item.last_seq, path)


def _encode_and_write(item: fmt.Archive, path: Path) -> bytes:
    _check_not_someone_elses(item, path)
    data = fmt.encode(item)
    _write_durably(path, data)
    return data


def _check_not_someone_elses(item: fmt.Archive, path: Path) -> None:
    """A file already at this name may only be our own leftover: an archive of the same
    records, written before a crash kept it from being registered (its records are still
    in the database, being archived now), or an unreadable partial file. Anything else
    (another log's archive in a shared folder, a registered archive) is never replaced."""
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        return
    try:
        found = fmt.decode(existing, where=str(path))
    except fmt.ArchiveError:
        log.warning("unreadable_leftover_archive_replaced", path=str(path))
        return
    same = (found.chain, found.number, found.first_seq) == (item.chain, item.number, item.first_seq)
    if same and found.records and found.records[0].hash == item.records[0].hash:
        log.warning("unregistered_leftover_archive_replaced", path=str(path))
        return
    raise RuntimeError(
        f"{path} already holds records {found.first_seq}..{found.last_seq} of chain "
        f"{found.chain}, which this log did not register: another log writes archives to "
        "this folder? Give each server its own log.archive_dir"
    )


def _write_durably(path: Path, data: bytes) -> None:
    """Write a file so that it is whole on disk, or absent, after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open_private(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # temporary files a crash left for this name (archiving a chain is serialised)
    for stale in path.parent.glob(f"{path.name}*.tmp"):
        stale.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archiver:
    """The server's retention task: archive its own chain's old records periodically."""

    def __init__(
        self,
        engine: AsyncEngine,
        chain: str,
        folder: Path,
        *,
        retention: timedelta,
        interval: float,
        max_records: int,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.chain = chain
        self.folder = folder
        self.retention = retention
        self.interval = interval
        self.max_records = max_records
        self.clock = clock

    async def run(self) -> None:
        """Archive now and every `interval` seconds until cancelled (a round that fails is
        logged; the next one retries)."""
        await every(self.interval, self.archive_once, name="archiving", first_at_once=True)

    async def archive_once(self) -> None:
        now = self.clock()
        try:
            await archive_old_records(
                self.engine,
                self.chain,
                self.folder,
                before=now - self.retention,
                now=now,
                max_records=self.max_records,
            )
        except ArchivingBusyError as exc:
            log.info("archiving_skipped", chain=self.chain, reason=str(exc))
