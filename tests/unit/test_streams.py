"""Streaming calls in the core (gateway.streams, gateway.exchange with `stream`): the hash
chains, the signed closes and the refusals, in the in-memory harness (no socket). The
gRPC shells and real peers are tested in tests/integration/test_streams.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import pytest

from gateway import canonical, envelope
from gateway.agreements import AgreementState
from gateway.configuration import Service, parse_content
from gateway.envelope import StreamClose, decode_answer, decode_close, decode_request
from gateway.errors import Code, GatewayError
from gateway.exchange import (
    Accepted,
    Call,
    Envelope,
    Outgoing,
    Refusal,
    accept_request,
    check_still_agreed,
    start_call,
)
from gateway.signing import EcdsaSigner
from gateway.streams import (
    REQUEST,
    RESPONSE,
    Chain,
    SignedClose,
    chain_of,
    check_close,
    close_record,
    frame_messages,
    seed,
    sign_close,
    unframe_messages,
)
from security_server.streams import OpenStreams
from tests.unit.exchange_harness import (
    CLINICS,
    GET_PERSON,
    POPULATION,
    PURPOSE,
    SS_DNIC,
    SS_MSP,
    World,
    agreement,
)

CHAT = "/demo.population.v1.PopulationRegistry/Chat"


# ---- the chain ---------------------------------------------------------------------------


def test_links_are_sha256_of_the_previous_link_and_the_message() -> None:
    header = b'{"a request header"}'
    chain = Chain(RESPONSE, header)
    first = hashlib.sha256(b"response\n" + header).digest()
    assert chain.link == first == seed(RESPONSE, header)
    seq, link = chain.extend(b"one")
    assert (seq, link) == (1, hashlib.sha256(first + b"one").digest())
    assert (chain.count, chain.size, chain.digest) == (1, 3, link.hex())
    assert Chain(REQUEST, header).link != first  # each direction has its own chain


def received_after(messages: list[tuple[int, bytes, bytes]]) -> Chain:
    chain = Chain(REQUEST, b"h")
    for seq, body, link in messages:
        chain.accept(seq, body, link)
    return chain


def messages(*bodies: bytes) -> list[tuple[int, bytes, bytes]]:
    chain = Chain(REQUEST, b"h")
    out = []
    for body in bodies:
        seq, link = chain.extend(body)
        out.append((seq, body, link))
    return out


def test_a_receiver_accepts_the_messages_in_order() -> None:
    chain = received_after(messages(b"a", b"b", b"c"))
    expected = Chain(REQUEST, b"h")
    for body in (b"a", b"b", b"c"):
        expected.extend(body)
    assert (chain.count, chain.digest, chain.size) == (3, expected.digest, 3)


@pytest.mark.parametrize(
    ("order", "code"),
    [
        ([0, 2], Code.STREAM_OUT_OF_ORDER),  # dropped
        ([1, 0], Code.STREAM_OUT_OF_ORDER),  # reordered
        ([0, 0], Code.STREAM_OUT_OF_ORDER),  # replayed
    ],
)
def test_a_receiver_refuses_messages_out_of_order(order: list[int], code: Code) -> None:
    all_ = messages(b"a", b"b", b"c")
    with pytest.raises(GatewayError) as caught:
        received_after([all_[i] for i in order])
    assert caught.value.code is code


def test_a_receiver_refuses_an_altered_message() -> None:
    (seq, _, link), *_ = messages(b"a")
    with pytest.raises(GatewayError) as caught:
        received_after([(seq, b"b", link)])
    assert caught.value.code is Code.STREAM_DIGEST_MISMATCH


def test_a_sender_keeps_recent_links_for_the_providers_close() -> None:
    chain = Chain(REQUEST, b"h", keep=2)
    links = [chain.extend(bytes([i]))[1] for i in range(4)]
    assert chain.link_at(4) == links[3] and chain.link_at(3) == links[2]
    assert chain.link_at(1) is None  # older than what is kept


# ---- a streaming call in the harness -----------------------------------------------------


@dataclass
class Stream:
    world: World
    out: Outgoing
    accepted: Accepted


def streaming_world() -> World:
    world = World()
    world.publish(
        services=[
            Service(
                id=POPULATION,
                description="Population registry",
                methods=(GET_PERSON, CHAT),
                streams=((CHAT, "bidi"),),
            )
        ]
    )
    return world


def stream_call(
    world: World, *, method: str = CHAT, kind: str | None = "bidi", message_id: str = "generated-1"
) -> Outgoing | Refusal:
    return start_call(
        Call(
            method=method,
            metadata={
                "gateway-client": str(CLINICS),
                "gateway-service": str(POPULATION),
                "gateway-purpose": PURPOSE,
            },
            body=b"",
            in_flight=1,
            generated_id=message_id,
            stream=kind,
        ),
        world.consumer,
        world.now,
    )


def opened(world: World) -> Stream:
    out = stream_call(world)
    assert isinstance(out, Outgoing), out
    accepted = accept_request(
        out.envelope, world.peer(), world.provider, world.backends, world.now, stream=True
    )
    assert isinstance(accepted, Accepted), accepted
    return Stream(world, out, accepted)


def test_a_stream_opens_with_a_signed_header_naming_its_kind() -> None:
    stream = opened(streaming_world())
    header = decode_request(stream.out.envelope.header)
    assert header.stream == "bidi"
    assert header.body_sha256 == envelope.sha256_hex(b"")
    assert stream.accepted.header == header
    assert stream.out.record.kind.value == stream.accepted.record.kind.value == "request"


def test_the_catalogue_decides_the_kind() -> None:
    world = streaming_world()
    as_unary = stream_call(world, kind=None)
    assert isinstance(as_unary, Refusal) and as_unary.error.code is Code.UNKNOWN_METHOD
    wrong_kind = stream_call(world, kind="server")
    assert isinstance(wrong_kind, Refusal) and wrong_kind.error.code is Code.UNKNOWN_METHOD
    unary_as_stream = stream_call(world, method=GET_PERSON, kind="bidi")
    assert isinstance(unary_as_stream, Refusal)
    assert unary_as_stream.error.code is Code.UNKNOWN_METHOD


def test_the_provider_refuses_a_stream_header_in_a_frame_and_a_unary_one_on_a_stream() -> None:
    world = streaming_world()
    out = stream_call(world)
    assert isinstance(out, Outgoing)
    in_a_frame = accept_request(
        out.envelope, world.peer(), world.provider, world.backends, world.now
    )
    assert isinstance(in_a_frame, Refusal)
    assert in_a_frame.error.code is Code.MALFORMED_ENVELOPE
    unary = world.call()  # a unary call, to get its signed envelope
    assert unary.outgoing is not None
    on_a_stream = accept_request(
        unary.outgoing.envelope,
        world.peer(),
        world.provider,
        world.backends,
        world.now,
        stream=True,
    )
    assert isinstance(on_a_stream, Refusal)
    assert on_a_stream.error.code in (Code.MALFORMED_ENVELOPE, Code.REPLAYED_MESSAGE)


def test_a_stream_whose_header_claims_another_kind_than_the_catalogue_is_refused() -> None:
    world = streaming_world()
    out = stream_call(world)
    assert isinstance(out, Outgoing)
    signer = world.consumer.signers[CLINICS.member]
    header = replace(decode_request(out.envelope.header), stream="server").encode()
    forged = Envelope(
        header=header,
        body=b"",
        signature=signer.sign(header),
        signer_certificate=out.envelope.signer_certificate,
        signer_ocsp=out.envelope.signer_ocsp,
    )
    refused = accept_request(
        forged, world.peer(), world.provider, world.backends, world.now, stream=True
    )
    assert isinstance(refused, Refusal) and refused.error.code is Code.UNKNOWN_METHOD


def closes(
    stream: Stream, bodies: list[bytes], answers: list[bytes]
) -> tuple[Chain, Chain, SignedClose]:
    """The consumer's request chain and close, after `bodies` were sent and `answers` came."""
    world, out = stream.world, stream.out
    header = out.envelope.header
    request_sent = Chain(REQUEST, header, keep=16)
    for body in bodies:
        request_sent.extend(body)
    signer = world.consumer.signers[CLINICS.member]
    close = sign_close(out.header, header, request_sent, signer, SS_MSP, world.now)
    response_sent = Chain(RESPONSE, header)
    for body in answers:
        response_sent.extend(body)
    return request_sent, response_sent, close


