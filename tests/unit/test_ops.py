"""The operations port: readiness with named reasons, and the HTTP answers that show it."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from gateway_ops.readiness import Readiness
from gateway_ops.server import Ops, OpsSettings


def test_readiness_names_each_failed_condition() -> None:
    readiness = Readiness()
    state: dict[str, str | None] = {"configuration": None, "log": None}
    readiness.add("configuration", lambda: state["configuration"])
    readiness.add("log", lambda: state["log"])
    assert readiness.ready() and readiness.failures() == {}
    state["log"] = "the message log cannot be written: disk full"
    assert readiness.failures() == {"log": "the message log cannot be written: disk full"}
    state["configuration"] = "expired"
    assert set(readiness.failures()) == {"configuration", "log"}
    state["log"] = state["configuration"] = None
    assert readiness.ready()


def test_a_condition_that_raises_reads_as_not_ready() -> None:
    readiness = Readiness()

    def broken() -> str | None:
        raise RuntimeError("boom")

    readiness.add("broken", broken)
    assert readiness.failures() == {"broken": "the check failed: RuntimeError: boom"}


def test_stopping_is_never_ready_again() -> None:
    readiness = Readiness()
    readiness.add("fine", lambda: None)
    readiness.stopping()
    assert readiness.failures() == {"stopping": "the process is stopping"}


async def test_readyz_answers_503_with_reasons_and_metrics_follow() -> None:
    ops = Ops("test")
    reason: list[str | None] = [None]
    ops.readiness.add("configuration", lambda: reason[0])
    async with TestClient(TestServer(ops.app())) as client:
        answer = await client.get("/readyz")
        assert answer.status == 200
        assert await answer.json() == {"ready": True, "process": "test", "failed": {}}
        metrics = await (await client.get("/metrics")).text()
        assert "gateway_ready 1.0" in metrics
        assert "process_cpu_seconds_total" in metrics
        reason[0] = "no configuration yet"
        answer = await client.get("/readyz")
        assert answer.status == 503
        assert (await answer.json())["failed"] == {"configuration": "no configuration yet"}
        assert "gateway_ready 0.0" in await (await client.get("/metrics")).text()
        alive = await client.get("/healthz")  # alive, though not ready
        assert alive.status == 200 and (await alive.json())["alive"] is True


async def test_an_empty_listen_turns_the_port_off() -> None:
    ops = Ops("test")
    assert await ops.start(OpsSettings(listen="")) is None
    await ops.close()
