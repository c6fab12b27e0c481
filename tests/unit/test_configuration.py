"""Unit tests of gateway.configuration: signed global configuration, anchor, indexes, expiry."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from gateway import canonical
from gateway.agreements import Agreement
from gateway.configuration import (
    Anchor,
    Federation,
    GlobalConfiguration,
    Member,
    OutboundApproval,
    SecurityServer,
    Service,
    SignedConfiguration,
    build_content,
    parse_content,
    sign_configuration,
    verify_configuration,
)
from gateway.errors import AuthorizationError, Code, ConfigurationError, Status
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.signing import EcdsaSigner, certificate_sha256

IssueCert = Callable[..., EcdsaSigner]

DNIC = MemberId.parse("UY/GOV/DNIC")
BPS = MemberId.parse("UY/GOV/BPS")
IDENTITY = SubsystemId.parse("UY/GOV/DNIC/identity")
BENEFITS = SubsystemId.parse("UY/GOV/BPS/benefits")
PERSON = ServiceId.parse("UY/GOV/DNIC/identity/person/v1")
SS_DNIC = SecurityServerId.parse("UY/GOV/DNIC/ss1")
SS_BPS = SecurityServerId.parse("UY/GOV/BPS/ss1")


@dataclasses.dataclass(frozen=True)
class World:
    """A configuration fixture: its content, the signer, the anchor and the certificates."""

    now: datetime
    content: bytes
    signed: SignedConfiguration
    anchor: Anchor
    config_signer: EcdsaSigner
    auth_dnic: EcdsaSigner
    auth_bps: EcdsaSigner
    agreement: Agreement
    content_args: dict[str, Any]


def expect_invalid(call: Callable[[], object]) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        call()
    assert info.value.code is Code.CONFIGURATION_INVALID
    assert info.value.status is Status.FAILED_PRECONDITION
    return info.value


@pytest.fixture
def world(ca: EcdsaSigner, issue: IssueCert, now: datetime) -> World:
    """A signed configuration of instance UY with two members, two servers and one agreement."""
    config_signer = issue("UY configuration signing", kind="config")
    auth_dnic = issue(str(SS_DNIC), kind="auth")
    auth_bps = issue(str(SS_BPS), kind="auth")
    deal = Agreement(
        id="AG-2025-001",
        client=BENEFITS,
        service=PERSON,
        purposes=frozenset({"benefit-eligibility"}),
        valid_from=now - timedelta(days=10),
        valid_until=now + timedelta(days=355),
    )
    args: dict[str, Any] = {
        "instance": "UY",
        "version": 42,
        "generated_at": now - timedelta(minutes=5),
        "expires_at": now + timedelta(hours=1),
        "ca_certificates": [ca.certificate_der],
        "members": [
            Member(id=DNIC, name="Dirección Nacional de Identificación Civil"),
            Member(id=BPS, name="Banco de Previsión Social"),
        ],
        "servers": [
            SecurityServer(
                id=SS_DNIC,
                address="ss1.dnic.gub.uy:8443",
                auth_certificate=auth_dnic.certificate_der,
                subsystems=(IDENTITY,),
            ),
            SecurityServer(
                id=SS_BPS,
                address="ss1.bps.gub.uy:8443",
                auth_certificate=auth_bps.certificate_der,
                subsystems=(BENEFITS,),
            ),
        ],
        "services": [
            Service(
                id=PERSON,
                description="Person lookup",
                methods=("/identity.v1.PersonService/GetPerson",),
            )
        ],
        "agreements": [deal],
    }
    content = build_content(**args)
    return World(
        now=now,
        content=content,
        signed=sign_configuration(content, config_signer),
        anchor=Anchor(
            instance="UY",
            signing_certificates=(config_signer.certificate_der,),
            addresses=("https://registry.gub.uy",),
        ),
        config_signer=config_signer,
        auth_dnic=auth_dnic,
        auth_bps=auth_bps,
        agreement=deal,
        content_args=args,
    )


# ---- build, sign, verify --------------------------------------------------------------


def test_content_is_canonical_and_order_independent(world: World) -> None:
    """build_content yields canonical JSON that does not depend on the order of its inputs."""
    assert canonical.encode(canonical.decode(world.content)) == world.content
    shuffled = dict(world.content_args)
    for key in ("members", "servers", "services", "agreements"):
        shuffled[key] = list(reversed(shuffled[key]))
    assert build_content(**shuffled) == world.content


def test_sign_configuration_carries_signer_certificate(world: World) -> None:
    """sign_configuration keeps the content and attaches the signer's certificate DER."""
    assert world.signed.content == world.content
    assert world.signed.signer_certificate == world.config_signer.certificate_der


