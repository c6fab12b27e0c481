"""Readiness seen from the operator's side, with real processes: `/readyz` turns 503 naming
the condition that failed, and back to 200 without a restart, and a `grpc.health.v1` client
of the consumer endpoint sees NOT_SERVING then SERVING in step.

One topology serves every fault (each test leaves it ready again): a configuration valid
for VALIDITY seconds, refreshed every second, and time-stamping that fails after
FAILURE_PERIOD seconds. Its registry keeps its database in PostgreSQL when
GATEWAY_TEST_POSTGRES_URL is set, in a database of its own that a test can close to
connections. Every `/readyz` answer polled must come within ANSWER_SECONDS, faults or not.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner
from security_server.message_log import PROBE_TIMEOUT_SECONDS

from .conftest import (
    CLINICS,
    GET_PERSON,
    MSP,
    POPULATION,
    close_database,
    postgres_database,
    reopen_database,
)

VALIDITY, REFRESH = 4.0, 1.0
FAILURE_PERIOD = 2.0
ANSWER_SECONDS = 0.5
LOG_PROBE_INTERVAL = 2.0  # `MessageLog.watch_writable`'s default, which the server uses
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PERSON = population_pb2.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
METADATA = routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification")


@pytest.fixture(scope="module")
def registry_database() -> Iterator[str | None]:
    """A PostgreSQL database for the registry alone (dropped at the end), or None."""
    url = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if not url:
        yield None
        return
    with postgres_database(f"gateway_readiness_{os.getpid()}") as (name, _):
        yield name


@pytest.fixture(scope="module")
def runner(
    tmp_path_factory: pytest.TempPathFactory, registry_database: str | None
) -> Iterator[Runner]:
    with Runner(
        tmp_path_factory.mktemp("readiness") / "run",
        validity_seconds=VALIDITY,
        refresh_seconds=REFRESH,
        timestamping={"interval_seconds": 0.2, "failure_period_seconds": FAILURE_PERIOD},
        separate_trust_services=True,  # the TSA stops, not the OCSP responder
    ) as runner:
        runner.prepare()
        if registry_database is not None:
            path = runner.workdir / "registry.toml"
            settings = tomllib.loads(path.read_text())
            url = make_url(os.environ["GATEWAY_TEST_POSTGRES_URL"]).set(database=registry_database)
            settings["database"] = url.render_as_string(hide_password=False)
            path.write_text(tomli_w.dumps(settings))
        runner.start_all()
        yield runner


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def consumer(runner: Runner) -> AsyncIterator[grpc.aio.Channel]:
    async with runner.consumer_channel(MSP) as channel:
        yield channel


async def health(channel: grpc.aio.Channel) -> Any:
    """The consumer endpoint's overall health; it must come within ANSWER_SECONDS."""
    stub: Any = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
    took = time.monotonic() - started
    assert took < ANSWER_SECONDS, f"grpc.health.v1 Check took {took:.3f} s"
    return status


async def readyz(http: aiohttp.ClientSession, ops: str) -> tuple[int, dict[str, Any]]:
    """One `/readyz` answer; it must come within ANSWER_SECONDS."""
    started = time.monotonic()
    async with http.get(f"{ops}/readyz") as answer:
        body = await answer.json()
    took = time.monotonic() - started
    assert took < ANSWER_SECONDS, f"/readyz took {took:.3f} s"
    return answer.status, body


async def wait_readiness(
    runner: Runner,
    http: aiohttp.ClientSession,
    name: str,
    *,
    failed: str | None,
    seconds: float,
) -> tuple[dict[str, Any], float]:
    """Poll `name`'s `/readyz` until it is 503 naming `failed`, or 200 when `failed` is
    None; the body and how long it took."""
    ops = runner.ops_url(name)
    started = time.monotonic()
    while True:
        status, body = await readyz(http, ops)
        if failed is None and status == 200:
            assert body["ready"] is True and body["failed"] == {}, body
            return body, time.monotonic() - started
        if failed is not None and status == 503 and failed in body["failed"]:
            assert body["ready"] is False, body
            return body, time.monotonic() - started
        if time.monotonic() - started > seconds:
            want = "ready" if failed is None else f"not ready naming {failed!r}"
            pytest.fail(f"{name} was not {want} within {seconds} s: {body}\n{runner.tail(name)}")
        await asyncio.sleep(0.1)


async def ready_everywhere(runner: Runner, http: aiohttp.ClientSession) -> None:
    """Every process of the topology ready (the state each test starts from and leaves)."""
    for name in ("registry", "ss-msp", "ss-dnic"):
        await wait_readiness(runner, http, name, failed=None, seconds=20)


async def person(channel: grpc.aio.Channel) -> Outcome:
    return await call_raw(channel, GET_PERSON, PERSON, METADATA)


async def test_registry_down_past_expiry(
    runner: Runner, http: aiohttp.ClientSession, consumer: grpc.aio.Channel
) -> None:
    """Registry stopped past the configuration's expiry: 503 naming `configuration` (it
    expired) and NOT_SERVING; ready and SERVING again once the registry is back."""
    await ready_everywhere(runner, http)
    assert await health(consumer) == SERVING
    runner.stop("registry", kill=True)
    body, took = await wait_readiness(
        runner, http, "ss-msp", failed="configuration", seconds=VALIDITY + 10
    )
    assert "expired" in body["failed"]["configuration"], body
    assert await health(consumer) == NOT_SERVING
    print(f"\nnot ready {took:.2f} s after the registry stopped: {body['failed']}")
    runner.start("registry")
    _, back = await wait_readiness(runner, http, "ss-msp", failed=None, seconds=15)
    assert await health(consumer) == SERVING
    print(f"ready again {back:.2f} s after the registry was ready")


