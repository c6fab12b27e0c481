"""Failover between providers: the population registry is hosted by two security servers
of DNIC; the Ministry of Health's server sends each call to the one answering fastest
that it can reach. When one is stopped (SIGTERM: it drains) under load, no call fails;
when one is killed (`kill -9`), only calls in flight at the kill may fail. No request
reaches two backends (every message id is in at most one provider's log); each failed
call is refused with its code and logged."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from gateway_demo.client import Outcome
from gateway_demo.runner import TEMPLATE, Runner

from .conftest import DNIC2, SECOND_DNIC_SERVER, timed_calls

MSP, DNIC1 = "UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    folder = tmp_path_factory.mktemp("failover")
    template = folder / "topology.toml"
    template.write_text(TEMPLATE.read_text() + SECOND_DNIC_SERVER)
    runner = Runner(folder / "run", template=template)
    try:
        runner.prepare()
        runner.start_all()
        yield runner
    finally:
        runner.close()


def provider_requests(runner: Runner, server: str) -> list[str]:
    """The message ids of the requests a provider server logged (and so passed on to its
    backend), read from its SQLite log (also after a kill -9)."""
    with sqlite3.connect(f"file:{runner.log_db(server)}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT message_id FROM message_log WHERE role = 'provider' AND kind = 'request'"
        ).fetchall()
    return [r[0] for r in rows]


async def load(
    runner: Runner, seconds: float, kill_after: float | None = None, *, drain: bool = False
) -> tuple[list[tuple[float, float, Outcome]], str | None, float]:
    """(start, end, outcome) of calls from 8 callers for `seconds`, and, with
    `kill_after`, the DNIC server stopped after that many seconds (the one taking the
    calls then): killed, or with `drain` sent SIGTERM and waited for; and when (seconds
    from the start, at the latest) it was gone: on a loaded machine the killer's own sleep
    and the stop may end well after `kill_after`."""
    killed: list[str] = []
    stopped_in: list[float] = []
    gone_at: list[float] = []
    before = {s: len(provider_requests(runner, s)) for s in (DNIC1, DNIC2)}
    begun = time.monotonic()  # no later than the calls' own start

    async def killer() -> None:
        if kill_after is not None:
            await asyncio.sleep(kill_after)
            busiest = max(before, key=lambda s: len(provider_requests(runner, s)) - before[s])
            killed.append(busiest)
            began = time.monotonic()
            await asyncio.to_thread(runner.stop, runner.server_names[busiest], kill=not drain)
            stopped_in.append(time.monotonic() - began)
            gone_at.append(time.monotonic() - begun)

    results = await timed_calls(runner, seconds, purpose="benchmark", during=killer)
    if stopped_in:
        print(f"\n{killed[0]} stopped in {stopped_in[0]:.2f} s, {gone_at[0]:.2f} s in")
    return results, killed[0] if killed else None, gone_at[0] if gone_at else 0.0


def test_a_provider_stopped_under_load_drains_and_no_call_fails(runner: Runner) -> None:
    results, victim, _ = asyncio.run(load(runner, 3.0, 1.0, drain=True))
    assert victim is not None
    failed = [o for _, _, o in results if not o.ok]
    assert failed == [], failed[:3]
    process = runner.processes[runner.server_names[victim]].popen
    assert process is not None and process.returncode == 0
    print(f"\ndrain: {victim} stopped; {len(results)} calls, none failed")
    seen = Counter(provider_requests(runner, DNIC1) + provider_requests(runner, DNIC2))
    assert max(seen.values()) == 1
    assert {o.message_id for _, _, o in results} <= set(seen)
    runner.start(runner.server_names[victim])  # back for the next test


def test_a_provider_killed_under_load_fails_only_calls_in_flight(runner: Runner) -> None:
    # both servers answer before the kill: each is tried while it is unmeasured
    warm, _, _ = asyncio.run(load(runner, 1.0))
    assert all(o.ok for _, _, o in warm), [o for _, _, o in warm if not o.ok][:3]
    first, second = provider_requests(runner, DNIC1), provider_requests(runner, DNIC2)
    assert first and second, (len(first), len(second))

    results, victim, gone_at = asyncio.run(load(runner, 3.5, 1.0))
    failed = [(s, e, o) for s, e, o in results if not o.ok]
    answered = [o for _, _, o in results if o.ok]
    # only calls already under way when the server died may fail (or sent to it before
    # the consumer's server saw its stream end)
    assert all(start <= gone_at + 0.5 for start, _, _ in failed), (gone_at, failed[:3])
    assert {o.error for _, _, o in failed} <= {"provider_unavailable", "deadline_exceeded"}
    assert len(failed) <= 8, [(round(s, 3), round(e, 3), o.details[:120]) for s, e, o in failed]
    assert len(answered) > 50
    late = [o for s, _, o in results if s > gone_at + 1.0]
    assert late and all(o.ok for o in late)
    print(
        f"\nfailover: {victim} killed; {len(results)} calls attempted, {len(failed)} failed "
        f"(in flight at the kill), {len(answered)} answered"
    )
    # no request reached two backends, and every answered call is in a provider's log
    seen = Counter(provider_requests(runner, DNIC1) + provider_requests(runner, DNIC2))
    assert max(seen.values()) == 1
    assert {o.message_id for o in answered} <= set(seen)
    # the refused calls were logged by the consumer
    with sqlite3.connect(f"file:{runner.log_db(MSP)}?mode=ro", uri=True) as db:
        refused = {
            r[0]
            for r in db.execute(
                "SELECT message_id FROM message_log WHERE role = 'consumer' AND kind = 'refusal'"
            )
        }
    assert {o.message_id for _, _, o in failed} <= refused