def test_verified_configuration_has_its_header_fields(world: World) -> None:
    """A verified configuration reports instance, version and times from the content."""
    config = verify_configuration(world.signed, world.anchor)
    assert config.instance == "UY"
    assert config.version == 42
    assert config.generated_at == world.now - timedelta(minutes=5)
    assert config.expires_at == world.now + timedelta(hours=1)
    assert set(config.members) == {DNIC, BPS}
    assert config.members[BPS].name == "Banco de Previsión Social"
    assert set(config.services) == {PERSON}
    assert config.services[PERSON].methods == ("/identity.v1.PersonService/GetPerson",)


def test_servers_by_auth_sha256(world: World) -> None:
    """servers_by_auth_sha256 finds each server by the SHA-256 of its TLS certificate."""
    config = verify_configuration(world.signed, world.anchor)
    by_auth = config.servers_by_auth_sha256
    assert by_auth[certificate_sha256(world.auth_dnic.certificate_der)].id == SS_DNIC
    assert by_auth[certificate_sha256(world.auth_bps.certificate_der)].id == SS_BPS
    server = by_auth[certificate_sha256(world.auth_dnic.certificate_der)]
    assert server.auth_certificate == world.auth_dnic.certificate_der
    assert server.address == "ss1.dnic.gub.uy:8443"
    assert certificate_sha256(world.config_signer.certificate_der) not in by_auth


def test_servers_hosting(world: World) -> None:
    """servers_hosting returns the servers that host a subsystem, and () for an unknown one."""
    config = verify_configuration(world.signed, world.anchor)
    assert [s.id for s in config.servers_hosting(IDENTITY)] == [SS_DNIC]
    assert [s.id for s in config.servers_hosting(BENEFITS)] == [SS_BPS]
    unknown = SubsystemId.parse("UY/GOV/DNIC/other")
    assert config.servers_hosting(unknown) == ()
    assert config.subsystem_known(IDENTITY)
    assert not config.subsystem_known(unknown)


def test_agreements_decide(world: World) -> None:
    """The configuration's agreement index allows the agreed call and refuses others."""
    config = verify_configuration(world.signed, world.anchor)
    assert config.agreements.decide(BENEFITS, PERSON, "benefit-eligibility", world.now) == (
        world.agreement
    )
    with pytest.raises(AuthorizationError) as info:
        config.agreements.decide(BENEFITS, PERSON, "marketing", world.now)
    assert info.value.code is Code.PURPOSE_NOT_COVERED


def test_trust_store_uses_configured_cas(
    world: World, member_signer: EcdsaSigner, now: datetime
) -> None:
    """The configuration's trust store accepts member certificates issued by its CAs."""
    config = verify_configuration(world.signed, world.anchor)
    assert config.trust.signing_member(member_signer.certificate_der, now)[1] == DNIC


def test_verify_with_several_anchor_certificates(world: World, issue: IssueCert) -> None:
    """A configuration signed by any one of the anchor's certificates is accepted."""
    other = issue("UY configuration signing 2", kind="config")
    anchor = dataclasses.replace(
        world.anchor,
        signing_certificates=(other.certificate_der, world.config_signer.certificate_der),
    )
    assert verify_configuration(world.signed, anchor).version == 42


# ---- rejections -----------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 100, -2, -1])
def test_content_altered_by_one_byte_is_rejected(world: World, position: int) -> None:
    """Changing one byte of the signed content makes the configuration invalid."""
    content = bytearray(world.content)
    content[position] ^= 0x01
    signed = dataclasses.replace(world.signed, content=bytes(content))
    err = expect_invalid(lambda: verify_configuration(signed, world.anchor))
    assert "signature" in err.message


