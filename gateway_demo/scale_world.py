"""A synthetic national instance for `gateway bench --scale F`, seeded in bulk.

At F = 1 the world is 1,000 members, 3,000 subsystems (three per member), 500 security
servers (one per member for the first 500 members, hosting that member's subsystems),
5,000 services, 50,000 active and 5,000 expired agreements between random subsystems and
services (a fixed random seed, so every run builds the same world).

Seeding through the admin API or the topology import costs several queries per item
(about a minute per 10,000 agreements on SQLite); `seed_registry` instead writes the rows
the registry reads, and the admin log entries the same changes would have appended, in
one transaction with `executemany`: the entries are linked onto the log's head with the
admin log's own hash chain (`ChainHead.link`), exactly as `registry.store.Change.log`
would link them, so `GET /v1/admin-log/verify` still holds, and the registry publishes
the rows as it publishes anything else. Each item is recorded as the topology seed records
it (actor `registry`, reason `imported from <source>`); an expired agreement has its
`import` entry followed by the `expire` transition the registry makes itself.

Every synthetic server gets its own authentication certificate (the registry refuses two
servers with one): self-signed, all over one P-256 key, which makes 500 of them cost
milliseconds; the configuration only carries their DER.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.agreements import Agreement, AgreementState, LegalBasis, LegalBasisKind
from gateway.audit import ADMIN_LOG, ChainHead, FieldValue
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time
from registry.migrations import upgrade
from registry.store import (
    ServerStatus,
    admin_head,
    admin_log,
    agreement_values,
    agreements,
    members,
    servers,
    services,
    subsystems,
)

# the world at F = 1 (issue 13)
BASE = {
    "members": 1_000,
    "subsystems": 3_000,
    "servers": 500,
    "services": 5_000,
    "active_agreements": 50_000,
    "expired_agreements": 5_000,
}
CLASSES = ("GOV", "COM", "NGO")
PURPOSES = ("service-delivery", "eligibility", "statistics", "fraud-prevention", "healthcare")
CATEGORIES = ("identity", "address", "income", "health", "education")


@dataclass(frozen=True, slots=True)
class Counts:
    members: int
    subsystems: int
    servers: int
    services: int
    active_agreements: int
    expired_agreements: int

    @classmethod
    def at(cls, scale: float) -> Counts:
        """F times the base world, at least one of each (three subsystems per member)."""
        n = {k: max(1, round(v * scale)) for k, v in BASE.items()}
        n["subsystems"] = 3 * n["members"]
        n["servers"] = min(n["servers"], n["members"])
        return cls(**n)

    @property
    def agreements(self) -> int:
        return self.active_agreements + self.expired_agreements


@dataclass(frozen=True, slots=True)
class SeedReport:
    counts: Counts
    admin_entries: int
    seconds: float


def synthetic_certificates(count: int, now: datetime) -> list[bytes]:
    """`count` distinct self-signed authentication certificates (DER) over one key."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    out = []
    for i in range(count):
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"synthetic security server {i}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway bench --scale"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


class _Log:
    """Admin log entries linked as `registry.store.Change.log` links them."""

    def __init__(self, head: ChainHead, at: datetime, source: str) -> None:
        self.head = head
        self.rows: list[dict[str, Any]] = []
        self.at = format_time(at)
        self.reason = f"imported from {source}"

    def add(
        self,
        *,
        action: str,
        target: str,
        concerns: set[str],
        details: dict[str, Any] | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
    ) -> None:
        fields: dict[str, FieldValue] = {
            "logged_at": self.at,
            "actor": "registry",
            "role": "registry-admin",
            "action": action,
            "target": target,
            "from_state": from_state,
            "to_state": to_state,
            "reason": self.reason if reason is None else reason,
            "details": json.dumps(details or {}, sort_keys=True, separators=(",", ":")),
        }
        record = self.head.link(fields)
        self.rows.append(
            {
                "seq": record.seq,
                "prev_hash": record.prev_hash,
                "hash": record.hash,
                "members": " ".join(sorted(concerns)),
                **fields,
            }
        )


