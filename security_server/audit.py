"""Auditor tools over a security server's message log (`gateway audit verify`).

Verification walks the hash chain, then every time-stamped batch: the Merkle root of the
batch's record hashes must be the stamped one, the RFC 3161 token must verify over it, and
no batch may cover records the chain no longer has (so deleting the newest records, which
the chain alone cannot show, is detected once they were stamped).

Only the trust anchors the caller gives (`cas`: the instance's CAs, from its anchor or
`--ca`) are trusted, never a certificate found in the log or its archives: whoever can
rewrite the log can also store a CA of their own there. Without anchors, tokens are not
checked at all and the report says so (`VerifyReport.anchored`). A token must also be
close in time to its records (`StampTimes`): not before the earliest minus the clock
skew, not after the latest plus a grace, so that a rewrite stamped later by the real TSA
(which stamps any digest) shows. Last, the log is compared with the signed checkpoints of
its chain heads that the registry received (`gateway.checkpoint`): a cut tail or a
rewrite before the last checkpoint is named with its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway import archive as archive_format
from gateway import merkle, tsp
from gateway.audit import ChainBrokenError, ChainedRecord, ChainHead, verify_chain
from gateway.checkpoint import Received, compare_with_checkpoints, wanted_seqs
from gateway.errors import GatewayError
from gateway.timeutil import format_time, parse_time
from security_server.message_log import (
    chain_names,
    iterate_records,
    log_archives,
    message_log,
    row_to_record,
    timestamp_batches,
)


@dataclass(slots=True)
class VerifyReport:
    """What `verify_log` found: per chain, its head and how many records were stamped."""

    heads: dict[str, ChainHead] = field(default_factory=dict)
    stamped: dict[str, int] = field(default_factory=dict)
    archived: dict[str, int] = field(default_factory=dict)
    # whether tokens were verified against trust anchors the caller gave
    anchored: bool = False
    # checkpoints the log was compared with and matched (None: none were given)
    checkpoints: int | None = None
    # the newest checkpoint per chain, for the report
    last_checkpoint: dict[str, Received] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(h.next_seq - 1 for h in self.heads.values())

    @property
    def stamped_total(self) -> int:
        return sum(self.stamped.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class StampTimes:
    """How far a batch's token time (genTime) may lie from its records' times."""

    # a token may not be older than its earliest record by more than this (clock skew)
    skew: timedelta
    # nor younger than its latest record by more than this (stamping interval, TSA
    # outages up to the failure period, and skew)
    grace: timedelta

    def check(self, chain: str, first: int, gen_time: datetime, times: list[datetime]) -> None:
        """Raise `ChainBrokenError` when `gen_time` is too far from the records' `times`."""
        if not times:
            return
        earliest, latest = min(times), max(times)
        if gen_time < earliest - self.skew:
            raise ChainBrokenError(
                first,
                None,
                f"batch stamped at {format_time(gen_time)}, before its earliest record "
                f"({format_time(earliest)}) by more than the clock skew {self.skew}: the "
                "records were written after the stamp (a rewrite)",
                chain=chain,
            )
        if gen_time > latest + self.grace:
            raise ChainBrokenError(
                first,
                None,
                f"batch stamped at {format_time(gen_time)}, later than its latest record "
                f"({format_time(latest)}) by more than the grace {self.grace}: the records "
                "were stamped long after they were logged (a rewrite stamped afterwards, "
                "or a TSA outage longer than the grace; see --token-grace)",
                chain=chain,
            )


@dataclass(slots=True)
class _Checks:
    """What every batch and record is checked against during one verification."""

    cas: list[x509.Certificate] | None
    times: StampTimes | None
    # per chain, the checkpointed sequence numbers whose hashes are collected
    wanted: dict[str, set[int]] = field(default_factory=dict)
    hashes: dict[tuple[str, int], bytes] = field(default_factory=dict)

    @property
    def timed(self) -> bool:
        """Whether token times are compared with their records' times."""
        return self.cas is not None and self.times is not None

    def collect(self, chain: str, records: list[ChainedRecord]) -> None:
        seqs = self.wanted.get(chain)
        if seqs:
            for r in records:
                if r.seq in seqs:
                    self.hashes[(chain, r.seq)] = r.hash


