"""Tracing: the traceparent checks, the spans of one call, and the no-op tracer when off."""

from __future__ import annotations

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.errors import Code, GatewayError
from gateway_ops.tracing import (
    MAX_TRACEPARENT,
    NO_TRACE,
    OFF,
    OK,
    Tracing,
    TracingSettings,
    current_call,
    format_traceparent,
    parse_traceparent,
    traceparent_of,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
CALLER = f"00-{TRACE}-{SPAN}-01"

MALFORMED = [
    "",
    "garbage",
    f"00-{TRACE}-{SPAN}",  # no flags
    f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
    f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
    f"00-{'0' * 32}-{SPAN}-01",  # trace id of zeros
    f"00-{TRACE}-{'0' * 16}-01",  # parent id of zeros
    f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has nothing after the flags
    f"01-{TRACE}-{SPAN}-01x",  # a later version's extra fields start with '-'
    f"01-{TRACE}-{SPAN}-01-" + "a" * MAX_TRACEPARENT,  # oversized
    f"00_{TRACE}_{SPAN}_01",
    f" {CALLER}",
    CALLER.encode() + b"\xff",
    "00-" + "é" * 32 + f"-{SPAN}-01",
]


def test_a_well_formed_traceparent_names_the_remote_parent() -> None:
    """A version 00 traceparent gives its trace id, parent id and sampled flag."""
    parent = parse_traceparent(CALLER)
    assert parent is not None and parent.is_remote
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == (TRACE, SPAN)
    assert parent.trace_flags.sampled
    assert format_traceparent(parent) == CALLER
    assert parse_traceparent(CALLER.encode()) == parent  # as a frame carries it
    unsampled = parse_traceparent(f"00-{TRACE}-{SPAN}-00")
    assert unsampled is not None and not unsampled.trace_flags.sampled


def test_a_later_version_is_read_by_its_first_fields() -> None:
    """A higher version with fields appended is read as version 00 (W3C's forward rule)."""
    parent = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-comes-next")
    assert parent is not None and f"{parent.trace_id:032x}" == TRACE


@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_or_oversized_traceparent_is_ignored(value: str | bytes) -> None:
    """Anything but a well-formed traceparent of bounded length names no parent."""
    assert parse_traceparent(value) is None


def test_traceparent_is_found_among_metadata() -> None:
    """The traceparent metadata is picked out of a call's metadata; binary values are not."""
    assert traceparent_of([("gateway-client", "x"), ("traceparent", CALLER)]) == CALLER
    assert traceparent_of([("traceparent", b"bytes")]) is None
    assert traceparent_of(None) is None


def test_sample_ratio_and_endpoint_are_checked() -> None:
    """A sample ratio outside 0..1 or an endpoint that is not an HTTP URL is refused."""
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingSettings(sample_ratio=1.5)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingSettings(otlp_endpoint="collector:4318")


def _tracing(exporter: InMemorySpanExporter, ratio: float = 1.0) -> Tracing:
    return Tracing(TracingSettings(sample_ratio=ratio), service_name="test", exporter=exporter)


async def _spans(tracing: Tracing, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    await tracing.close()
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_a_call_continues_the_callers_trace_with_its_steps_as_children() -> None:
    """The call's span is a child of the caller's; its steps are its children; the next hop gets a steps's id."""
    exporter = InMemorySpanExporter()
    tracing = _tracing(exporter)
    trace = tracing.start_call("consumer call", CALLER, message_id="m-1")
    assert current_call() is trace
    assert structlog.contextvars.get_contextvars()["trace_id"] == TRACE
    checks = trace.start("consumer checks")
    trace.end(checks)
    trace.describe(client="UY/GOV/MSP/clinics")
    with trace.step("provider leg", SpanKind.CLIENT) as leg:
        next_hop = parse_traceparent(trace.traceparent(leg))
    with pytest.raises(GatewayError), trace.step("log commit"):
        raise GatewayError("the log is full", code=Code.LOG_UNAVAILABLE)
    trace.outcome(Code.LOG_UNAVAILABLE.value)
    trace.finish()
    assert current_call() is NO_TRACE
    assert "trace_id" not in structlog.contextvars.get_contextvars()

    spans = await _spans(tracing, exporter)
    call = spans["consumer call"]
    assert call.parent is not None and f"{call.parent.span_id:016x}" == SPAN
    assert {f"{s.context.trace_id:032x}" for s in spans.values()} == {TRACE}
    for name in ("consumer checks", "provider leg", "log commit"):
        parent = spans[name].parent
        assert parent is not None and parent.span_id == call.context.span_id
    assert next_hop is not None and next_hop.span_id == spans["provider leg"].context.span_id
    assert call.kind is SpanKind.SERVER and spans["provider leg"].kind is SpanKind.CLIENT
    assert dict(call.attributes or {}) == {
        "gateway.message_id": "m-1",
        "gateway.client": "UY/GOV/MSP/clinics",
        "gateway.outcome": Code.LOG_UNAVAILABLE.value,
    }
    assert call.status.status_code is StatusCode.ERROR
    failed = spans["log commit"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == Code.LOG_UNAVAILABLE.value  # its code, not its message
    assert not failed.events


@pytest.mark.parametrize("value", [MALFORMED[1], MALFORMED[9], MALFORMED[12]])
async def test_a_call_with_a_malformed_traceparent_starts_a_new_trace(value: str | bytes) -> None:
    """A malformed or oversized traceparent is ignored: the call is the root of a new trace."""
    exporter = InMemorySpanExporter()
    tracing = _tracing(exporter)
    trace = tracing.start_call("provider call", value)
    trace.outcome(OK)
    trace.finish()
    (span,) = (await _spans(tracing, exporter)).values()
    assert span.parent is None
    assert f"{span.context.trace_id:032x}" != TRACE
    assert span.status.status_code is StatusCode.UNSET


async def test_the_callers_decision_not_to_sample_is_followed() -> None:
    """A caller's unsampled trace records nothing here, yet its id still goes to the next hop."""
    exporter = InMemorySpanExporter()
    tracing = _tracing(exporter)
    trace = tracing.start_call("consumer call", f"00-{TRACE}-{SPAN}-00")
    with trace.step("provider leg") as leg:
        forwarded = trace.traceparent(leg)
    trace.finish()
    assert await _spans(tracing, exporter) == {}
    assert forwarded.startswith(f"00-{TRACE}-") and forwarded.endswith("-00")


async def test_a_call_the_sampler_leaves_out_records_nothing_and_says_so_to_the_next_hop() -> None:
    """Left out by the sample ratio, a new call opens no step span and binds no trace id
    to its log lines, and hands the next hop its trace id with the sampled flag off (so
    that the next hop does not record a trace without its root)."""
    exporter = InMemorySpanExporter()
    tracing = _tracing(exporter, ratio=0.0)
    trace = tracing.start_call("consumer call", None)
    assert current_call() is NO_TRACE
    assert "trace_id" not in structlog.contextvars.get_contextvars()
    assert trace.start("consumer checks") is None
    with trace.step("provider leg") as leg:
        assert leg is None
        forwarded = parse_traceparent(trace.traceparent(leg))
    trace.outcome(OK)
    trace.finish()
    assert await _spans(tracing, exporter) == {}
    assert forwarded is not None and not forwarded.trace_flags.sampled

    # the next hop follows that decision even though its own ratio would record everything
    downstream = InMemorySpanExporter()
    next_hop = _tracing(downstream, ratio=1.0)
    call = next_hop.start_call("provider call", trace.traceparent(None))
    call.finish()
    assert await _spans(next_hop, downstream) == {}


async def test_tracing_off_creates_no_span() -> None:
    """Off, a call's trace is the shared no-op: no span, no log binding, nothing passed on."""
    assert not OFF.enabled
    trace = OFF.start_call("consumer call", CALLER)
    assert trace is NO_TRACE and current_call() is NO_TRACE
    assert trace.start("consumer checks") is None
    with trace.step("log commit") as span:
        assert span is None
    assert trace.step("provider leg") is trace.step("log commit")  # one shared object
    assert trace.traceparent(span) == ""
    trace.outcome(OK)
    trace.finish()
    assert "trace_id" not in structlog.contextvars.get_contextvars()
    await OFF.close()
