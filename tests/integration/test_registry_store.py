"""The registry's store and governance in-process, on SQLite and PostgreSQL.

Migrations, the topology seed, the agreement workflow and its admin log, changes that race
each other (in one store, and on PostgreSQL in two stores as two registry processes would
have) and tampering with the admin log. Each PostgreSQL test runs in a database of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tomllib
import uuid
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_pem_x509_certificate
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from certs.pki import Issued, init_pki, issue, load_issued
from gateway.agreements import AgreementState, LegalBasis, LegalBasisKind
from gateway.configuration import SignedConfiguration
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId, server_dns_name
from gateway.settings import database_url
from gateway.timeutil import format_time
from gateway.workflow import Action, Policy
from gateway_demo.runner import TEMPLATE
from gateway_ops.auth import Principal, Role
from gateway_ops.backupfile import BACKUP_MAC, BackupKey
from registry.backup import SKIP_VERSIONS, BackupError, backup, read_backup, restore
from registry.governance import (
    AgreementRequest,
    Conflict,
    Forbidden,
    Governance,
    InvalidRequest,
    NotFound,
)
from registry.migrations import alembic_config
from registry.store import RegistryStore, admin_head, admin_log, agreements, members, metadata
from registry.topology import load_topology

POSTGRES = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
NO_POSTGRES = "GATEWAY_TEST_POSTGRES_URL is not set: PostgreSQL registry store tests skipped"
needs_postgres = pytest.mark.skipif(not POSTGRES, reason=NO_POSTGRES)

MSP, DNIC = MemberId.parse("UY/GOV/MSP"), MemberId.parse("UY/GOV/DNIC")
CLINICS = SubsystemId.parse("UY/GOV/MSP/clinics")
POPULATION = ServiceId.parse("UY/GOV/DNIC/identity/population/v1")
SEEDED_AGREEMENT = "AGR-2026-0001"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def admin(subject: str) -> Principal:
    return Principal(
        subject=subject, role=Role.REGISTRY_ADMIN, member=None, server=None, issuer="test"
    )


def member_admin(subject: str, member: MemberId) -> Principal:
    return Principal(
        subject=subject, role=Role.MEMBER_ADMIN, member=member, server=None, issuer="test"
    )


REGISTRY = admin("alice@registry")
MSP_ADMIN = member_admin("carla@msp", MSP)
DNIC_ADMIN = member_admin("diego@dnic", DNIC)
AUDITOR = Principal(subject="audit", role=Role.AUDITOR, member=None, server=None, issuer="test")


class FakeClock:
    """The governance's clock: fixed until a test moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class ChangeCounter:
    """Counts the governance's requests to publish a new configuration."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


class Registry:
    """A governance over a store, with its fake clock and publish counter."""

    def __init__(self, store: RegistryStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.published = ChangeCounter()
        self.gov = Governance(
            store, instance="UY", policy=Policy(), clock=clock, on_change=self.published
        )


# ---- databases ---------------------------------------------------------------------------


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """The async URL of a new, empty PostgreSQL database, dropped afterwards."""
    assert POSTGRES is not None
    server = make_url(database_url(POSTGRES, base=Path.cwd()))
    name = f"registry_test_{uuid.uuid4().hex[:16]}"
    engine = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        async with engine.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await engine.dispose()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=[needs_postgres, pytest.mark.postgres])]
)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield database_url(str(tmp_path / "registry.db"), base=tmp_path)
        return
    async with fresh_postgres_database() as pg:
        yield pg


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new PostgreSQL database (the test is skipped without GATEWAY_TEST_POSTGRES_URL)."""
    if not POSTGRES:
        pytest.skip(NO_POSTGRES)
    async with fresh_postgres_database() as pg:
        yield pg


