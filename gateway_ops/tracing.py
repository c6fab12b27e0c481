"""Tracing: OpenTelemetry spans of each call, exported over OTLP/HTTP when configured.

A call's trace comes from its caller's `traceparent` (W3C Trace Context, `00-TRACE-SPAN-FLAGS`)
when that is well formed, else a new one starts. `Tracing.start_call` opens the call's span
and returns a `CallTrace` that opens its steps (checks, log commits, the next hop) as
children, gives the `traceparent` to hand to the next hop, and records the call's outcome.
For the call's duration its trace id is bound in structlog's context variables, so that
every log line of the call carries `trace_id`.

Turned off (`otlp_endpoint = ""`, the default), there is no tracer at all: `start_call`
returns `NO_TRACE`, whose methods do nothing and create no span object, so the data path
pays a few method calls. An incoming `traceparent` is then neither read nor passed on.
A call the sampler leaves out (`sample_ratio`) costs about as little: its steps open no
span and its log lines carry no trace id, and only its `traceparent` (sampled flag off)
goes on to the next hop, which leaves the call out as well.

What this module must never do: fail a call. A malformed or oversized `traceparent` is
ignored (a new trace starts); export runs in the SDK's own thread and its failures are
only logged by the SDK. Span attributes come from the configuration and the gateway's own
decisions (client, service, method once checked, message id, outcome code), never from a
caller's unchecked input or a message body.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

log = structlog.get_logger("gateway.tracing")

# the gRPC metadata key and frame field of the W3C Trace Context header
TRACEPARENT = "traceparent"
# longest traceparent read at all: version 00 has exactly 55 characters; a later version
# may append fields, which are ignored, but nothing longer than this is even parsed
MAX_TRACEPARENT = 256
_VERSION_00_LENGTH = 55
_TRACEPARENT_HEAD = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# the outcome code of a call that was answered
OK = "ok"


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSettings:
    """The `[tracing]` table."""

    # base URL of an OTLP/HTTP collector, such as http://127.0.0.1:4318 (spans go to
    # URL/v1/traces, as with OTEL_EXPORTER_OTLP_ENDPOINT); "" turns tracing off
    otlp_endpoint: str = ""
    # the resource's service.name; "" stands for the process's own name (a server's id)
    service_name: str = ""
    # share of new traces recorded (0 to 1); a call that continues a caller's trace follows
    # the caller's sampled flag instead
    sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError("tracing.sample_ratio must be between 0 and 1")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError("tracing.otlp_endpoint must be an http:// or https:// URL")


def parse_traceparent(value: str | bytes | None) -> trace.SpanContext | None:
    """The remote parent a W3C `traceparent` names, or None when it is absent, longer than
    `MAX_TRACEPARENT`, or malformed (version ff, ids of zeros, upper-case hex, a version 00
    value with anything after it, or anything but ASCII)."""
    if not value or len(value) > MAX_TRACEPARENT:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _TRACEPARENT_HEAD.match(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags = match.groups()
    if version == "ff":
        return None
    if len(value) != _VERSION_00_LENGTH and (version == "00" or value[_VERSION_00_LENGTH] != "-"):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace.SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16) & trace.TraceFlags.SAMPLED),
    )


def traceparent_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The `traceparent` among gRPC request metadata, unchecked (`start_call` checks it)."""
    for key, value in metadata or ():
        if key == TRACEPARENT and isinstance(value, str):
            return value
    return None


def format_traceparent(context: trace.SpanContext) -> str:
    """The version 00 `traceparent` naming `context` as the parent."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def traces_url(endpoint: str) -> str:
    """Where an OTLP/HTTP collector at `endpoint` takes spans."""
    return endpoint.rstrip("/") + "/v1/traces"


class CallTrace:
    """The spans of one call: its own, and its steps as children of it."""

    __slots__ = ("_context", "_log_tokens", "_reset", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self.span = span
        self._context: Context = trace.set_span_in_context(span)
        trace_id = span.get_span_context().trace_id
        self._log_tokens = structlog.contextvars.bind_contextvars(trace_id=f"{trace_id:032x}")
        self._reset: contextvars.Token[CallTrace] | None = _CURRENT.set(self)

    def start(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> trace.Span | None:
        """A step's span, started now: end it with `end`."""
        return self._tracer.start_span(name, context=self._context, kind=kind)

    def end(self, span: trace.Span | None, code: str | None = None) -> None:
        """End a step's span; `code`, when given, is the error it ended with."""
        if span is None:
            return
        if code is not None:
            span.set_attribute("gateway.outcome", code)
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()

    def step(
        self, name: str, kind: SpanKind = SpanKind.INTERNAL
    ) -> AbstractContextManager[trace.Span | None]:
        """A step's span around a block; an exception marks it failed (by its code, if it
        has one, never by its message) and goes on."""
        return self._step(name, kind)

    @contextmanager
    def _step(self, name: str, kind: SpanKind) -> Iterator[trace.Span | None]:
        span = self._tracer.start_span(name, context=self._context, kind=kind)
        try:
            yield span
        except BaseException as exc:
            code = getattr(getattr(exc, "code", None), "value", None)
            self.end(span, code if isinstance(code, str) else type(exc).__name__)
            raise
        self.end(span)

    def traceparent(self, span: trace.Span | None) -> str:
        """The `traceparent` that makes the next hop's spans children of `span`."""
        if span is None:
            return ""
        return format_traceparent(span.get_span_context())

    def describe(self, **attributes: str) -> None:
        """Attributes of the call's span, each named `gateway.NAME` (checked values only)."""
        for name, value in attributes.items():
            self.span.set_attribute(f"gateway.{name}", value)

    def outcome(self, code: str) -> None:
        """The call's outcome: `ok`, or the code it was refused or failed with."""
        self.span.set_attribute("gateway.outcome", code)
        if code != OK:
            self.span.set_status(Status(StatusCode.ERROR, code))

    def finish(self) -> None:
        """End the call's span and unbind its trace id (in the task that started it)."""
        self.span.end()
        structlog.contextvars.reset_contextvars(**self._log_tokens)
        if self._reset is not None:
            _CURRENT.reset(self._reset)
            self._reset = None


