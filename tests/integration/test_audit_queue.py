"""`log.audit_queue` at the auditor API: past it, a query is refused with 503
`log_unavailable` at once, and the queries that waited are answered once the log drains.

In-process: a real SQLite message log, the real `AuditorApi` (aiohttp, port 0) and real
registry tokens. The log is kept busy by another connection holding SQLite's write lock,
as a slow disk or a long transaction would: the writer's transaction waits for it while
the auditors' records queue behind it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from gateway.settings import database_url
from gateway_ops.auth import Role as TokenRole
from gateway_ops.auth import TokenIssuer, TokenVerifier
from security_server.auditor_api import AuditorApi, start
from security_server.message_log import MessageLog
from security_server.search import Searcher

from .test_message_log_store import fields  # an exchange's request record

AUDIT_QUEUE = 3
ISSUER = "gateway-registry:UY"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[MessageLog, str, str, Path]]:
    """(log, base URL of its auditor API, an instance-wide auditor token, the log's file)."""
    path = tmp_path / "messagelog.db"
    log = await MessageLog.open(database_url(str(path), base=tmp_path), audit_queue=AUDIT_QUEUE)
    issuer = TokenIssuer(ec.generate_private_key(ec.SECP256R1()), issuer=ISSUER, audience=ISSUER)
    api = AuditorApi(
        log,
        lambda subject: None if subject is None else f"pseudonym-of-{subject}",
        Searcher(log.engine),
        TokenVerifier(issuer=issuer),
    )
    runner, port = await start(api, "127.0.0.1:0")
    token = issuer.issue(
        subject="alice", role=TokenRole.AUDITOR, now=datetime.now(UTC), ttl=timedelta(minutes=5)
    )
    try:
        yield log, f"http://127.0.0.1:{port}", token, path
    finally:
        await runner.cleanup()
        await log.close()


async def query(session: aiohttp.ClientSession, url: str, token: str, i: int) -> Any:
    async with session.get(
        f"{url}/audit/v1/records",
        params={"message_id": f"m-{i}"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, await response.json()


async def wait_for(condition: Any, what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_query_past_the_audit_queue_gets_503_log_unavailable_and_the_waiting_ones_are_answered(
    served: tuple[MessageLog, str, str, Path],
) -> None:
    """README (*Exchanges first*): audit-query records wait in a queue of at most
    `log.audit_queue`; when it is full an auditor query is refused with 503
    `log_unavailable` (at once, not after the log frees up). The queries that waited are
    answered (200, with what they asked for) once the log can be written again, each with
    its own `audit-query` record; the refused one is said in the server's log
    (`audit_query_not_logged`) and has no record."""
    log, url, token, path = served
    await log.append(fields(1))  # something to find
    # another writer takes SQLite's write lock (WAL: searches still read meanwhile)
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    waiting: list[asyncio.Future[Any]] = []
    try:
        blocker.execute("BEGIN IMMEDIATE")
        # an exchange's record: the writer takes it and waits for the lock in its transaction
        data = asyncio.ensure_future(log.append(fields(2)))
        waiting.append(data)
        await asyncio.sleep(0)  # the append has queued its record
        await wait_for(lambda: log.queued == 0, "the writer to take the exchange's record")
        async with aiohttp.ClientSession() as session:
            queries = [asyncio.ensure_future(query(session, url, token, 1)) for _ in range(3)]
            waiting += queries
            await wait_for(lambda: log.queued == AUDIT_QUEUE, "the audit queue to fill")
            assert not any(q.done() for q in queries)
            with capture_logs() as logs:
                started = time.monotonic()
                status, body = await asyncio.wait_for(query(session, url, token, 1), 2)
                refused_in = time.monotonic() - started
            assert (status, body["error"]) == (503, "log_unavailable"), body
            assert "cannot be logged" in body["message"]
            assert refused_in < 1.0, refused_in  # refused at once, not after the queue moved
            assert [e["event"] for e in logs if e["log_level"] == "error"] == [
                "audit_query_not_logged"
            ]
            assert not any(w.done() for w in waiting)  # the exchange and the queries wait
            blocker.execute("ROLLBACK")  # the log drains
            answers = await asyncio.wait_for(asyncio.gather(*queries), 5)
        await asyncio.wait_for(data, 5)
    finally:
        blocker.close()
        for w in waiting:
            w.cancel()
    for status, body in answers:
        assert status == 200, body
        assert [r["message_id"] for r in body["records"]] == ["m-1"]
    with sqlite3.connect(path) as db:
        kinds = [r[0] for r in db.execute("SELECT kind FROM message_log ORDER BY seq")]
    # the exchanges', then one audit-query record per answered query, none for the refused
    assert kinds == ["request", "request", *["audit-query"] * 3], kinds
