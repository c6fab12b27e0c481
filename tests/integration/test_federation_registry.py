"""Federation in the registry's governance, in-process, on SQLite and PostgreSQL.

Importing another instance's anchor and ending the federation (who may, which anchors are
refused, states and the admin log), what the store publishes, cross-border agreements
(allowed only for a client of an actively federated instance) and the outbound approval
workflow. Each PostgreSQL test runs in a database of its own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from certs.pki import init_pki, issue, load_issued
from gateway.agreements import AgreementState, LegalBasis, LegalBasisKind
from gateway.configuration import Anchor, build_content, parse_content
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.settings import database_url
from gateway.timeutil import format_time
from gateway.workflow import Action, Policy
from gateway_demo.runner import TEMPLATE
from gateway_ops.auth import Principal, Role
from registry.governance import (
    AgreementRequest,
    Conflict,
    Forbidden,
    Governance,
    InvalidRequest,
    NotFound,
    OutboundRequest,
)
from registry.store import RegistryStore
from registry.topology import load_topology, load_topology_ids

from .test_registry_store import (
    ChangeCounter,
    FakeClock,
    admin,
    fresh_postgres_database,
    member_admin,
    needs_postgres,
)

MSP, DNIC = MemberId.parse("UY/GOV/MSP"), MemberId.parse("UY/GOV/DNIC")
CLINICS = SubsystemId.parse("UY/GOV/MSP/clinics")
POPULATION = ServiceId.parse("UY/GOV/DNIC/identity/population/v1")
AR_CLINICS = SubsystemId.parse("AR/GOB/MINSAL/clinicas")
AR_REGISTRY = ServiceId.parse("AR/GOB/RENAPER/identidad/personas/v1")
# a real clock's time: the anchors' certificates are issued around now
START = datetime.now(UTC).replace(microsecond=0)

REGISTRY = admin("alice@registry")
MSP_ADMIN = member_admin("carla@msp", MSP)
DNIC_ADMIN = member_admin("diego@dnic", DNIC)
BPS_ADMIN = member_admin("bea@bps", MemberId.parse("UY/GOV/BPS"))
AUDITOR = Principal(subject="audit", role=Role.AUDITOR, member=None, server=None, issuer="test")
SERVER = Principal(
    subject="ss1",
    role=Role.SECURITY_SERVER,
    member=None,
    server=SecurityServerId.parse("UY/GOV/MSP/ss1"),
    issuer="test",
)


class Registry:
    """The UY registry's governance over a store, with a fake clock and a publish counter."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self.clock = FakeClock(START)
        self.published = ChangeCounter()
        self.gov = Governance(
            store, instance="UY", policy=Policy(), clock=self.clock, on_change=self.published
        )

    async def actions(self, target: str) -> list[tuple[str, str, str | None, str | None, str]]:
        """(action, actor, from, to, reason) of the admin log entries about `target`."""
        return [
            (e.action, e.actor, e.from_state, e.to_state, e.reason)
            for e in await self.store.admin_entries()
            if e.target == target
        ]


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


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo topology next to a UY PKI, and the PKIs of two other instances, AR and CL."""
    folder = tmp_path_factory.mktemp("federation")
    shutil.copyfile(TEMPLATE, folder / "topology.toml")
    _, uy_members, uy_servers = load_topology_ids(folder / "topology.toml")
    for instance, members, servers in (
        ("UY", list(uy_members), list(uy_servers)),
        ("AR", [MemberId.parse("AR/GOB/MINSAL")], [SecurityServerId.parse("AR/GOB/MINSAL/ss1")]),
        ("CL", [MemberId.parse("CL/GOB/MINSAL")], []),
    ):
        init_pki(
            pki_folder(folder, instance),
            instance=instance,
            members=members,
            servers=servers,
            registry_addresses=[f"{instance.lower()}.registry.example:7000"],
            now=START - timedelta(days=1),
        )
    return folder


def pki_folder(folder: Path, instance: str) -> Path:
    """Where the PKI of `instance` lies (UY's next to the topology, which names its files)."""
    return folder / ("pki" if instance == "UY" else f"pki-{instance.lower()}")


# the anchor's field holding its configuration-signing certificates
CERTIFICATES = "configuration_signing_certificates"


def anchor_of(pkis: Path, instance: str) -> dict[str, Any]:
    """The anchor.json `gateway pki init` wrote for `instance`."""
    doc: dict[str, Any] = json.loads((pki_folder(pkis, instance) / "anchor.json").read_text())
    return doc


@pytest.fixture
async def registry(url: str, pkis: Path) -> AsyncIterator[Registry]:
    """The UY registry seeded with the demo topology."""
    store = await RegistryStore.open(url)
    try:
        reg = Registry(store)
        await reg.gov.seed(load_topology(pkis / "topology.toml"), "topology.toml")
        yield reg
    finally:
        await store.close()


def agreement_for(client: SubsystemId, purpose: str = "cross-border-care") -> AgreementRequest:
    return AgreementRequest(
        client=client,
        service=POPULATION,
        purposes=(purpose,),
        legal_basis=LegalBasis(kind=LegalBasisKind.CONTRACT, reference="Convenio UY-AR 2026"),
        reason="patients treated across the border",
    )


def outbound_for(
    service: ServiceId = AR_REGISTRY, purposes: tuple[str, ...] = ("identity-check",)
) -> OutboundRequest:
    return OutboundRequest(
        client=CLINICS,
        service=service,
        purposes=purposes,
        agreement="AR-AGR-2026-0007",
        reason="identify Argentine patients",
    )


# ---- federate and end --------------------------------------------------------------------


async def test_only_a_registry_administrator_federates_and_ends(
    registry: Registry, pkis: Path
) -> None:
    """Member administrators, auditors and security servers are refused; nothing is logged."""
    reg, anchor = registry, anchor_of(pkis, "AR")
    entries, published = len(await reg.store.admin_entries()), reg.published.calls
    for actor in (MSP_ADMIN, AUDITOR, SERVER):
        with pytest.raises(Forbidden, match="only a registry administrator may federate"):
            await reg.gov.federate(actor, anchor, "trying")
    await reg.gov.federate(REGISTRY, anchor, "Convenio UY-AR 2026")
    for actor in (DNIC_ADMIN, AUDITOR, SERVER):
        with pytest.raises(Forbidden, match="only a registry administrator may end federations"):
            await reg.gov.end_federation(actor, "AR", "trying")
    assert len(await reg.store.admin_entries()) == entries + 1
    assert reg.published.calls == published + 1
    listed = await reg.gov.list_federations(SERVER)  # any token may read them
    assert [(f["instance"], f["state"]) for f in listed] == [("AR", "active")]


async def test_an_anchor_carrying_another_federated_instances_key_is_refused(
    registry: Registry, pkis: Path
) -> None:
    """An anchor naming CL with AR's configuration-signing certificate (a mistake, or AR
    asking to sign as CL) is refused while AR is federated: AR's registry could otherwise
    sign configurations as CL. (A hardening a red-team review asked for.)"""
    await registry.gov.federate(REGISTRY, anchor_of(pkis, "AR"), "Convenio UY-AR 2026")
    ar = anchor_of(pkis, "AR")
    posing = {**anchor_of(pkis, "CL"), CERTIFICATES: ar[CERTIFICATES]}
    with pytest.raises(Conflict, match="is instance AR's too"):
        await registry.gov.federate(REGISTRY, posing, "Convenio UY-CL")
    await registry.gov.federate(REGISTRY, anchor_of(pkis, "CL"), "Convenio UY-CL")


async def test_federation_lifecycle_is_logged_and_published(registry: Registry, pkis: Path) -> None:
    """Federate, end, federate again: each publishes, each is an admin log entry with why,
    and the store's content lists the federation with its anchor and state."""
    reg, gov, clock = registry, registry.gov, registry.clock
    published = reg.published.calls
    first = await gov.federate(REGISTRY, anchor_of(pkis, "AR"), "Convenio UY-AR 2026")
    assert (first["state"], first["since"], first["ended_at"]) == (
        "active",
        format_time(START),
        None,
    )
    assert first["addresses"] == ["ar.registry.example:7000"]
    assert Anchor.from_json(first["anchor"]) == Anchor.from_json(anchor_of(pkis, "AR"))
    (federation,) = (await reg.store.content()).federations
    assert (federation.instance, federation.active, federation.since) == ("AR", True, START)

    ended_at = clock.advance(minutes=10)
    ended = await gov.end_federation(REGISTRY, "AR", "the convention was suspended")
    assert (ended["state"], ended["ended_at"], ended["revision"]) == (
        "ended",
        format_time(ended_at),
        2,
    )
    (federation,) = (await reg.store.content()).federations
    assert (federation.active, federation.ended_at) == (False, ended_at)

    again_at = clock.advance(minutes=10)
    again = await gov.federate(REGISTRY, anchor_of(pkis, "AR"), "the convention resumed")
    assert (again["state"], again["since"], again["ended_at"], again["revision"]) == (
        "active",
        format_time(again_at),
        None,
        3,
    )
    assert reg.published.calls == published + 3
    assert await reg.actions("AR") == [
        ("federate", "alice@registry", None, "active", "Convenio UY-AR 2026"),
        ("end_federation", "alice@registry", "active", "ended", "the convention was suspended"),
        ("federate", "alice@registry", "ended", "active", "the convention resumed"),
    ]
    assert (await gov.verify_admin_log(AUDITOR))["verified"] is True
    # federation entries concern no member: member administrators do not read them
    assert "AR" not in {e["target"] for e in await gov.admin_log(MSP_ADMIN, limit=1000)}

    # the content builds a configuration the core parses, with both federations' states
    content = await reg.store.content()
    config = parse_content(
        build_content(
            instance="UY",
            version=1,
            generated_at=START,
            expires_at=START + timedelta(minutes=10),
            ca_certificates=(),
            members=content.members,
            servers=content.servers,
            services=content.services,
            agreements=content.agreements,
            federations=content.federations,
        )
    )
    assert config.federations["AR"].active is True
    assert config.federations["AR"].since == again_at


def _expired_anchor(pkis: Path) -> dict[str, Any]:
    ca = load_issued(pki_folder(pkis, "CL"), "ca")
    old = issue(
        common_name="CL configuration signing",
        issuer=ca,
        now=START - timedelta(days=400),
        days=30,
        kind="config",
    ).certificate
    return {
        **anchor_of(pkis, "CL"),
        "configuration_signing_certificates": [
            old.public_bytes(serialization.Encoding.PEM).decode()
        ],
    }


def _rsa_anchor(pkis: Path) -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CL configuration signing")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START - timedelta(days=1))
        .not_valid_after(START + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return {**anchor_of(pkis, "CL"), "configuration_signing_certificates": [pem]}


async def test_bad_anchors_are_refused(registry: Registry, pkis: Path) -> None:
    """Our own instance's anchor, malformed anchors, an expired or non-EC certificate, no
    address, a bad instance code: 400; an instance already federated: 409; none is logged or published."""
    reg, gov = registry, registry.gov
    ar = anchor_of(pkis, "AR")
    await gov.federate(REGISTRY, ar, "Convenio UY-AR 2026")
    entries, published = len(await reg.store.admin_entries()), reg.published.calls
    refused: list[tuple[Any, type[Exception], str]] = [
        (anchor_of(pkis, "UY"), InvalidRequest, "cannot federate with itself"),
        ({"instance": "CL"}, InvalidRequest, "anchor is malformed"),
        (
            {**anchor_of(pkis, "CL"), "configuration_signing_certificates": ["not a PEM"]},
            InvalidRequest,
            "anchor is malformed",
        ),
        (
            {**anchor_of(pkis, "CL"), "configuration_signing_certificates": []},
            InvalidRequest,
            "no signing certificate",
        ),
        ({**anchor_of(pkis, "CL"), "addresses": []}, InvalidRequest, "no configuration address"),
        ({**anchor_of(pkis, "CL"), "addresses": ["nowhere"]}, InvalidRequest, "not HOST:PORT"),
        # digits of other scripts: "²" was an internal error, Arabic-Indic ones were stored
        ({**anchor_of(pkis, "CL"), "addresses": ["cfg.cl:²"]}, InvalidRequest, "not HOST:PORT"),
        ({**anchor_of(pkis, "CL"), "addresses": ["cfg.cl:١٢٣"]}, InvalidRequest, "not HOST:PORT"),
        ({**anchor_of(pkis, "CL"), "instance": "chile"}, InvalidRequest, "not an instance code"),
        (_expired_anchor(pkis), InvalidRequest, "is not valid now"),
        (_rsa_anchor(pkis), InvalidRequest, "must hold an EC key"),
        (ar, Conflict, "AR is already federated"),
    ]
    for doc, error, message in refused:
        with pytest.raises(error, match=message):
            await gov.federate(REGISTRY, doc, "a reason")
    with pytest.raises(InvalidRequest, match="federate needs a reason"):
        await gov.federate(REGISTRY, anchor_of(pkis, "CL"), " ")
    with pytest.raises(NotFound, match="does not federate with instance CL"):
        await gov.end_federation(REGISTRY, "CL", "never federated")
    with pytest.raises(InvalidRequest, match="needs a reason"):
        await gov.end_federation(REGISTRY, "AR", "")
    await gov.end_federation(REGISTRY, "AR", "ended")
    with pytest.raises(Conflict, match="already ended"):
        await gov.end_federation(REGISTRY, "AR", "ended twice")
    assert len(await reg.store.admin_entries()) == entries + 1
    assert reg.published.calls == published + 1


# ---- cross-border agreements -------------------------------------------------------------


async def test_cross_border_agreements_need_an_active_federation(
    registry: Registry, pkis: Path
) -> None:
    """A client of another instance is refused (409) until it is federated and after the
    federation ends; meanwhile the agreement goes through the normal workflow and is
    published."""
    reg, gov = registry, registry.gov
    with pytest.raises(Conflict, match="AR, which UY does not federate with"):
        await gov.request_agreement(REGISTRY, agreement_for(AR_CLINICS))
    await gov.federate(REGISTRY, anchor_of(pkis, "AR"), "Convenio UY-AR 2026")

    # the provider's administrator or a registry administrator may ask; nobody else here
    with pytest.raises(Forbidden, match="member administrator of UY/GOV/DNIC may request"):
        await gov.request_agreement(MSP_ADMIN, agreement_for(AR_CLINICS))
    by_registry = await gov.request_agreement(REGISTRY, agreement_for(AR_CLINICS))
    by_provider = await gov.request_agreement(DNIC_ADMIN, agreement_for(AR_CLINICS, "second"))
    assert by_registry["client"] == by_provider["client"] == str(AR_CLINICS)

    await gov.act(DNIC_ADMIN, by_registry["id"], Action.APPROVE, "")
    active = await gov.act(REGISTRY, by_registry["id"], Action.APPROVE, "convention checked")
    assert active["state"] == "active"
    published = {a.id: a for a in (await reg.store.content()).agreements}
    assert published[by_registry["id"]].client == AR_CLINICS
    assert published[by_registry["id"]].state is AgreementState.ACTIVE
    # the provider's administrator sees and acts on it; an unrelated member does not see it
    assert by_registry["id"] in {a["id"] for a in await gov.list_agreements(DNIC_ADMIN)}
    with pytest.raises(NotFound):
        await gov.get_agreement(BPS_ADMIN, by_registry["id"])
    suspended = await gov.act(DNIC_ADMIN, by_registry["id"], Action.SUSPEND, "audit")
    assert suspended["state"] == "suspended"

    await gov.end_federation(REGISTRY, "AR", "the convention ended")
    with pytest.raises(Conflict, match="whose federation with UY ended at"):
        await gov.request_agreement(REGISTRY, agreement_for(AR_CLINICS, "third"))
    # nor is one asked before the end approved, or a suspended one resumed (either would go
    # live unseen if the federation came back; red-team review)
    for who in (DNIC_ADMIN, REGISTRY):
        with pytest.raises(Conflict, match="whose federation with UY ended at"):
            await gov.act(who, by_provider["id"], Action.APPROVE, "convention checked")
    with pytest.raises(Conflict, match="whose federation with UY ended at"):
        await gov.act(DNIC_ADMIN, by_registry["id"], Action.RESUME, "audit done")
    assert (await gov.get_agreement(REGISTRY, by_provider["id"]))["state"] == "requested"
    assert (await gov.get_agreement(REGISTRY, by_registry["id"]))["state"] == "suspended"
    with pytest.raises(Conflict, match="CL, which UY does not federate with"):
        await gov.request_agreement(
            REGISTRY, agreement_for(SubsystemId.parse("CL/GOB/MINSAL/hospitales"))
        )
    entries = await reg.actions(by_registry["id"])
    assert [e[:4] for e in entries] == [
        ("request", "alice@registry", None, "requested"),
        ("approve", "diego@dnic", "requested", "approved_by_provider"),
        ("approve", "alice@registry", "approved_by_provider", "active"),
        ("suspend", "diego@dnic", "active", "suspended"),
    ]


# ---- outbound approvals ------------------------------------------------------------------


async def test_outbound_approval_workflow_and_publication(registry: Registry, pkis: Path) -> None:
    """Request (the client's member administrator), approve (registry administrator),
    revoke: each logged; only an approved one is published; refusals say why."""
    reg, gov, clock = registry, registry.gov, registry.clock
    with pytest.raises(Conflict, match="AR, which UY does not federate with"):
        await gov.request_outbound(MSP_ADMIN, outbound_for())
    await gov.federate(REGISTRY, anchor_of(pkis, "AR"), "Convenio UY-AR 2026")
    with pytest.raises(InvalidRequest, match="belongs to this instance"):
        await gov.request_outbound(MSP_ADMIN, outbound_for(POPULATION))
    with pytest.raises(Forbidden, match="member administrator of UY/GOV/MSP"):
        await gov.request_outbound(DNIC_ADMIN, outbound_for())
    with pytest.raises(InvalidRequest, match="purpose"):
        await gov.request_outbound(MSP_ADMIN, outbound_for(purposes=("not a purpose",)))

    published = reg.published.calls
    requested = await gov.request_outbound(MSP_ADMIN, outbound_for())
    approval_id = requested["id"]
    assert approval_id == f"OUT-{START.year}-0001"
    assert (requested["state"], requested["agreement"], requested["requested_by"]) == (
        "requested",
        "AR-AGR-2026-0007",
        "carla@msp",
    )
    assert reg.published.calls == published  # nothing published changes yet
    assert (await reg.store.content()).outbound_approvals == ()
    with pytest.raises(Conflict, match=f"{approval_id} .* is already requested"):
        await gov.request_outbound(REGISTRY, outbound_for(purposes=("other",)))

    with pytest.raises(Forbidden, match="only a registry administrator may approve"):
        await gov.approve_outbound(MSP_ADMIN, approval_id, "")
    with pytest.raises(NotFound, match=f"outbound approval {approval_id} does not exist"):
        await gov.approve_outbound(DNIC_ADMIN, approval_id, "")
    with pytest.raises(Forbidden, match="auditor token cannot change outbound"):
        await gov.revoke_outbound(AUDITOR, approval_id, "auditors read")
    assert [a["id"] for a in await gov.list_outbound(MSP_ADMIN)] == [approval_id]
    assert await gov.list_outbound(DNIC_ADMIN) == []
    assert await gov.list_outbound(SERVER) == []

    approved_at = clock.advance(minutes=5)
    approved = await gov.approve_outbound(REGISTRY, approval_id, "convention checked")
    assert (approved["state"], approved["approved_at"]) == ("approved", format_time(approved_at))
    assert reg.published.calls == published + 1
    (outbound,) = (await reg.store.content()).outbound_approvals
    assert (outbound.client, outbound.service, outbound.purposes, outbound.approved_at) == (
        CLINICS,
        AR_REGISTRY,
        frozenset({"identity-check"}),
        approved_at,
    )
    with pytest.raises(Conflict, match="it is approved; only a requested one"):
        await gov.approve_outbound(REGISTRY, approval_id, "again")

    with pytest.raises(InvalidRequest, match="revoke needs a reason"):
        await gov.revoke_outbound(MSP_ADMIN, approval_id, "")
    revoked = await gov.revoke_outbound(MSP_ADMIN, approval_id, "the study ended")
    assert revoked["state"] == "revoked"
    assert reg.published.calls == published + 2
    assert (await reg.store.content()).outbound_approvals == ()
    with pytest.raises(Conflict, match="already revoked"):
        await gov.revoke_outbound(REGISTRY, approval_id, "again")

    # a new one may be asked once the old one is revoked; it cannot be approved once the
    # federation ended
    second = await gov.request_outbound(MSP_ADMIN, outbound_for(purposes=("other",)))
    await gov.end_federation(REGISTRY, "AR", "the convention ended")
    with pytest.raises(Conflict, match="federation with UY ended"):
        await gov.approve_outbound(REGISTRY, second["id"], "too late")

    assert await reg.actions(approval_id) == [
        ("request_outbound", "carla@msp", None, "requested", "identify Argentine patients"),
        ("approve_outbound", "alice@registry", "requested", "approved", "convention checked"),
        ("revoke_outbound", "carla@msp", "approved", "revoked", "the study ended"),
    ]
    msp_log = {e["target"] for e in await gov.admin_log(MSP_ADMIN, limit=1000)}
    assert approval_id in msp_log
    assert approval_id not in {e["target"] for e in await gov.admin_log(DNIC_ADMIN, limit=1000)}
    assert (await gov.verify_admin_log(AUDITOR))["verified"] is True
