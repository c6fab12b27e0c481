"""Fixtures that start real topologies (processes on loopback, real mTLS, real SQLite)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tomli_w
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.settings import database_url
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import TEMPLATE, Runner

MSP, DNIC = "UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"
CLINICS, IDENTITY = "UY/GOV/MSP/clinics", "UY/GOV/DNIC/identity"
POPULATION = "UY/GOV/DNIC/identity/population/v1"
VACCINATION = "UY/GOV/MSP/clinics/vaccination/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
GET_RECORD = "/demo.vaccination.v1.VaccinationRegister/GetRecord"
ECHO = "/demo.population.v1.PopulationRegistry/Echo"


# ---- load ----------------------------------------------------------------------------------


async def timed_calls(
    runner: Runner,
    seconds: float,
    *,
    callers: int = 8,
    purpose: str = "healthcare-identification",
    pause: float = 0.0,
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[float, float, Outcome]]:
    """(start, end, outcome) of the clinics' GetPerson calls through ss-msp, made by
    `callers` concurrent callers for `seconds` (times from the start), with `during` run
    beside them (a fault to inject)."""
    request = population_pb2.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    metadata = routing_metadata(client=CLINICS, service=POPULATION, purpose=purpose)
    results: list[tuple[float, float, Outcome]] = []
    begun = time.monotonic()
    async with runner.consumer_channel(MSP, CLINICS) as channel:

        async def caller() -> None:
            while time.monotonic() - begun < seconds:
                started = time.monotonic() - begun
                outcome = await call_raw(channel, GET_PERSON, request, metadata, timeout=10)
                results.append((started, time.monotonic() - begun, outcome))
                if pause:
                    await asyncio.sleep(pause)

        async def nothing() -> None:
            return None

        await asyncio.gather((during or nothing)(), *(caller() for _ in range(callers)))
    return results


# ---- PostgreSQL databases of a test's own --------------------------------------------------


def postgres_server() -> str:
    """The async URL of the test PostgreSQL server (the variable may name this process's
    own database; any database of the server takes CREATE and DROP DATABASE)."""
    server = (
        os.environ.get("GATEWAY_TEST_POSTGRES_SERVER") or os.environ["GATEWAY_TEST_POSTGRES_URL"]
    )
    return database_url(server, base=Path.cwd())


async def postgres_admin(*statements: str) -> None:
    """Run statements on the test PostgreSQL server, outside any transaction."""
    engine = create_async_engine(postgres_server(), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


@contextmanager
def postgres_database(prefix: str) -> Iterator[tuple[str, str]]:
    """A new database on the test server, as (name, URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    asyncio.run(postgres_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            name,
            make_url(postgres_server()).set(database=name).render_as_string(hide_password=False),
        )
    finally:
        asyncio.run(postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def postgres_rows(url: str, query: str) -> list[Any]:
    """The rows a query returns from a database of the test server."""
    engine = create_async_engine(database_url(url, base=Path.cwd()))
    try:
        async with engine.connect() as conn:
            return list(await conn.execute(sa.text(query)))
    finally:
        await engine.dispose()


async def close_database(name: str) -> None:
    """As a database restart looks to its clients: every connection cut, new ones refused
    (until `reopen_database`)."""
    await postgres_admin(
        f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )


async def reopen_database(name: str) -> None:
    await postgres_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


# a second security server of DNIC hosting the population registry's subsystem, for the
# failover and balancer tests (appended to the demo topology template)
DNIC2 = "UY/GOV/DNIC/ss2"
SECOND_DNIC_SERVER = f"""
[[servers]]
id = "{DNIC2}"
address = "127.0.0.1:7103"
auth_certificate = "pki/auth/UY_GOV_DNIC_ss2.crt"
subsystems = ["UY/GOV/DNIC/identity"]
"""


def template_with(tmp: Path, extra_agreements: list[dict[str, Any]]) -> Path:
    """The demo topology with extra agreements, written to a new template file."""
    doc = tomllib.loads(TEMPLATE.read_text())
    doc["agreements"] = [*doc.get("agreements", []), *extra_agreements]
    path = tmp / "template.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def timed_agreements() -> list[dict[str, Any]]:
    """Agreements for IDENTITY -> POPULATION: one not yet valid, one expired."""
    now = datetime.now(UTC)
    return [
        {
            "id": "AGR-FUTURE",
            "client": IDENTITY,
            "service": POPULATION,
            "purposes": ["future-study"],
            "valid_from": now + timedelta(days=30),
        },
        {
            "id": "AGR-EXPIRED",
            "client": IDENTITY,
            "service": POPULATION,
            "purposes": ["old-study"],
            "valid_from": now - timedelta(days=60),
            "valid_until": now - timedelta(days=1),
        },
    ]


@pytest.fixture(scope="module")
def make_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Runner]]:
    """Build and start topologies; every one is stopped at the end of the module."""
    runners: list[Runner] = []

    def make(**kwargs: Any) -> Runner:
        workdir = tmp_path_factory.mktemp("topology")
        if "extra_agreements" in kwargs:
            kwargs["template"] = template_with(workdir, kwargs.pop("extra_agreements"))
        runner = Runner(workdir / "run", **kwargs)
        runners.append(runner)
        runner.prepare()
        runner.start_all()
        return runner

    yield make
    for runner in runners:
        runner.close()


def query_log(db: Path, sql: str, *args: object) -> list[sqlite3.Row]:
    """Rows of a message log database read as it stands, opened read-only (the server may be
    running)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition the topology reaches by itself (a stamp, a checkpoint, a log line);
    fail naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def log_rows(db: Path, message_id: str) -> list[dict[str, Any]]:
    """The message log rows of one message id, in order."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT * FROM message_log WHERE message_id = ? ORDER BY seq", (message_id,)
        )
        return [dict(r) for r in rows]


def run_gateway(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the `gateway` command line as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def audit_verify(db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `gateway audit verify` on a log as an auditor would."""
    return run_gateway("audit", "verify", "--quiet", "--db", db, *extra)


def keep_cookies(response: Any, cookies: dict[str, str]) -> SimpleCookie:
    """Apply a response's Set-Cookie headers to `cookies` as a browser would (a cookie set
    empty or with Max-Age=0 is deleted); the cookies as set, with their attributes."""
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        jar.load(header)
    for name, morsel in jar.items():
        if morsel["max-age"] == "0" or not morsel.value:
            cookies.pop(name, None)
        else:
            cookies[name] = morsel.value
    return jar