def check_request_close(
    stream: Stream, close: SignedClose, received: Chain, signer: EcdsaSigner | None = None
) -> StreamClose:
    world = stream.world
    signer = signer or world.consumer.signers[CLINICS.member]
    return check_close(
        close.header,
        close.signature,
        signer.certificate_der,
        request=stream.accepted.header,
        request_header=stream.accepted.envelope.header,
        received=received,
        sender=SS_MSP,
        config=world.provider.config.require(world.now),
        now=world.now,
    )


def test_both_closes_verify_and_the_response_names_what_was_received() -> None:
    stream = opened(streaming_world())
    world, header = stream.world, stream.out.envelope.header
    request_sent, response_sent, close = closes(stream, [b"a", b"b"], [b"x"])
    received = Chain(REQUEST, header)
    for seq, body in enumerate((b"a", b"b"), 1):
        received.accept(seq, body, request_sent.link_at(seq) or b"")
    checked = check_request_close(stream, close, received)
    assert (checked.direction, checked.count, checked.size) == (REQUEST, 2, 2)
    provider_signer = world.provider.signers[POPULATION.member]
    answer = sign_close(
        stream.accepted.header,
        header,
        response_sent,
        provider_signer,
        SS_DNIC,
        world.now,
        received=received,
        grpc_status=5,
        grpc_message="not found",
    )
    arrived = Chain(RESPONSE, header)
    arrived.accept(1, b"x", response_sent.link)
    ended = check_close(
        answer.header,
        answer.signature,
        provider_signer.certificate_der,
        request=stream.out.header,
        request_header=header,
        received=arrived,
        sender=SS_DNIC,
        config=world.consumer.config.require(world.now),
        now=world.now,
        sent=request_sent,
    )
    assert (ended.grpc_status, ended.request_count, ended.request_digest) == (
        5,
        2,
        request_sent.digest,
    )
    record = close_record(
        stream.out.record.role,
        stream.out.facts,
        (answer.header, ended, answer.signature),
        "s",
        None,
        world.now,
    )
    assert (record.kind.value, record.status, record.error_message) == (
        "response",
        "backend_error",
        "not found",
    )
    assert (
        close_record(
            stream.accepted.record.role, stream.accepted.facts, close, "s", None, world.now
        ).kind.value
        == "stream-close"
    )