@pytest.fixture(scope="module")
def topology_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo topology copied next to a PKI holding the certificates it names."""
    folder = tmp_path_factory.mktemp("topology")
    path = folder / "topology.toml"
    shutil.copyfile(TEMPLATE, path)
    doc = tomllib.loads(path.read_text())
    init_pki(
        folder / "pki",
        instance="UY",
        members=[MemberId.parse(m["id"]) for m in doc["members"]],
        servers=[SecurityServerId.parse(s["id"]) for s in doc["servers"]],
        registry_addresses=["127.0.0.1:7000"],
        now=datetime.now(UTC),
    )
    return path


@pytest.fixture(scope="module")
def numbered_topology(topology_file: Path) -> Path:
    """The demo topology with its agreement named AGR-2026-0002, next to the same PKI."""
    path = topology_file.with_name("numbered.toml")
    text = topology_file.read_text()
    path.write_text(text.replace(f'id = "{SEEDED_AGREEMENT}"', 'id = "AGR-2026-0002"'))
    return path


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Registry]:
    store = await RegistryStore.open(url)
    try:
        yield Registry(store, FakeClock(START))
    finally:
        await store.close()


@pytest.fixture
async def registry(url: str, topology_file: Path) -> AsyncIterator[Registry]:
    """A registry seeded with the demo topology."""
    async with opened(url) as reg:
        await reg.gov.seed(load_topology(topology_file), topology_file.name)
        yield reg


# ---- helpers -----------------------------------------------------------------------------


def at(minutes: int) -> str:
    """The logged form of START plus `minutes`."""
    return format_time(START + timedelta(minutes=minutes))


def agreement_request(purpose: str, reason: str = "") -> AgreementRequest:
    return AgreementRequest(
        client=CLINICS,
        service=POPULATION,
        purposes=(purpose,),
        legal_basis=LegalBasis(kind=LegalBasisKind.LAW, reference="Ley 18.331 art. 9"),
        reason=reason,
    )


async def log_entries(reg: Registry, target: str | None = None) -> list[Any]:
    rows = await reg.store.admin_entries()
    return [r for r in rows if target is None or r.target == target]


async def state_of(reg: Registry, agreement_id: str) -> tuple[str, int]:
    async with reg.store.read() as conn:
        row = (
            await conn.execute(sa.select(agreements).where(agreements.c.id == agreement_id))
        ).one()
    return row.state, row.revision


async def execute(reg: Registry, statement: str) -> None:
    async with reg.store.engine.begin() as conn:
        await conn.execute(sa.text(statement))


def diff_schema(conn: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


def current_revision(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


# ---- migrations --------------------------------------------------------------------------


async def test_migrations_yield_exactly_the_store_metadata(url: str) -> None:
    """After the migrations, alembic finds no difference between the database and the tables."""
    async with opened(url) as reg, reg.store.engine.connect() as conn:
        assert await conn.run_sync(diff_schema) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert await conn.run_sync(current_revision) == head


async def test_reopening_an_existing_database_is_a_no_op_upgrade(url: str) -> None:
    """Opening a migrated database again keeps its rows, its revision and its admin log head."""
    async with opened(url) as reg:
        await reg.gov.add_member(REGISTRY, MemberId.parse("UY/GOV/BPS"), "Banco de Previsión")
        before = await log_entries(reg)
    async with opened(url) as reg:
        async with reg.store.engine.connect() as conn:
            assert await conn.run_sync(diff_schema) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert await conn.run_sync(current_revision) == head
            assert (await conn.execute(sa.select(members.c.id))).scalars().all() == ["UY/GOV/BPS"]
            heads = (await conn.execute(sa.select(admin_head))).all()
        assert [(h.id, h.next_seq) for h in heads] == [(1, 2)]
        assert [r.hash for r in await log_entries(reg)] == [r.hash for r in before]
        assert (await reg.gov.verify_admin_log(AUDITOR))["verified"] is True


# ---- the seed ----------------------------------------------------------------------------


async def test_seed_imports_the_topology_once(url: str, topology_file: Path) -> None:
    """The first seed imports every item with a log entry naming the file; a second adds nothing."""
    topology = load_topology(topology_file)
    async with opened(url) as reg:
        # 2 members, 2 subsystems, 2 servers, 2 services, 1 agreement
        assert await reg.gov.seed(topology, "topology.toml") == 9
        assert reg.published.calls == 1
        content = await reg.store.content()
        assert {str(m.id) for m in content.members} == {str(MSP), str(DNIC)}
        assert {str(s.id) for s in content.servers} == {"UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"}
        assert {s.auth_certificate for s in content.servers} == {
            s.auth_certificate for s in topology.servers
        }
        assert {str(s.id) for s in content.services} == {
            str(POPULATION),
            "UY/GOV/MSP/clinics/vaccination/v1",
        }
        assert [(a.id, a.state) for a in content.agreements] == [
            (SEEDED_AGREEMENT, AgreementState.ACTIVE)
        ]
        entries = await log_entries(reg)
        assert [e.action for e in entries] == [
            *["add_member"] * 2,
            *["add_subsystem"] * 2,
            *["register_server"] * 2,
            *["add_service"] * 2,
            "import",
        ]
        assert {(e.actor, e.reason) for e in entries} == {
            ("registry", "imported from topology.toml")
        }

        assert await reg.gov.seed(topology, "topology.toml") == 0
        assert reg.published.calls == 1
        assert len(await log_entries(reg)) == 9
        assert await reg.store.content() == content


# ---- the agreement workflow --------------------------------------------------------------


async def test_agreement_workflow_is_logged_with_who_when_why_and_states(
    registry: Registry,
) -> None:
    """Request, both approvals, suspend, resume and revoke: each one admin log entry."""
    reg, gov, clock = registry, registry.gov, registry.clock
    published = reg.published.calls
    requested = await gov.request_agreement(
        MSP_ADMIN, agreement_request("fraud-check", "to confirm identities at the counter")
    )
    agreement_id = requested["id"]
    assert (requested["state"], requested["revision"]) == ("requested", 1)
    assert reg.published.calls == published  # a request changes nothing that is published

    steps = [
        (DNIC_ADMIN, Action.APPROVE, "", "approved_by_provider"),
        (REGISTRY, Action.APPROVE, "legal basis checked", "active"),
        (DNIC_ADMIN, Action.SUSPEND, "incident INC-42 under investigation", "suspended"),
        (REGISTRY, Action.RESUME, "incident INC-42 closed", "active"),
        (MSP_ADMIN, Action.REVOKE, "the counter service closed", "revoked"),
    ]
    times = []
    for revision, (actor, action, reason, state) in enumerate(steps, start=2):
        times.append(clock.advance(minutes=5))
        doc = await gov.act(actor, agreement_id, action, reason)
        assert (doc["state"], doc["revision"]) == (state, revision)
        published_states = {a.id: a.state for a in (await reg.store.content()).agreements}
        # security servers learn of it once active, and then of every later state
        assert published_states.get(agreement_id) == (None if revision == 2 else state)
    assert reg.published.calls == published + len(steps)

    entries = [
        (e.logged_at, e.actor, e.role, e.action, e.from_state, e.to_state, e.reason)
        for e in await log_entries(reg, agreement_id)
    ]
    assert entries == [
        (
            at(0),
            "carla@msp",
            "member-admin:UY/GOV/MSP",
            "request",
            None,
            "requested",
            "to confirm identities at the counter",
        ),
        (
            at(5),
            "diego@dnic",
            "member-admin:UY/GOV/DNIC",
            "approve",
            "requested",
            "approved_by_provider",
            "",
        ),
        (
            at(10),
            "alice@registry",
            "registry-admin",
            "approve",
            "approved_by_provider",
            "active",
            "legal basis checked",
        ),
        (
            at(15),
            "diego@dnic",
            "member-admin:UY/GOV/DNIC",
            "suspend",
            "active",
            "suspended",
            "incident INC-42 under investigation",
        ),
        (
            at(20),
            "alice@registry",
            "registry-admin",
            "resume",
            "suspended",
            "active",
            "incident INC-42 closed",
        ),
        (
            at(25),
            "carla@msp",
            "member-admin:UY/GOV/MSP",
            "revoke",
            "active",
            "revoked",
            "the counter service closed",
        ),
    ]
    assert [format_time(t) for t in times] == [e[0] for e in entries[1:]]
    assert (await gov.verify_admin_log(AUDITOR))["verified"] is True


async def test_refused_transitions_change_and_log_nothing(registry: Registry) -> None:
    """Wrong party, wrong state, missing reason or not a party: refused, no entry, no publish."""
    reg, gov = registry, registry.gov
    agreement_id = (await gov.request_agreement(MSP_ADMIN, agreement_request("study")))["id"]
    await gov.act(DNIC_ADMIN, agreement_id, Action.APPROVE, "")
    entries, published = len(await log_entries(reg)), reg.published.calls
    bps_admin = member_admin("bea@bps", MemberId.parse("UY/GOV/BPS"))

    with pytest.raises(Forbidden, match="only the provider or the registry may approve"):
        await gov.act(MSP_ADMIN, agreement_id, Action.APPROVE, "")
    with pytest.raises(Conflict, match="waiting for a registry administrator"):
        await gov.act(DNIC_ADMIN, agreement_id, Action.APPROVE, "")
    with pytest.raises(Conflict, match="revoke applies only to agreements that are"):
        await gov.act(REGISTRY, agreement_id, Action.REVOKE, "changed our mind")
    with pytest.raises(InvalidRequest, match="reject needs a reason"):
        await gov.act(REGISTRY, agreement_id, Action.REJECT, "  ")
    with pytest.raises(NotFound, match=f"agreement {agreement_id} does not exist"):
        await gov.act(bps_admin, agreement_id, Action.REJECT, "not mine but still")
    with pytest.raises(Forbidden, match="auditor token cannot change agreements"):
        await gov.act(AUDITOR, agreement_id, Action.REJECT, "auditors only read")

    assert await state_of(reg, agreement_id) == ("approved_by_provider", 2)
    assert len(await log_entries(reg)) == entries
    assert reg.published.calls == published


async def test_requests_get_a_free_id_after_an_imported_one(
    url: str, numbered_topology: Path
) -> None:
    """A seeded agreement named like the next generated id does not block new requests."""
    async with opened(url) as reg:
        await reg.gov.seed(load_topology(numbered_topology), numbered_topology.name)
        doc = await reg.gov.request_agreement(MSP_ADMIN, agreement_request("after-import"))
        assert doc["id"] != "AGR-2026-0002"


# ---- races -------------------------------------------------------------------------------

REVOKERS = [
    admin("alice@registry"),
    admin("bruno@registry"),
    MSP_ADMIN,
    DNIC_ADMIN,
    admin("chen@registry"),
    member_admin("other@msp", MSP),
    member_admin("other@dnic", DNIC),
    admin("dora@registry"),
]


async def race_revokes(govs: list[Governance], agreement_id: str) -> list[Any]:
    """Every revoker revokes the agreement at once, through the governances in turn."""
    results: list[Any] = await asyncio.gather(
        *(
            govs[i % len(govs)].act(p, agreement_id, Action.REVOKE, f"revoked by {p.subject}")
            for i, p in enumerate(REVOKERS)
        ),
        return_exceptions=True,
    )
    return results


async def check_one_revoke_won(reg: Registry, agreement_id: str, results: list[Any]) -> None:
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if not isinstance(r, dict)]
    assert len(won) == 1, results
    assert all(isinstance(e, Conflict) for e in lost), lost
    assert all("the agreement is revoked" in e.message for e in lost)
    assert (won[0]["state"], won[0]["revision"]) == ("revoked", 2)
    assert await state_of(reg, agreement_id) == ("revoked", 2)
    revokes = [e for e in await log_entries(reg, agreement_id) if e.action == "revoke"]
    assert len(revokes) == 1
    assert (revokes[0].from_state, revokes[0].to_state) == ("active", "revoked")
    assert revokes[0].reason == f"revoked by {revokes[0].actor}"


async def race_approvals(govs: list[Governance], count: int) -> list[str]:
    """`count` requested agreements, each approved by its provider and a registry admin at once."""
    ids = [
        (await govs[0].request_agreement(MSP_ADMIN, agreement_request(f"race-{i}")))["id"]
        for i in range(count)
    ]
    calls = []
    for i, agreement_id in enumerate(ids):
        provider = govs[i % len(govs)].act(DNIC_ADMIN, agreement_id, Action.APPROVE, "")
        registry = govs[(i + 1) % len(govs)].act(REGISTRY, agreement_id, Action.APPROVE, "ok")
        calls += [provider, registry] if i % 2 else [registry, provider]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [r for r in results if not isinstance(r, dict)] == []
    return ids


async def check_both_approvals_counted(reg: Registry, ids: list[str]) -> None:
    both_paths = {
        (("requested", "approved_by_provider"), ("approved_by_provider", "active")),
        (("requested", "approved_by_registry"), ("approved_by_registry", "active")),
    }
    for agreement_id in ids:
        assert await state_of(reg, agreement_id) == ("active", 3)
        approvals = [e for e in await log_entries(reg, agreement_id) if e.action == "approve"]
        assert {e.actor for e in approvals} == {"diego@dnic", "alice@registry"}
        assert tuple((e.from_state, e.to_state) for e in approvals) in both_paths


async def test_concurrent_revokes_one_wins_the_others_conflict(registry: Registry) -> None:
    """Eight revokes of one active agreement at once: one succeeds, seven get Conflict."""
    published = registry.published.calls
    results = await race_revokes([registry.gov], SEEDED_AGREEMENT)
    await check_one_revoke_won(registry, SEEDED_AGREEMENT, results)
    assert registry.published.calls == published + 1
    assert (await registry.gov.verify_admin_log(AUDITOR))["verified"] is True


async def test_concurrent_provider_and_registry_approvals_both_count(registry: Registry) -> None:
    """Provider and registry approving at once, 20 times: every agreement active at revision 3."""
    ids = await race_approvals([registry.gov], 20)
    await check_both_approvals_counted(registry, ids)
    log = await registry.gov.verify_admin_log(AUDITOR)
    assert log["verified"] is True
    assert log["entries"] == 9 + 20 * 3


async def test_two_registry_processes_serialise_their_changes(
    pg_url: str, topology_file: Path
) -> None:
    """Two stores (two engines) over one PostgreSQL database: the row lock orders every change."""
    async with opened(pg_url) as one, opened(pg_url) as two:
        await one.gov.seed(load_topology(topology_file), topology_file.name)
        govs = [one.gov, two.gov]

        results = await race_revokes(govs, SEEDED_AGREEMENT)
        await check_one_revoke_won(one, SEEDED_AGREEMENT, results)
        assert one.published.calls + two.published.calls == 2  # the seed and the revoke

        ids = await race_approvals(govs, 20)
        await check_both_approvals_counted(one, ids)

        for reg in (one, two):
            log = await reg.gov.verify_admin_log(AUDITOR)
            assert (log["verified"], log["entries"]) == (True, 9 + 1 + 20 * 3)


# ---- tampering with the admin log --------------------------------------------------------


@pytest.fixture
async def logged(registry: Registry) -> Registry:
    """A seeded registry with one agreement taken through its whole approval."""
    gov = registry.gov
    agreement_id = (await gov.request_agreement(MSP_ADMIN, agreement_request("audit-trail")))["id"]
    await gov.act(DNIC_ADMIN, agreement_id, Action.APPROVE, "")
    await gov.act(REGISTRY, agreement_id, Action.APPROVE, "fine")
    assert (await gov.verify_admin_log(AUDITOR))["verified"] is True
    return registry


async def test_edited_reason_is_detected(logged: Registry) -> None:
    """An UPDATE of one entry's reason fails verification, naming its seq and its target."""
    target = (await log_entries(logged))[4].target
    await execute(logged, "UPDATE admin_log SET reason = 'nothing happened' WHERE seq = 5")
    result = await logged.gov.verify_admin_log(AUDITOR)
    assert result["verified"] is False
    assert "record 5 " in result["error"] and target in result["error"]
    assert "altered" in result["error"]


