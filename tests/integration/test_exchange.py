"""One call through two security servers, and every refusal the consumer side can give."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .clinics import get_person
from .conftest import (
    CLINICS,
    DNIC,
    GET_PERSON,
    GET_RECORD,
    IDENTITY,
    MSP,
    POPULATION,
    VACCINATION,
    log_rows,
    timed_agreements,
)

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    # failpoints armed: they fire only for calls whose message id asks for one
    return make_runner(extra_agreements=timed_agreements(), env={"GATEWAY_FAILPOINTS": "1"})


@pytest.fixture
async def msp(runner: Runner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        yield channel


@pytest.fixture
async def dnic(runner: Runner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(runner.consumers[DNIC]) as channel:
        yield channel


async def test_allowed_call_returns_backend_answer_byte_for_byte(
    runner: Runner, msp: grpc.aio.Channel
) -> None:
    """The answer through both security servers equals the backend's direct answer."""
    async with grpc.aio.insecure_channel(runner.backends["population"]) as direct:
        expected = await call_raw(direct, GET_PERSON, PERSON, [])
    outcome = await call_raw(
        msp,
        GET_PERSON,
        PERSON,
        routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification"),
    )
    assert outcome.ok, outcome
    assert expected.body and outcome.body == expected.body
    assert population.Person.FromString(outcome.body).given_name == "Ana"
    assert outcome.message_id and len(outcome.message_id) == 32
    assert int(outcome.trailing["gateway-total-us"]) > 0


async def test_both_logs_hold_matching_records(runner: Runner, msp: grpc.aio.Channel) -> None:
    """Consumer and provider log the same signed request and response under one message id."""
    message_id = f"test-{uuid.uuid4().hex}"
    outcome = await call_raw(
        msp,
        GET_PERSON,
        PERSON,
        routing_metadata(
            client=CLINICS,
            service=POPULATION,
            purpose="healthcare-identification",
            user_id="dr.rodriguez",
            subject="1.234.567-8",
            message_id=message_id,
        ),
    )
    assert outcome.ok and outcome.message_id == message_id
    consumer = log_rows(runner.log_db(MSP), message_id)
    provider = log_rows(runner.log_db(DNIC), message_id)
    assert [(r["kind"], r["role"]) for r in consumer] == [
        ("request", "consumer"),
        ("response", "consumer"),
    ]
    assert [(r["kind"], r["role"]) for r in provider] == [
        ("request", "provider"),
        ("response", "provider"),
    ]
    for mine, theirs in zip(consumer, provider, strict=True):
        assert mine["header"] == theirs["header"]
        assert mine["signature"] == theirs["signature"]
        assert mine["body_sha256"] == theirs["body_sha256"]
        assert mine["user_id"] == "dr.rodriguez"
    # the data subject is stored only as a keyed pseudonym, in the records and in the signed
    # headers both sides keep; both sides (one instance, one key) name it alike
    assert consumer[0]["subject_ref"] and "1.234.567-8" not in consumer[0]["subject_ref"]
    assert provider[0]["subject_ref"] == consumer[0]["subject_ref"]
    for row in (*consumer, *provider):
        assert b"1.234.567-8" not in bytes(row["header"] or b"")


@pytest.mark.parametrize(
    ("failpoint", "server", "side"),
    [("consumer-logged", MSP, "consumer's"), ("provider-logged", DNIC, "provider's")],
)
async def test_an_internal_error_is_a_clear_refusal_recorded_against_its_request(
    runner: Runner, msp: grpc.aio.Channel, failpoint: str, server: str, side: str
) -> None:
    """A bug in a server (injected once the request's record is durable, on the consumer
    before it sends, on the provider before its backend is called) reaches the caller as
    internal_error with the message id and no detail of the bug, leaves a refusal record
    after the request's in that server's log, is in its process log with its traceback,
    and the server goes on serving."""
    message_id = f"fail-{failpoint}-{uuid.uuid4().hex}"
    outcome = await get_person(msp, message_id=message_id)
    assert (outcome.code, outcome.error) == (grpc.StatusCode.INTERNAL, "internal_error"), outcome
    assert f"internal error in the {side} server" in outcome.details, outcome.details
    assert "failpoint" not in outcome.details and "Traceback" not in outcome.details
    assert outcome.message_id == message_id
    rows = log_rows(runner.log_db(server), message_id)
    assert [(r["kind"], r["error_code"]) for r in rows] == [
        ("request", None),
        ("refusal", "internal_error"),
    ]
    assert "InjectedError" in runner.tail(runner.server_names[server])
    again = await get_person(msp)
    assert again.ok, again


async def test_backend_error_status_is_passed_through(msp: grpc.aio.Channel) -> None:
    """A backend's own NOT_FOUND reaches the caller unchanged, with the message id."""
    outcome = await call_raw(
        msp,
        GET_PERSON,
        population.GetPersonRequest(national_id="0.000.000-0").SerializeToString(),
        routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification"),
    )
    assert outcome.code == grpc.StatusCode.NOT_FOUND
    assert "no person" in outcome.details
    assert outcome.error is None and outcome.message_id


