"""The exchange's refusal cases in the in-memory harness (`exchange_harness`): the attack,
exchange and trust-fault cases of the end-to-end suites, through the very functions the
gRPC shells call, in milliseconds. Each case checks the code the caller gets, where the
call stopped, and the records each side logged (a refusal is always logged; nothing is
answered without its records)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from gateway import canonical
from gateway.agreements import AgreementState, RateLimit
from gateway.configuration import Member, SecurityServer
from gateway.envelope import RequestHeader, decode_request, decode_response, sha256_hex
from gateway.errors import Code, GatewayError
from gateway.exchange import Envelope, Peer, Refusal, accept_request
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId
from security_server.certificate_status import der_sha256
from tests.unit.conftest import NOW, build_ca, build_certificate
from tests.unit.exchange_harness import (
    AGREEMENT,
    CLINICS,
    DNIC,
    GET_PERSON,
    MSP,
    POPULATION,
    PURPOSE,
    SS_MSP,
    World,
    agreement,
    altered,
    flip,
    ocsp_answer,
    resign,
)

OK = [("request", None), ("response", None)]


@pytest.fixture
def world() -> World:
    return World()


def test_an_allowed_call_is_answered_and_logged_twice_on_each_side(world: World) -> None:
    outcome = world.call(b"person 1.234.567-8", metadata={"gateway-subject": "1.234.567-8"})
    assert outcome.error is None and outcome.body == b"person 1.234.567-8"
    assert world.consumer.kinds() == OK and world.provider.kinds() == OK
    consumer_request, consumer_response = world.consumer.log
    provider_request, provider_response = world.provider.log
    # both sides logged the same signed request and response
    assert consumer_request.header == provider_request.header
    assert consumer_request.signature == provider_request.signature
    assert consumer_response.header == provider_response.header
    assert consumer_request.facts.agreement_id == provider_request.facts.agreement_id == AGREEMENT
    assert consumer_request.facts.subject_ref == provider_request.facts.subject_ref
    assert "1.234.567-8" not in str(consumer_request.fields())  # only its pseudonym
    assert provider_request.facts.peer == str(SS_MSP)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"purpose": "marketing"}, Code.PURPOSE_NOT_COVERED),
        ({"service": "UY/GOV/DNIC/identity/nothing/v1"}, Code.UNKNOWN_SERVICE),
        ({"client": "UY/GOV/MSP/other"}, Code.CLIENT_NOT_SERVED),
        ({"client": "UY/GOV/DNIC/identity"}, Code.CLIENT_NOT_SERVED),
        ({"client": "not an id"}, Code.MALFORMED_IDENTIFIER),
        ({"purpose": ""}, Code.MISSING_METADATA),
        ({"method": "/demo.population.v1.PopulationRegistry/Delete"}, Code.UNKNOWN_METHOD),
        ({"metadata": {"gateway-id": "bad id with spaces"}}, Code.MALFORMED_IDENTIFIER),
        ({"body": b"x" * (64 * 1024 + 1)}, Code.BODY_TOO_LARGE),
    ],
)
def test_the_consumer_refuses_what_may_not_leave_and_logs_it(
    world: World, changes: dict[str, object], code: Code
) -> None:
    outcome = world.call(**changes)  # type: ignore[arg-type]
    assert (outcome.refused_by, outcome.code) == ("consumer", code.value)
    assert world.consumer.kinds() == [("refusal", code.value)]
    assert world.provider.log == []


def test_unverified_ids_are_recorded_as_claims(world: World) -> None:
    world.call(client="UY/GOV/MSP/other")
    [refusal] = world.consumer.log
    assert refusal.facts.client == "claimed:UY/GOV/MSP/other"


@pytest.mark.parametrize(
    ("state", "valid_until", "code"),
    [
        (AgreementState.SUSPENDED, None, Code.AGREEMENT_SUSPENDED),
        (AgreementState.REVOKED, None, Code.AGREEMENT_REVOKED),
        (AgreementState.ACTIVE, NOW - timedelta(minutes=1), Code.AGREEMENT_EXPIRED),
    ],
)
def test_an_agreement_out_of_force_stops_the_call_at_the_consumer(
    state: AgreementState, valid_until: object, code: Code
) -> None:
    world = World(agreements=[agreement(valid_until=valid_until, state=state)])
    assert world.call().code == code.value


def test_an_agreement_revoked_after_the_envelope_left_is_enforced_by_the_provider(
    world: World,
) -> None:
    """The provider is the authority: a request signed under an agreement the provider's
    newer configuration no longer has is refused there."""

    def revoke_in_transit(envelope: Envelope) -> Envelope:
        world.provider.config.current = world.configuration(agreements=[])
        return envelope

    outcome = world.call(request=revoke_in_transit)
    assert (outcome.refused_by, outcome.code) == ("provider", Code.NO_AGREEMENT.value)
    assert world.provider.kinds() == [("refusal", "no_agreement")]
    assert world.consumer.kinds() == [("request", None), ("refusal", "no_agreement")]


def test_an_expired_configuration_refuses_calls(world: World) -> None:
    world.advance(hours=2)
    world.refresh_staples()
    assert world.call().code == Code.CONFIGURATION_EXPIRED.value


def test_the_rate_limit_of_an_agreement_is_counted_by_the_provider() -> None:
    world = World(agreements=[agreement(rate_limit=RateLimit(requests=2, per_seconds=60))])
    codes = [world.call().code for _ in range(3)]
    assert codes == [None, None, Code.RATE_LIMITED.value]
    assert world.provider.kinds()[-1] == ("refusal", "rate_limited")


# ---- what an attacker between the servers, or a misbehaving peer, can try ------------------


def test_a_tampered_signature_is_refused(world: World) -> None:
    outcome = world.call(request=lambda e: altered(e, signature=flip(e.signature, 10)))
    assert (outcome.refused_by, outcome.code) == ("provider", Code.BAD_SIGNATURE.value)
    [refusal] = world.provider.log
    # the client is not proven: a claim in the refusal record
    assert refusal.facts.client == f"claimed:{CLINICS}"
    assert refusal.header is not None


def test_a_tampered_body_is_refused(world: World) -> None:
    outcome = world.call(request=lambda e: altered(e, body=e.body + b"!"))
    assert outcome.code == Code.BODY_DIGEST_MISMATCH.value


def test_a_tampered_header_is_refused(world: World) -> None:
    def other_purpose(envelope: Envelope) -> Envelope:
        doc = canonical.decode(envelope.header)
        assert isinstance(doc, dict)
        return altered(envelope, header=canonical.encode({**doc, "purpose": "marketing"}))

    assert world.call(request=other_purpose).code == Code.BAD_SIGNATURE.value


@pytest.mark.parametrize(
    "header", [b"", b"not json", b"[1]", canonical.encode({"message_id": "x"})]
)
def test_a_malformed_header_is_refused_as_malformed(world: World, header: bytes) -> None:
    outcome = world.call(request=lambda e: altered(e, header=header))
    assert outcome.code == Code.MALFORMED_ENVELOPE.value


def test_a_replayed_envelope_is_refused(world: World) -> None:
    first = world.call()
    assert first.error is None and first.outgoing is not None
    replay = world.call(resend=first.outgoing.envelope)
    assert (replay.refused_by, replay.code) == ("provider", Code.REPLAYED_MESSAGE.value)


@pytest.mark.parametrize(
    ("change", "column"),
    [
        ({"purpose": "care\n2026 status=ok\x1b[31m"}, "purpose"),
        ({"metadata": {"gateway-user-id": "alice\r\nINJECT\x00"}}, "user_id"),
        ({"method": "/a.B/C\nX"}, "method"),
        ({"purpose": "care\u202egnp.exe"}, "purpose"),
    ],
)
def test_a_refused_calls_unchecked_text_is_logged_escaped(
    world: World, change: dict[str, Any], column: str
) -> None:
    """gRPC's server takes any bytes in metadata from a raw HTTP/2 client: a refused call's
    purpose, user or method reaches its record unchecked, and is written there with control
    characters, line breaks and bidirectional overrides escaped, never raw. (Found by a
    red-team review.)"""
    outcome = world.call(**change)
    assert outcome.code == Code.MALFORMED_IDENTIFIER.value
    kept = world.consumer.log[-1].fields()[column]
    assert isinstance(kept, str) and kept.isprintable(), kept
    assert "\\" in kept  # the escapes stand for what was sent


def test_a_refused_request_does_not_use_up_its_id(world: World) -> None:
    """Only a request about to be accepted claims its id: one the provider refused (here
    with its backend not configured) may be sent again with the same id once it can be."""
    same = {"gateway-id": "order-2026-000123"}
    backends = set(world.backends)
    world.backends.clear()
    refused = world.call(metadata=same)
    assert (refused.refused_by, refused.code) == ("provider", Code.BACKEND_UNAVAILABLE.value)
    world.backends.update(backends)
    world.advance(seconds=1)
    assert world.call(metadata=same).error is None


def test_a_member_without_an_agreement_cannot_use_up_another_clients_ids(world: World) -> None:
    """A member with its own registered server and signing key, but no agreement, sends the
    ids the clinics will use (an order number, say): refused, they are not claimed, and the
    clinics' calls with them go through. (Found by a red-team review.)"""
    evil, ss_evil = MemberId.parse("UY/COM/EVIL"), SecurityServerId.parse("UY/COM/EVIL/ss1")
    app = SubsystemId.parse("UY/COM/EVIL/app")
    evil_auth = build_certificate(world.ca, str(ss_evil), kind="auth")
    evil_sign = build_certificate(world.ca, str(evil), kind="sign")
    config = world.configuration()
    world.publish(
        members=[*config.members.values(), Member(id=evil, name="EVIL")],
        servers=[
            *config.servers.values(),
            SecurityServer(
                id=ss_evil,
                address="127.0.0.1:3",
                auth_certificate=evil_auth.certificate_der,
                subsystems=(app,),
            ),
        ],
    )
    header = RequestHeader(
        message_id="order-2026-000123",
        client=app,
        service=POPULATION,
        method=GET_PERSON,
        purpose=PURPOSE,
        sender=ss_evil,
        created_at=world.now,
        body_sha256=sha256_hex(b"x"),
    ).encode()
    envelope = Envelope(
        header=header,
        body=b"x",
        signature=evil_sign.sign(header),
        signer_certificate=evil_sign.certificate_der,
        signer_ocsp=ocsp_answer(evil_sign.certificate, world.ca, world.now),
    )
    peer = Peer(
        evil_auth.certificate,
        der_sha256(evil_auth.certificate),
        ocsp_answer(evil_auth.certificate, world.ca, world.now),
    )
    refused = accept_request(envelope, peer, world.provider, world.backends, world.now)
    assert isinstance(refused, Refusal) and refused.error.code is Code.NO_AGREEMENT
    world.advance(seconds=30)
    assert world.call(metadata={"gateway-id": "order-2026-000123"}).error is None