async def test_deleted_middle_entry_is_detected(logged: Registry) -> None:
    """Deleting one entry from the middle fails verification at the missing seq."""
    await execute(logged, "DELETE FROM admin_log WHERE seq = 7")
    result = await logged.gov.verify_admin_log(AUDITOR)
    assert result["verified"] is False
    assert result["error"].startswith("record 7: is missing")


async def test_swapped_entries_are_detected(logged: Registry) -> None:
    """Swapping the whole content (hashes included) of two entries fails verification."""
    entries = {e.seq: e._asdict() for e in await log_entries(logged) if e.seq in (3, 4)}
    async with logged.store.engine.begin() as conn:
        for seq, other in ((3, 4), (4, 3)):
            values = {k: v for k, v in entries[other].items() if k != "seq"}
            await conn.execute(admin_log.update().where(admin_log.c.seq == seq).values(**values))
    result = await logged.gov.verify_admin_log(AUDITOR)
    assert result["verified"] is False
    assert result["error"].startswith("record 3 ")
    assert "does not link" in result["error"]


async def test_deleted_newest_entry_is_detected(logged: Registry) -> None:
    """Deleting the newest entry fails verification: the chain ends before the log's head."""
    last = (await log_entries(logged))[-1].seq
    await execute(logged, f"DELETE FROM admin_log WHERE seq = {last}")
    result = await logged.gov.verify_admin_log(AUDITOR)
    assert result["verified"] is False