async def verify_log(
    url: str | None,
    progress: Callable[[int, int], None] | None = None,
    cas: list[x509.Certificate] | None = None,
    stale_after: timedelta | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    archive_dir: Path | None = None,
    *,
    stamp_times: StampTimes | None = None,
    checkpoints: list[Received] | None = None,
) -> VerifyReport:
    """Verify every chain of a log, its archives and its time-stamps.

    Raise `ChainBrokenError` naming the first bad record, batch or archive file. Each
    chain's archives (registered in `log_archives`, files in `archive_dir`) are checked
    first, in order, then the records still in the database continue from the last one.
    With `url` None, the archive files of `archive_dir` are verified alone (offline).

    Tokens are checked against `cas` only (never against certificates kept in the log or
    its archives); with `cas` None they are not checked, only the Merkle roots and ranges
    of the batches are, and `report.anchored` stays False. With `stamp_times`, each token's
    time must be close to its records' times. With `stale_after`, records left unstamped
    for longer than that fail verification too (the newest batch's token, deleted with its
    records' stamps, would otherwise pass unnoticed). With `checkpoints`, the verified log
    must agree with each of them (`gateway.checkpoint.compare_with_checkpoints`)."""
    report = VerifyReport(anchored=cas is not None)
    checks = _Checks(cas, stamp_times, wanted_seqs(checkpoints or ()))
    if url is None:
        if archive_dir is None:
            raise ValueError("give a database, an archive folder, or both")
        found = _archive_files(archive_dir)
        total = 0
        counter = _Progress(progress, total)
        for chain in sorted(found):
            listed = [
                _Listed(number, found[chain][number].name, None) for number in sorted(found[chain])
            ]
            head, stamped, unstamped = _verify_archives(chain, archive_dir, listed, checks, counter)
            if stale_after is not None and unstamped is not None:
                _refuse_stale(chain, unstamped[0], unstamped[1], head, stamped, stale_after, now)
            report.heads[chain] = head
            report.stamped[chain] = stamped
            report.archived[chain] = head.next_seq - 1
        _compare(report, checks, checkpoints)
        return report
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            total = int(
                (await conn.execute(sa.select(sa.func.count()).select_from(message_log))).scalar()
                or 0
            )
            archived_total = int(
                (
                    await conn.execute(
                        sa.select(sa.func.coalesce(sa.func.max(log_archives.c.last_seq), 0))
                    )
                ).scalar()
                or 0
            )
        counter = _Progress(progress, total + archived_total)
        for chain in await chain_names(engine):
            for attempt in range(5):
                listed = await _listed_archives(engine, chain)
                try:
                    head, stamped, archived = await _verify_one_chain(
                        engine, chain, listed, archive_dir, checks, counter, stale_after, now
                    )
                    break
                except ChainBrokenError:
                    # the server may have archived (and pruned) this chain meanwhile: then
                    # verify it again as it now stands; otherwise the break is real
                    if attempt == 4 or await _listed_archives(engine, chain) == listed:
                        raise
            report.heads[chain] = head
            report.stamped[chain] = stamped
            report.archived[chain] = archived
        _compare(report, checks, checkpoints)
        return report
    finally:
        await engine.dispose()


def _compare(report: VerifyReport, checks: _Checks, checkpoints: list[Received] | None) -> None:
    """Compare the verified chains with the checkpoints, if any were given."""
    if checkpoints is None:
        return
    ends = {chain: head.next_seq - 1 for chain, head in report.heads.items()}
    report.checkpoints = compare_with_checkpoints(checkpoints, checks.hashes, ends)
    for r in checkpoints:
        last = report.last_checkpoint.get(r.checkpoint.chain)
        if last is None or r.checkpoint.seq >= last.checkpoint.seq:
            report.last_checkpoint[r.checkpoint.chain] = r


