"""A provider's security server stopped with SIGTERM drains (README, *One call* and
`limits.drain_seconds`): `/readyz` turns 503 naming `stopping` at once, peers are told on
their streams and send no new call to it, the calls in flight are answered, and the
process exits within `limits.drain_seconds` even when a call is stuck in its backend.

`test_failover.py` stops a provider under load (short calls, a second provider to fail
over to); here the population registry's only provider, ss-dnic, has a backend of the
test's own that answers after a delay the request names, so that a call is in flight
for as long as the test wants, and new calls have nowhere else to go.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import aiohttp
import grpc
import pytest

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, query_log

pytestmark = pytest.mark.slow

DRAIN_SECONDS = 3.0
# what the server may take past the drain deadline to close its log and send the final
# checkpoint, and a test process's polling
AFTER_DRAIN_SECONDS = 3.0
SLOW_CALL_SECONDS = 1.5
# a server still running this long after SIGTERM is killed, and the test fails
GIVE_UP_SECONDS = DRAIN_SECONDS + 7.0
METADATA = routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification")
STOPPING = "the process is stopping"  # gateway_ops.readiness.Readiness.stopping


class SlowBackend:
    """The population registry's GetPerson, answering after the seconds its national id
    names ("delay:1.5"), or only when released ("stuck"); it notes each request."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.release = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "demo.population.v1.PopulationRegistry",
                    {
                        "GetPerson": grpc.unary_unary_rpc_method_handler(
                            self.get_person,
                            request_deserializer=population_pb2.GetPersonRequest.FromString,
                            response_serializer=population_pb2.Person.SerializeToString,
                        )
                    },
                ),
            )
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def get_person(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.received.append(request.national_id)
        kind, _, delay = request.national_id.partition(":")
        self.release.wait(float(delay) if kind == "delay" else 60.0)
        return population_pb2.Person(national_id=request.national_id, given_name="Ana")

    def close(self) -> None:
        self.release.set()
        self.server.stop(None)


@pytest.fixture(scope="module")
def backend() -> Iterator[SlowBackend]:
    backend = SlowBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, backend: SlowBackend) -> Iterator[Runner]:
    with Runner(tmp_path_factory.mktemp("drain") / "run") as runner:
        runner.prepare()
        runner.set_settings(DNIC, "backends", **{POPULATION: backend.address})
        runner.set_settings(DNIC, "limits", drain_seconds=DRAIN_SECONDS)
        runner.start_all()
        yield runner


async def get_person(runner: Runner, national_id: str, timeout: float = 30.0) -> Outcome:
    request = population_pb2.GetPersonRequest(national_id=national_id).SerializeToString()
    async with runner.consumer_channel(MSP, CLINICS) as channel:
        return await call_raw(channel, GET_PERSON, request, METADATA, timeout=timeout)


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def readyz(http: aiohttp.ClientSession, ops: str) -> tuple[int, dict[str, Any]] | None:
    """`/readyz` of a server, or None once its operations port is closed (it has stopped)."""
    try:
        async with http.get(f"{ops}/readyz") as answer:
            return answer.status, await answer.json()
    except aiohttp.ClientConnectionError:
        return None


def draining_notices(runner: Runner) -> int:
    """How many drain notices ss-msp has had from its providers (its `peer_draining` log
    lines)."""
    log = runner.processes[runner.server_names[MSP]].log_path
    return log.read_text().count('"peer_draining"')


async def stop_with_a_call_in_flight(
    runner: Runner, backend: SlowBackend, national_id: str
) -> tuple[asyncio.Task[Outcome], float, int]:
    """Start a call that reaches the backend, then SIGTERM ss-dnic; the call, when the
    signal was sent, and the drain notices ss-msp had before."""
    # the link to ss-dnic is up, as it is for a server taking calls
    assert (await get_person(runner, "delay:0")).ok
    seen = len(backend.received)
    call = asyncio.create_task(get_person(runner, national_id))
    await until(lambda: len(backend.received) > seen, "the call reached the backend")
    popen = runner.processes[runner.server_names[DNIC]].popen
    assert popen is not None
    told = draining_notices(runner)
    popen.send_signal(signal.SIGTERM)
    return call, time.monotonic(), told


