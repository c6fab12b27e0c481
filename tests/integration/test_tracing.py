"""One trace across both security servers and the provider's backend, collected over OTLP/HTTP.

The demo's OTLP/HTTP receiver (`gateway_demo.otlp`) takes the spans every process of one
topology exports: both security servers and the population backend, with tracing pointed
at it and a batch delay of 50 ms.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.otlp import Collector, Span
from gateway_demo.runner import Runner
from tests.integration.attacker import build_request, fetch_ocsp, open_stream, request_frame

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
PURPOSE = "healthcare-identification"
BACKEND = "demo-backend-population"


@dataclass(frozen=True, slots=True)
class Topology:
    runner: Runner
    collector: Collector


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    collector = Collector()
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Topology]:
    runner = Runner(
        tmp_path_factory.mktemp("tracing"),
        tracing={"otlp_endpoint": collector.url},
        env={"OTEL_BSP_SCHEDULE_DELAY": "50"},
    )
    try:
        runner.prepare()
        runner.start_all()
        yield Topology(runner, collector)
    finally:
        runner.close()


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a caller's own sampled span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def call(runner: Runner, *extra: tuple[str, str], purpose: str = PURPOSE) -> Outcome:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        return await call_raw(
            channel,
            GET_PERSON,
            PERSON,
            [*routing_metadata(client=CLINICS, service=POPULATION, purpose=purpose), *extra],
        )


# each server's spans of one allowed call: the call, its checks, two log commits, the hop
CONSUMER_SPANS = sorted(
    [
        "consumer call",
        "consumer checks",
        "log commit",
        "log commit",
        "provider leg",
        "response checks",
    ]
)
PROVIDER_SPANS = sorted(
    ["provider call", "provider checks", "log commit", "log commit", "backend call"]
)


async def test_one_call_is_one_trace_across_both_servers_and_the_backend(
    topology: Topology,
) -> None:
    """An allowed call's spans come from both servers and the backend, in the caller's trace, parents intact."""
    traceparent, trace_id, caller_span = new_traceparent()
    outcome = await call(topology.runner, ("traceparent", traceparent))
    assert outcome.ok, outcome
    spans = topology.collector.wait(
        lambda spans: len([s for s in spans if s.trace_id == trace_id]) >= 12
    )
    trace = [s for s in spans if s.trace_id == trace_id]
    assert_one_call(trace, caller_span, outcome)


def assert_one_call(trace: list[Span], caller_span: str, outcome: Outcome) -> None:
    """The spans of one allowed call: from each process, parents intact, attributes right."""
    by_service: dict[str, list[str]] = {}
    for span in trace:
        by_service.setdefault(span.service, []).append(span.name)
    assert {k: sorted(v) for k, v in by_service.items()} == {
        MSP: CONSUMER_SPANS,
        DNIC: PROVIDER_SPANS,
        BACKEND: ["demo.population.v1.PopulationRegistry/GetPerson"],
    }
    ids = {s.span_id: s for s in trace}
    assert len(ids) == len(trace)
    for span in trace:
        assert span.parent_id in ids or span.parent_id == caller_span, span

    def only(service: str, name: str) -> Span:
        (span,) = [s for s in trace if s.service == service and s.name == name]
        return span

    consumer_call = only(MSP, "consumer call")
    assert consumer_call.parent_id == caller_span
    # the hops: consumer's provider leg -> provider's call; provider's backend call -> backend
    assert only(DNIC, "provider call").parent_id == only(MSP, "provider leg").span_id
    assert (
        only(BACKEND, "demo.population.v1.PopulationRegistry/GetPerson").parent_id
        == only(DNIC, "backend call").span_id
    )
    for server, call_span in ((MSP, consumer_call), (DNIC, only(DNIC, "provider call"))):
        assert all(
            s.parent_id == call_span.span_id
            for s in trace
            if s.service == server and s is not call_span
        )
        assert call_span.attributes == {
            "gateway.client": CLINICS,
            "gateway.service": POPULATION,
            "gateway.method": GET_PERSON,
            "gateway.message_id": outcome.message_id,
            "gateway.outcome": "ok",
        }


async def test_a_stream_is_one_trace_across_both_servers(topology: Topology) -> None:
    """A streaming call's spans: the consumer's stream and its provider leg, the provider's
    stream (child of that leg) and its backend call, in the caller's trace."""
    traceparent, trace_id, caller_span = new_traceparent()
    async with grpc.aio.insecure_channel(topology.runner.consumers[MSP]) as channel:
        call = channel.unary_stream(
            "/demo.population.v1.PopulationRegistry/ExportPeople",
            request_serializer=population.ExportRequest.SerializeToString,
            response_deserializer=population.Person.FromString,
        )(
            population.ExportRequest(),
            metadata=[
                *routing_metadata(client=CLINICS, service=POPULATION, purpose=PURPOSE),
                ("traceparent", traceparent),
            ],
            timeout=10,
        )
        assert len([p async for p in call]) == 3
    spans = topology.collector.wait(
        lambda spans: len([s for s in spans if s.trace_id == trace_id]) >= 4
    )
    trace = {(s.service, s.name): s for s in spans if s.trace_id == trace_id}
    assert set(trace) == {
        (MSP, "consumer stream"),
        (MSP, "provider leg"),
        (DNIC, "provider stream"),
        (DNIC, "backend call"),
    }
    assert trace[MSP, "consumer stream"].parent_id == caller_span
    assert trace[MSP, "provider leg"].parent_id == trace[MSP, "consumer stream"].span_id
    assert trace[DNIC, "provider stream"].parent_id == trace[MSP, "provider leg"].span_id
    assert trace[DNIC, "backend call"].parent_id == trace[DNIC, "provider stream"].span_id
    for name in ((MSP, "consumer stream"), (DNIC, "provider stream")):
        assert trace[name].attributes["gateway.outcome"] == "ok"
        assert trace[name].attributes["gateway.method"].endswith("/ExportPeople")