def test_a_stale_envelope_is_refused(world: World) -> None:
    first = world.call()
    assert first.outgoing is not None
    world.advance(minutes=10)
    world.refresh_staples()
    # the staple is not signed: a replayer can attach a fresh one
    fresh = world.consumer.own_status.staple(world.msp_sign.certificate_sha256)
    outcome = world.call(resend=altered(first.outgoing.envelope, signer_ocsp=fresh))
    assert outcome.code == Code.STALE_MESSAGE.value


def test_an_envelope_signed_by_another_member_is_refused(world: World) -> None:
    """ss-msp's stream carrying a request signed with DNIC's key for MSP's client."""

    staple = world.provider.own_status.staple(world.dnic_sign.certificate_sha256)
    resigned = resign(world.dnic_sign, staple)
    assert world.call(request=resigned).code == Code.UNTRUSTED_SIGNER.value


def test_a_signing_certificate_of_another_ca_is_refused(world: World) -> None:
    rogue_ca = build_ca("Rogue CA")
    rogue = build_certificate(rogue_ca, str(MSP), kind="sign")

    assert world.call(request=resign(rogue)).code == Code.UNTRUSTED_SIGNER.value


def test_an_unregistered_peer_is_refused(world: World) -> None:
    stranger = build_certificate(world.ca, "UY/GOV/MSP/ss9", kind="auth")
    outcome = world.call(peer=world.peer(stranger))
    assert outcome.code == Code.PEER_NOT_REGISTERED.value
    [refusal] = world.provider.log
    assert refusal.facts.peer is not None and refusal.facts.peer.startswith("certificate:")