def test_a_close_that_does_not_match_what_arrived_is_refused() -> None:
    stream = opened(streaming_world())
    request_sent, _, close = closes(stream, [b"a", b"b"], [])
    fewer = Chain(REQUEST, stream.out.envelope.header)
    fewer.accept(1, b"a", request_sent.link_at(1) or b"")
    with pytest.raises(GatewayError) as caught:
        check_request_close(stream, close, fewer)
    assert caught.value.code is Code.STREAM_DIGEST_MISMATCH


def test_a_close_signed_by_another_member_is_refused() -> None:
    stream = opened(streaming_world())
    world = stream.world
    header = stream.out.envelope.header
    chain = Chain(REQUEST, header)
    other = world.provider.signers[POPULATION.member]
    close = sign_close(stream.out.header, header, chain, other, SS_MSP, world.now)
    with pytest.raises(GatewayError) as caught:
        check_request_close(stream, close, Chain(REQUEST, header), other)
    assert caught.value.code is Code.UNTRUSTED_SIGNER


def test_a_close_of_another_stream_or_tampered_is_refused() -> None:
    first = opened(streaming_world())
    world = first.world
    second_out = stream_call(world, message_id="generated-2")
    assert isinstance(second_out, Outgoing)
    signer = world.consumer.signers[CLINICS.member]
    other = sign_close(
        second_out.header,
        second_out.envelope.header,
        Chain(REQUEST, second_out.envelope.header),
        signer,
        SS_MSP,
        world.now,
    )
    empty = Chain(REQUEST, first.out.envelope.header)
    with pytest.raises(GatewayError) as caught:
        check_request_close(first, other, empty)
    assert caught.value.code is Code.RESPONSE_MISMATCH
    _, _, close = closes(first, [], [])
    tampered = SignedClose(
        header=close.header.replace(b'"count":0', b'"count":1'),
        close=close.close,
        signature=close.signature,
    )
    with pytest.raises(GatewayError) as caught:
        check_request_close(first, tampered, empty)
    assert caught.value.code is Code.BAD_SIGNATURE


def test_the_providers_close_must_name_a_request_digest_that_was_sent() -> None:
    stream = opened(streaming_world())
    world, header = stream.world, stream.out.envelope.header
    request_sent, response_sent, _ = closes(stream, [b"a"], [])
    forged_received = Chain(REQUEST, header)
    forged_received.extend(b"not what was sent")
    signer = world.provider.signers[POPULATION.member]
    answer = sign_close(
        stream.accepted.header,
        header,
        response_sent,
        signer,
        SS_DNIC,
        world.now,
        received=forged_received,
    )
    with pytest.raises(GatewayError) as caught:
        check_close(
            answer.header,
            answer.signature,
            signer.certificate_der,
            request=stream.out.header,
            request_header=header,
            received=Chain(RESPONSE, header),
            sender=SS_DNIC,
            config=world.consumer.config.require(world.now),
            now=world.now,
            sent=request_sent,
        )
    assert caught.value.code is Code.STREAM_DIGEST_MISMATCH


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (AgreementState.SUSPENDED, Code.AGREEMENT_SUSPENDED),
        (AgreementState.REVOKED, Code.AGREEMENT_REVOKED),
    ],
)
def test_an_open_stream_is_ended_by_its_agreement_suspended_or_revoked(
    state: AgreementState, code: Code
) -> None:
    stream = opened(streaming_world())
    world = stream.world
    check_still_agreed(stream.accepted.header, world.provider, world.now)
    services = world.provider.config.require(world.now).services
    world.agreements = [agreement(state=state)]
    world.publish(services=list(services.values()))
    for node in (world.consumer, world.provider):
        with pytest.raises(GatewayError) as caught:
            check_still_agreed(stream.accepted.header, node, world.now)
        assert caught.value.code is code


