"""The registry's store: tables, row conversions, serialised changes and the admin log.

SQLAlchemy Core over SQLite (the default) or PostgreSQL (by URL); the schema is created
and upgraded by the alembic migrations in `registry/migrations`, never by `create_all`.

Every change runs inside `RegistryStore.change()`, which serialises changes twice over:
an asyncio lock inside one registry process, and on PostgreSQL a row lock on the admin
log's head (`SELECT ... FOR UPDATE`), so that several registry processes over one
database still apply changes one at a time, each reading the state the previous one left.
The same transaction appends the change's entries to the hash-chained admin log, so a
change and its log entry are committed together or not at all.

Publishing takes the same row lock (`RegistryStore.publishing()`): while a version is
built from the database no change can commit, so a version covers exactly the admin log
entries up to the one it names, and versions are numbered one after another whichever
process publishes. The version's transaction sends a PostgreSQL notification on channel
`gateway_configuration` when it commits; the other registry processes listen for it
(`registry.publisher.follow_notifications`). Migrations run under an advisory lock, so
replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.agreements import (
    PUBLISHED_STATES,
    Agreement,
    AgreementState,
    LegalBasis,
    LegalBasisKind,
    RateLimit,
)
from gateway.audit import ADMIN_FIELDS, ADMIN_LOG, ChainedRecord, ChainHead, FieldValue
from gateway.configuration import (
    Anchor,
    Federation,
    Member,
    OutboundApproval,
    SecurityServer,
    Service,
    SignedConfiguration,
)
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time

metadata = sa.MetaData()

members = sa.Table(
    "members",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)
subsystems = sa.Table(
    "subsystems",
    metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False, index=True),
    sa.Column("created_at", sa.String(40), nullable=False),
)
servers = sa.Table(
    "security_servers",
    metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False, index=True),
    sa.Column("address", sa.String(300), nullable=False),
    sa.Column("auth_certificate", sa.LargeBinary, nullable=False),
    sa.Column("subsystems", sa.Text, nullable=False),  # JSON list
    # pending until a registry administrator approves it; only approved servers are published
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("submitted_at", sa.String(40), nullable=False),
)
# authentication certificates a server registers after its first (renewal), pending until
# a registry administrator approves them; the first stays in security_servers
next_auth_certificates = sa.Table(
    "next_auth_certificates",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("server", sa.String(300), sa.ForeignKey("security_servers.id"), nullable=False),
    sa.Column("certificate", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("submitted_at", sa.String(40), nullable=False),
    sa.Index("ix_next_auth_certificates_server", "server"),
)
services = sa.Table(
    "services",
    metadata,
    sa.Column("id", sa.String(400), primary_key=True),
    sa.Column("subsystem", sa.String(300), nullable=False, index=True),
    sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False, index=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("methods", sa.Text, nullable=False),  # JSON list
    # JSON object {method path: "server" | "client" | "bidi"}: the streaming methods
    sa.Column("streams", sa.Text, nullable=False, server_default="{}"),
    sa.Column("interface", sa.Text, nullable=False),  # .proto source, may be empty
    sa.Column("data_categories", sa.Text, nullable=False),  # JSON list
    sa.Column("legal_basis", sa.Text, nullable=False),
    sa.Column("contact", sa.String(500), nullable=False),
)
agreements = sa.Table(
    "agreements",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("client", sa.String(300), nullable=False, index=True),
    sa.Column("client_member", sa.String(200), nullable=False, index=True),
    sa.Column("service", sa.String(400), nullable=False, index=True),
    sa.Column("provider_member", sa.String(200), nullable=False, index=True),
    sa.Column("purposes", sa.Text, nullable=False),  # JSON list
    sa.Column("legal_basis_kind", sa.String(20)),
    sa.Column("legal_basis_reference", sa.Text),
    sa.Column("data_categories", sa.Text, nullable=False),  # JSON list
    sa.Column("valid_from", sa.String(40), nullable=False),
    sa.Column("valid_until", sa.String(40)),
    sa.Column("rate_limit_requests", sa.Integer),
    sa.Column("rate_limit_per_seconds", sa.Integer),
    sa.Column("state", sa.String(30), nullable=False, index=True),
    # increases with every change: a guard against lost updates on top of the lock
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)
admin_log = sa.Table(
    "admin_log",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    *(sa.Column(name, sa.Text) for name in ADMIN_FIELDS),
    # the members an entry concerns, space-separated, for scoped listing (not hashed)
    sa.Column("members", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.LargeBinary, nullable=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
    # an agreement's history, and the four-eyes check of every approval (who approved it
    # already), read the entries about one target: without it, each scanned the whole log
    sa.Index("ix_admin_log_target", "target"),
)
# one row (id 1): the head of the admin log, locked by every change
admin_head = sa.Table(
    "admin_log_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("next_seq", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.LargeBinary, nullable=False),
)
# the other instances this one federates with: one row per instance, active or ended
federations = sa.Table(
    "federations",
    metadata,
    sa.Column("instance", sa.String(64), primary_key=True),
    sa.Column("anchor", sa.Text, nullable=False),  # the instance's anchor, JSON
    sa.Column("state", sa.String(20), nullable=False),  # active, ended
    sa.Column("since", sa.String(40), nullable=False),  # when it last became active
    sa.Column("ended_at", sa.String(40)),
    sa.Column("reason", sa.Text, nullable=False),  # why of the latest change
    sa.Column("updated_by", sa.Text, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)
# this instance's own approvals of its subsystems' exchanges with other instances' services
outbound_approvals = sa.Table(
    "outbound_approvals",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("client", sa.String(300), nullable=False, index=True),
    sa.Column("client_member", sa.String(200), nullable=False, index=True),
    sa.Column("service", sa.String(400), nullable=False, index=True),
    sa.Column("purposes", sa.Text, nullable=False),  # JSON list
    # the provider-side agreement, as the provider's registry names it (free text)
    sa.Column("agreement", sa.String(200), nullable=False),
    sa.Column("state", sa.String(20), nullable=False, index=True),  # requested, approved, revoked
    sa.Column("reason", sa.Text, nullable=False),  # why of the latest change
    sa.Column("requested_by", sa.Text, nullable=False),
    sa.Column("updated_by", sa.Text, nullable=False),
    sa.Column("approved_at", sa.String(40)),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)
# the signed checkpoints of security servers' message logs, append-only (database triggers
# refuse UPDATE and DELETE, see migration 0003_checkpoints), with the registry's receipt time
checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("server", sa.String(300), nullable=False),
    # the server's owner, for auditors scoped to a member
    sa.Column("member", sa.String(200), nullable=False, index=True),
    sa.Column("chain", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("head", sa.LargeBinary(32), nullable=False),
    sa.Column("server_time", sa.String(40), nullable=False),
    sa.Column("received_at", sa.String(40), nullable=False),
    # what the server signed, and its signature (re-verifiable by anyone later)
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Index("ix_checkpoints_server_chain_seq", "server", "chain", "seq"),
)
configurations = sa.Table(
    "configurations",
    metadata,
    sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("signer_certificate", sa.LargeBinary, nullable=False),
    # the last admin log entry the version covers, and when it was generated (NULL on rows
    # stored before migration 0005)
    sa.Column("admin_seq", sa.BigInteger),
    sa.Column("generated_at", sa.String(40)),
)

# the web console's signed-out sessions, until they would have ended (see registry.console)
console_signouts = sa.Table(
    "console_signouts",
    metadata,
    sa.Column("session", sa.String(64), primary_key=True),
    sa.Column("ends_at", sa.Float, nullable=False),
)


# PostgreSQL's notification channel for published versions (payload: the version number)
CONFIGURATION_CHANNEL = "gateway_configuration"
# the advisory lock key under which the schema is migrated
MIGRATION_LOCK = "gateway-registry-migrations"


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """The newest configuration version in the database, as its publisher stored it."""

    number: int
    signed: SignedConfiguration
    # None on versions stored before migration 0005
    admin_seq: int | None
    generated_at: datetime | None


class PublishingSlot:
    """The database's state while a version is built: the admin log's last entry, the newest
    stored version, and how to store the next one."""

    def __init__(
        self,
        engine: AsyncEngine,
        conn: AsyncConnection | None,
        head_seq: int,
        latest: StoredVersion | None,
    ) -> None:
        self._engine = engine
        self._conn = conn
        self.head_seq = head_seq
        self.latest = latest

    async def save(
        self, version: int, signed: SignedConfiguration, *, admin_seq: int, generated_at: datetime
    ) -> None:
        """Store `version` (only the newest copy is kept: it carries the version counter on.
        The content's history is the admin log, not copies of the whole configuration, which
        at national scale are tens of MB each) and announce it."""
        values = {
            "version": version,
            "content": signed.content,
            "signature": signed.signature,
            "signer_certificate": signed.signer_certificate,
            "admin_seq": admin_seq,
            "generated_at": format_time(generated_at),
        }
        if self._conn is None:  # SQLite: a short transaction of its own
            async with self._engine.begin() as conn:
                await self._store(conn, version, values)
        else:
            await self._store(self._conn, version, values)

    @staticmethod
    async def _store(conn: AsyncConnection, version: int, values: dict[str, Any]) -> None:
        await conn.execute(configurations.insert().values(**values))
        await conn.execute(configurations.delete().where(configurations.c.version < version))
        if conn.dialect.name == "postgresql":  # delivered when the transaction commits
            await conn.execute(sa.select(sa.func.pg_notify(CONFIGURATION_CHANNEL, str(version))))


class ServerStatus:
    PENDING = "pending"
    APPROVED = "approved"


class FederationState:
    ACTIVE = "active"
    ENDED = "ended"


class OutboundState:
    REQUESTED = "requested"
    APPROVED = "approved"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True, kw_only=True)
class Content:
    """What the registry publishes: the approved servers, the enforceable agreements, every
    federation (active and ended) and the approved outbound approvals."""

    members: tuple[Member, ...]
    servers: tuple[SecurityServer, ...]
    services: tuple[Service, ...]
    agreements: tuple[Agreement, ...]
    federations: tuple[Federation, ...] = ()
    outbound_approvals: tuple[OutboundApproval, ...] = ()


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list)
    return [str(v) for v in value]


def agreement_from_row(r: Any) -> Agreement:
    return Agreement(
        id=r.id,
        client=SubsystemId.parse(r.client),
        service=ServiceId.parse(r.service),
        purposes=frozenset(_json_list(r.purposes)),
        valid_from=parse_time(r.valid_from),
        valid_until=None if r.valid_until is None else parse_time(r.valid_until),
        state=AgreementState(r.state),
        legal_basis=None
        if r.legal_basis_kind is None
        else LegalBasis(kind=LegalBasisKind(r.legal_basis_kind), reference=r.legal_basis_reference),
        data_categories=frozenset(_json_list(r.data_categories)),
        rate_limit=None
        if r.rate_limit_requests is None
        else RateLimit(requests=r.rate_limit_requests, per_seconds=r.rate_limit_per_seconds),
    )


def agreement_values(a: Agreement) -> dict[str, Any]:
    """The columns of an agreement's row that follow from its model."""
    return {
        "id": a.id,
        "client": str(a.client),
        "client_member": str(a.client.member),
        "service": str(a.service),
        "provider_member": str(a.service.subsystem.member),
        "purposes": json.dumps(sorted(a.purposes)),
        "legal_basis_kind": None if a.legal_basis is None else a.legal_basis.kind.value,
        "legal_basis_reference": None if a.legal_basis is None else a.legal_basis.reference,
        "data_categories": json.dumps(sorted(a.data_categories)),
        "valid_from": format_time(a.valid_from),
        "valid_until": None if a.valid_until is None else format_time(a.valid_until),
        "rate_limit_requests": None if a.rate_limit is None else a.rate_limit.requests,
        "rate_limit_per_seconds": None if a.rate_limit is None else a.rate_limit.per_seconds,
        "state": a.state.value,
    }


