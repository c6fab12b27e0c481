"""Fixtures that start real topologies (processes on loopback, real mTLS, real SQLite)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway_demo.runner import TEMPLATE, Runner

MSP, DNIC = "UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"
CLINICS, IDENTITY = "UY/GOV/MSP/clinics", "UY/GOV/DNIC/identity"
POPULATION = "UY/GOV/DNIC/identity/population/v1"
VACCINATION = "UY/GOV/MSP/clinics/vaccination/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
GET_RECORD = "/demo.vaccination.v1.VaccinationRegister/GetRecord"
ECHO = "/demo.population.v1.PopulationRegistry/Echo"


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