async def _verify_one_chain(
    engine: AsyncEngine,
    chain: str,
    listed: list[_Listed],
    archive_dir: Path | None,
    checks: _Checks,
    counter: _Progress,
    stale_after: timedelta | None,
    now: Callable[[], datetime],
) -> tuple[ChainHead, int, int]:
    """Verify one chain, archives then database; (head, records stamped, records archived)."""
    if listed and archive_dir is None:
        raise ChainBrokenError(
            1,
            None,
            f"is in archive files ({len(listed)} registered); give the archive folder "
            "(--archive-dir) to verify them",
            chain=chain,
        )
    head, stamped, unstamped = (
        _verify_archives(chain, archive_dir, listed, checks, counter)
        if listed and archive_dir is not None
        else (ChainHead(), 0, None)
    )
    after = head.next_seq - 1
    if archive_dir is not None:
        await _check_no_unregistered_archive(engine, chain, archive_dir, len(listed) + 1)
    batch: list[ChainedRecord] = []
    async for record in iterate_records(engine, chain, after=after):
        if not batch and record.seq != head.next_seq and after:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"is missing: the archives end at record {after} and the database "
                f"continues at {record.seq}",
                chain=chain,
            )
        batch.append(record)
        if len(batch) >= 5000:
            head = verify_chain(batch, head)
            checks.collect(chain, batch)
            counter.add(len(batch))
            batch = []
    head = verify_chain(batch, head)
    checks.collect(chain, batch)
    counter.add(len(batch))
    in_database = await _verify_stamps(engine, chain, head, after, checks)
    stamped += in_database
    if stale_after is not None and stamped < head.next_seq - 1:
        # the oldest record no time-stamp covers: in an archive, or else the first after
        # the database's stamped batches (which follow the archives one after another)
        oldest: object
        if unstamped is not None:
            first, oldest = unstamped
        else:
            first = after + in_database + 1
            async with engine.connect() as conn:
                oldest = (
                    await conn.execute(
                        sa.select(message_log.c.logged_at).where(
                            message_log.c.chain == chain, message_log.c.seq == first
                        )
                    )
                ).scalar()
        if oldest is not None:
            _refuse_stale(chain, first, str(oldest), head, stamped, stale_after, now)
    return head, stamped, after


def _refuse_stale(
    chain: str,
    first: int,
    logged_at: str,
    head: ChainHead,
    stamped: int,
    stale_after: timedelta,
    now: Callable[[], datetime],
) -> None:
    """Fail when `first`, the oldest record no time-stamp covers, is older than the grace."""
    if parse_time(logged_at) < now() - stale_after:
        raise ChainBrokenError(
            first,
            None,
            f"and the {head.next_seq - 2 - stamped} other record(s) no time-stamp covers "
            f"are not time-stamped although logged at {logged_at}, more than {stale_after} "
            "ago: a time-stamp was deleted, or the server's TSAs have been failing since",
            chain=chain,
        )


async def _check_no_unregistered_archive(
    engine: AsyncEngine, chain: str, folder: Path, number: int
) -> None:
    """The archive file after the last registered one may only be a crash's leftover, whose
    records are still in the database; otherwise its registration was deleted."""
    path = folder / archive_format.file_name(chain, number)
    try:
        found = archive_format.decode(path.read_bytes(), where=str(path))
    except (FileNotFoundError, archive_format.ArchiveError):
        return  # none, or an unreadable partial file that the next archiving replaces
    if found.chain != chain or not found.records:
        return
    async with engine.connect() as conn:
        kept = (
            await conn.execute(
                sa.select(message_log.c.hash).where(
                    message_log.c.chain == chain, message_log.c.seq == found.first_seq
                )
            )
        ).scalar()
    if kept is not None and bytes(kept) == found.records[0].hash:
        return  # a leftover: its records were never pruned
    raise ChainBrokenError(
        found.first_seq,
        None,
        f"is missing: archive {number} of chain {chain} ({path.name}) holds records "
        f"{found.first_seq}..{found.last_seq}, which the database no longer has, yet it is "
        "not registered: its registration was deleted",
        chain=chain,
    )


class _Progress:
    def __init__(self, report: Callable[[int, int], None] | None, total: int) -> None:
        self.report = report
        self.total = total
        self.done = 0

    def add(self, count: int) -> None:
        self.done += count
        if self.report:
            self.report(self.done, max(self.total, self.done))


@dataclass(frozen=True, slots=True)
class _Listed:
    """An archive a chain should have: its number, file name and (from the database) digest."""

    number: int
    file_name: str
    sha256: str | None
    first_seq: int | None = None
    last_seq: int | None = None