# ---- server approval and expiry -----------------------------------------------------------


async def test_a_submitted_server_enters_the_configuration_only_once_approved(
    registry: Registry, topology_file: Path
) -> None:
    """A pending server is not published; after a registry administrator approves it, it is."""
    server = SecurityServerId.parse("UY/GOV/MSP/ss2")
    ca = load_issued(topology_file.parent / "pki", "ca")
    cert = issue(
        common_name=str(server), issuer=ca, now=START - timedelta(days=1), days=30, kind="auth"
    ).certificate
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    submitted = await registry.gov.submit_server(
        MSP_ADMIN,
        server=server,
        address="127.0.0.1:7999",
        auth_certificate_pem=pem,
        subsystems_hosted=(CLINICS,),
    )
    assert submitted["status"] == "pending"
    assert server not in {s.id for s in (await registry.store.content()).servers}
    with pytest.raises(Forbidden):
        await registry.gov.approve_server(MSP_ADMIN, server, "approving my own server")
    await registry.gov.approve_server(REGISTRY, server, "certificate fingerprint checked")
    assert server in {s.id for s in (await registry.store.content()).servers}
    with pytest.raises(Conflict, match="approved, not pending"):
        await registry.gov.approve_server(REGISTRY, server, "again")
    # another server's certificate: it names ss2, and peers would verify ss3's name
    with pytest.raises(InvalidRequest, match="its common name is 'UY/GOV/MSP/ss2', not"):
        await registry.gov.submit_server(
            MSP_ADMIN,
            server=SecurityServerId.parse("UY/GOV/MSP/ss3"),
            address="127.0.0.1:7998",
            auth_certificate_pem=pem,
            subsystems_hosted=(CLINICS,),
        )
    registry.clock.advance(days=40)
    with pytest.raises(InvalidRequest, match="not valid now"):
        await registry.gov.submit_server(
            MSP_ADMIN,
            server=SecurityServerId.parse("UY/GOV/MSP/ss4"),
            address="127.0.0.1:7997",
            auth_certificate_pem=issue(common_name="x", issuer=ca, now=START, days=30, kind="auth")
            .certificate.public_bytes(serialization.Encoding.PEM)
            .decode(),
            subsystems_hosted=(CLINICS,),
        )
    steps = [(r.action, r.to_state) for r in await log_entries(registry, str(server))]
    assert steps == [("register_server", "pending"), ("approve_server", "approved")]


