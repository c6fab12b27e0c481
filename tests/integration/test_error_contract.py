"""The error contract of the consumer endpoint holds for any input, from a caller's side.

The consumer endpoint runs in this process on a real gRPC server on loopback, with the
gRPC options of `security_server.main` (`consumer_options`) and a stub node: every case
here is refused before the configuration, keys or log are needed, so the stub only keeps
the refusal records. Attackers speak raw HTTP/2 (h2) where grpcio would not send what
they send, and a standard grpcio client otherwise: every answer must be a clean gRPC
status with its `gateway-error`, readable by a standard client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from gateway.errors import MAX_MESSAGE_CHARS
from gateway_demo.client import Outcome, call_raw, routing_metadata
from security_server.consumer import ConsumerService
from security_server.endpoint_limits import backstop, consumer_options
from security_server.node import Node
from security_server.peers import PeerPool
from security_server.settings import LimitsSection

METHOD = "/demo.population.v1.PopulationRegistry/GetPerson"
CLIENT = "UY/GOV/MSP/clinics"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
PURPOSE = "healthcare-identification"


@dataclass
class StubNode:
    """The part of a node the consumer reads before its first check passes; refusal records
    are kept. With `hold_until` set, each refusal waits until that many have arrived, so
    that a burst is really concurrent (bounded by a timeout, should some never arrive)."""

    limits: LimitsSection
    hold_until: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def clock(self) -> datetime:
        return datetime.now(UTC)

    def pseudonym(self, subject: str | None) -> str | None:
        return None if subject is None else "0" * 64

    async def log_failure(self, fields: dict[str, Any]) -> None:
        self.records.append(fields)
        if len(self.records) >= self.hold_until:
            self.all_in.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), 20)


@contextlib.asynccontextmanager
async def consumer_endpoint(node: StubNode) -> AsyncIterator[str]:
    """A consumer endpoint on loopback with the production gRPC options; its address."""
    server = grpc.aio.server(
        options=consumer_options(node.limits, max_receive=1 << 20, max_send=1 << 20)
    )
    server.add_generic_rpc_handlers((ConsumerService(cast(Node, node), cast(PeerPool, None)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def raw_grpc_call(
    address: str, path: str, metadata: list[tuple[bytes, bytes]], body: bytes = b""
) -> dict[bytes, bytes]:
    """One unary gRPC call over raw HTTP/2, sending header values exactly as given (h2 is
    told not to check them); the response headers and trailers, merged."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ],
    )
    conn.send_data(stream, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
    answer: dict[bytes, bytes] = {}
    try:
        while True:
            writer.write(conn.data_to_send())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the server closed the connection before answering"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.update((bytes(k), bytes(v)) for k, v in event.headers or ())
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset with error {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    return answer
    finally:
        writer.close()


async def call_once(node: StubNode, metadata: list[tuple[str, str]]) -> Outcome:
    """One call by a standard grpcio client to a fresh consumer endpoint."""
    async with (
        consumer_endpoint(node) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        return await call_raw(channel, METHOD, b"", metadata)


async def test_control_byte_in_message_id_gets_a_coded_refusal_over_raw_http2() -> None:
    """A gateway-id with a control byte gets INVALID_ARGUMENT/malformed_identifier and a generated id, never INTERNAL."""
    node = StubNode(LimitsSection())
    metadata = [
        (b"gateway-client", CLIENT.encode()),
        (b"gateway-service", SERVICE.encode()),
        (b"gateway-purpose", PURPOSE.encode()),
        (b"gateway-id", b"evil\x01id"),
    ]
    async with consumer_endpoint(node) as address:
        answer = await raw_grpc_call(address, METHOD, metadata)
    assert answer.get(b"grpc-status") == b"3", answer  # INVALID_ARGUMENT
    assert answer[b"gateway-error"] == b"malformed_identifier"
    generated = answer[b"gateway-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    message = unquote(answer[b"grpc-message"].decode())
    assert "\x01" not in message
    assert "evil\\x01id" in message  # escaped, not verbatim
    assert generated in message
    assert [r["message_id"] for r in node.records] == [generated]


async def test_well_formed_message_id_is_echoed_in_a_refusal() -> None:
    """A well-formed gateway-id is still echoed in the trailer of a refusal."""
    outcome = await call_once(
        StubNode(LimitsSection()),
        routing_metadata(client=CLIENT, service=None, purpose=None, message_id="m-1"),
    )
    assert outcome.error == "missing_metadata"
    assert outcome.trailing["gateway-id"] == "m-1"


async def test_long_escaped_client_id_gets_a_bounded_readable_refusal() -> None:
    """A gateway-client of UY/GOV/MSP/ and 7,000 backslashes gets malformed_identifier with a bounded message."""
    node = StubNode(LimitsSection())
    client = "UY/GOV/MSP/" + "\\" * 7000
    outcome = await call_once(
        node, routing_metadata(client=client, service=SERVICE, purpose=PURPOSE)
    )
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert outcome.error == "malformed_identifier"
    assert len(outcome.details) <= MAX_MESSAGE_CHARS
    assert "7011 characters" in outcome.details
    assert len(node.records[0]["error_message"]) <= MAX_MESSAGE_CHARS


async def _burst(address: str, calls: int) -> list[Outcome]:
    async with grpc.aio.insecure_channel(address) as channel:
        metadata = routing_metadata(client=CLIENT, service=None, purpose=None)
        return await asyncio.gather(
            *(call_raw(channel, METHOD, b"", metadata, timeout=30) for _ in range(calls))
        )


async def test_burst_of_1900_calls_on_one_channel_gets_only_coded_answers() -> None:
    """1,900 concurrent calls on one channel: each answered with a gateway error, those past the limit overloaded."""
    limits = LimitsSection()  # the documented defaults: 1,000 at once, backstop 2,000
    calls = 1900
    node = StubNode(limits, hold_until=calls)
    async with consumer_endpoint(node) as address:
        outcomes = await _burst(address, calls)
    codes = collections.Counter((o.code.name, o.error) for o in outcomes)
    assert codes == {
        ("INVALID_ARGUMENT", "missing_metadata"): limits.max_concurrent_calls,
        ("RESOURCE_EXHAUSTED", "overloaded"): calls - limits.max_concurrent_calls,
    }, codes


async def test_calls_past_the_backstop_are_refused_at_once_without_a_record() -> None:
    """Past the backstop, calls get overloaded at once and leave no record; up to it, they are recorded."""
    limits = LimitsSection(max_concurrent_calls=10)
    calls, past = backstop(limits) + 90, 90
    node = StubNode(limits, hold_until=calls + 1)  # released below, not by a count
    async with (
        consumer_endpoint(node) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        metadata = routing_metadata(client=CLIENT, service=None, purpose=None)
        tasks = [
            asyncio.create_task(call_raw(channel, METHOD, b"", metadata, timeout=30))
            for _ in range(calls)
        ]
        # the calls past the backstop are answered while the others are still held
        finished: set[asyncio.Task[Outcome]] = set()
        while len(finished) < past:
            done, _ = await asyncio.wait(set(tasks) - finished, return_when=asyncio.FIRST_COMPLETED)
            finished |= done
        assert all(t.result().error == "overloaded" for t in finished)
        assert len(node.records) == backstop(limits)
        node.all_in.set()
        outcomes = await asyncio.gather(*tasks)
    codes = collections.Counter((o.code.name, o.error) for o in outcomes)
    assert codes == {
        ("INVALID_ARGUMENT", "missing_metadata"): limits.max_concurrent_calls,
        ("RESOURCE_EXHAUSTED", "overloaded"): calls - limits.max_concurrent_calls,
    }, codes
    assert len(node.records) == backstop(limits)


@pytest.mark.parametrize("size", [7 * 1024, 17 * 1024])
async def test_metadata_limit_is_the_documented_one(size: int) -> None:
    """Metadata below 16 KiB reaches the gateway (which refuses its value); beyond, gRPC refuses it."""
    outcome = await call_once(
        StubNode(LimitsSection()),
        routing_metadata(client=CLIENT, service=SERVICE, purpose=PURPOSE, user_id="u" * size),
    )
    if size < 16 * 1024:
        assert outcome.error == "malformed_identifier", outcome
    else:
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        assert outcome.error is None