async def test_log_lines_of_a_call_carry_its_trace_id(topology: Topology) -> None:
    """A refused call's log line carries the caller's trace id; its span names the refusal's code."""
    traceparent, trace_id, _ = new_traceparent()
    outcome = await call(topology.runner, ("traceparent", traceparent), purpose="not-agreed")
    assert outcome.error and not outcome.ok
    (span,) = topology.collector.matching(
        lambda s: s.trace_id == trace_id and s.name == "consumer call"
    )
    assert span.attributes["gateway.outcome"] == outcome.error
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [
            json.loads(line)
            for line in topology.runner.processes["ss-msp"].log_path.read_text().splitlines()
            if line.startswith("{")
        ]
        refused = [line for line in lines if line.get("event") == "call_refused"]
        if any(line.get("message_id") == outcome.message_id for line in refused):
            break
        await asyncio.sleep(0.05)
    (line,) = [line for line in refused if line.get("message_id") == outcome.message_id]
    assert line["trace_id"] == trace_id


async def test_a_malformed_traceparent_from_the_caller_starts_a_new_trace(
    topology: Topology,
) -> None:
    """A caller's malformed traceparent is ignored: the call succeeds as the root of a new trace."""
    outcome = await call(topology.runner, ("traceparent", "00-not-a-trace-01"))
    assert outcome.ok, outcome
    (span,) = topology.collector.matching(
        lambda s: (
            s.attributes.get("gateway.message_id") == outcome.message_id
            and s.name == "consumer call"
        )
    )
    assert span.parent_id == ""


@pytest.mark.parametrize(
    "traceparent",
    [
        b"x" * 100_000,  # oversized
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # a trace id of zeros
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        b"\xff\xfe not even UTF-8",
    ],
)
async def test_a_malformed_traceparent_in_a_frame_is_ignored(
    topology: Topology, traceparent: bytes
) -> None:
    """A frame with a malformed or oversized traceparent is answered; the provider starts a new trace."""
    runner = topology.runner
    pki = runner.pki
    ca_pem = (pki / "ca.crt").read_bytes()
    auth_cert = (pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    signer = EcdsaSigner(
        load_private_key((pki / "sign" / "UY_GOV_MSP.key").read_bytes()),
        load_certificate((pki / "sign" / "UY_GOV_MSP.crt").read_bytes()),
    )
    message_id = uuid.uuid4().hex
    envelope = build_request(
        signer,
        signer_ocsp=fetch_ocsp(
            runner.ocsp_url,
            signer.certificate.public_bytes(serialization.Encoding.PEM),
            ca_pem,
        ),
        message_id=message_id,
        client=CLINICS,
        service=POPULATION,
        method=GET_PERSON,
        purpose=PURPOSE,
        sender=MSP,
        body=PERSON,
        created_at=datetime.now(UTC),
    )
    frame = request_frame(envelope)
    frame.traceparent = traceparent
    async with open_stream(
        runner.providers[DNIC],
        DNIC,
        ca_pem,
        auth_cert,
        (pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
        staple=fetch_ocsp(runner.ocsp_url, auth_cert, ca_pem),
    ) as stream:
        answer = await stream.send(frame)
    assert isinstance(answer, pb.Frame) and answer.WhichOneof("kind") == "response", answer
    (span,) = topology.collector.matching(
        lambda s: s.attributes.get("gateway.message_id") == message_id
    )
    assert (span.service, span.name, span.parent_id) == (DNIC, "provider call", "")


def test_spans_still_queued_are_sent_at_shutdown(
    tmp_path_factory: pytest.TempPathFactory, collector: Collector
) -> None:
    """With a batch delay of a minute, a call's spans still reach the collector when the processes stop."""
    runner = Runner(
        tmp_path_factory.mktemp("flush"),
        tracing={"otlp_endpoint": collector.url},
        env={"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )
    try:
        runner.prepare()
        runner.start_all()
        traceparent, trace_id, caller_span = new_traceparent()
        outcome = asyncio.run(call(runner, ("traceparent", traceparent)))
        assert outcome.ok, outcome
    finally:
        runner.close()
    assert_one_call([s for s in collector.spans if s.trace_id == trace_id], caller_span, outcome)