def test_content_altered_meaningfully_is_rejected(world: World) -> None:
    """A well-formed canonical edit (a changed agreement purpose) is rejected by the signature."""
    content = world.content.replace(b'"benefit-eligibility"', b'"benefit-eligibilitx"')
    assert content != world.content
    parse_content(content)  # still a perfectly good configuration on its own
    signed = dataclasses.replace(world.signed, content=content)
    expect_invalid(lambda: verify_configuration(signed, world.anchor))


def test_signature_from_another_key_is_rejected(world: World, issue: IssueCert) -> None:
    """A signature by another key, presented with the anchor's certificate, is rejected."""
    intruder = issue("UY configuration signing", kind="config")
    signed = dataclasses.replace(world.signed, signature=intruder.sign(world.content))
    err = expect_invalid(lambda: verify_configuration(signed, world.anchor))
    assert "signature" in err.message


def test_garbage_signature_is_rejected(world: World) -> None:
    """A signature that is not even DER is rejected as CONFIGURATION_INVALID."""
    signed = dataclasses.replace(world.signed, signature=b"\x00\x01")
    expect_invalid(lambda: verify_configuration(signed, world.anchor))


def test_signer_not_in_anchor_is_rejected(world: World, issue: IssueCert) -> None:
    """A configuration validly signed by a certificate not in the anchor is rejected."""
    outsider = issue("UY configuration signing", kind="config")
    signed = sign_configuration(world.content, outsider)
    err = expect_invalid(lambda: verify_configuration(signed, world.anchor))
    assert "anchor" in err.message


def test_instance_different_from_anchor_is_rejected(world: World) -> None:
    """A configuration for another instance than the anchor's is rejected."""
    anchor = dataclasses.replace(world.anchor, instance="UY-TEST")
    err = expect_invalid(lambda: verify_configuration(world.signed, anchor))
    assert "'UY'" in err.message
    assert "'UY-TEST'" in err.message


def test_signed_content_for_other_instance_is_rejected(world: World) -> None:
    """Content built for another instance, signed by the anchor's key, is still rejected."""
    args = dict(world.content_args, instance="AR")
    signed = sign_configuration(build_content(**args), world.config_signer)
    expect_invalid(lambda: verify_configuration(signed, world.anchor))


def test_server_of_unknown_member_is_rejected(world: World) -> None:
    """A server owned by a member not in the configuration makes it invalid."""
    args = dict(world.content_args, members=[Member(id=BPS, name="BPS")])
    signed = sign_configuration(build_content(**args), world.config_signer)
    err = expect_invalid(lambda: verify_configuration(signed, world.anchor))
    assert "unknown member" in err.message


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.pop("agreements"),
        lambda d: d.update(members=[{"id": "uy/GOV/X", "name": "x"}]),
        lambda d: d.update(ca_certificates=["not base64!"]),
        lambda d: d.update(ca_certificates=["AAAA"]),
        lambda d: d.update(expires_at="tomorrow"),
        lambda d: d.update(version="42x"),
        lambda d: d.update(services=[{"id": "UY/GOV/DNIC/identity/person/v1"}]),
    ],
)
def test_parse_content_rejects_malformed_content(
    world: World, mutate: Callable[[dict[str, Any]], object]
) -> None:
    """Malformed content (even if signed) raises CONFIGURATION_INVALID, never another error."""
    doc = canonical.decode(world.content)
    mutate(doc)
    content = canonical.encode(doc)
    expect_invalid(lambda: parse_content(content))
    signed = sign_configuration(content, world.config_signer)
    expect_invalid(lambda: verify_configuration(signed, world.anchor))


@pytest.mark.parametrize("content", [b"", b"[]", b'{"format": 1}', b"\xff"])
def test_parse_content_rejects_garbage(content: bytes) -> None:
    """Bytes that are not a configuration document raise CONFIGURATION_INVALID."""
    expect_invalid(lambda: parse_content(content))


# ---- expiry ---------------------------------------------------------------------------


def _verified(world: World) -> GlobalConfiguration:
    return verify_configuration(world.signed, world.anchor)


def test_check_current_before_expiry(world: World) -> None:
    """check_current passes before expires_at."""
    config = _verified(world)
    config.check_current(world.now)
    config.check_current(config.expires_at - timedelta(microseconds=1))