async def watch_drain(
    runner: Runner,
    backend: SlowBackend,
    stopping: tuple[asyncio.Task[Outcome], float, int],
) -> dict[str, Any]:
    """Poll ss-dnic's `/readyz` until it exits, sending one new call through ss-msp once
    `/readyz` names stopping and ss-msp has been told; what was seen, with times from the
    signal."""
    call, signalled, told = stopping
    name = runner.server_names[DNIC]
    popen = runner.processes[name].popen
    assert popen is not None
    ops = runner.ops_url(name)
    seen: dict[str, Any] = {"answers": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while popen.poll() is None and time.monotonic() - signalled < GIVE_UP_SECONDS:
            answer = await readyz(http, ops)
            if answer is not None:
                seen["answers"].append(answer)
                if "new_call" not in seen and answer[1].get("failed", {}).get("stopping"):
                    seen["stopping_after"] = time.monotonic() - signalled
                    # ss-msp is told on its stream (readiness turns false just before)
                    await until(
                        lambda: draining_notices(runner) > told, "ss-msp told of the drain", 2.0
                    )
                    seen["told_after"] = time.monotonic() - signalled
                    before = len(backend.received)
                    began = time.monotonic()
                    seen["new_call"] = await get_person(runner, "delay:0", timeout=10)
                    seen["new_call_seconds"] = time.monotonic() - began
                    seen["new_call_reached_backend"] = len(backend.received) > before
            if call.done() and "call_ended_after" not in seen:
                seen["call_ended_after"] = time.monotonic() - signalled
            await asyncio.sleep(0.05)
    if popen.poll() is None:
        runner.stop(name, kill=True)
        call.cancel()
        raise AssertionError(
            f"ss-dnic still running {GIVE_UP_SECONDS} s after SIGTERM (drain_seconds "
            f"{DRAIN_SECONDS}): killed; seen {seen}"
        )
    seen["exited_after"] = time.monotonic() - signalled
    seen["returncode"] = popen.returncode
    seen["outcome"] = await call
    seen.setdefault("call_ended_after", seen["exited_after"])
    return seen


def print_times(seen: dict[str, Any]) -> None:
    times = {k: round(v, 2) for k, v in seen.items() if k.endswith(("_after", "_seconds"))}
    print(f"\nseconds after SIGTERM (drain_seconds {DRAIN_SECONDS}): {times}")


def restart_dnic(runner: Runner) -> None:
    name = runner.server_names[DNIC]
    runner.stop(name, kill=True)  # if a failed test left it running
    runner.start(name)


def check_drain_signalled(seen: dict[str, Any]) -> None:
    """What holds in every drain: `/readyz` said 503 naming stopping at once and until the
    end, a new call got a clear error at once and never reached the backend, and the
    server exited cleanly."""
    answers = seen["answers"]
    assert answers, "no /readyz answer after SIGTERM"
    assert "stopping_after" in seen, f"/readyz never named stopping: {answers[:3]}"
    # at once: well within the drain (a loaded 2-core machine takes its time)
    assert seen["stopping_after"] < 2.0, seen["stopping_after"]
    assert seen["told_after"] < 2.0, seen["told_after"]
    # from the first answer naming stopping (the signal takes a moment to arrive) to the end
    first = next(i for i, (_, body) in enumerate(answers) if "stopping" in body.get("failed", {}))
    assert all(
        status == 503 and body["ready"] is False and body["failed"].get("stopping") == STOPPING
        for status, body in answers[first:]
    ), answers[first:][:3]
    new: Outcome = seen["new_call"]
    assert not new.ok and new.error == "provider_unavailable", (new.code, new.details)
    assert seen["new_call_seconds"] < 3.0, seen["new_call_seconds"]
    assert not seen["new_call_reached_backend"], "a call sent during the drain reached the backend"
    assert seen["returncode"] == 0


def test_sigterm_turns_readiness_to_stopping_and_answers_the_call_in_flight(
    runner: Runner, backend: SlowBackend
) -> None:
    async def scenario() -> dict[str, Any]:
        stopping = await stop_with_a_call_in_flight(runner, backend, f"delay:{SLOW_CALL_SECONDS}")
        return await watch_drain(runner, backend, stopping)

    try:
        seen = asyncio.run(scenario())
    finally:
        restart_dnic(runner)  # back for the next test
    print_times(seen)
    check_drain_signalled(seen)
    outcome: Outcome = seen["outcome"]
    assert outcome.ok, (outcome.code, outcome.details)
    assert population_pb2.Person.FromString(outcome.body or b"").given_name == "Ana"
    # answered and logged by the provider before it went away
    kinds = {
        r["kind"]
        for r in query_log(
            runner.log_db(DNIC),
            "SELECT kind FROM message_log WHERE role = 'provider' AND message_id = ?",
            outcome.message_id,
        )
    }
    assert {"request", "response"} <= kinds, kinds
    # the server waited for the call, and went once it was answered, not at the deadline
    assert seen["exited_after"] >= SLOW_CALL_SECONDS
    assert seen["exited_after"] < DRAIN_SECONDS + AFTER_DRAIN_SECONDS


def test_a_call_stuck_in_the_backend_holds_the_drain_no_longer_than_drain_seconds(
    runner: Runner, backend: SlowBackend
) -> None:
    async def scenario() -> dict[str, Any]:
        stopping = await stop_with_a_call_in_flight(runner, backend, "stuck")
        return await watch_drain(runner, backend, stopping)

    try:
        seen = asyncio.run(scenario())
    finally:
        backend.release.set()  # the stuck request's thread returns
        restart_dnic(runner)
        backend.release.clear()  # delays are delays again, whichever test comes next
    print_times(seen)
    check_drain_signalled(seen)
    # the call in flight had its drain_seconds, then the server went
    assert DRAIN_SECONDS - 0.2 <= seen["exited_after"] < DRAIN_SECONDS + AFTER_DRAIN_SECONDS
    # its caller got a clear error when the server went, not at its own deadline (30 s)
    outcome: Outcome = seen["outcome"]
    assert not outcome.ok and outcome.error == "provider_unavailable", (
        outcome.code,
        outcome.details,
    )
    assert seen["call_ended_after"] < DRAIN_SECONDS + AFTER_DRAIN_SECONDS