async def test_a_server_certificate_of_another_ca_or_naming_another_server_is_refused(
    registry: Registry, topology_file: Path
) -> None:
    """With the instance's CAs given (as `registry serve` gives its settings'), a server's
    first certificate and a renewal must come from one of them: peers would refuse any
    other, so the registry says so at once. A certificate of the right CA that also names
    another server's verified name, which would let its holder pass for that server, is
    refused as well."""
    ca = load_issued(topology_file.parent / "pki", "ca")
    gov = Governance(
        registry.store,
        instance="UY",
        policy=Policy(),
        clock=registry.clock,
        on_change=registry.published,
        ca_certificates=(ca.certificate.public_bytes(serialization.Encoding.DER),),
    )
    stranger = issue(common_name="another CA", issuer=None, now=START, days=30, kind="ca")

    def pem_of(server: SecurityServerId, issuer: Issued, hosts: tuple[str, ...] = ()) -> str:
        made = issue(
            common_name=str(server),
            issuer=issuer,
            now=START - timedelta(days=1),
            days=30,
            kind="auth",
            hosts=hosts,
        )
        return made.certificate.public_bytes(serialization.Encoding.PEM).decode()

    new = SecurityServerId.parse("UY/GOV/MSP/ss5")
    with pytest.raises(InvalidRequest, match="not issued by any of the instance's CAs"):
        await gov.submit_server(
            MSP_ADMIN,
            server=new,
            address="127.0.0.1:7995",
            auth_certificate_pem=pem_of(new, stranger),
            subsystems_hosted=(CLINICS,),
        )
    with pytest.raises(InvalidRequest, match="another security server's verified name"):
        await gov.submit_server(
            MSP_ADMIN,
            server=new,
            address="127.0.0.1:7995",
            auth_certificate_pem=pem_of(
                new, ca, (server_dns_name(SecurityServerId.parse("UY/GOV/DNIC/ss1")),)
            ),
            subsystems_hosted=(CLINICS,),
        )
    current = SecurityServerId.parse("UY/GOV/MSP/ss1")
    with pytest.raises(InvalidRequest, match="not issued by any of the instance's CAs"):
        await gov.submit_auth_certificate(MSP_ADMIN, current, pem_of(current, stranger), "")
    submitted = await gov.submit_server(
        MSP_ADMIN,
        server=new,
        address="127.0.0.1:7995",
        auth_certificate_pem=pem_of(new, ca),
        subsystems_hosted=(CLINICS,),
    )
    assert submitted["status"] == "pending"