@pytest.mark.parametrize(
    "after", [timedelta(0), timedelta(microseconds=1), timedelta(days=30)], ids=str
)
def test_check_current_at_and_after_expiry(world: World, after: timedelta) -> None:
    """check_current raises CONFIGURATION_EXPIRED at and after expires_at."""
    config = _verified(world)
    with pytest.raises(ConfigurationError) as info:
        config.check_current(config.expires_at + after)
    assert info.value.code is Code.CONFIGURATION_EXPIRED
    assert info.value.status is Status.UNAVAILABLE


# ---- anchor ---------------------------------------------------------------------------


def test_anchor_json_round_trip(world: World) -> None:
    """Anchor.from_json(anchor.to_json()) == anchor, through real JSON text."""
    text = json.dumps(world.anchor.to_json())
    assert Anchor.from_json(json.loads(text)) == world.anchor


def test_anchor_json_holds_pem(world: World) -> None:
    """The anchor's JSON holds its certificates as PEM."""
    d = world.anchor.to_json()
    assert d["instance"] == "UY"
    assert d["addresses"] == ["https://registry.gub.uy"]
    [pem] = d["configuration_signing_certificates"]
    assert pem.startswith("-----BEGIN CERTIFICATE-----")


def test_anchor_from_json_verifies_configuration(world: World) -> None:
    """An anchor read back from JSON verifies the configuration it was made for."""
    anchor = Anchor.from_json(json.loads(json.dumps(world.anchor.to_json())))
    assert verify_configuration(world.signed, anchor).instance == "UY"


def _anchor_variants() -> list[Any]:
    return [
        None,
        "garbage",
        42,
        [],
        {},
        {"instance": "UY", "addresses": []},
        {"instance": "UY", "configuration_signing_certificates": []},
        {
            "instance": "UY",
            "configuration_signing_certificates": ["not a pem"],
            "addresses": [],
        },
        {"instance": "UY", "configuration_signing_certificates": [1], "addresses": []},
        {"instance": "UY", "configuration_signing_certificates": None, "addresses": []},
        {"instance": "UY", "configuration_signing_certificates": [], "addresses": []},
    ]


@pytest.mark.parametrize("value", _anchor_variants())
def test_anchor_from_json_rejects_garbage(value: Any) -> None:
    """Anchor.from_json of anything malformed raises CONFIGURATION_INVALID."""
    expect_invalid(lambda: Anchor.from_json(value))


# ---- federation -------------------------------------------------------------------------


def _federated(world: World, issue: IssueCert, **extra: Any) -> tuple[Anchor, bytes]:
    other = Anchor(
        instance="AR",
        signing_certificates=(issue("AR configuration", kind="config").certificate_der,),
        addresses=("registry.gob.ar:7000",),
    )
    args = {**world.content_args, **extra}
    args.setdefault(
        "federations",
        [Federation(anchor=other, active=True, since=world.now - timedelta(days=1))],
    )
    return other, build_content(**args)


def test_federations_and_outbound_approvals_round_trip(world: World, issue: IssueCert) -> None:
    """The anchors an instance federates with, its outbound policy and approvals are part of
    the signed content, and parse back exactly."""
    approval = OutboundApproval(
        client=BENEFITS,
        service=ServiceId.parse("AR/GOB/RENAPER/identity/person/v1"),
        purposes=frozenset({"benefit-eligibility"}),
        approved_at=world.now,
    )
    other, content = _federated(
        world, issue, outbound_approval_required=True, outbound_approvals=[approval]
    )
    config = parse_content(content)
    assert set(config.federations) == {"AR"}
    assert config.federations["AR"].anchor == other and config.federations["AR"].active
    assert config.outbound_approval_required is True
    assert config.outbound_approvals == {(approval.client, approval.service): approval}


def test_an_unfederated_configuration_is_unchanged(world: World) -> None:
    """Without federations or outbound approvals, the content has none of their keys (the
    documents an unfederated instance published before stay byte for byte the same)."""
    doc = canonical.decode(world.content)
    assert not {"federations", "outbound_approval_required", "outbound_approvals"} & set(doc)
    config = parse_content(world.content)
    assert config.federations == {} and config.outbound_approval_required is False


