"""Serving an aiohttp application to whoever can connect, with bounds on what one source
can hold: its open connections, a first request whose head never ends, an idle
connection kept alive.

aiohttp keeps an idle connection, or one whose request head is still arriving, for an
hour by default (its keep-alive timeout): a red-team review held 400 connections of the
registry's API for 35 s with half a request head each, and with 1,100 took the whole
registry down (its descriptors, shared with the configuration service, ran out). Here:

- at most `CONNECTIONS_PER_SOURCE` connections per source (an IPv4 address or an IPv6
  /64, `gateway_ops.sources`), and over all sources at most half the process's
  descriptors; one more is closed at once;
- a connection whose first request head is not complete within `REQUEST_HEAD_SECONDS`
  is closed, and over TLS one whose handshake is not done by then (asyncio shows a TLS
  connection to its protocol only once the handshake is done, so one still shaking
  hands is timed but not yet counted against its source: counting it would take an
  accept loop of our own) (after a request,
  aiohttp's keep-alive timeout closes a connection whose next head does not come whole
  within `KEEPALIVE_SECONDS`);
- an idle connection is closed after `KEEPALIVE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway_ops.sources import OpenCalls, source_of

log = structlog.get_logger("gateway_ops.http_sites")

CONNECTIONS_PER_SOURCE = 256
REQUEST_HEAD_SECONDS = 10.0
KEEPALIVE_SECONDS = 15.0


def _half_the_descriptors() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(CONNECTIONS_PER_SOURCE, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 20


class _Process:
    """The HTTP connections open in this process, over every guarded site: at most half its
    descriptors, so that many sources together cannot take the ones its gRPC services and
    database connections need."""

    open = 0
    limit = _half_the_descriptors()


class ConnectionGuard:
    """The bounds above, for the connections of one site; `refused` counts the
    connections closed for them."""

    def __init__(
        self,
        per_source: int = CONNECTIONS_PER_SOURCE,
        head_seconds: float = REQUEST_HEAD_SECONDS,
        *,
        process: type[_Process] = _Process,
    ) -> None:
        self.connections = OpenCalls(per_source)
        self.process = process
        self.head_seconds = head_seconds
        self.refused = 0
        # connections whose first request has not begun: the handle that closes each
        self._clocks: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(inner(), self)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A request has begun: its head was read whole."""
        if request.transport is not None:
            clock = self._clocks.pop(request.transport, None)
            if clock is not None:
                clock.cancel()
        return await handler(request)

    def _opened(self, transport: asyncio.BaseTransport, source: str) -> bool:
        if self.process.open >= self.process.limit or not self.connections.take(source):
            self.refused += 1
            return False
        self.process.open += 1
        loop = asyncio.get_running_loop()
        self._clocks[transport] = loop.call_later(self.head_seconds, self._too_slow, transport)
        return True

    def _closed(self, transport: asyncio.BaseTransport, source: str) -> None:
        self.connections.give(source)
        self.process.open -= 1
        clock = self._clocks.pop(transport, None)
        if clock is not None:
            clock.cancel()

    def _too_slow(self, transport: asyncio.BaseTransport) -> None:
        self._clocks.pop(transport, None)
        self.refused += 1
        transport.close()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted and timed by a `ConnectionGuard`."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None
        self._source = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._source = source_of(str(peer[0]) if isinstance(peer, tuple) and peer else None)
        if not self._guard._opened(transport, self._source):
            transport.close()  # over its source's connections: nothing read, nothing kept
            return
        self._transport = transport
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._guard._closed(self._transport, self._source)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._transport is None:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections a `ConnectionGuard` bounds."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context: Any = None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registered with the runner, which stops it
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            # a TLS handshake that does not end: the connection is not yet counted (the
            # protocol sees it only once the handshake is done), so its time is bounded
            ssl_handshake_timeout=self.guard.head_seconds if self._ssl_context else None,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    ssl_context: Any = None,
    guard: ConnectionGuard | None = None,
) -> tuple[web.AppRunner, int, ConnectionGuard]:
    """Serve `app` on host:port within the bounds above (a fresh `ConnectionGuard` unless
    one is given); the runner (to clean up), the bound port and the guard."""
    guard = guard or ConnectionGuard()
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
    site = GuardedSite(runner, host, port, guard=guard, ssl_context=ssl_context)
    await site.start()
    return runner, int(runner.addresses[0][1]), guard
