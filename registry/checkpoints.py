"""The checkpoints security servers send of their message logs' chain heads.

Why the registry: it is the one party outside an agency's own database that every
security server already reaches (it fetches its configuration there), it keeps an
append-only admin log of its own, and auditors already trust it and hold its tokens. A
server's operator, who can rewrite the server's database and holds its keys, cannot
reach back into the registry's.

`CheckpointBook.receive` accepts a checkpoint only when it is signed by the registered
authentication certificate of an approved server of this instance, and only when it moves
that chain forward: a sequence number going back, or another hash for a sequence already
checkpointed, is refused and logged loudly (the log was cut or rewritten, or a chain was
restarted under the same name). Accepted checkpoints are stored with the registry's
receipt time in a table whose triggers refuse UPDATE and DELETE.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
import structlog
from cryptography import x509

from gateway.checkpoint import Checkpoint, SignedCheckpoint, verify_checkpoint
from gateway.errors import GatewayError
from gateway.identifiers import MemberId
from gateway.timeutil import format_time
from registry.store import (
    RegistryStore,
    ServerStatus,
    checkpoints,
    next_auth_certificates,
    servers,
)

log = structlog.get_logger("registry.checkpoints")


class CheckpointRefused(Exception):
    """A checkpoint the registry will not keep; `kind` is "unknown_server",
    "bad_signature" or "conflict" (the chain went back or changed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# a server's checkpoints refused for their signature: one warning per this many seconds
BAD_SIGNATURE_LOG_SECONDS = 60.0


class CheckpointBook:
    def __init__(self, store: RegistryStore, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.clock = clock
        self._lock = asyncio.Lock()
        self.conflicts = 0
        # bad signatures per approved server: logged at most once a BAD_SIGNATURE_LOG_SECONDS
        # each, with how many came since (the service answers anyone: a forger would
        # otherwise write a log line per checkpoint) - server -> (last logged, not logged)
        self._bad: dict[str, tuple[float, int]] = {}

    def _bad_signature(self, server: str) -> None:
        now = time.monotonic()
        logged, since = self._bad.get(server, (-math.inf, 0))
        if now - logged < BAD_SIGNATURE_LOG_SECONDS:
            self._bad[server] = (logged, since + 1)
            return
        log.warning("checkpoint_bad_signature", server=server, more_since_last=since)
        self._bad[server] = (now, 0)

    async def _registered(self, server: str) -> list[x509.Certificate]:
        """The server's approved authentication certificates (several during a renewal)."""
        async with self.store.read() as conn:
            der = (
                await conn.execute(
                    sa.select(servers.c.auth_certificate).where(
                        servers.c.id == server, servers.c.status == ServerStatus.APPROVED
                    )
                )
            ).scalar()
            if der is None:
                raise CheckpointRefused(
                    "unknown_server",
                    f"{server} is not an approved security server of this instance",
                )
            renewals = (
                await conn.execute(
                    sa.select(next_auth_certificates.c.certificate).where(
                        next_auth_certificates.c.server == server,
                        next_auth_certificates.c.state == ServerStatus.APPROVED,
                    )
                )
            ).scalars()
            return [x509.load_der_x509_certificate(bytes(d)) for d in (der, *renewals)]

    async def receive(self, signed: SignedCheckpoint) -> datetime:
        """Verify and store one checkpoint; its receipt time, or `CheckpointRefused`."""
        try:
            claimed = Checkpoint.parse(signed.content)
        except ValueError as exc:
            raise CheckpointRefused("bad_signature", str(exc)) from None
        checkpoint = None
        for certificate in await self._registered(str(claimed.server)):
            try:
                checkpoint = verify_checkpoint(signed, certificate)
                break
            except GatewayError:
                pass
        if checkpoint is None:
            self._bad_signature(str(claimed.server))
            raise CheckpointRefused(
                "bad_signature",
                f"the checkpoint is not signed by the registered authentication certificate "
                f"of {claimed.server}",
            ) from None
        server, chain = str(checkpoint.server), checkpoint.chain
        # one registry process serialises here; several over PostgreSQL take a transaction
        # lock on the (server, chain) pair
        async with self._lock, self.store.engine.begin() as conn:
            if self.store.is_postgres:
                await conn.execute(
                    sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"{server} {chain}")))
                )
            last = (
                await conn.execute(
                    sa.select(checkpoints.c.seq, checkpoints.c.head)
                    .where(checkpoints.c.server == server, checkpoints.c.chain == chain)
                    .order_by(checkpoints.c.seq.desc(), checkpoints.c.id.desc())
                    .limit(1)
                )
            ).first()
            if last is not None:
                seq, head = int(last.seq), bytes(last.head)
                if checkpoint.seq < seq or (checkpoint.seq == seq and checkpoint.head != head):
                    self.conflicts += 1
                    why = (
                        f"its chain {chain} goes back from record {seq} to {checkpoint.seq}"
                        if checkpoint.seq < seq
                        else f"record {seq} of its chain {chain} now has another hash"
                    )
                    log.error(
                        "checkpoint_conflict",
                        server=server,
                        chain=chain,
                        checkpointed_seq=seq,
                        offered_seq=checkpoint.seq,
                        checkpointed_head=head.hex(),
                        offered_head=checkpoint.head.hex(),
                        alert="the server's message log was cut or rewritten, or its chain "
                        "restarted under the same name",
                    )
                    raise CheckpointRefused(
                        "conflict",
                        f"refused: {why}; the registry keeps the checkpoints it already has",
                    )
            received_at = self.clock()
            await conn.execute(
                checkpoints.insert().values(
                    server=server,
                    member=str(checkpoint.server.owner),
                    chain=chain,
                    seq=checkpoint.seq,
                    head=checkpoint.head,
                    server_time=format_time(checkpoint.at),
                    received_at=format_time(received_at),
                    content=signed.content,
                    signature=signed.signature,
                )
            )
        return received_at

    async def list(
        self, *, member: MemberId | None, server: str | None, after: int, limit: int
    ) -> dict[str, Any]:
        """A page of checkpoints in the order received (only `member`'s servers' when given)."""
        query = sa.select(checkpoints).where(checkpoints.c.id > after).order_by(checkpoints.c.id)
        if member is not None:
            query = query.where(checkpoints.c.member == str(member))
        if server is not None:
            query = query.where(checkpoints.c.server == server)
        async with self.store.read() as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "checkpoints": [
                {
                    "id": int(r.id),
                    "server": r.server,
                    "chain": r.chain,
                    "seq": int(r.seq),
                    "head": bytes(r.head).hex(),
                    "time": r.server_time,
                    "received_at": r.received_at,
                    "content": base64.b64encode(bytes(r.content)).decode(),
                    "signature": base64.b64encode(bytes(r.signature)).decode(),
                }
                for r in rows
            ],
            "next": int(rows[-1].id) if more and rows else None,
        }
