"""Sample backends of the demo, each with its own `.proto` (gateway_demo/protos/):

- population: a population registry answering identity look-ups (`GetPerson`), and an
  `Echo` method used by the benchmark;
- vaccination: a health ministry's vaccination register (`GetRecord`).

They know nothing of the gateway: they are ordinary gRPC services. With tracing on
(`gateway demo-backend --otlp-endpoint`, or OTEL_EXPORTER_OTLP_ENDPOINT), each call has a
span, child of the `traceparent` its caller (the provider's security server) sends, as any
backend instrumented with OpenTelemetry would have.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gateway_demo.generated import population_pb2 as population
from gateway_demo.generated import vaccination_pb2 as vaccination
from gateway_ops.tracing import OFF, OK, Tracing, traceparent_of

PEOPLE = {
    "1.234.567-8": population.Person(
        national_id="1.234.567-8",
        given_name="Ana",
        family_name="Pereira",
        birth_date="1984-03-12",
        alive=True,
    ),
    "4.321.765-2": population.Person(
        national_id="4.321.765-2",
        given_name="Jorge",
        family_name="Silva",
        birth_date="1950-11-02",
        alive=True,
    ),
    # a person of the Argentine register (the federation demo's AR instance)
    "20.123.456": population.Person(
        national_id="20.123.456",
        given_name="Lucía",
        family_name="Fernández",
        birth_date="1979-08-23",
        alive=True,
    ),
}

RECORDS = {
    "1.234.567-8": vaccination.VaccinationRecord(
        national_id="1.234.567-8",
        vaccinations=[
            vaccination.Vaccination(vaccine="measles-mumps-rubella", date="1985-04-01"),
            vaccination.Vaccination(vaccine="influenza-2026", date="2026-05-20"),
        ],
    )
}

Context = grpc.aio.ServicerContext[Any, Any]


async def get_person(request: population.GetPersonRequest, context: Context) -> population.Person:
    person = PEOPLE.get(request.national_id)
    if person is None:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"no person with national id {request.national_id}"
        )
    assert person is not None
    return person


async def echo(request: population.EchoMessage, context: Context) -> population.EchoMessage:
    return request


async def export_people(
    request: population.ExportRequest, context: Context
) -> AsyncIterator[population.Person]:
    if request.born_since and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", request.born_since):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "born_since must be YYYY-MM-DD")
    for person in PEOPLE.values():
        if person.birth_date >= request.born_since:
            yield person


async def download(
    request: population.DownloadRequest, context: Context
) -> AsyncIterator[population.EchoMessage]:
    payload = population.EchoMessage(payload=b"\x5a" * request.size)
    for _ in range(request.count):
        yield payload


async def upload(
    requests: AsyncIterator[population.EchoMessage], context: Context
) -> population.UploadSummary:
    count, size, digest = 0, 0, hashlib.sha256()
    async for message in requests:
        count += 1
        size += len(message.payload)
        digest.update(message.payload)
    return population.UploadSummary(count=count, bytes=size, sha256=digest.hexdigest())


async def chat(
    requests: AsyncIterator[population.EchoMessage], context: Context
) -> AsyncIterator[population.EchoMessage]:
    async for message in requests:
        yield message


async def get_record(
    request: vaccination.GetRecordRequest, context: Context
) -> vaccination.VaccinationRecord:
    record = RECORDS.get(request.national_id)
    if record is None:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"no record for national id {request.national_id}"
        )
    assert record is not None
    return record


def traced(fn: Any, name: str, tracing: Tracing) -> Any:
    """`fn` with a span of each call named `name`, child of the caller's `traceparent`."""
    if not tracing.enabled:
        return fn

    async def handle(request: Any, context: Context) -> Any:
        trace = tracing.start_call(name, traceparent_of(context.invocation_metadata()))
        try:
            answer = await fn(request, context)
        except BaseException:
            trace.outcome("backend_error")
            raise
        else:
            trace.outcome(OK)
            return answer
        finally:
            trace.finish()

    return handle


# the streaming methods of the backends, by kind (the catalogue lists them alike)
STREAMING = {
    "ExportPeople": "server",
    "Download": "server",
    "Upload": "client",
    "Chat": "bidi",
}
_HANDLERS = {
    None: grpc.unary_unary_rpc_method_handler,
    "server": grpc.unary_stream_rpc_method_handler,
    "client": grpc.stream_unary_rpc_method_handler,
    "bidi": grpc.stream_stream_rpc_method_handler,
}

# each backend: its gRPC service and methods (handler, request and response classes)
METHODS: dict[str, tuple[str, dict[str, tuple[Any, Any, Any]]]] = {
    "population": (
        "demo.population.v1.PopulationRegistry",
        {
            "GetPerson": (get_person, population.GetPersonRequest, population.Person),
            "Echo": (echo, population.EchoMessage, population.EchoMessage),
            "ExportPeople": (export_people, population.ExportRequest, population.Person),
            "Download": (download, population.DownloadRequest, population.EchoMessage),
            "Upload": (upload, population.EchoMessage, population.UploadSummary),
            "Chat": (chat, population.EchoMessage, population.EchoMessage),
        },
    ),
    "vaccination": (
        "demo.vaccination.v1.VaccinationRegister",
        {
            "GetRecord": (
                get_record,
                vaccination.GetRecordRequest,
                vaccination.VaccinationRecord,
            )
        },
    ),
}


def handler(name: str, tracing: Tracing = OFF) -> Any:
    """The gRPC handler of backend `name`, its calls traced when `tracing` is on."""
    service, methods = METHODS[name]
    return grpc.method_handlers_generic_handler(
        service,
        {
            method: _HANDLERS[STREAMING.get(method)](
                fn if method in STREAMING else traced(fn, f"{service}/{method}", tracing),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
            for method, (fn, request_type, response_type) in methods.items()
        },
    )


async def serve_backends(
    backends: list[tuple[str, str, Tracing]],
    *,
    stop: asyncio.Event,
    on_ready: Callable[[dict[str, Any]], None],
) -> None:
    """Sample backends, (name, host:port, tracing) each, in one gRPC server: each address
    answers every backend's methods (their services differ), which costs one process for
    all (the tests start dozens of topologies)."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(tuple(handler(name, tracing) for name, _, tracing in backends))
    ports = [server.add_insecure_port(listen) for _, listen, _ in backends]
    await server.start()
    bound = {
        name: f"{listen.rsplit(':', 1)[0]}:{port}"
        for (name, listen, _), port in zip(backends, ports, strict=True)
    }
    if len(bound) == 1:
        ((name, address),) = bound.items()
        on_ready({"backend": name, "listen": address})
    else:
        on_ready({"backends": bound})
    await stop.wait()
    await server.stop(grace=1.0)
    # the spans of the last calls, exported before the process ends
    for _, _, tracing in backends:
        await tracing.close()