def test_a_peer_of_another_member_is_refused(world: World) -> None:
    """DNIC's own server relaying a request of MSP's client."""
    peer = world.peer(world.dnic_auth)
    peer.staple = world.provider.own_status.staple(world.provider.auth_sha256)
    outcome = world.call(peer=peer)
    assert outcome.code == Code.PEER_MEMBER_MISMATCH.value


def test_a_peer_without_a_stapled_status_is_refused(world: World) -> None:
    peer = world.peer()
    peer.staple = b""
    assert world.call(peer=peer).code == Code.CERTIFICATE_STATUS_INVALID.value


def test_a_refused_frames_header_and_signature_are_kept_bounded(world: World) -> None:
    outcome = world.call(request=lambda e: altered(e, header=b"x" * 10_000, signature=b"s" * 5000))
    assert outcome.code == Code.MALFORMED_ENVELOPE.value
    [refusal] = world.provider.log
    assert refusal.header == b"x" * 4096 and refusal.signature == b"s" * 1024
    assert refusal.error_message is not None and "cut to 4096" in refusal.error_message


# ---- certificates: expired, revoked, stale --------------------------------------------------


def test_a_revoked_signing_certificate_is_refused_before_it_leaves(world: World) -> None:
    world.refresh_staples(revoked=(world.msp_sign,))
    outcome = world.call()
    assert (outcome.refused_by, outcome.code) == (
        "consumer",
        Code.SIGNER_CERTIFICATE_REVOKED.value,
    )