async def test_tsa_down_past_failure_period(
    runner: Runner, http: aiohttp.ClientSession, consumer: grpc.aio.Channel
) -> None:
    """TSA down past the failure period: 503 naming `timestamping` and NOT_SERVING; ready
    and SERVING again once the TSA answers, with no call made meanwhile."""
    await ready_everywhere(runner, http)
    assert await health(consumer) == SERVING
    runner.stop("tsa")
    stopped = time.monotonic()
    # something to stamp: the failure period starts with the first failed attempt
    assert (outcome := await person(consumer)).ok, outcome
    body, _ = await wait_readiness(
        runner, http, "ss-msp", failed="timestamping", seconds=FAILURE_PERIOD + 10
    )
    took = time.monotonic() - stopped
    assert took >= FAILURE_PERIOD, f"not ready {took:.2f} s after, within the failure period"
    assert "time-stamping" in body["failed"]["timestamping"], body
    assert await health(consumer) == NOT_SERVING
    print(f"\nnot ready {took:.2f} s after the TSA stopped: {body['failed']}")
    runner.start("tsa")
    _, back = await wait_readiness(runner, http, "ss-msp", failed=None, seconds=10)
    assert await health(consumer) == SERVING
    print(f"ready again {back:.2f} s after the TSA was ready")


async def test_log_locked_by_another_connection(
    runner: Runner, http: aiohttp.ClientSession, consumer: grpc.aio.Channel
) -> None:
    """Another connection holding the log database's write lock: 503 naming `log` and
    NOT_SERVING (while `/readyz` still answers at once); ready and SERVING again once it
    lets go."""
    await ready_everywhere(runner, http)
    assert await health(consumer) == SERVING
    other = sqlite3.connect(runner.log_db(MSP), timeout=10, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        body, took = await wait_readiness(runner, http, "ss-msp", failed="log", seconds=15)
        assert "database is locked" in body["failed"]["log"], body
        # the probe's interval, the probe's own wait, and room for a loaded machine
        assert took < LOG_PROBE_INTERVAL + PROBE_TIMEOUT_SECONDS + 1.5, took
        assert await health(consumer) == NOT_SERVING
        print(f"\nnot ready {took:.2f} s after the lock was taken: {body['failed']}")
        # still not ready while the lock is held: the probe keeps failing
        await asyncio.sleep(0.5)
        status, body = await readyz(http, runner.ops_url("ss-msp"))
        assert status == 503 and "log" in body["failed"], body
        held = time.monotonic() - locked
    finally:
        other.execute("ROLLBACK")
        other.close()
    _, back = await wait_readiness(runner, http, "ss-msp", failed=None, seconds=10)
    assert await health(consumer) == SERVING
    assert (outcome := await person(consumer)).ok, outcome
    print(f"lock held {held:.2f} s; ready again {back:.2f} s after it was released")


async def test_registry_database_unreachable(
    runner: Runner,
    http: aiohttp.ClientSession,
    registry_database: str | None,
) -> None:
    """The registry's PostgreSQL database refusing connections: the registry's `/readyz`
    names `database`; ready again once it accepts them."""
    if registry_database is None:
        pytest.skip("GATEWAY_TEST_POSTGRES_URL is not set: the registry runs on SQLite")
    await ready_everywhere(runner, http)
    closed = time.monotonic()
    await close_database(registry_database)
    try:
        body, _ = await wait_readiness(runner, http, "registry", failed="database", seconds=10)
        took = time.monotonic() - closed
        print(f"\nregistry not ready {took:.2f} s after its database closed: {body['failed']}")
    finally:
        await reopen_database(registry_database)
    _, back = await wait_readiness(runner, http, "registry", failed=None, seconds=10)
    print(f"registry ready again {back:.2f} s after its database reopened")
    # the security servers, whose configuration may have expired meanwhile, follow
    await ready_everywhere(runner, http)


async def test_server_starting_without_a_configuration(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A security server started with the registry down and no cached configuration: its
    operations port answers at once, /healthz 200 and /readyz 503 naming `configuration`;
    ready once the registry (and its trust services) come up, without a restart."""
    with Runner(tmp_path / "run") as runner:
        runner.prepare()
        ops = runner.reserve_address()
        runner.set_settings(MSP, "ops", listen=ops)
        runner.launch("ss-msp")
        deadline = time.monotonic() + 20
        while True:
            try:
                async with http.get(f"http://{ops}/healthz") as answer:
                    assert answer.status == 200, await answer.text()
                    break
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no operations port after 20 s\n{runner.tail('ss-msp')}")
                await asyncio.sleep(0.05)
        status, body = await readyz(http, f"http://{ops}")
        assert status == 503, body
        assert "no global configuration" in body["failed"]["configuration"], body
        assert not runner.processes["ss-msp"].ready_path.exists()
        for name in (*runner.trust_services, "registry"):
            runner.start(name)
        runner.wait_ready("ss-msp")
        assert runner.ops_url("ss-msp") == f"http://{ops}"
        await wait_readiness(runner, http, "ss-msp", failed=None, seconds=15)
