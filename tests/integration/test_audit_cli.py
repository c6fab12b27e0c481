"""`gateway audit verify` on a real log: intact passes; every kind of tampering is named."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from gateway_demo.runner import Runner
from tests.tamper import tamper_sqlite

from .clinics import get_person
from .conftest import MSP, audit_verify


@pytest.fixture(scope="module")
def log_copy(make_runner: Callable[..., Runner], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A message log with 5 exchanges (10 records), copied after its server stopped."""
    import asyncio

    runner = make_runner()

    async def calls() -> None:
        async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
            for _ in range(5):
                outcome = await get_person(channel)
                assert outcome.ok

    asyncio.run(calls())
    runner.stop("ss-msp")
    target = tmp_path_factory.mktemp("log") / "messagelog.db"
    shutil.copy(runner.log_db(MSP), target)
    return target


@pytest.fixture
def db(log_copy: Path, tmp_path: Path) -> Path:
    path = tmp_path / "messagelog.db"
    shutil.copy(log_copy, path)
    return path


def execute(db: Path, *statements: str) -> None:
    tamper_sqlite(db, *statements)


def test_intact_log_verifies(db: Path) -> None:
    """An untouched log verifies, exit status 0, with its record count."""
    result = audit_verify(db)
    assert result.returncode == 0, result.stdout
    assert "OK: 10 record(s) verified" in result.stdout


def test_edited_record_is_named(db: Path) -> None:
    """Changing the purpose of record 3 fails verification at record 3."""
    execute(db, "UPDATE message_log SET purpose = 'marketing' WHERE seq = 3")
    result = audit_verify(db)
    assert result.returncode == 1
    assert "record 3" in result.stdout and "altered" in result.stdout


def test_deleted_record_is_named(db: Path) -> None:
    """Deleting record 4 fails verification naming record 4 as missing."""
    execute(db, "DELETE FROM message_log WHERE seq = 4")
    result = audit_verify(db)
    assert result.returncode == 1
    assert "record 4" in result.stdout and "missing" in result.stdout


def test_reordered_records_are_named(db: Path) -> None:
    """Swapping records 5 and 6 fails verification at record 5."""
    execute(
        db,
        "UPDATE message_log SET seq = -5 WHERE seq = 5",
        "UPDATE message_log SET seq = 5 WHERE seq = 6",
        "UPDATE message_log SET seq = 6 WHERE seq = -5",
    )
    result = audit_verify(db)
    assert result.returncode == 1
    assert "record 5" in result.stdout


def test_rehashed_edit_breaks_the_next_link(db: Path) -> None:
    """An edit whose own hash is recomputed is still caught by the next record's link."""
    from gateway.audit import RECORD_FIELDS, record_hash

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = dict(conn.execute("SELECT * FROM message_log WHERE seq = 2").fetchone())
    row["purpose"] = "marketing"
    fields = {k: row[k] for k in RECORD_FIELDS}
    new_hash = record_hash(2, row["prev_hash"], fields)
    tamper_sqlite(
        db, ("UPDATE message_log SET purpose = 'marketing', hash = ? WHERE seq = 2", (new_hash,))
    )
    result = audit_verify(db)
    assert result.returncode == 1
    assert "record 3" in result.stdout and "link" in result.stdout


def test_missing_log_is_a_usage_error(tmp_path: Path) -> None:
    """A path with no log exits 2 with a clear message."""
    result = audit_verify(tmp_path / "nothing.db")
    assert result.returncode == 2
    assert "no message log" in result.stderr