def test_an_ended_federation_stays_listed_as_ended(world: World, issue: IssueCert) -> None:
    """An ended federation is published as ended (so that refusals can say so)."""
    anchor = Anchor(
        instance="AR",
        signing_certificates=(issue("AR configuration", kind="config").certificate_der,),
        addresses=("registry.gob.ar:7000",),
    )
    ended = Federation(
        anchor=anchor, active=False, since=world.now - timedelta(days=9), ended_at=world.now
    )
    _, content = _federated(world, issue, federations=[ended])
    assert parse_content(content).federations["AR"].active is False


def test_federating_with_itself_is_rejected(world: World) -> None:
    """A configuration that lists its own instance as federated is refused."""
    own = Federation(anchor=world.anchor, active=True, since=world.now)
    content = build_content(**{**world.content_args, "federations": [own]})
    error = expect_invalid(lambda: parse_content(content))
    assert "cannot federate with itself" in error.message


# ---- instance binding: a configuration speaks only for its own instance ----------------

FOREIGN_MEMBER = MemberId.parse("AR/GOB/RENAPER")
IMPOSTOR = MemberId.parse("BR/GOV/X")
AR_PERSON = ServiceId.parse("AR/GOB/RENAPER/identity/person/v1")


def _foreign_server(
    world: World, owner: MemberId, subsystems: tuple[SubsystemId, ...]
) -> SecurityServer:
    return SecurityServer(
        id=SecurityServerId(owner=owner, code="evil"),
        address="evil.example:8443",
        auth_certificate=world.auth_bps.certificate_der,
        subsystems=subsystems,
    )


def _binding_cases() -> list[Any]:
    def member(w: World) -> dict[str, Any]:
        return {"members": [*w.content_args["members"], Member(id=FOREIGN_MEMBER, name="x")]}

    def server(w: World) -> dict[str, Any]:
        return {
            **member(w),
            "servers": [
                *w.content_args["servers"],
                _foreign_server(w, FOREIGN_MEMBER, (SubsystemId(member=FOREIGN_MEMBER, code="a"),)),
            ],
        }

    def hosted(w: World) -> dict[str, Any]:
        evil = SecurityServer(
            id=SecurityServerId(owner=BPS, code="ss2"),
            address="evil.example:8443",
            auth_certificate=w.auth_bps.certificate_der,
            subsystems=(SubsystemId(member=IMPOSTOR, code="clinics"),),
        )
        return {"servers": [*w.content_args["servers"], evil]}

    def service(w: World) -> dict[str, Any]:
        return {
            "services": [
                *w.content_args["services"],
                Service(id=AR_PERSON, description="not ours", methods=()),
            ]
        }

    def agreement(w: World) -> dict[str, Any]:
        return {"agreements": [dataclasses.replace(w.agreement, id="AG-X", service=AR_PERSON)]}

    def approval_client(w: World) -> dict[str, Any]:
        return {
            "outbound_approvals": [
                OutboundApproval(
                    client=SubsystemId(member=IMPOSTOR, code="a"),
                    service=AR_PERSON,
                    purposes=frozenset({"p"}),
                    approved_at=w.now,
                )
            ]
        }

    def approval_service(w: World) -> dict[str, Any]:
        return {
            "outbound_approvals": [
                OutboundApproval(
                    client=BENEFITS, service=PERSON, purposes=frozenset({"p"}), approved_at=w.now
                )
            ]
        }

    return [
        pytest.param(member, "member AR/GOB/RENAPER", id="foreign-member"),
        pytest.param(server, "AR/GOB/RENAPER", id="foreign-server"),
        pytest.param(hosted, "subsystem BR/GOV/X/clinics", id="foreign-hosted-subsystem"),
        pytest.param(service, "service AR/GOB/RENAPER/identity/person/v1", id="foreign-service"),
        pytest.param(agreement, "agreement AG-X", id="agreement-for-foreign-service"),
        pytest.param(approval_client, "client BR/GOV/X/a", id="outbound-approval-foreign-client"),
        pytest.param(approval_service, str(PERSON), id="outbound-approval-own-service"),
    ]


