"""Search the message log for auditors: filters, keyset pagination, per-result verification.

Results come oldest first, ordered by (logged_at, chain, seq); a page ends with a cursor
naming its last result, and the next page starts strictly after it (keyset pagination:
as fast on page 1000 as on page 1, and stable while newer records are appended; a record
committed after the cursor passed it with an earlier time, which a replica's clock skew
could cause, is not shown by that walk). Indexes serve
the selective filters: message id, data subject (pseudonym) and time.

Every result says whether its record verifies on its own: its hash matches its fields,
it links to the record before it in its chain, and the signature in its header verifies
with the signing certificate it names. The whole-log checks (time-stamps, deletions at
the end of a chain, archives) stay with `gateway audit verify`.

Records that an archive file holds are no longer in the database, so searches cover the
retention period only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.audit import GENESIS, ChainedRecord, RecordKind, record_hash
from gateway.errors import GatewayError
from gateway.signing import verify_signature
from gateway.timeutil import format_time, parse_time
from security_server.message_log import (
    CHAIN_PATTERN,
    log_archives,
    log_evidence,
    message_log,
    row_to_record,
    timestamp_batches,
)

# what `kind` may be; audit-query records are shown only when asked for
KINDS = tuple(k.value for k in RecordKind)
EXCHANGE_KINDS = (
    RecordKind.REQUEST.value,
    RecordKind.RESPONSE.value,
    RecordKind.STREAM_CLOSE.value,
    RecordKind.REFUSAL.value,
)


class CursorError(ValueError):
    """A pagination cursor that this server did not issue."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    message_id: str | None = None
    client: str | None = None
    service: str | None = None
    purpose: str | None = None
    status: str | None = None
    kind: str | None = None
    role: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # the data subject's pseudonym (the API derives it from the identifier it is given)
    subject_ref: str | None = None
    # results of which member: records whose client or service belongs to it (None: all)
    member: str | None = None
    after: tuple[str, str, int] | None = None
    limit: int = 50


def encode_cursor(logged_at: str, chain: str, seq: int) -> str:
    raw = json.dumps([logged_at, chain, seq], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str, str, int]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        logged_at, chain, seq = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise CursorError("the cursor 'after' is not one this API returned") from None
    if not (
        isinstance(logged_at, str)
        and len(logged_at) <= 40
        and isinstance(chain, str)
        and CHAIN_PATTERN.fullmatch(chain)
        and type(seq) is int
        and 0 <= seq < 2**63
    ):
        raise CursorError("the cursor 'after' is not one this API returned")
    try:
        # the log's own time form only: JSON may carry lone surrogates and NULs, which
        # no database binds alike
        parse_time(logged_at)
    except ValueError:
        raise CursorError("the cursor 'after' is not one this API returned") from None
    return logged_at, chain, seq


def _where(q: Query) -> list[Any]:
    c = message_log.c
    conditions: list[Any] = []
    for column, value in (
        (c.message_id, q.message_id),
        (c.client, q.client),
        (c.service, q.service),
        (c.purpose, q.purpose),
        (c.status, q.status),
        (c.role, q.role),
        (c.subject_ref, q.subject_ref),
    ):
        if value is not None:
            conditions.append(column == value)
    if q.kind is not None:
        conditions.append(c.kind == q.kind)
    else:
        conditions.append(c.kind.in_(EXCHANGE_KINDS))
    if q.since is not None:
        conditions.append(c.logged_at >= format_time(q.since))
    if q.until is not None:
        conditions.append(c.logged_at < format_time(q.until))
    if q.member is not None:
        prefix = q.member + "/"
        conditions.append(
            sa.or_(
                sa.func.substr(c.client, 1, len(prefix)) == prefix,
                sa.func.substr(c.service, 1, len(prefix)) == prefix,
            )
        )
        # a member's auditor does not see other auditors' queries
        conditions.append(c.kind != RecordKind.AUDIT_QUERY.value)
    if q.after is not None:
        conditions.append(
            sa.tuple_(c.logged_at, c.chain, c.seq) > sa.tuple_(*(sa.literal(v) for v in q.after))
        )
    return conditions


