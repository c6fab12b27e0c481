"""The registry's store (SQLAlchemy Core; SQLite by default).

Holds members, security servers, services, agreements and the published configuration
versions, so that versions keep increasing across restarts. At this stage its content
is replaced from the topology file at start-up (`replace_topology`).
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.agreements import Agreement
from gateway.configuration import Member, SecurityServer, Service, SignedConfiguration
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time
from registry.topology import Topology

metadata = sa.MetaData()

members = sa.Table(
    "members",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(500), nullable=False),
)
servers = sa.Table(
    "security_servers",
    metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("address", sa.String(300), nullable=False),
    sa.Column("auth_certificate", sa.LargeBinary, nullable=False),
    sa.Column("subsystems", sa.Text, nullable=False),  # JSON list
)
services = sa.Table(
    "services",
    metadata,
    sa.Column("id", sa.String(400), primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("methods", sa.Text, nullable=False),  # JSON list
)
agreements = sa.Table(
    "agreements",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("client", sa.String(300), nullable=False),
    sa.Column("service", sa.String(400), nullable=False),
    sa.Column("purposes", sa.Text, nullable=False),  # JSON list
    sa.Column("valid_from", sa.String(40), nullable=False),
    sa.Column("valid_until", sa.String(40)),
)
configurations = sa.Table(
    "configurations",
    metadata,
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("signer_certificate", sa.LargeBinary, nullable=False),
)


class RegistryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open(cls, url: str) -> RegistryStore:
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def replace_topology(self, topology: Topology) -> None:
        async with self.engine.begin() as conn:
            for table in (agreements, services, servers, members):
                await conn.execute(table.delete())
            if topology.members:
                await conn.execute(
                    members.insert(), [{"id": str(m.id), "name": m.name} for m in topology.members]
                )
            if topology.servers:
                await conn.execute(
                    servers.insert(),
                    [
                        {
                            "id": str(s.id),
                            "address": s.address,
                            "auth_certificate": s.auth_certificate,
                            "subsystems": json.dumps([str(x) for x in s.subsystems]),
                        }
                        for s in topology.servers
                    ],
                )
            if topology.services:
                await conn.execute(
                    services.insert(),
                    [
                        {
                            "id": str(s.id),
                            "description": s.description,
                            "methods": json.dumps(list(s.methods)),
                        }
                        for s in topology.services
                    ],
                )
            if topology.agreements:
                await conn.execute(
                    agreements.insert(),
                    [
                        {
                            "id": a.id,
                            "client": str(a.client),
                            "service": str(a.service),
                            "purposes": json.dumps(sorted(a.purposes)),
                            "valid_from": format_time(a.valid_from),
                            "valid_until": None
                            if a.valid_until is None
                            else format_time(a.valid_until),
                        }
                        for a in topology.agreements
                    ],
                )

    async def load_topology(self) -> Topology:
        async with self.engine.connect() as conn:
            m = (await conn.execute(sa.select(members))).all()
            s = (await conn.execute(sa.select(servers))).all()
            v = (await conn.execute(sa.select(services))).all()
            a = (await conn.execute(sa.select(agreements))).all()
        return Topology(
            members=tuple(Member(id=MemberId.parse(r.id), name=r.name) for r in m),
            servers=tuple(
                SecurityServer(
                    id=SecurityServerId.parse(r.id),
                    address=r.address,
                    auth_certificate=r.auth_certificate,
                    subsystems=tuple(SubsystemId.parse(x) for x in json.loads(r.subsystems)),
                )
                for r in s
            ),
            services=tuple(
                Service(
                    id=ServiceId.parse(r.id),
                    description=r.description,
                    methods=tuple(json.loads(r.methods)),
                )
                for r in v
            ),
            agreements=tuple(
                Agreement(
                    id=r.id,
                    client=SubsystemId.parse(r.client),
                    service=ServiceId.parse(r.service),
                    purposes=frozenset(json.loads(r.purposes)),
                    valid_from=parse_time(r.valid_from),
                    valid_until=None if r.valid_until is None else parse_time(r.valid_until),
                )
                for r in a
            ),
        )

    async def last_version(self) -> int:
        async with self.engine.connect() as conn:
            value = (await conn.execute(sa.select(sa.func.max(configurations.c.version)))).scalar()
        return int(value or 0)

    async def save_configuration(self, version: int, signed: SignedConfiguration) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                configurations.insert().values(
                    version=version,
                    content=signed.content,
                    signature=signed.signature,
                    signer_certificate=signed.signer_certificate,
                )
            )
            # keep a bounded history
            await conn.execute(
                configurations.delete().where(configurations.c.version < version - 100)
            )
