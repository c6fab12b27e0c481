"""The operations HTTP server: `/metrics` (Prometheus text format), `/healthz` (the process
is alive and its event loop turns) and `/readyz` (it can do its job now: 200, or 503 with
each failed condition named).

It listens on its own address (`[ops] listen`, loopback by default), apart from the data
and admin endpoints, and answers without authentication: what it shows is counts, times
and names from the configuration, never a caller's input or personal data.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from gateway.errors import ConfigFileError
from gateway_ops import http_sites
from gateway_ops.readiness import Readiness

log = structlog.get_logger("gateway.ops")


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsSettings:
    """The `[ops]` table: the operations port."""

    # host:port of /metrics, /healthz and /readyz (plain HTTP); port 0 picks a free port
    # (written to the ready file and logged); "" turns the port off
    listen: str = "127.0.0.1:0"
    # false: no per-call or per-request metrics are recorded (the state gauges, readiness
    # and the process's own metrics remain); for measuring what metrics cost
    metrics: bool = True


class Ops:
    """One process's metrics registry and readiness, and the HTTP server that shows them."""

    def __init__(self, process: str) -> None:
        # a registry of our own, not prometheus_client's global one: two processes' worth
        # of metrics never mix, in tests that run several in one interpreter either
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.readiness = Readiness()
        self.process = process
        ready = Gauge(
            "gateway_ready",
            "1 when the process can do its job now (what /readyz answers), else 0",
            registry=self.registry,
        )
        ready.set_function(lambda: 1.0 if self.readiness.ready() else 0.0)
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "process": self.process})

    async def _readyz(self, request: web.Request) -> web.Response:
        failed = self.readiness.failures()
        return web.json_response(
            {"ready": not failed, "process": self.process, "failed": failed},
            status=503 if failed else 200,
        )

    async def start(self, settings: OpsSettings) -> str | None:
        """Serve on `settings.listen`; the bound `http://host:port`, or None when turned off."""
        if not settings.listen:
            return None
        host, _, port = settings.listen.rpartition(":")
        # bounds on what one source holds: the process's descriptors serve its other ports
        self._runner, bound, _ = await http_sites.serve(self.app(), host, int(port))
        url = f"http://{host}:{bound}"
        log.info("ops_listening", process=self.process, url=url)
        return url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def server_tls(certificate: Path | None, key: Path | None, what: str) -> ssl.SSLContext | None:
    """A TLS server context (TLS 1.2 or newer) for an HTTP API, or None for plain HTTP when
    neither file is set; `ConfigFileError` naming the settings `what` when it cannot be."""
    if (certificate is None) != (key is None):
        raise ConfigFileError(f"{what}.tls_certificate and {what}.tls_key go together")
    if certificate is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigFileError(f"{what}.tls_certificate, {what}.tls_key: {exc}") from None
    return context
