"""Faults with real processes: backends, peers and the registry stopped, killed and restarted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import grpc

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, audit_verify, log_rows

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()


async def person(runner: Runner, message_id: str | None = None) -> Outcome:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        return await call_raw(
            channel,
            GET_PERSON,
            PERSON,
            routing_metadata(
                client=CLINICS,
                service=POPULATION,
                purpose="healthcare-identification",
                message_id=message_id,
            ),
        )


async def until(predicate: Callable[[Outcome], bool], runner: Runner, seconds: float) -> Outcome:
    """Call repeatedly until an outcome satisfies the predicate (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        outcome = await person(runner)
        if predicate(outcome) or time.monotonic() > deadline:
            return outcome
        await asyncio.sleep(0.2)


async def test_backend_down_gives_unavailable_and_is_logged(
    make_runner: Callable[..., Runner],
) -> None:
    """With the provider's backend stopped, the call fails UNAVAILABLE/backend_unavailable, logged on both sides."""
    runner = make_runner()
    assert (await person(runner)).ok
    runner.stop("backend-population")
    message_id = uuid.uuid4().hex
    outcome = await person(runner, message_id)
    assert (outcome.code, outcome.error) == (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    provider = log_rows(runner.log_db(DNIC), message_id)
    assert [(r["kind"], r["error_code"]) for r in provider] == [
        ("request", None),
        ("response", "backend_unavailable"),
    ]
    consumer = log_rows(runner.log_db(MSP), message_id)
    assert [(r["kind"], r["error_code"]) for r in consumer] == [
        ("request", None),
        ("refusal", "backend_unavailable"),
    ]
    runner.start("backend-population")
    assert (await until(lambda o: o.ok, runner, 10)).ok


async def test_provider_server_down_then_back(make_runner: Callable[..., Runner]) -> None:
    """With the provider's security server down the call fails provider_unavailable; it resumes after restart."""
    runner = make_runner()
    assert (await person(runner)).ok
    runner.stop("ss-dnic", kill=True)
    outcome = await person(runner)
    assert (outcome.code, outcome.error) == (grpc.StatusCode.UNAVAILABLE, "provider_unavailable")
    assert (
        log_rows(runner.log_db(MSP), outcome.message_id or "")[-1]["error_code"]
        == "provider_unavailable"
    )
    runner.start("ss-dnic")
    assert (await until(lambda o: o.ok, runner, 10)).ok


async def test_registry_down_cached_then_expired_then_resumes(
    make_runner: Callable[..., Runner],
) -> None:
    """Registry down: calls go on from the cache, are refused once it expires, and resume when it returns."""
    runner = make_runner(validity_seconds=4.0, refresh_seconds=1.0)
    assert (await person(runner)).ok
    runner.stop("registry", kill=True)
    assert (await person(runner)).ok  # served from the last good configuration
    expired = await until(lambda o: o.error == "configuration_expired", runner, 15)
    assert (expired.code, expired.error) == (grpc.StatusCode.UNAVAILABLE, "configuration_expired")
    assert "expired" in expired.details
    runner.start("registry")
    assert (await until(lambda o: o.ok, runner, 15)).ok  # no restart of the security servers


async def test_server_restarts_from_cached_configuration_while_registry_is_down(
    make_runner: Callable[..., Runner],
) -> None:
    """A security server restarted while the registry is down starts from its configuration on disk."""
    runner = make_runner()
    assert (await person(runner)).ok
    runner.stop("registry", kill=True)
    runner.stop("ss-msp")
    runner.start("ss-msp")
    assert (await person(runner)).ok


async def test_provider_killed_under_load_loses_nothing(make_runner: Callable[..., Runner]) -> None:
    """Killing the provider mid-load leaves both logs verifiable, and every answered call logged by it."""
    runner = make_runner()
    stop, enough = asyncio.Event(), asyncio.Event()
    answered: list[str] = []

    async def worker() -> None:
        while not stop.is_set():
            outcome = await person(runner)
            if outcome.ok and outcome.message_id:
                answered.append(outcome.message_id)
                if len(answered) >= 30:
                    enough.set()

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.wait_for(enough.wait(), timeout=30)
    runner.stop("ss-dnic", kill=True)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    runner.start("ss-dnic")
    for server in (MSP, DNIC):
        result = audit_verify(runner.log_db(server))
        assert result.returncode == 0, result.stdout + result.stderr
    for message_id in answered:
        kinds = [r["kind"] for r in log_rows(runner.log_db(DNIC), message_id)]
        assert kinds == ["request", "response"], message_id


async def test_calls_over_the_concurrency_limit_are_refused_with_a_code(
    make_runner: Callable[..., Runner],
) -> None:
    """Calls beyond limits.max_concurrent_calls get `overloaded`, a message id and a log record."""
    runner = make_runner(limits={"max_concurrent_calls": 2})
    outcomes = await asyncio.gather(*(person(runner) for _ in range(40)))
    refused = [o for o in outcomes if not o.ok]
    assert any(o.ok for o in outcomes)
    assert refused, "40 concurrent calls never exceeded a limit of 2"
    assert {(o.code, o.error) for o in refused} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
    }
    rows = log_rows(runner.log_db(MSP), refused[0].message_id or "")
    assert [(r["kind"], r["error_code"]) for r in rows] == [("refusal", "overloaded")]
