"""`grpc.health.v1` on the consumer and provider endpoints, for load balancers and
Kubernetes probes.

The overall status (service "") is SERVING while the server is ready (the same conditions
as the operations port's `/readyz`: a configuration in force, the log writable, its own
OCSP answers fresh, time-stamping within its failure period), NOT_SERVING otherwise, and
NOT_SERVING for good once the server stops. Probes are served by this handler, registered before the endpoints' own, so they are
never refused, logged or counted as calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio  # type: ignore[attr-defined]

from security_server.background import every

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ReadinessHealth(aio.HealthServicer):  # type: ignore[misc]
    """Health that follows `ready()`: read at each Check, and every `interval` seconds for
    the watchers of Watch."""

    def __init__(self, ready: Callable[[], bool], *, interval: float = 1.0) -> None:
        super().__init__()
        self.ready = ready
        self.interval = interval

    async def refresh(self) -> None:
        await self.set("", SERVING if self.ready() else NOT_SERVING)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        await self.refresh()
        return await super().Check(request, context)

    async def run(self) -> None:
        """Keep the status current for Watch (until cancelled)."""
        await every(self.interval, self.refresh, name="health", first_at_once=True)

    def register(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)