def test_a_revoked_signing_certificate_stapled_anyway_is_refused_by_the_provider(
    world: World,
) -> None:
    good = world.consumer.own_status.staple(world.msp_sign.certificate_sha256)
    world.refresh_staples(revoked=(world.msp_sign,))
    revoked = world.consumer.own_status.staple(world.msp_sign.certificate_sha256)
    world.consumer.own_status.answers[world.msp_sign.certificate_sha256] = good
    outcome = world.call(request=lambda e: altered(e, signer_ocsp=revoked))
    assert (outcome.refused_by, outcome.code) == (
        "provider",
        Code.SIGNER_CERTIFICATE_REVOKED.value,
    )


def test_a_revoked_provider_certificate_is_not_sent_to(world: World) -> None:
    world.refresh_staples(revoked=(world.dnic_auth,))
    outcome = world.call()
    # the provider refuses to serve with it; a consumer holding its revoked staple sends nothing
    assert outcome.code == Code.PEER_CERTIFICATE_REVOKED.value


def test_stale_staples_are_refused(world: World) -> None:
    world.advance(minutes=20)  # answers produced 20 minutes ago, freshness 10
    assert world.call().code == Code.CERTIFICATE_STATUS_STALE.value


def test_an_expired_signing_certificate_is_refused() -> None:
    world = World()
    expired = build_certificate(
        world.ca,
        str(MSP),
        kind="sign",
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    world.consumer.signers[MSP] = expired
    world.consumer.own_status.answers[expired.certificate_sha256] = ocsp_answer(
        expired.certificate, world.ca, world.now
    )
    # refused before it leaves, as the provider would refuse it
    outcome = world.call()
    assert (outcome.refused_by, outcome.code) == ("consumer", Code.UNTRUSTED_SIGNER.value)
    assert outcome.error is not None and "is not valid at" in outcome.error.message
    # and by the provider, when a consumer sends it all the same
    fresh = World()
    lapsed = build_certificate(
        fresh.ca,
        str(MSP),
        kind="sign",
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )

    refused = fresh.call(
        request=resign(lapsed, ocsp_answer(lapsed.certificate, fresh.ca, fresh.now))
    )
    assert (refused.refused_by, refused.code) == ("provider", Code.UNTRUSTED_SIGNER.value)
    assert refused.error is not None and "is not valid at" in refused.error.message


def test_timestamping_down_past_its_period_refuses_new_calls(world: World) -> None:
    world.consumer.timestamping = GatewayError(
        "no TSA answered", code=Code.TIMESTAMPING_UNAVAILABLE
    )
    assert world.call().code == Code.TIMESTAMPING_UNAVAILABLE.value


# ---- the answer on its way back ------------------------------------------------------------


def test_a_tampered_response_body_is_refused_by_the_consumer(world: World) -> None:
    outcome = world.call(response=lambda e: altered(e, body=b"forged"))
    assert (outcome.refused_by, outcome.code) == ("response", Code.BODY_DIGEST_MISMATCH.value)
    # the provider answered and logged it; the consumer logged its refusal of the answer
    assert world.provider.kinds() == OK
    assert world.consumer.kinds() == [("request", None), ("refusal", "body_digest_mismatch")]


def test_a_response_to_another_request_is_refused(world: World) -> None:
    first = world.call()
    assert first.error is None
    kept: list[Envelope] = []

    def keep(envelope: Envelope) -> Envelope:
        kept.append(envelope)
        return envelope

    world.call(response=keep)
    outcome = world.call(response=lambda _: kept[0])
    assert outcome.code == Code.RESPONSE_MISMATCH.value


def test_a_response_signed_by_the_client_member_is_refused(world: World) -> None:
    staple = world.consumer.own_status.staple(world.msp_sign.certificate_sha256)
    assert world.call(response=resign(world.msp_sign, staple)).code == Code.UNTRUSTED_SIGNER.value


def test_a_response_with_a_forged_status_is_refused(world: World) -> None:
    def forged(envelope: Envelope) -> Envelope:
        doc = canonical.decode(envelope.header)
        assert isinstance(doc, dict)
        return altered(envelope, header=canonical.encode({**doc, "grpc_status": 7}))

    assert world.call(response=forged).code == Code.BAD_SIGNATURE.value


def test_a_backend_error_is_signed_and_passed_through(world: World) -> None:
    world.backend = lambda body: (5, "no such person", b"")
    outcome = world.call()
    assert outcome.error is None
    [_, response] = world.consumer.log
    assert response.status == "backend_error" and response.error_message == "no such person"
    header = decode_response(world.provider.log[1].header or b"")
    assert header.grpc_status == 5


def test_a_request_header_names_what_the_call_asked(world: World) -> None:
    outcome = world.call(metadata={"gateway-user-id": "dr.perez"})
    assert outcome.outgoing is not None
    header = decode_request(outcome.outgoing.envelope.header)
    assert (header.client, header.service, header.method, header.purpose) == (
        CLINICS,
        POPULATION,
        GET_PERSON,
        PURPOSE,
    )
    assert header.sender == SS_MSP and header.user_id == "dr.perez"


def test_the_provider_needs_a_backend_for_the_service(world: World) -> None:
    world.backends = set()
    assert world.call().code == Code.BACKEND_UNAVAILABLE.value


def test_a_signer_key_for_the_member_is_needed(world: World) -> None:
    world.consumer.signers = {DNIC: world.dnic_sign}
    assert world.call().code == Code.CLIENT_NOT_SERVED.value
