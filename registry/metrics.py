"""The registry's Prometheus metrics: admin API requests by route template and status,
agreements by state, the configuration version and its publishing time, and the watchers
connected. Routes are the API's templates (`/v1/agreements/{id}`), never a raw path."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gateway_registry_api_requests_total",
            "Admin API requests, by route template and HTTP status",
            ["route", "status"],
            registry=registry,
        )
        self.agreements = Gauge(
            "gateway_registry_agreements",
            "Agreements in the registry, by state (as of the last publication)",
            ["state"],
            registry=registry,
        )
        self.version = Gauge(
            "gateway_configuration_version",
            "Version of the configuration last published",
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "gateway_registry_publish_seconds",
            "Time to build, sign and store one configuration version",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.watchers = Gauge(
            "gateway_registry_watchers",
            "Watch streams open (security servers and federated servers following)",
            registry=registry,
        )
        self.calls_refused = Counter(
            "gateway_registry_configuration_calls_refused_total",
            "Configuration service calls refused: their source address had "
            "configuration_calls_per_address open already",
            registry=registry,
        )

    def published(self, version: int, seconds: float, states: dict[str, int]) -> None:
        self.version.set(version)
        self.publish_seconds.observe(seconds)
        for state, count in states.items():
            self.agreements.labels(state).set(count)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count each request under its route's template, with the status it got."""
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            self.requests.labels(route, str(status)).inc()


def timer() -> Callable[[], float]:
    started = time.perf_counter()
    return lambda: time.perf_counter() - started