async def test_renewal_publishes_both_certificates_then_only_the_successor(
    registry: Registry, topology_file: Path
) -> None:
    """A server's next authentication certificate waits for a registry administrator, is
    then published beside the current one (peers accept either), and replaces it when the
    old one is retired; what would break the server is refused with its reason."""
    server = SecurityServerId.parse("UY/GOV/MSP/ss1")
    ca = load_issued(topology_file.parent / "pki", "ca")

    def pem_of(common_name: str, days: int = 30) -> str:
        issued = issue(
            common_name=common_name,
            issuer=ca,
            now=START - timedelta(days=1),
            days=days,
            kind="auth",
        )
        return issued.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def published() -> list[bytes]:
        [entry] = [s for s in content.servers if s.id == server]
        return list(entry.auth_certificates)

    content = await registry.store.content()
    [old] = published()
    fresh = pem_of(str(server))
    with pytest.raises(Forbidden):  # another member's administrator
        await registry.gov.submit_auth_certificate(
            member_admin("admin@dnic", DNIC), server, fresh, ""
        )
    with pytest.raises(InvalidRequest, match="common name is 'UY/GOV/MSP/ss9'"):
        await registry.gov.submit_auth_certificate(MSP_ADMIN, server, pem_of("UY/GOV/MSP/ss9"), "")
    submitted = await registry.gov.submit_auth_certificate(MSP_ADMIN, server, fresh, "renewal")
    assert submitted["state"] == "pending"
    content = await registry.store.content()
    assert published() == [old]
    with pytest.raises(Conflict, match="already registered for UY/GOV/MSP/ss1"):
        await registry.gov.submit_auth_certificate(MSP_ADMIN, server, fresh, "")
    sha = submitted["sha256"]
    with pytest.raises(Forbidden):
        await registry.gov.approve_auth_certificate(MSP_ADMIN, server, sha, "my own")
    await registry.gov.approve_auth_certificate(REGISTRY, server, sha, "fingerprint checked")
    content = await registry.store.content()
    new = load_pem_x509_certificate(fresh.encode()).public_bytes(serialization.Encoding.DER)
    assert published() == [old, new]
    [listed] = [s for s in await registry.gov.list_servers(REGISTRY) if s["id"] == str(server)]
    assert [(c["sha256"], c["state"]) for c in listed["next_auth_certificates"]] == [
        (sha, "approved")
    ]
    # the old one retired: the successor becomes the first, and is then the only one
    old_sha = hashlib.sha256(old).hexdigest()
    await registry.gov.retire_auth_certificate(MSP_ADMIN, server, old_sha, "rolled over")
    content = await registry.store.content()
    assert published() == [new]
    with pytest.raises(Conflict, match="only approved authentication certificate"):
        await registry.gov.retire_auth_certificate(MSP_ADMIN, server, sha, "")
    with pytest.raises(NotFound):
        await registry.gov.retire_auth_certificate(MSP_ADMIN, server, old_sha, "again")
    steps = [(r.action, r.to_state) for r in await log_entries(registry, str(server))]
    assert steps[-3:] == [
        ("register_auth_certificate", "pending"),
        ("approve_auth_certificate", "approved"),
        ("retire_auth_certificate", "retired"),
    ]


