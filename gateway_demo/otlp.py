"""A small OTLP/HTTP trace receiver on 127.0.0.1, for the tests and `gateway bench`.

It takes `POST /v1/traces` (application/x-protobuf, gzip or not) as an OpenTelemetry
collector would, in an aiohttp server on a thread of its own, so that it outlives any
caller's event loop. It keeps the spans it received, decoded (`Collector.spans`, for the
tests), or only the raw requests (`decode=False`, for the benchmark, whose receiver must
cost the machine as little as possible while the servers are measured; `span_count`
decodes them afterwards).
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_ANSWER = ExportTraceServiceResponse().SerializeToString()


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, str]


def spans_of(body: bytes) -> list[Span]:
    """The spans of one export request's (uncompressed) body."""
    export = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in export.resource_spans:
        service = next(
            (
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            ),
            "",
        )
        for scope_spans in resource_spans.scope_spans:
            spans += [
                Span(
                    service=service,
                    name=s.name,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(),
                    attributes={a.key: a.value.string_value for a in s.attributes},
                )
                for s in scope_spans.spans
            ]
    return spans


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1; `start` returns its base URL."""

    def __init__(self, *, decode: bool = True) -> None:
        self.decode = decode
        self.spans: list[Span] = []
        # the raw bodies received, when not decoded on arrival
        self.bodies: list[bytes] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    async def _export(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if not self.decode:
            self.bodies.append(body)
        else:
            spans = spans_of(body)
            with self._changed:
                self.spans += spans
                self._changed.notify_all()
        return web.Response(body=_ANSWER, content_type="application/x-protobuf")

    async def _serve(self, started: threading.Event) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._stop = asyncio.Event()
        started.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> str:
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(self._serve(started),),
            name="otlp-receiver",
            daemon=True,
        )
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the OTLP receiver did not start")
        return self.url

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def span_count(self) -> int:
        """How many spans were received (decoding the raw bodies kept so far)."""
        return len(self.spans) + sum(len(spans_of(body)) for body in list(self.bodies))

    def wait(self, done: Callable[[list[Span]], bool], timeout: float = 10.0) -> list[Span]:
        """The spans collected once `done` holds for them (failing after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: done(list(self.spans)), timeout):
                raise AssertionError(f"spans collected so far: {self.spans}")
            return list(self.spans)

    def matching(self, match: Callable[[Span], bool]) -> list[Span]:
        """The spans that `match`, once there is one."""
        return [s for s in self.wait(lambda spans: any(map(match, spans))) if match(s)]