def federation_from_row(r: Any) -> Federation:
    return Federation(
        anchor=Anchor.from_json(json.loads(r.anchor)),
        active=r.state == FederationState.ACTIVE,
        since=parse_time(r.since),
        ended_at=None if r.ended_at is None else parse_time(r.ended_at),
    )


def outbound_from_row(r: Any) -> OutboundApproval:
    """An approved outbound approval as the configuration carries it."""
    assert r.approved_at is not None
    return OutboundApproval(
        client=SubsystemId.parse(r.client),
        service=ServiceId.parse(r.service),
        purposes=frozenset(_json_list(r.purposes)),
        approved_at=parse_time(r.approved_at),
    )


def server_from_row(r: Any, next_certificates: tuple[bytes, ...] = ()) -> SecurityServer:
    return SecurityServer(
        id=SecurityServerId.parse(r.id),
        address=r.address,
        auth_certificate=bytes(r.auth_certificate),
        subsystems=tuple(SubsystemId.parse(x) for x in _json_list(r.subsystems)),
        next_auth_certificates=next_certificates,
    )


def service_from_row(r: Any) -> Service:
    return Service(
        id=ServiceId.parse(r.id),
        description=r.description,
        methods=tuple(_json_list(r.methods)),
        streams=tuple(sorted(json.loads(r.streams or "{}").items())),
    )


