"""The provider's security server enforces an agreement's rate limit, and logs its refusals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, log_rows

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
LIMITED_PURPOSE = "limited-study"


def limited_agreement() -> dict[str, Any]:
    """CLINICS -> POPULATION for one purpose of its own, at most 3 calls a minute."""
    return {
        "id": "AGR-LIMITED",
        "client": CLINICS,
        "service": POPULATION,
        "purposes": [LIMITED_PURPOSE],
        "valid_from": datetime.now(UTC) - timedelta(days=1),
        "legal_basis": {"kind": "law", "reference": "Ley 18.331 art. 9"},
        "data_categories": ["identity"],
        "rate_limit": {"requests": 3, "per_seconds": 60},
    }


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    return make_runner(extra_agreements=[limited_agreement()])


@pytest.fixture
async def msp(runner: Runner) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        yield channel


async def test_call_over_the_rate_limit_is_refused_and_logged_by_the_provider(
    runner: Runner, msp: grpc.aio.Channel
) -> None:
    """Three calls a minute pass; the fourth is refused rate_limited and logged by both servers."""
    for _ in range(3):
        outcome = await call_raw(
            msp,
            GET_PERSON,
            PERSON,
            routing_metadata(client=CLINICS, service=POPULATION, purpose=LIMITED_PURPOSE),
        )
        assert outcome.ok, outcome
    message_id = f"test-{uuid.uuid4().hex}"
    fourth = await call_raw(
        msp,
        GET_PERSON,
        PERSON,
        routing_metadata(
            client=CLINICS, service=POPULATION, purpose=LIMITED_PURPOSE, message_id=message_id
        ),
    )
    assert (fourth.code, fourth.error) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
    assert "AGR-LIMITED" in fourth.details and "retry in" in fourth.details
    assert fourth.message_id == message_id
    provider = log_rows(runner.log_db(DNIC), message_id)
    assert [(r["kind"], r["role"], r["status"], r["error_code"]) for r in provider] == [
        ("refusal", "provider", "refused", "rate_limited")
    ]
    # the consumer signed and logged the request, then logged the provider's refusal
    consumer = log_rows(runner.log_db(MSP), message_id)
    assert [(r["kind"], r["error_code"]) for r in consumer] == [
        ("request", None),
        ("refusal", "rate_limited"),
    ]


async def test_rate_limit_counts_only_its_own_agreement(msp: grpc.aio.Channel) -> None:
    """Calls under the unlimited demo agreement of the same client and service still pass."""
    for _ in range(5):
        outcome = await call_raw(
            msp,
            GET_PERSON,
            PERSON,
            routing_metadata(
                client=CLINICS, service=POPULATION, purpose="healthcare-identification"
            ),
        )
        assert outcome.ok, outcome