@pytest.mark.parametrize(("change", "named"), _binding_cases())
def test_a_configuration_listing_another_instances_party_is_rejected(
    world: World, change: Callable[[World], dict[str, Any]], named: str
) -> None:
    """Members, servers, hosted subsystems, services and agreement services of another
    instance (and outbound approvals not from own client to foreign service) are refused,
    naming the offending id."""
    content = build_content(**{**world.content_args, **change(world)})
    error = expect_invalid(lambda: parse_content(content))
    assert named in error.message


def test_a_member_of_ours_published_by_a_federated_registry_is_rejected(
    world: World, issue: IssueCert
) -> None:
    """AR's registry (its own anchor and key) publishing a member UY/GOV/MSP, an approved
    server of it and its subsystem: AR's configuration is refused as a whole."""
    ar_signer = issue("AR configuration", kind="config")
    msp = MemberId.parse("UY/GOV/MSP")
    content = build_content(
        **{
            **world.content_args,
            "instance": "AR",
            "members": [Member(id=FOREIGN_MEMBER, name="RENAPER"), Member(id=msp, name="MSP")],
            "servers": [
                _foreign_server(world, msp, (SubsystemId(member=msp, code="clinics"),)),
            ],
            "services": [],
            "agreements": [],
        }
    )
    anchor = Anchor(
        instance="AR", signing_certificates=(ar_signer.certificate_der,), addresses=("x:1",)
    )
    signed = sign_configuration(content, ar_signer)
    error = expect_invalid(lambda: verify_configuration(signed, anchor))
    assert "member UY/GOV/MSP" in error.message


def test_a_foreign_agreement_client_is_allowed(world: World) -> None:
    """An agreement's client may be a subsystem of another instance (cross-border)."""
    deal = dataclasses.replace(world.agreement, client=SubsystemId(member=FOREIGN_MEMBER, code="a"))
    config = parse_content(build_content(**{**world.content_args, "agreements": [deal]}))
    assert config.agreements.decide(deal.client, PERSON, "benefit-eligibility", world.now)


# ---- renewal: several authentication certificates of one server ---------------------------


def test_a_renewing_server_is_known_by_each_of_its_certificates(
    world: World, issue: IssueCert
) -> None:
    """During a renewal the configuration lists a server's next certificate beside the
    first; a peer presenting either is that server, and no two servers share one."""
    following = issue(str(SS_DNIC), kind="auth")
    args = dict(world.content_args)
    dnic, bps = args["servers"]
    args["servers"] = [
        dataclasses.replace(dnic, next_auth_certificates=(following.certificate_der,)),
        bps,
    ]
    config = parse_content(build_content(**args))
    for der in (world.auth_dnic.certificate_der, following.certificate_der):
        assert config.servers_by_auth_sha256[certificate_sha256(der)].id == SS_DNIC
    assert (
        config.servers[SS_DNIC].auth_x509s[1].serial_number == following.certificate.serial_number
    )
    # a server without a renewal keeps the entry it always had
    assert b"next_auth_certificates" not in build_content(**world.content_args)
    args["servers"] = [
        dataclasses.replace(dnic, next_auth_certificates=(world.auth_bps.certificate_der,)),
        bps,
    ]
    error = expect_invalid(lambda: parse_content(build_content(**args)))
    assert "list the same authentication certificate" in error.message


def test_an_expired_certificate_leaves_the_published_server_entry(
    world: World, issue: IssueCert
) -> None:
    """The registry leaves out the expired ones of a renewing server's certificates (never
    the last) and says when the next one listed beside another expires."""
    from registry.publisher import without_expired_certificates

    ending = issue(str(SS_DNIC), kind="auth", not_after=world.now + timedelta(days=2))
    following = issue(str(SS_DNIC), kind="auth")
    server = dataclasses.replace(
        world.content_args["servers"][0],
        auth_certificate=ending.certificate_der,
        next_auth_certificates=(following.certificate_der,),
    )
    [kept], soonest = without_expired_certificates((server,), world.now)
    assert kept.auth_certificates == (ending.certificate_der, following.certificate_der)
    assert soonest == ending.certificate.not_valid_after_utc
    [kept], soonest = without_expired_certificates((server,), world.now + timedelta(days=3))
    assert kept.auth_certificates == (following.certificate_der,)
    assert soonest is None
    [kept], _ = without_expired_certificates((server,), world.now + timedelta(days=999))
    assert kept.auth_certificates == (following.certificate_der,)
