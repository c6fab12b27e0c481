"""The health servicer follows whether a configuration is in force, and stays down once stopping."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health_pb2

from security_server.health import NOT_SERVING, SERVING, ConfigurationHealth


async def test_health_follows_the_configuration_and_shutdown() -> None:
    """SERVING while a configuration is in force, NOT_SERVING without one, and NOT_SERVING
    for good after shutdown begins."""
    in_force = False
    health = ConfigurationHealth(lambda: in_force)
    request = health_pb2.HealthCheckRequest()
    context: Any = None  # used only to abort for an unknown service
    assert (await health.Check(request, context)).status == NOT_SERVING
    in_force = True
    assert (await health.Check(request, context)).status == SERVING
    await health.enter_graceful_shutdown()
    assert (await health.Check(request, context)).status == NOT_SERVING