@pytest.mark.parametrize(
    ("metadata", "status", "code"),
    [
        pytest.param(
            {"client": IDENTITY, "service": VACCINATION, "purpose": "identity-check"},
            grpc.StatusCode.PERMISSION_DENIED,
            "no_agreement",
            id="no-agreement",
        ),
        pytest.param(
            {"client": IDENTITY, "service": POPULATION, "purpose": "future-study"},
            grpc.StatusCode.PERMISSION_DENIED,
            "agreement_not_yet_valid",
            id="not-yet-valid",
        ),
        pytest.param(
            {"client": IDENTITY, "service": POPULATION, "purpose": "old-study"},
            grpc.StatusCode.PERMISSION_DENIED,
            "agreement_expired",
            id="expired",
        ),
        pytest.param(
            {
                "client": IDENTITY,
                "service": "UY/GOV/MSP/clinics/unknown/v1",
                "purpose": "identity-check",
            },
            grpc.StatusCode.NOT_FOUND,
            "unknown_service",
            id="unknown-service",
        ),
        pytest.param(
            {"client": "UY/GOV/MSP/clinics", "service": VACCINATION, "purpose": "identity-check"},
            grpc.StatusCode.PERMISSION_DENIED,
            "client_not_served",
            id="client-of-another-server",
        ),
        pytest.param(
            {"client": "uy/GOV/DNIC/identity", "service": VACCINATION, "purpose": "identity-check"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed_identifier",
            id="malformed-client",
        ),
        pytest.param(
            {"client": IDENTITY, "service": "UY/GOV/MSP/clinics", "purpose": "identity-check"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed_identifier",
            id="malformed-service",
        ),
        pytest.param(
            {"client": IDENTITY, "service": VACCINATION, "purpose": "a purpose with spaces"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed_identifier",
            id="malformed-purpose",
        ),
        pytest.param(
            {"client": IDENTITY, "service": VACCINATION, "purpose": None},
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing_metadata",
            id="missing-purpose",
        ),
        pytest.param(
            {"client": None, "service": None, "purpose": None},
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing_metadata",
            id="no-metadata",
        ),
    ],
)
async def test_refusals_carry_their_own_code(
    runner: Runner,
    dnic: grpc.aio.Channel,
    metadata: dict[str, str | None],
    status: grpc.StatusCode,
    code: str,
) -> None:
    """Each refusal has its stable code and status, and is logged by the consumer server."""
    method = GET_PERSON if metadata["service"] == POPULATION else GET_RECORD
    outcome = await call_raw(dnic, method, b"", routing_metadata(**metadata))
    assert (outcome.code, outcome.error) == (status, code), outcome.details
    assert outcome.details and outcome.message_id
    rows = log_rows(runner.log_db(DNIC), outcome.message_id)
    assert [(r["kind"], r["status"], r["error_code"]) for r in rows] == [
        ("refusal", "refused", code)
    ]


async def test_purpose_not_covered(msp: grpc.aio.Channel) -> None:
    """A purpose outside the agreement is refused and the message names the covered ones."""
    outcome = await call_raw(
        msp,
        GET_PERSON,
        PERSON,
        routing_metadata(client=CLINICS, service=POPULATION, purpose="marketing"),
    )
    assert outcome.error == "purpose_not_covered"
    assert "healthcare-identification" in outcome.details


async def test_method_outside_the_service_is_refused(msp: grpc.aio.Channel) -> None:
    """A method that is not part of the service is refused as unknown_method."""
    outcome = await call_raw(
        msp,
        "/demo.population.v1.PopulationRegistry/DeletePerson",
        PERSON,
        routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification"),
    )
    assert (outcome.code, outcome.error) == (grpc.StatusCode.UNIMPLEMENTED, "unknown_method")


async def test_malformed_message_id_is_refused(msp: grpc.aio.Channel) -> None:
    """A caller-supplied message id with forbidden characters is refused."""
    outcome = await call_raw(
        msp,
        GET_PERSON,
        PERSON,
        routing_metadata(
            client=CLINICS,
            service=POPULATION,
            purpose="healthcare-identification",
            message_id="a b",
        ),
    )
    assert outcome.error == "malformed_identifier"


async def test_a_callers_message_id_names_one_exchange_of_its_server(
    runner: Runner, msp: grpc.aio.Channel
) -> None:
    """A message id the caller chose, used again for the same exchange, is refused by the
    provider, which accepted it; two calls with one new id at once: the consumer's server
    lets one through. (Another client's or service's reuse of an id is refused by the
    consumer's server itself: test_message_log_store.) A call refused before its request
    was logged leaves the id free."""
    message_id = uuid.uuid4().hex
    first = await get_person(msp, message_id=message_id)
    second = await get_person(msp, message_id=message_id)
    assert first.ok
    assert (second.code, second.error) == (grpc.StatusCode.ALREADY_EXISTS, "replayed_message")
    provider = [(r["kind"], r["error_code"]) for r in log_rows(runner.log_db(DNIC), message_id)]
    assert provider == [("request", None), ("response", None), ("refusal", "replayed_message")]

    twin = uuid.uuid4().hex
    together = await asyncio.gather(*(get_person(msp, message_id=twin) for _ in range(2)))
    assert sorted(o.error or "ok" for o in together) == ["ok", "replayed_message"], together

    # refused before its request was logged (a purpose not agreed): the id is free
    free = uuid.uuid4().hex
    refused = await get_person(msp, purpose="marketing", message_id=free)
    assert refused.error == "purpose_not_covered", refused
    again = await get_person(msp, message_id=free)
    assert again.ok, again
