"""What every test process shares: a PostgreSQL database of its own.

Tests that use PostgreSQL read GATEWAY_TEST_POSTGRES_URL when their module is imported.
Before any module is collected, each test process (a plain `pytest`, or each worker of
`pytest -n`) creates a new, empty database on that server and points the variable at it,
so that two processes, parallel workers or two engineers' runs, never reset or read each
other's tables; the database is dropped when the process ends. The server given by the
caller is kept in GATEWAY_TEST_POSTGRES_SERVER (workers inherit it from the controller).
This file must never touch a database it did not create.

It also orders the test files for `make test`'s workers (pytest-xdist, one file per
worker, handed out in collection order): the longest-running integration files first,
then the other integration files, then the unit tests, which fill the gaps at the end,
so that no long file starts last and runs alone.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.settings import database_url

URL = "GATEWAY_TEST_POSTGRES_URL"
SERVER = "GATEWAY_TEST_POSTGRES_SERVER"
_DATABASE = pytest.StashKey[str]()  # the name of the database this process created

# The files that take longest (`pytest --durations`), started first; only the order changes.
LONGEST_FIRST = (
    "tests/integration/test_demo.py",
    "tests/integration/test_console_browser.py",
    "tests/integration/test_faults.py",
    "tests/integration/test_evidence.py",
    "tests/integration/test_trust_faults.py",
    "tests/integration/test_archive.py",
    "tests/integration/test_replicas.py",
    "tests/integration/test_add_an_agency.py",
    "tests/integration/test_federation.py",
    "tests/integration/test_readiness.py",
    "tests/integration/test_registry_api.py",
    "tests/integration/test_auditor_api.py",
    "tests/integration/test_federation_api.py",
    "tests/integration/test_failover.py",
    "tests/integration/test_load_balancer.py",
    "tests/integration/test_database_outage.py",
    "tests/integration/test_tracing.py",
)


def _is_xdist_controller(config: pytest.Config) -> bool:
    """Whether this process only hands tests out to `pytest -n` workers (runs none)."""
    return not hasattr(config, "workerinput") and getattr(config.option, "dist", "no") != "no"


async def _execute(server: str, statement: str) -> None:
    engine = create_async_engine(
        database_url(server, base=Path.cwd()), isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    server = os.environ.get(SERVER) or os.environ.get(URL)
    if not server or _is_xdist_controller(config):
        return
    os.environ[SERVER] = server
    name = f"gateway_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_execute(server, f'CREATE DATABASE "{name}"'))
    os.environ[URL] = make_url(server).set(database=name).render_as_string(hide_password=False)
    config.stash[_DATABASE] = name


def pytest_unconfigure(config: pytest.Config) -> None:
    name = config.stash.get(_DATABASE, None)
    if name is None:
        return
    server = os.environ[SERVER]
    os.environ[URL] = server
    asyncio.run(_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _file_rank(item: pytest.Item) -> tuple[int, int]:
    path = item.nodeid.split("::", 1)[0]
    if path in LONGEST_FIRST:
        return (0, LONGEST_FIRST.index(path))
    return (1, 0) if path.startswith("tests/integration/") else (2, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # a stable sort: each file's tests keep their order (and their module-scoped fixtures)
    items.sort(key=_file_rank)