async def _listed_archives(engine: AsyncEngine, chain: str) -> list[_Listed]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(log_archives)
            .where(log_archives.c.chain == chain)
            .order_by(log_archives.c.number)
        )
        return [
            _Listed(
                int(r.number), str(r.file_name), str(r.sha256), int(r.first_seq), int(r.last_seq)
            )
            for r in rows
        ]


def _archive_files(folder: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        parsed = archive_format.parse_file_name(path.name)
        if parsed is not None:
            found.setdefault(parsed[0], {})[parsed[1]] = path
    return found


def _verify_archives(
    chain: str,
    folder: Path | None,
    listed: list[_Listed],
    checks: _Checks,
    counter: _Progress,
) -> tuple[ChainHead, int, tuple[int, str] | None]:
    """Verify a chain's archive files in order; return the head after the last, the
    number of records their time-stamps cover, and (seq, logged_at) of the first archived
    record no time-stamp covers (None when every one is covered).

    Archiving moves whole time-stamped batches, never a record not stamped yet once a
    chain is stamped at all: so an archive with batches is covered by them exactly, one
    after another, and none without batches follows one with them (only a chain kept
    without a TSA at first has archives without any)."""
    assert folder is not None
    head = ChainHead()
    prev_sha = archive_format.NO_ARCHIVE
    stamped = 0
    unstamped: tuple[int, str] | None = None
    was_stamped = False
    digests = {item.sha256: item.number for item in listed if item.sha256}
    for expected, item in enumerate(listed, start=1):
        name = item.file_name
        where = f"archive {item.number} of chain {chain} ({name})"
        if item.number != expected:
            offline = item.sha256 is None
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"is missing: archive {expected} of chain {chain} is "
                + (
                    f"not in {folder} (the next file is {item.file_name})"
                    if offline
                    else f"not registered (the next registered is {item.number})"
                ),
                chain=chain,
            )
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"is missing: {where} is missing from {folder}",
                chain=chain,
            ) from None
        digest = archive_format.sha256_hex(data)
        if item.sha256 is not None and digest != item.sha256:
            other = digests.get(digest)
            why = (
                f"{where} holds archive {other}: the archive files were reordered"
                if other is not None
                else f"{where} was edited: its SHA-256 is not the one registered when it was written"
            )
            raise ChainBrokenError(head.next_seq, None, why, chain=chain)
        try:
            parsed = archive_format.decode(data, where=where)
        except archive_format.ArchiveError as err:
            raise ChainBrokenError(head.next_seq, None, err.message, chain=chain) from None
        if parsed.chain != chain or parsed.number != item.number:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"{where} holds archive {parsed.number} of chain {parsed.chain}: the archive "
                "files were reordered or renamed",
                chain=chain,
            )
        if parsed.prev_sha256 != prev_sha:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"{where} does not link to the archive before it (edited, reordered or "
                "an archive is missing)",
                chain=chain,
            )
        if parsed.records and parsed.records[0].seq > head.next_seq:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"is missing: {where} starts at record {parsed.records[0].seq}",
                chain=chain,
            )
        try:
            head = verify_chain(parsed.records, head)
        except ChainBrokenError as err:
            raise ChainBrokenError(
                err.seq,
                err.message_id,
                f"in {where}: {err.message.split(': ', 1)[-1]}",
                chain=chain,
            ) from None
        if head.next_seq - 1 != parsed.last_seq:
            raise ChainBrokenError(
                head.next_seq,
                None,
                f"{where}: its header says it ends at {parsed.last_seq}",
                chain=chain,
            )
        counter.add(len(parsed.records))
        checks.collect(chain, list(parsed.records))
        # the CAs kept in the archive's evidence are never trusted: only `checks.cas`
        by_seq = {r.seq: r for r in parsed.records}
        if parsed.records and not parsed.batches:
            if was_stamped:
                raise ChainBrokenError(
                    parsed.records[0].seq,
                    None,
                    f"{where} holds records no time-stamp covers, after archives that are "
                    "stamped: its batches were removed",
                    chain=chain,
                )
            if unstamped is None:
                first = parsed.records[0]
                unstamped = (first.seq, str(first.fields["logged_at"]))
        next_first = parsed.records[0].seq if parsed.records else head.next_seq
        for batch in parsed.batches:
            if batch.first_seq != next_first or batch.last_seq > parsed.last_seq:
                raise ChainBrokenError(
                    batch.first_seq,
                    None,
                    f"{where}: its time-stamped batches must cover its records "
                    f"{next_first}..{parsed.last_seq} one after another, and batch "
                    f"{batch.first_seq}..{batch.last_seq} does not follow on",
                    chain=chain,
                )
            next_first = batch.last_seq + 1
            covered = [by_seq[s] for s in range(batch.first_seq, batch.last_seq + 1) if s in by_seq]
            _check_batch(
                chain,
                batch.first_seq,
                batch.last_seq,
                [r.hash for r in covered],
                batch.root,
                batch.token,
                checks,
                [parse_time(str(r.fields["logged_at"])) for r in covered] if checks.timed else [],
            )
            stamped += len(covered)
        if parsed.batches:
            if next_first != parsed.last_seq + 1:
                raise ChainBrokenError(
                    next_first,
                    None,
                    f"{where}: its time-stamped batches end at {next_first - 1}, before its "
                    f"last record {parsed.last_seq}: a batch was removed",
                    chain=chain,
                )
            was_stamped = True
        prev_sha = digest
    return head, stamped, unstamped