class _NoTrace(CallTrace):
    """The call trace of a process without tracing: every method does nothing."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def start(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> trace.Span | None:
        return None

    def end(self, span: trace.Span | None, code: str | None = None) -> None:
        pass

    def step(
        self, name: str, kind: SpanKind = SpanKind.INTERNAL
    ) -> AbstractContextManager[trace.Span | None]:
        return _NO_SPAN

    def traceparent(self, span: trace.Span | None) -> str:
        return ""

    def describe(self, **attributes: str) -> None:
        pass

    def outcome(self, code: str) -> None:
        pass

    def finish(self) -> None:
        pass


class _Unsampled(_NoTrace):
    """The call trace of a call its sampler left out: no span is recorded, but the next hop
    is handed the call's trace id with the sampled flag off, so that it leaves the call
    out too (`ParentBased`) instead of sampling it on its own and recording a trace
    without its root."""

    __slots__ = ("_traceparent",)

    def __init__(self, context: trace.SpanContext) -> None:
        self._traceparent = format_traceparent(context)

    def traceparent(self, span: trace.Span | None) -> str:
        return self._traceparent


NO_TRACE: CallTrace = _NoTrace()
_NO_SPAN: AbstractContextManager[None] = nullcontext()
_CURRENT: contextvars.ContextVar[CallTrace] = contextvars.ContextVar(
    "gateway_call_trace", default=NO_TRACE
)


def current_call() -> CallTrace:
    """The trace of the call this task is handling (`NO_TRACE` outside a traced call)."""
    return _CURRENT.get()


class Tracing:
    """One process's tracer, exporting in batches (BatchSpanProcessor, in its own thread),
    or none at all when tracing is off."""

    def __init__(
        self,
        settings: TracingSettings,
        *,
        service_name: str,
        exporter: SpanExporter | None = None,
    ) -> None:
        """`exporter` replaces the OTLP/HTTP exporter (tests); with neither it nor an
        `otlp_endpoint`, tracing is off. The batch schedule is the SDK's (5 s, or
        OTEL_BSP_SCHEDULE_DELAY in milliseconds)."""
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if exporter is None and not settings.otlp_endpoint:
            return
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint))
        name = settings.service_name or service_name
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create({SERVICE_NAME: name}),
            shutdown_on_exit=False,
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("gateway")
        log.info("tracing_on", service_name=name, otlp_endpoint=settings.otlp_endpoint or None)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_call(
        self,
        name: str,
        traceparent: str | bytes | None,
        *,
        kind: SpanKind = SpanKind.SERVER,
        **attributes: str,
    ) -> CallTrace:
        """Open a call's span, child of `traceparent` when that is well formed (else the
        root of a new trace), with `attributes` as in `CallTrace.describe`. Call `finish`
        on the result in the same task."""
        if self._tracer is None:
            return NO_TRACE
        parent = parse_traceparent(traceparent)
        context = (
            trace.set_span_in_context(trace.NonRecordingSpan(parent))
            if parent is not None
            else Context()
        )
        span = self._tracer.start_span(
            name,
            context=context,
            kind=kind,
            attributes={f"gateway.{k}": v for k, v in attributes.items()},
        )
        if not span.is_recording():
            # left out by the sampler: its steps cost nothing (no span, no log binding)
            return _Unsampled(span.get_span_context())
        return CallTrace(self._tracer, span)

    async def close(self, timeout: float = 3.0) -> None:
        """Export the spans still queued (at most `timeout` seconds), then stop."""
        provider = self._provider
        if provider is None:
            return
        self._provider = self._tracer = None

        def flush() -> Any:
            provider.force_flush(int(timeout * 1000))
            provider.shutdown()

        try:
            await asyncio.wait_for(asyncio.to_thread(flush), timeout + 1.0)
        except TimeoutError:
            log.warning("tracing_flush_timeout", seconds=timeout)


OFF = Tracing(TracingSettings(), service_name="")