# auditor searches (and evidence exports) at once on one log; the others wait. A search
# that matches nothing in a large log reads all of it: many at once held every connection
# of the log's pool (5, then 10 more) and stalled the data path's writer, which shares it
# (found by a red-team review: 60 searches of one token held a write for 28 s)
SEARCHES_AT_ONCE = 2
# longest one statement of a search may run on PostgreSQL
SEARCH_STATEMENT_SECONDS = 15


class SearchTooLongError(Exception):
    """A search's statement ran past SEARCH_STATEMENT_SECONDS (PostgreSQL) and was stopped."""


class Searcher:
    """Runs auditor searches over one log (every chain), with a cache of signing certificates."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._certificates: dict[str, x509.Certificate | None] = {}
        self._slots = asyncio.Semaphore(SEARCHES_AT_ONCE)
        self.running = 0  # searches holding a connection now (for tests and metrics)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one search or export: one of SEARCHES_AT_ONCE, its statements
        bounded in time on PostgreSQL (`SearchTooLongError` past it)."""
        async with self._slots, self.engine.connect() as conn:
            self.running += 1
            try:
                if conn.dialect.name == "postgresql":
                    milliseconds = int(SEARCH_STATEMENT_SECONDS * 1000)
                    await conn.execute(sa.text(f"SET LOCAL statement_timeout = {milliseconds}"))
                yield conn
            except sa.exc.DBAPIError as exc:
                if "statement timeout" in str(exc.orig):
                    raise SearchTooLongError(
                        f"the search ran for more than {SEARCH_STATEMENT_SECONDS} s and was "
                        "stopped: narrow it (since and until, a message id or a subject)"
                    ) from None
                raise
            finally:
                self.running -= 1

    async def search(self, q: Query) -> tuple[list[dict[str, Any]], str | None]:
        """One page of results, as JSON-ready dicts, and the cursor of the next page (or None)."""
        c = message_log.c
        statement = (
            sa.select(message_log)
            .where(*_where(q))
            .order_by(c.logged_at, c.chain, c.seq)
            .limit(q.limit + 1)
        )
        async with self.connection() as conn:
            rows = (await conn.execute(statement)).all()
            more = len(rows) > q.limit
            records = [row_to_record(r) for r in rows[: q.limit]]
            previous = await self._previous_hashes(conn, records)
            stamps = await self._stamps(conn, records)
            await self._load_certificates(conn, records)
        results = [
            self._result(r, previous.get((r.chain, r.seq - 1)), stamps.get((r.chain, r.seq)))
            for r in records
        ]
        last = records[-1] if records and more else None
        cursor = (
            None
            if last is None
            else encode_cursor(str(last.fields["logged_at"]), last.chain, last.seq)
        )
        return results, cursor

    async def _previous_hashes(
        self, conn: Any, records: list[ChainedRecord]
    ) -> dict[tuple[str, int], bytes]:
        """The hash of the record before each result, from the database or the archives."""
        wanted = {(r.chain, r.seq - 1) for r in records if r.seq > 1}
        found: dict[tuple[str, int], bytes] = {(r.chain, 0): GENESIS for r in records if r.seq == 1}
        if wanted:
            by_chain: dict[str, list[int]] = {}
            for chain, seq in wanted:
                by_chain.setdefault(chain, []).append(seq)
            for chain, seqs in by_chain.items():
                # chain = ? AND seq IN (...): the primary key's index (a row-value IN list is
                # not served by it on SQLite)
                rows = await conn.execute(
                    sa.select(message_log.c.seq, message_log.c.hash).where(
                        message_log.c.chain == chain, message_log.c.seq.in_(sorted(seqs))
                    )
                )
                for row in rows:
                    found[(chain, int(row.seq))] = bytes(row.hash)
            missing = [p for p in wanted if p not in found]
            for chain, seq in missing:
                row = (
                    await conn.execute(
                        sa.select(log_archives.c.last_hash).where(
                            log_archives.c.chain == chain, log_archives.c.last_seq == seq
                        )
                    )
                ).first()
                if row is not None:
                    found[(chain, seq)] = bytes(row.last_hash)
        return found

    async def _stamps(
        self, conn: Any, records: list[ChainedRecord]
    ) -> dict[tuple[str, int], dict[str, str]]:
        by_chain: dict[str, list[int]] = {}
        for r in records:
            by_chain.setdefault(r.chain, []).append(r.seq)
        out: dict[tuple[str, int], dict[str, str]] = {}
        for chain, seqs in by_chain.items():
            rows = await conn.execute(
                sa.select(
                    timestamp_batches.c.first_seq,
                    timestamp_batches.c.last_seq,
                    timestamp_batches.c.gen_time,
                    timestamp_batches.c.tsa,
                ).where(
                    timestamp_batches.c.chain == chain,
                    timestamp_batches.c.last_seq >= min(seqs),
                    timestamp_batches.c.first_seq <= max(seqs),
                )
            )
            batches = [(int(b[0]), int(b[1]), str(b[2]), str(b[3])) for b in rows]
            for seq in seqs:
                for first, last, gen_time, tsa in batches:
                    if first <= seq <= last:
                        out[(chain, seq)] = {"gen_time": gen_time, "tsa": tsa}
        return out

    async def _load_certificates(self, conn: Any, records: list[ChainedRecord]) -> None:
        wanted = {
            sha
            for r in records
            if isinstance(sha := r.fields.get("signer_certificate_sha256"), str)
            and sha not in self._certificates
        }
        if not wanted:
            return
        if len(self._certificates) > 10_000:
            self._certificates.clear()
        rows = await conn.execute(
            sa.select(log_evidence.c.sha256, log_evidence.c.data).where(
                log_evidence.c.sha256.in_(sorted(wanted))
            )
        )
        for row in rows:
            try:
                self._certificates[str(row.sha256)] = x509.load_der_x509_certificate(
                    bytes(row.data)
                )
            except ValueError:
                self._certificates[str(row.sha256)] = None
        for sha in wanted:
            self._certificates.setdefault(sha, None)

    def _result(
        self,
        r: ChainedRecord,
        previous: bytes | None,
        stamp: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        problems: list[str] = []
        if record_hash(r.seq, r.prev_hash, r.fields) != r.hash:
            problems.append("its content does not match its hash (altered)")
        if previous is None:
            problems.append(f"record {r.seq - 1} of its chain, which it links to, is missing")
        elif previous != r.prev_hash:
            problems.append("it does not link to the record before it")
        header, signature = r.fields.get("header"), r.fields.get("signature")
        signer = r.fields.get("signer_certificate_sha256")
        if isinstance(header, bytes) and isinstance(signature, bytes):
            certificate = self._certificates.get(signer) if isinstance(signer, str) else None
            if certificate is None:
                problems.append("the signing certificate it names is not in the log")
                signed = "unknown"
            else:
                try:
                    verify_signature(certificate, header, signature)
                    signed = "valid"
                except GatewayError:
                    problems.append("the signature over its header does not verify")
                    signed = "invalid"
        else:
            signed = "none"
        return {
            "chain": r.chain,
            "seq": r.seq,
            **{
                name: (base64.b64encode(v).decode() if isinstance(v, bytes) else v)
                for name, v in r.fields.items()
            },
            "hash": r.hash.hex(),
            "prev_hash": r.prev_hash.hex(),
            "signature_status": signed,
            "timestamp": dict(stamp) if stamp else None,
            "verified": not problems,
            "problems": problems,
        }
