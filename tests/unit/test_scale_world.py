"""The synthetic world of `gateway bench --scale`: counts, a valid admin log, and a
configuration the registry publishes and a security server verifies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from gateway.audit import ADMIN_LOG, ChainHead, verify_chain
from gateway.configuration import Anchor, verify_configuration
from gateway.signing import EcdsaSigner
from gateway_demo.scale_world import Counts, seed_registry
from registry.publisher import Publisher
from registry.store import RegistryStore, admin_log, admin_record
from tests.unit.conftest import IssueCert


def test_counts_scale_from_the_national_world() -> None:
    assert Counts.at(1) == Counts(1000, 3000, 500, 5000, 50_000, 5_000)
    small = Counts.at(0.002)
    assert small == Counts(2, 6, 1, 10, 100, 10)
    assert small.agreements == 110


async def test_seeded_registry_publishes_a_configuration_that_verifies(
    tmp_path: Path, issue: IssueCert
) -> None:
    database = tmp_path / "registry.db"
    report = seed_registry(database, instance="UY", scale=0.002)
    counts = report.counts
    # one entry per item, and one more per expired agreement (its expiry)
    items = counts.members + counts.subsystems + counts.servers + counts.services
    assert report.admin_entries == items + counts.agreements + counts.expired_agreements

    store = await RegistryStore.open(f"sqlite+aiosqlite:///{database}")
    try:
        async with store.read() as conn:
            rows = (await conn.execute(sa.select(admin_log).order_by(admin_log.c.seq))).all()
        head = verify_chain([admin_record(r) for r in rows], ChainHead(fmt=ADMIN_LOG))
        assert head == await store.admin_head()
        assert await store.agreement_states() == {
            "active": counts.active_agreements,
            "expired": counts.expired_agreements,
        }

        signer: EcdsaSigner = issue("UY configuration signing", kind="config")
        publisher = Publisher(
            store=store,
            instance="UY",
            signer=signer,
            ca_certificates=(),
            validity=timedelta(minutes=10),
            clock=lambda: datetime.now(UTC),
        )
        await publisher.publish()
        _, signed, _ = await publisher.whole()
    finally:
        await store.close()
    anchor = Anchor(
        instance="UY", signing_certificates=(signer.certificate_der,), addresses=("x:1",)
    )
    config = verify_configuration(signed, anchor)
    assert len(config.members) == counts.members
    assert len(config.servers) == counts.servers
    assert len(config.services) == counts.services
    # every synthetic server has its own authentication certificate
    assert len(config.servers_by_auth_sha256) == counts.servers
    published = sum(1 for _ in signed.content.split(b'"AGR-SYN-')) - 1
    assert published == counts.agreements
