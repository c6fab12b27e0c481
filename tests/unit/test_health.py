"""The health servicer follows readiness, and stays down once stopping."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from security_server.health import NOT_SERVING, SERVING, ReadinessHealth


async def test_health_follows_readiness_and_shutdown() -> None:
    """SERVING while ready, NOT_SERVING while not, and NOT_SERVING
    for good after shutdown begins."""
    ready = False
    health = ReadinessHealth(lambda: ready)
    request = health_pb2.HealthCheckRequest()
    context: Any = None  # used only to abort for an unknown service
    assert (await health.Check(request, context)).status == NOT_SERVING
    ready = True
    assert (await health.Check(request, context)).status == SERVING
    await health.enter_graceful_shutdown()
    assert (await health.Check(request, context)).status == NOT_SERVING