def admin_record(row: Any) -> ChainedRecord:
    return ChainedRecord(
        seq=int(row.seq),
        prev_hash=bytes(row.prev_hash),
        hash=bytes(row.hash),
        fields={name: getattr(row, name) for name in ADMIN_FIELDS},
    )


class Change:
    """One serialised change: its connection, and the admin log entries it appends."""

    def __init__(self, conn: AsyncConnection, head: ChainHead) -> None:
        self.conn = conn
        self.head = head
        self.entries: list[ChainedRecord] = []

    async def log(
        self,
        *,
        at: datetime,
        actor: str,
        role: str,
        action: str,
        target: str,
        reason: str,
        concerns: Iterable[MemberId],
        from_state: str | None = None,
        to_state: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> ChainedRecord:
        """Append one entry to the admin log within this change."""
        fields: dict[str, FieldValue] = {
            "logged_at": format_time(at),
            "actor": actor,
            "role": role,
            "action": action,
            "target": target,
            "from_state": from_state,
            "to_state": to_state,
            "reason": reason,
            "details": json.dumps(details or {}, sort_keys=True, separators=(",", ":")),
        }
        record = self.head.link(fields)
        await self.conn.execute(
            admin_log.insert().values(
                seq=record.seq,
                prev_hash=record.prev_hash,
                hash=record.hash,
                members=" ".join(sorted({str(m) for m in concerns})),
                **fields,
            )
        )
        self.entries.append(record)
        return record


class RegistryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._lock = asyncio.Lock()
        self.is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    async def open(cls, url: str) -> RegistryStore:
        """Open the database and bring its schema to the newest migration."""
        from registry.migrations import upgrade

        if url.startswith("sqlite") and ":memory:" not in url:
            Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":  # replicas starting together migrate once
                await conn.execute(
                    sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(MIGRATION_LOCK)))
                )
            await conn.run_sync(upgrade)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def agreement_states(self) -> dict[str, int]:
        """How many agreements are in each state (states with none are absent)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(agreements.c.state, sa.func.count()).group_by(agreements.c.state)
            )
            return {str(state): int(n) for state, n in rows}

    async def ping(self) -> None:
        """A round trip to the database; raises what a query would meet."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    @asynccontextmanager
    async def change(self) -> AsyncIterator[Change]:
        """A transaction in which nothing else changes the registry, with its admin log head."""
        async with self._lock, self.engine.begin() as conn:
            query = sa.select(admin_head).where(admin_head.c.id == 1)
            if self.is_postgres:
                query = query.with_for_update()
            row = (await conn.execute(query)).first()
            if row is None:
                raise RuntimeError("the admin log head is missing: run the migrations")
            change = Change(conn, ChainHead(int(row.next_seq), bytes(row.last_hash), ADMIN_LOG))
            yield change
            if change.entries:
                await conn.execute(
                    admin_head.update()
                    .where(admin_head.c.id == 1)
                    .values(next_seq=change.head.next_seq, last_hash=change.head.last_hash)
                )

    @asynccontextmanager
    async def publishing(self) -> AsyncIterator[PublishingSlot]:
        """A transaction in which no change commits (PostgreSQL: the admin log head's row
        lock), with the admin log's last entry and the newest stored version. On SQLite (one
        process) the version is stored in a transaction of its own."""
        if not self.is_postgres:
            async with self.engine.connect() as conn:
                head, latest = await self._publishing_state(conn, lock=False)
            yield PublishingSlot(self.engine, None, head, latest)
            return
        async with self.engine.begin() as conn:
            head, latest = await self._publishing_state(conn, lock=True)
            yield PublishingSlot(self.engine, conn, head, latest)

    async def _publishing_state(
        self, conn: AsyncConnection, *, lock: bool
    ) -> tuple[int, StoredVersion | None]:
        query = sa.select(admin_head.c.next_seq).where(admin_head.c.id == 1)
        if lock:
            query = query.with_for_update()
        head = int((await conn.execute(query)).scalar_one()) - 1
        row = (
            await conn.execute(
                sa.select(configurations).order_by(configurations.c.version.desc()).limit(1)
            )
        ).first()
        latest = None
        if row is not None:
            latest = StoredVersion(
                number=int(row.version),
                signed=SignedConfiguration(
                    content=bytes(row.content),
                    signature=bytes(row.signature),
                    signer_certificate=bytes(row.signer_certificate),
                ),
                admin_seq=None if row.admin_seq is None else int(row.admin_seq),
                generated_at=None if row.generated_at is None else parse_time(row.generated_at),
            )
        return head, latest

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def content(self) -> Content:
        """The publishable content: members, approved servers, services, enforceable
        agreements, federations and approved outbound approvals."""
        async with self.engine.connect() as conn:
            catalogue = await self._catalogue(conn)
            a = (
                await conn.execute(
                    sa.select(agreements)
                    .where(agreements.c.state.in_([s.value for s in PUBLISHED_STATES]))
                    .order_by(agreements.c.id)
                )
            ).all()
        return dataclasses.replace(catalogue, agreements=tuple(agreement_from_row(r) for r in a))

    async def catalogue(self) -> Content:
        """The publishable content but its agreements (`agreements` is empty)."""
        async with self.engine.connect() as conn:
            return await self._catalogue(conn)

    async def _catalogue(self, conn: AsyncConnection) -> Content:
        m = (await conn.execute(sa.select(members).order_by(members.c.id))).all()
        s = (
            await conn.execute(
                sa.select(servers)
                .where(servers.c.status == ServerStatus.APPROVED)
                .order_by(servers.c.id)
            )
        ).all()
        renewals: dict[str, list[bytes]] = {}
        for r in (
            await conn.execute(
                sa.select(next_auth_certificates.c.server, next_auth_certificates.c.certificate)
                .where(next_auth_certificates.c.state == ServerStatus.APPROVED)
                .order_by(next_auth_certificates.c.submitted_at, next_auth_certificates.c.sha256)
            )
        ).all():
            renewals.setdefault(r.server, []).append(bytes(r.certificate))
        v = (await conn.execute(sa.select(services).order_by(services.c.id))).all()
        f = (await conn.execute(sa.select(federations).order_by(federations.c.instance))).all()
        o = (
            await conn.execute(
                sa.select(outbound_approvals)
                .where(outbound_approvals.c.state == OutboundState.APPROVED)
                .order_by(outbound_approvals.c.id)
            )
        ).all()
        return Content(
            members=tuple(Member(id=MemberId.parse(r.id), name=r.name) for r in m),
            servers=tuple(server_from_row(r, tuple(renewals.get(r.id, ()))) for r in s),
            services=tuple(service_from_row(r) for r in v),
            agreements=(),
            federations=tuple(federation_from_row(r) for r in f),
            outbound_approvals=tuple(outbound_from_row(r) for r in o),
        )

    async def published_agreement_pages(self, size: int = 5000) -> AsyncIterator[list[Agreement]]:
        """Every published agreement, a page of `size` at a time (in id order), so that a
        national instance's are never all parsed at once."""
        after = ""
        while True:
            async with self.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(agreements)
                        .where(
                            agreements.c.state.in_([s.value for s in PUBLISHED_STATES]),
                            agreements.c.id > after,
                        )
                        .order_by(agreements.c.id)
                        .limit(size)
                    )
                ).all()
            if not rows:
                return
            after = str(rows[-1].id)
            yield [agreement_from_row(r) for r in rows]

    async def agreements_by_id(self, ids: Iterable[str]) -> dict[str, Agreement | None]:
        """The agreements of `ids` that exist: each as published, or None when its state is
        not published; ids of no agreement are absent."""
        wanted = sorted(set(ids))
        found: dict[str, Agreement | None] = {}
        async with self.engine.connect() as conn:
            for start in range(0, len(wanted), 500):
                rows = await conn.execute(
                    sa.select(agreements).where(agreements.c.id.in_(wanted[start : start + 500]))
                )
                for r in rows:
                    published = r.state in {s.value for s in PUBLISHED_STATES}
                    found[str(r.id)] = agreement_from_row(r) if published else None
        return found

    async def admin_targets(self, after: int) -> tuple[set[str], int]:
        """The targets of the admin log entries after `after`, and the last entry's seq."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(admin_log.c.seq, admin_log.c.target).where(admin_log.c.seq > after)
                )
            ).all()
        return {str(r.target) for r in rows}, max((int(r.seq) for r in rows), default=after)

    async def admin_entries(
        self,
        *,
        member: MemberId | None = None,
        after: int = 0,
        limit: int | None = None,
        target: str | None = None,
    ) -> Sequence[Any]:
        """Admin log rows in order; only those concerning `member` when one is given, and
        only those about `target` (an agreement's id, say) when one is given."""
        query = sa.select(admin_log).where(admin_log.c.seq > after).order_by(admin_log.c.seq)
        if target is not None:
            query = query.where(admin_log.c.target == target)
        if member is not None:
            # `||` on both databases (SQLite has concat() only from 3.44)
            padded = sa.literal(" ") + admin_log.c.members + sa.literal(" ")
            # byte for byte, as identifiers compare: SQLite's LIKE ignores the case of ASCII
            # letters, so UY/GOV/msp read the entries of UY/GOV/MSP (a red-team review)
            position = sa.func.strpos if self.is_postgres else sa.func.instr
            query = query.where(position(padded, f" {member} ") > 0)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).all()

    async def sign_out(self, session: str, ends_at: float, now: float) -> None:
        """Record a console session as signed out until `ends_at`; forget ended ones."""
        async with self.engine.begin() as conn:
            await conn.execute(console_signouts.delete().where(console_signouts.c.ends_at < now))
            await conn.execute(
                console_signouts.delete().where(console_signouts.c.session == session)
            )
            await conn.execute(console_signouts.insert().values(session=session, ends_at=ends_at))

    async def signed_out(self, session: str) -> bool:
        async with self.engine.connect() as conn:
            found = await conn.scalar(
                sa.select(console_signouts.c.session).where(console_signouts.c.session == session)
            )
        return found is not None

    async def admin_head(self) -> ChainHead:
        """Where the admin log says it ends (updated with every change)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(admin_head).where(admin_head.c.id == 1))).one()
        return ChainHead(int(row.next_seq), bytes(row.last_hash), ADMIN_LOG)

    async def last_version(self) -> int:
        async with self.engine.connect() as conn:
            value = (await conn.execute(sa.select(sa.func.max(configurations.c.version)))).scalar()
        return int(value or 0)
