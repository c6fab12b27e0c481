"""A security server killed with records waiting for a time-stamp stamps them after restart.

Real processes: the TSA is stopped, calls are made (they succeed: the failure period is
long), the consumer's server is killed with SIGKILL while its records wait, then the TSA
and the server are started again: every record of the log ends up covered by a verified
time-stamp, and the chain continues.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner

from .conftest import audit_verify

MSP_SERVER = "UY/GOV/MSP/ss1"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
METHOD = "/demo.population.v1.PopulationRegistry/GetPerson"


@pytest.fixture
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    r = Runner(
        tmp_path_factory.mktemp("stamp-recovery"),
        timestamping={"interval_seconds": 0.2, "failure_period_seconds": 300},
        separate_trust_services=True,  # the TSA stops, not the OCSP responder
    )
    try:
        r.prepare()
        r.start_all()
        yield r
    finally:
        r.close()


def stamped_and_total(runner: Runner) -> tuple[int, int]:
    return runner.stamped(MSP_SERVER)


async def calls(runner: Runner, n: int) -> None:
    body = population_pb2.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    metadata = routing_metadata(
        client="UY/GOV/MSP/clinics", service=SERVICE, purpose="healthcare-identification"
    )
    async with runner.consumer_channel(MSP_SERVER) as channel:
        for _ in range(n):
            outcome = await call_raw(channel, METHOD, body, metadata)
            assert outcome.code == grpc.StatusCode.OK, outcome


def test_backlog_survives_a_crash_and_is_stamped_after_restart(runner: Runner) -> None:
    asyncio.run(calls(runner, 3))
    deadline = time.monotonic() + 10
    while stamped_and_total(runner)[0] < stamped_and_total(runner)[1]:
        assert time.monotonic() < deadline, "the first calls were never stamped"
        time.sleep(0.1)
    stamped_before, _ = stamped_and_total(runner)

    runner.stop("tsa")
    asyncio.run(calls(runner, 5))
    time.sleep(0.5)  # a few stamping attempts fail meanwhile
    stamped, total = stamped_and_total(runner)
    assert stamped == stamped_before < total, "records were stamped with the TSA down"

    server = runner.server_names[MSP_SERVER]
    runner.stop(server, kill=True)
    runner.start("tsa")
    runner.start(server)
    deadline = time.monotonic() + 15
    while (now := stamped_and_total(runner))[0] < total:
        assert time.monotonic() < deadline, f"the backlog was not stamped after restart: {now}"
        time.sleep(0.1)

    asyncio.run(calls(runner, 1))  # the chain goes on after the restart
    result = audit_verify(runner.log_db(MSP_SERVER))
    assert result.returncode == 0, result.stdout + result.stderr