def _check_batch(
    chain: str,
    first: int,
    end: int,
    leaves: list[bytes],
    root: bytes,
    token: bytes,
    checks: _Checks,
    times: list[datetime],
) -> None:
    if len(leaves) != end - first + 1 or merkle.root(leaves) != root:
        raise ChainBrokenError(
            first,
            None,
            f"batch {first}..{end}: its records' Merkle root is not the stamped one",
            chain=chain,
        )
    if checks.cas is None:
        return  # no trust anchor: the token cannot be judged (the report says so)
    try:
        info = tsp.verify_token(token, digest=root, cas=checks.cas)
    except GatewayError as err:
        raise ChainBrokenError(
            first, None, f"batch {first}..{end}: {err.message}", chain=chain
        ) from None
    if checks.times is not None:
        checks.times.check(chain, first, info.gen_time, times)


async def read_records(url: str, message_id: str) -> list[ChainedRecord]:
    """The records of one message, in log order (read-only)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(message_log)
                .where(message_log.c.message_id == message_id)
                .order_by(message_log.c.logged_at, message_log.c.chain, message_log.c.seq)
            )
            return [row_to_record(r) for r in rows]
    finally:
        await engine.dispose()


async def _verify_stamps(
    engine: AsyncEngine,
    chain: str,
    head: ChainHead,
    after: int,
    checks: _Checks,
) -> int:
    """Check every time-stamped batch of a chain still in the database against the (already
    verified) chain; `after` is the last archived record."""
    async with engine.connect() as conn:
        batches = (
            await conn.execute(
                sa.select(timestamp_batches)
                .where(timestamp_batches.c.chain == chain)
                .order_by(timestamp_batches.c.first_seq)
            )
        ).all()
        stamped = 0
        last = after
        for batch in batches:
            first, end = int(batch.first_seq), int(batch.last_seq)
            if first != last + 1:
                raise ChainBrokenError(
                    first,
                    None,
                    f"time-stamped batches are not contiguous (previous ended at {last})",
                    chain=chain,
                )
            if end >= head.next_seq:
                raise ChainBrokenError(
                    head.next_seq,
                    None,
                    f"is missing: the batch time-stamped at {batch.gen_time} covers records "
                    f"up to {end}, so records {head.next_seq}..{end} were deleted",
                    chain=chain,
                )
            rows = (
                await conn.execute(
                    sa.select(message_log.c.hash, message_log.c.logged_at)
                    .where(message_log.c.chain == chain, message_log.c.seq.between(first, end))
                    .order_by(message_log.c.seq)
                )
            ).all()
            leaves = [bytes(r.hash) for r in rows]
            _check_batch(
                chain,
                first,
                end,
                leaves,
                bytes(batch.root),
                bytes(batch.token),
                checks,
                [parse_time(str(r.logged_at)) for r in rows] if checks.timed else [],
            )
            stamped += len(leaves)
            last = end
        return stamped