def seed_registry(
    database: Path,
    *,
    instance: str,
    scale: float,
    now: datetime | None = None,
    source: str = "gateway bench --scale",
    seed: int = 13,
) -> SeedReport:
    """Create (migrate) the registry's SQLite database and bulk-insert F times the world.

    Call before the registry starts (it must not run meanwhile). Items get identifiers
    `INSTANCE/CLASS/SYNnnnnn[/subK[/svcN/v1]]` and agreements `AGR-SYN-nnnnnnn`, so they
    never collide with the demo topology's or with identifiers the API assigns."""
    import time

    started = time.perf_counter()
    now = now or datetime.now(UTC).replace(microsecond=0)
    counts = Counts.at(scale)
    rng = random.Random(seed)
    stamp = format_time(now)
    database.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            upgrade(conn)
        with engine.begin() as conn:
            head_row = conn.execute(sa.select(admin_head).where(admin_head.c.id == 1)).one()
            log = _Log(
                ChainHead(int(head_row.next_seq), bytes(head_row.last_hash), ADMIN_LOG),
                now,
                source,
            )
            member_ids = [
                MemberId.parse(f"{instance}/{CLASSES[i % len(CLASSES)]}/SYN{i:05d}")
                for i in range(counts.members)
            ]
            member_rows = []
            for i, m in enumerate(member_ids):
                name = f"Synthetic agency {i}"
                member_rows.append({"id": str(m), "name": name, "created_at": stamp})
                log.add(
                    action="add_member", target=str(m), concerns={str(m)}, details={"name": name}
                )
            subs = [SubsystemId(member=m, code=f"sub{k}") for m in member_ids for k in range(3)]
            sub_rows = []
            for s in subs:
                sub_rows.append({"id": str(s), "member": str(s.member), "created_at": stamp})
                log.add(action="add_subsystem", target=str(s), concerns={str(s.member)})
            server_rows = []
            for i, der in enumerate(synthetic_certificates(counts.servers, now)):
                owner = member_ids[i]
                sid = SecurityServerId(owner=owner, code="ss1")
                hosted = sorted(str(SubsystemId(member=owner, code=f"sub{k}")) for k in range(3))
                address = f"ss1.syn{i:05d}.invalid:7443"
                server_rows.append(
                    {
                        "id": str(sid),
                        "member": str(owner),
                        "address": address,
                        "auth_certificate": der,
                        "subsystems": json.dumps(hosted),
                        "status": ServerStatus.APPROVED,
                        "submitted_at": stamp,
                    }
                )
                log.add(
                    action="register_server",
                    target=str(sid),
                    concerns={str(owner)},
                    to_state=ServerStatus.APPROVED,
                    details={"address": address, "subsystems": hosted},
                )
            # services only on subsystems a synthetic server hosts, so each is reachable
            hosted_subs = subs[: 3 * counts.servers]
            service_ids = [
                ServiceId(subsystem=hosted_subs[j % len(hosted_subs)], code=f"svc{j}", version="v1")
                for j in range(counts.services)
            ]
            service_rows = []
            for j, svc in enumerate(service_ids):
                methods = [
                    f"/synthetic.svc{j}.v1.Service/Get",
                    f"/synthetic.svc{j}.v1.Service/List",
                ]
                cats = sorted(rng.sample(CATEGORIES, 2))
                service_rows.append(
                    {
                        "id": str(svc),
                        "subsystem": str(svc.subsystem),
                        "member": str(svc.member),
                        "description": f"Synthetic service {j} of {svc.member}",
                        "methods": json.dumps(methods),
                        "interface": "",
                        "data_categories": json.dumps(cats),
                        "legal_basis": "",
                        "contact": "",
                    }
                )
                log.add(
                    action="add_service",
                    target=str(svc),
                    concerns={str(svc.member)},
                    details={"methods": methods, "data_categories": cats},
                )
            agreement_rows = []
            expire_entries = []
            start = datetime(2026, 1, 1, tzinfo=UTC)
            for n in range(counts.agreements):
                expired = n >= counts.active_agreements
                client = subs[rng.randrange(len(subs))]
                j = rng.randrange(len(service_ids))
                service = service_ids[j]
                cats = json.loads(service_rows[j]["data_categories"])
                a = Agreement(
                    id=f"AGR-SYN-{n + 1:07d}",
                    client=client,
                    service=service,
                    purposes=frozenset(rng.sample(PURPOSES, rng.randint(1, 2))),
                    valid_from=start,
                    valid_until=now - timedelta(days=1 + n % 30) if expired else None,
                    state=AgreementState.ACTIVE,
                    legal_basis=LegalBasis(
                        kind=LegalBasisKind.LAW, reference=f"Synthetic law {n % 97}"
                    ),
                    data_categories=frozenset(cats[:1]),
                )
                concerns = {str(client.member), str(service.member)}
                log.add(
                    action="import",
                    target=a.id,
                    concerns=concerns,
                    to_state=AgreementState.ACTIVE.value,
                    details=a.to_json(),
                )
                values = agreement_values(a)
                revision = 1
                if expired:
                    values["state"] = AgreementState.EXPIRED.value
                    revision = 2
                    expire_entries.append((a.id, concerns))
                agreement_rows.append(
                    {**values, "revision": revision, "created_at": stamp, "updated_at": stamp}
                )
            # the registry's own expiry pass, as `Governance.expire_due` records it
            for agreement_id, concerns in expire_entries:
                log.add(
                    action="expire",
                    target=agreement_id,
                    concerns=concerns,
                    from_state=AgreementState.ACTIVE.value,
                    to_state=AgreementState.EXPIRED.value,
                    reason="its validity ended",
                    details={"as": ["system"], "revision": 2},
                )
            for table, rows in (
                (members, member_rows),
                (subsystems, sub_rows),
                (servers, server_rows),
                (services, service_rows),
                (agreements, agreement_rows),
                (admin_log, log.rows),
            ):
                conn.execute(table.insert(), rows)
            conn.execute(
                admin_head.update()
                .where(admin_head.c.id == 1)
                .values(next_seq=log.head.next_seq, last_hash=log.head.last_hash)
            )
    finally:
        engine.dispose()
    return SeedReport(
        counts=counts, admin_entries=len(log.rows), seconds=time.perf_counter() - started
    )
