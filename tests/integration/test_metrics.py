"""Metrics as an operator scrapes them from real processes: counts per outcome, the state
gauges, and label sets that a flood of made-up ids cannot grow."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .conftest import CLINICS, GET_PERSON, MSP, POPULATION

ALLOWED = "healthcare-identification"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    return make_runner()


def scrape(runner: Runner, process: str) -> Samples:
    """Every sample of a process's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(runner.ops_url(process) + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def calls(samples: Samples, role: str) -> dict[tuple[str, str, str, str], float]:
    """gateway_calls_total of one role: (client, service, method, code) -> count."""
    found = {}
    for (name, labels), value in samples.items():
        if name == "gateway_calls_total" and dict(labels)["role"] == role:
            d = dict(labels)
            found[(d["client"], d["service"], d["method"], d["code"])] = value
    return found


def api_status(runner: Runner, path: str, token: str) -> int:
    """The HTTP status of one GET to the registry's admin API."""
    request = urllib.request.Request(
        runner.api_url + path, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def person(
    runner: Runner, *, client: str = CLINICS, service: str = POPULATION, purpose: str = ALLOWED
) -> Outcome:
    body = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    async with runner.consumer_channel(MSP) as channel:
        return await call_raw(
            channel,
            GET_PERSON,
            body,
            routing_metadata(client=client, service=service, purpose=purpose),
        )


async def consumer_calls_when(
    runner: Runner, done: Callable[[dict[tuple[str, str, str, str], float]], bool]
) -> dict[tuple[str, str, str, str], float]:
    """ss-msp's consumer call counts once `done` holds of them (or after 5 s)."""
    for _ in range(50):
        counted = calls(scrape(runner, "ss-msp"), "consumer")
        if done(counted):
            break
        await asyncio.sleep(0.1)
    return counted


def diff(
    after: dict[tuple[str, str, str, str], float], before: dict[tuple[str, str, str, str], float]
) -> dict[tuple[str, str, str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def test_calls_are_counted_per_outcome_on_both_servers(runner: Runner) -> None:
    """Three allowed calls and two for a purpose no agreement covers: the consumer counts
    both outcomes under the configuration's ids, the provider the three it answered; the
    latency histograms and the log's commits moved with them."""
    before_msp, before_dnic = scrape(runner, "ss-msp"), scrape(runner, "ss-dnic")
    outcomes = [await person(runner) for _ in range(3)]
    outcomes += [await person(runner, purpose="marketing") for _ in range(2)]
    assert [o.error for o in outcomes] == [None] * 3 + ["purpose_not_covered"] * 2, outcomes
    consumer_counts = {
        (CLINICS, POPULATION, GET_PERSON, "ok"): 3.0,
        (CLINICS, POPULATION, GET_PERSON, "purpose_not_covered"): 2.0,
    }
    provider_counts = {(CLINICS, POPULATION, GET_PERSON, "ok"): 3.0}
    # a call's outcome can reach the caller just before its handler counts it
    for _ in range(50):
        msp, dnic = scrape(runner, "ss-msp"), scrape(runner, "ss-dnic")
        counted = diff(calls(msp, "consumer"), calls(before_msp, "consumer"))
        if counted == consumer_counts and (
            diff(calls(dnic, "provider"), calls(before_dnic, "provider")) == provider_counts
        ):
            break
        await asyncio.sleep(0.1)
    assert diff(calls(msp, "consumer"), calls(before_msp, "consumer")) == consumer_counts
    assert diff(calls(dnic, "provider"), calls(before_dnic, "provider")) == provider_counts

    def moved(samples: Samples, old: Samples, name: str, **labels: str) -> float:
        return (value(samples, name, **labels) or 0.0) - (value(old, name, **labels) or 0.0)

    assert moved(msp, before_msp, "gateway_call_seconds_count", role="consumer") == 5
    assert moved(msp, before_msp, "gateway_provider_seconds_count") == 3
    assert moved(dnic, before_dnic, "gateway_backend_seconds_count") == 3
    # a request and a response record per answered call on each side, and two refusals
    assert moved(msp, before_msp, "gateway_log_batch_records_sum") == 3 * 2 + 2
    assert moved(dnic, before_dnic, "gateway_log_batch_records_sum") == 3 * 2
    assert moved(msp, before_msp, "gateway_log_commit_seconds_count") >= 1
    assert value(msp, "gateway_calls_in_flight", role="consumer") == 0
    assert value(dnic, "gateway_peer_streams_open") == 1  # ss-msp's stream to it


def test_state_gauges_show_configuration_certificates_and_ocsp(runner: Runner) -> None:
    """Configuration version, age and expiry per instance; seconds to expiry of each own
    certificate; the age of each held OCSP answer; readiness."""
    samples = scrape(runner, "ss-msp")
    version = value(samples, "gateway_configuration_version", followed_instance="UY")
    assert version is not None and version >= 1
    age = value(samples, "gateway_configuration_age_seconds", followed_instance="UY")
    expiry = value(samples, "gateway_configuration_expiry_seconds", followed_instance="UY")
    assert age is not None and 0 <= age < 600
    assert expiry is not None and 0 < expiry <= 600
    for certificate in ("authentication", "signing:UY/GOV/MSP"):
        left = value(samples, "gateway_certificate_expiry_seconds", certificate=certificate)
        assert left is not None and left > 86_400, certificate
        held = value(samples, "gateway_ocsp_answer_age_seconds", certificate=certificate)
        assert held is not None and 0 <= held < 600, certificate
    assert value(samples, "gateway_ready") == 1.0
    assert value(samples, "gateway_tsa_failures_total") == 0.0
    assert value(samples, "gateway_log_unstamped_records") is not None
    assert value(samples, "gateway_log_queue_records") is not None


async def test_made_up_ids_add_no_series(runner: Runner) -> None:
    """200 calls naming random clients and services (well formed, and not) add at most one
    series per refusal code, all labelled unknown: the label set is bounded by the
    configuration, whatever callers send."""
    await person(runner, client="UY/GOV/MSP/nobody", service=POPULATION)  # the series exist
    await person(runner, client=CLINICS, service="UY/GOV/DNIC/identity/nothing/v1")
    seeded = {
        ("unknown", "unknown", "other", "client_not_served"),
        (CLINICS, "unknown", "other", "unknown_service"),
    }
    # a refusal reaches the caller before the server's handler counts it
    before = await consumer_calls_when(runner, lambda c: seeded <= set(c))

    async def junk(i: int) -> Outcome:
        tag = uuid.uuid4().hex[:8]
        if i % 2:
            return await person(runner, client=f"UY/GOV/MSP/{tag}", service=POPULATION)
        return await person(runner, client=CLINICS, service=f"UY/GOV/DNIC/identity/{tag}/v1")

    outcomes = await asyncio.gather(*(junk(i) for i in range(200)))
    assert {o.error for o in outcomes} == {"client_not_served", "unknown_service"}
    after = await consumer_calls_when(
        runner, lambda c: sum(diff(c, before).values()) >= 200 or set(c) != set(before)
    )
    assert set(after) == set(before)
    grown = diff(after, before)
    assert grown == {
        ("unknown", "unknown", "other", "client_not_served"): 100.0,
        (CLINICS, "unknown", "other", "unknown_service"): 100.0,
    }


async def test_registry_and_trust_services_count_their_requests(runner: Runner) -> None:
    """The registry counts API requests by route template and status, agreements by
    state and watchers; the OCSP responder and the TSA count their answers."""
    assert (await person(runner)).ok  # records for the TSA to stamp
    token = runner.token("registry-admin")
    agreement = "AGR-2026-0001"
    statuses = [
        api_status(runner, path, token)
        for path in (f"/v1/agreements/{agreement}", "/v1/agreements/NOPE-1")
    ]
    assert statuses == [200, 404]
    registry = scrape(runner, "registry")
    route = "/v1/agreements/{id}"
    assert (
        value(registry, "gateway_registry_api_requests_total", route=route, status="200") or 0
    ) >= 1
    assert (
        value(registry, "gateway_registry_api_requests_total", route=route, status="404") or 0
    ) >= 1
    assert not any(
        name == "gateway_registry_api_requests_total" and "NOPE" in dict(labels)["route"]
        for name, labels in registry
    )
    assert (value(registry, "gateway_registry_agreements", state="active") or 0) >= 1
    assert (value(registry, "gateway_registry_watchers") or 0) >= 2  # both servers
    version = value(registry, "gateway_configuration_version")
    assert version is not None and version >= 1
    assert (value(registry, "gateway_registry_publish_seconds_count") or 0) >= 1
    ocsp = scrape(runner, "ocsp")
    assert (value(ocsp, "gateway_ocsp_requests_total", answer="good") or 0) >= 1
    deadline = time.monotonic() + 10
    while not value(scrape(runner, "tsa"), "gateway_tsa_requests_total", answer="granted"):
        assert time.monotonic() < deadline, "the TSA counted no granted stamp"
        await asyncio.sleep(0.2)