# ---- backup and restore ------------------------------------------------------------------


# the operator's backup key, kept apart from the backups
BACKUP_KEY = BackupKey(b"k" * 32, Path("/nonexistent/backup.key"))
# the restoring registry's settings.refresh_seconds (the default)
EVERY_MINUTE = 60.0


@asynccontextmanager
async def empty_database_like(url: str, tmp_path: Path) -> AsyncIterator[str]:
    if url.startswith("sqlite"):
        yield database_url(str(tmp_path / "restored.db"), base=tmp_path)
        return
    async with fresh_postgres_database() as pg:
        yield pg


async def test_a_backup_restores_into_an_empty_database_and_goes_on(
    registry: Registry, url: str, tmp_path: Path
) -> None:
    """`gateway registry backup` and `restore`: the restored registry holds what the
    backup held, its admin log verifies and goes on with its chain, and its configuration
    versions go on from the last; a damaged backup, or a database that already holds a
    registry, is refused."""
    await registry.gov.add_member(REGISTRY, MemberId.parse("UY/GOV/BPS"), "BPS")
    async with registry.store.publishing() as slot:
        await slot.save(
            41,
            SignedConfiguration(content=b"{}", signature=b"s", signer_certificate=b"c"),
            admin_seq=slot.head_seq,
            generated_at=START,
        )
    out = tmp_path / "registry-backup.zip"
    taken = await backup(registry.store, out, key=BACKUP_KEY, instance="UY", now=START)
    assert taken.configuration_version == 41 and taken.admin_entries > 0
    assert taken.tables["members"] == 3

    async with empty_database_like(url, tmp_path) as target:
        restored_store = await RegistryStore.open(target)
        try:
            with pytest.raises(BackupError, match="of instance 'UY', this registry's 'AR'"):
                await restore(
                    restored_store,
                    out,
                    key=BACKUP_KEY,
                    instance="AR",
                    now=START,
                    refresh_seconds=EVERY_MINUTE,
                )
            # restored a week later: a registry refreshing every minute has published about
            # 10,080 versions meanwhile, more than the fixed margin; one per second is counted
            week = timedelta(days=7)
            restored = await restore(
                restored_store,
                out,
                key=BACKUP_KEY,
                instance="UY",
                now=START + week,
                refresh_seconds=EVERY_MINUTE,
            )
            assert restored.tables == taken.tables
            assert restored.admin_entries == taken.admin_entries
            assert await restored_store.last_version() == 41 + SKIP_VERSIONS + 7 * 86_400
            again = Registry(restored_store, FakeClock(START))
            # the admin log goes on from the restored head, and still verifies
            await again.gov.add_member(REGISTRY, MemberId.parse("UY/GOV/MEF"), "MEF")
            verified = await again.gov.verify_admin_log(REGISTRY)
            assert verified["verified"] and verified["entries"] == taken.admin_entries + 1
            with pytest.raises(BackupError, match="restore only into an empty database"):
                await restore(
                    restored_store,
                    out,
                    key=BACKUP_KEY,
                    instance="UY",
                    now=START,
                    refresh_seconds=EVERY_MINUTE,
                )
        finally:
            await restored_store.close()

    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(damaged, "w") as copy:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "members.jsonl":
                data = data.replace(b"BPS", b"XYZ")
            copy.writestr(item, data)
    with pytest.raises(BackupError, match="members does not match its SHA-256"):
        read_backup(damaged, BACKUP_KEY)

    # whoever can change a stored backup but not read the key: a member of their own, with
    # the table's SHA-256 and count made to match, is refused before any row is read (the
    # restored registry would sign and publish it)
    edited = tmp_path / "edited.zip"
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(edited, "w") as copy:
        manifest = json.loads(source.read("manifest.json"))
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "members.jsonl":
                first = data.splitlines()[0]
                data += first.replace(b"UY/GOV", b"UY/EVIL", 1) + b"\n"
                manifest["tables"]["members"].update(
                    rows=manifest["tables"]["members"]["rows"] + 1,
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            if item.filename not in ("manifest.json", BACKUP_MAC):
                copy.writestr(item, data)
        raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
        copy.writestr("manifest.json", raw)
        copy.writestr(BACKUP_MAC, BackupKey(b"e" * 32, tmp_path / "evil.key").mac(raw))
    with pytest.raises(BackupError, match="does not match its MAC"):
        read_backup(edited, BACKUP_KEY)

    # a byte flipped on the disk (in the first table holding BPS; stored uncompressed, so
    # that only the CRC tells): a clear error, not zipfile's
    stored = tmp_path / "stored.zip"
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(stored, "w") as copy:
        for item in source.infolist():
            copy.writestr(item.filename, source.read(item), zipfile.ZIP_STORED)
    flipped = bytearray(stored.read_bytes())
    flipped[flipped.index(b"UY/GOV/BPS")] ^= 1
    stored.write_bytes(bytes(flipped))
    with pytest.raises(BackupError, match=r"is damaged: \w+\.jsonl cannot be read \(Bad CRC"):
        read_backup(stored, BACKUP_KEY)


async def test_a_security_server_token_lists_no_agreements_even_naming_a_member(
    registry: Registry,
) -> None:
    """A security-server token reads the catalogue, never agreements: not even by naming a
    member, which listed every agreement of that member, pending ones and their purposes
    included (red-team review)."""
    server = SecurityServerId.parse("UY/GOV/MSP/ss1")
    token = Principal(
        subject=str(server), role=Role.SECURITY_SERVER, member=MSP, server=server, issuer="test"
    )
    await registry.gov.request_agreement(
        MSP_ADMIN, agreement_request("fraud-investigation", reason="confidential")
    )
    assert await registry.gov.list_agreements(token) == []
    for member in (DNIC, MSP):
        assert await registry.gov.list_agreements(token, member=member) == []
    # a member's administrator still lists its own, and another member's only where shared
    own = await registry.gov.list_agreements(MSP_ADMIN, member=MSP)
    assert any("fraud-investigation" in json.dumps(a) for a in own)
    assert await registry.gov.list_agreements(MSP_ADMIN, member=MemberId.parse("UY/GOV/BPS")) == []


async def test_admin_log_scope_compares_member_codes_byte_for_byte(registry: Registry) -> None:
    """Member codes are case-sensitive: the administrator of UY/GOV/msp reads none of the
    entries about UY/GOV/MSP (SQLite's LIKE ignored the case; red-team review)."""
    lower = MemberId.parse("UY/GOV/msp")
    await registry.gov.add_member(REGISTRY, lower, "Another member, lower-case code")
    await registry.gov.request_agreement(
        MSP_ADMIN, agreement_request("healthcare-identification", reason="MSP internal: case 4711")
    )
    seen = await registry.gov.admin_log(member_admin("eve@msp-lower", lower), limit=1000)
    assert seen and all(str(lower) in e["target"] for e in seen), seen
    assert not [e for e in seen if "UY/GOV/MSP" in json.dumps(e)]
    own = await registry.gov.admin_log(MSP_ADMIN, limit=1000)
    assert any(e["action"] == "request" for e in own)


async def test_agreements_past_their_validity_are_marked_expired_by_the_sweep(
    registry: Registry,
) -> None:
    """expire_due marks ended agreements expired, as the registry itself, and publishes them."""
    request = AgreementRequest(
        client=CLINICS,
        service=POPULATION,
        purposes=("short-study",),
        legal_basis=LegalBasis(kind=LegalBasisKind.CONSENT, reference="form 12"),
        valid_until=START + timedelta(hours=1),
    )
    doc = await registry.gov.request_agreement(MSP_ADMIN, request)
    await registry.gov.act(DNIC_ADMIN, doc["id"], Action.APPROVE, "")
    await registry.gov.act(REGISTRY, doc["id"], Action.APPROVE, "")
    assert await registry.gov.expire_due() == 0
    registry.clock.advance(hours=2)
    published = registry.published.calls
    assert await registry.gov.expire_due() == 1
    assert (await state_of(registry, doc["id"]))[0] == AgreementState.EXPIRED.value
    assert registry.published.calls == published + 1
    (entry,) = [r for r in await log_entries(registry, doc["id"]) if r.action == "expire"]
    assert (entry.actor, entry.from_state, entry.to_state) == ("registry", "active", "expired")
    published_states = {a.id: a.state for a in (await registry.store.content()).agreements}
    assert published_states[doc["id"]] is AgreementState.EXPIRED
