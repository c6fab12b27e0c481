"""A PostgreSQL outage under load: the population registry's security server logs to a
PostgreSQL database of this module's own, which goes away for two seconds while the
clinics call (every connection to it is cut and new ones are refused, as in a restart),
then comes back. Calls that cannot be logged are refused with a code (fail closed:
nothing answered unlogged), the server resumes by itself, and its chain verifies."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.settings import database_url
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, run_gateway

POSTGRES = os.environ.get("GATEWAY_TEST_POSTGRES_URL")

pytestmark = pytest.mark.skipif(
    not POSTGRES, reason="GATEWAY_TEST_POSTGRES_URL is not set: PostgreSQL outage test skipped"
)


async def _admin(server_url: str, *statements: str) -> None:
    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runner, str, str, str]]:
    """The demo topology with ss-dnic's log in a PostgreSQL database of its own; yields the
    runner, the server's URL, the database's name and its URL."""
    assert POSTGRES is not None
    server_url = database_url(POSTGRES, base=Path.cwd())
    name = f"outage_test_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    runner = Runner(tmp_path_factory.mktemp("outage") / "run")
    try:
        runner.prepare()
        runner.set_log(DNIC, database=url, chain="dnic")
        runner.start_all()
        yield runner, server_url, name, url
    finally:
        runner.close()
        asyncio.run(
            _admin(
                server_url,
                f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true',
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            )
        )


def test_calls_are_refused_while_the_log_is_down_and_resume_after(
    outage: tuple[Runner, str, str, str],
) -> None:
    runner, server_url, name, url = outage
    down_at, up_at, seconds = 1.0, 3.0, 6.0

    async def scenario() -> list[tuple[float, Outcome]]:
        request = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
        metadata = routing_metadata(
            client=CLINICS, service=POPULATION, purpose="healthcare-identification"
        )
        results: list[tuple[float, Outcome]] = []
        begun = time.monotonic()
        async with runner.consumer_channel(MSP, CLINICS) as channel:

            async def caller() -> None:
                while time.monotonic() - begun < seconds:
                    started = time.monotonic() - begun
                    outcome = await call_raw(channel, GET_PERSON, request, metadata, timeout=10)
                    results.append((started, outcome))
                    await asyncio.sleep(0.01)

            async def database() -> None:
                await asyncio.sleep(down_at)
                await _admin(
                    server_url,
                    f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{name}'",
                )
                await asyncio.sleep(up_at - down_at)
                await _admin(server_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

            await asyncio.gather(database(), *(caller() for _ in range(4)))
        return results

    results = asyncio.run(scenario())
    before = [o for s, o in results if s < down_at - 0.2]
    during = [o for s, o in results if down_at + 0.3 < s < up_at]
    after = [o for s, o in results if s > up_at + 2.0]
    assert before and all(o.ok for o in before)
    # fail closed: what could not be logged is refused with a code, never answered
    refused = [o for o in during if not o.ok]
    assert refused, "no call was refused while the log's database was down"
    assert {o.error for o in refused} <= {"log_unavailable", "internal_error"}, {
        o.error for o in refused
    }
    assert [o for o in during if o.ok] == []
    # resumed by itself
    assert after and all(o.ok for o in after), [o for o in after if not o.ok][:3]
    print(
        f"\noutage: {len(results)} calls, {len(refused)} refused while the database was "
        f"down ({sorted({o.error or '' for o in refused})}), {len(after)} answered after"
    )
    # every answered call is in the provider's log, and the chain verifies
    answered = {o.message_id for _, o in results if o.ok}
    assert answered <= asyncio.run(_provider_answers(url))
    done = run_gateway("audit", "verify", "--db", url, "--quiet", "--stamp-grace", "-1")
    assert done.returncode == 0, done.stdout + done.stderr


async def _provider_answers(url: str) -> set[str]:
    """The message ids of the responses the provider logged as answered."""
    engine = create_async_engine(database_url(url, base=Path.cwd()))
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT message_id FROM message_log WHERE role = 'provider' "
                    "AND kind = 'response' AND status = 'ok'"
                )
            )
            return {r[0] for r in rows}
    finally:
        await engine.dispose()