# ---- encodings ---------------------------------------------------------------------------


def test_a_close_round_trips_and_is_told_from_a_response() -> None:
    stream = opened(streaming_world())
    _, _, close = closes(stream, [b"a"], [])
    decoded = decode_close(close.header)
    assert decoded == close.close
    assert isinstance(decode_answer(close.header), StreamClose)


@pytest.mark.parametrize(
    "change",
    [
        {"direction": "sideways"},
        {"count": -1},
        {"count": True},
        {"request_count": 1},  # only a response close names the request's
        {"digest": "zz"},
    ],
)
def test_a_malformed_close_is_refused(change: dict[str, object]) -> None:
    stream = opened(streaming_world())
    _, _, close = closes(stream, [b"a"], [])
    doc = canonical.decode(close.header)
    assert isinstance(doc, dict)
    doc.update(change)
    with pytest.raises(GatewayError) as caught:
        decode_close(canonical.encode(doc))
    assert caught.value.code is Code.MALFORMED_ENVELOPE


def test_streams_travel_in_the_configuration_only_for_services_that_have_them() -> None:
    world = streaming_world()
    config = world.provider.config.require(world.now)
    assert config.services[POPULATION].stream_kind(CHAT) == "bidi"
    assert config.services[POPULATION].stream_kind(GET_PERSON) is None
    assert b'"streams"' not in World().content()


def test_a_configuration_with_an_unknown_stream_kind_is_refused() -> None:
    content = World().content()
    tampered = content.replace(
        b'"methods":["/demo.population.v1.PopulationRegistry/GetPerson"]',
        b'"methods":["/demo.population.v1.PopulationRegistry/GetPerson"],"streams":{"/demo.population.v1.PopulationRegistry/GetPerson":"sideways"}',
    )
    assert tampered != content
    with pytest.raises(GatewayError) as caught:
        parse_content(tampered)
    assert caught.value.code is Code.CONFIGURATION_INVALID
    assert "streaming kind 'sideways'" in caught.value.message


def test_a_chain_keeps_its_messages_framed_up_to_its_cap() -> None:
    chain = Chain(RESPONSE, b"h", bodies=20)
    chain.extend(b"abc")
    chain.extend(b"defgh")
    assert chain.bodies == frame_messages([b"abc", b"defgh"])
    assert unframe_messages(chain.bodies) == [b"abc", b"defgh"]
    assert chain_of(RESPONSE, b"h", [b"abc", b"defgh"]).digest == chain.digest
    chain.extend(b"too much for the cap")
    assert chain.bodies is None  # over the cap: none kept, only the digests
    assert Chain(RESPONSE, b"h").bodies is None  # the log keeps no bodies


@pytest.mark.parametrize("framed", [b"\x00\x00\x00", b"\x00\x00\x00\x05abc"])
def test_a_cut_framing_is_refused(framed: bytes) -> None:
    with pytest.raises(ValueError, match="cut short"):
        unframe_messages(framed)


# ---- the bounds on open streams (security_server.streams.OpenStreams) --------------------


def test_streams_are_bounded_per_client_and_in_all_counting_those_still_opening() -> None:
    """limits.max_streams_per_client per client, limits.max_streams in all: on a provider,
    streams whose open has not arrived count too, so that a peer opening streams and sending
    nothing cannot hold more than the total (each refused before anything is read)."""
    streams = OpenStreams()
    streams.take("UY/GOV/MSP/clinics", 2, 3)
    streams.take("UY/GOV/MSP/clinics", 2, 3)
    with pytest.raises(GatewayError, match="max_streams_per_client") as per_client:
        streams.take("UY/GOV/MSP/clinics", 2, 3)
    assert per_client.value.code is Code.TOO_MANY_STREAMS
    streams.opening += 1  # a peer's stream with no open yet
    with pytest.raises(GatewayError, match=r"limits\.max_streams\)") as in_all:
        streams.take("UY/GOV/BPS/benefits", 2, 3)
    assert in_all.value.code is Code.TOO_MANY_STREAMS
    with pytest.raises(GatewayError, match=r"has 3 streaming calls open"):
        streams.check_total(3)
    streams.opening -= 1
    streams.give("UY/GOV/MSP/clinics")
    streams.take("UY/GOV/BPS/benefits", 2, 3)
    assert streams.open == {"UY/GOV/MSP/clinics": 1, "UY/GOV/BPS/benefits": 1}
    assert streams.total == 2
