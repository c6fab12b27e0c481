"""A consumer's link to a provider server (`security_server.peers.PeerLink`) reconnects
within about 2 s of the provider coming back from a long outage (README, *One call*: "a
server back from a restart is reconnected to within 2 s: the channels' reconnect backoff
is capped there instead of gRPC's 2 minutes").

Real gRPC on loopback, on the channel `PeerLink` builds with its own options (only its
credentials are gRPC's local ones instead of mutual TLS, which plays no part in the
backoff). The provider endpoint (a `grpc.aio` server answering the exchange stream) goes
away for OUTAGE_SECONDS while calls keep arriving at the consumer (each asks the link
whether the provider can be reached, as `ConsumerService._route` does). Meanwhile its port
is held by a socket that accepts each connection and closes it at once (a failed
connection attempt, as a refused one is), so that the test sees every attempt gRPC makes:
with the cap, no two are more than 2 s (plus gRPC's 20 % jitter) apart however long the
outage lasts; with gRPC's own backoff (1 s growing by 1.6 each time, up to 120 s) the
fourth wait alone is over 3.2 s, and the next ones grow to minutes. Then the provider
starts again on the same port, and a call through the link must be answered within
RECONNECT_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from gateway.configuration import SecurityServer
from gateway.errors import GatewayError
from gateway.identifiers import SecurityServerId, SubsystemId
from gateway.v1 import exchange_pb2 as pb
from security_server.peers import EXCHANGE_METHOD, PeerLink
from tests.unit.conftest import build_ca, build_certificate

# long enough for gRPC's own backoff to show (its fifth attempt comes more than 8.9 s in,
# at most 6.2 s after the fourth), short enough for a unit test
OUTAGE_SECONDS = 10.0
# the cap (2 s) with gRPC's jitter (up to +20 %), and a little room for scheduling
MAX_GAP_SECONDS = 2.6
# from the provider's return to a call answered: the wait above, then a connection and
# a stream opened
RECONNECT_SECONDS = 3.5
# how often a call arrives at the consumer during the outage
POKE_SECONDS = 0.2
LOCAL = grpc.LocalConnectionType.LOCAL_TCP

pytestmark = pytest.mark.serial  # measures delays


async def echo_frames(requests: AsyncIterator[pb.Frames], context: Any) -> AsyncIterator[pb.Frames]:
    """A provider endpoint reduced to its transport: each request frame comes back as the
    answer to its correlation id."""
    async for message in requests:
        yield pb.Frames(
            frames=[
                pb.Frame(correlation_id=f.correlation_id, response=f.request)
                for f in message.frames
            ]
        )


async def provider(port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    service, method = EXCHANGE_METHOD.lstrip("/").split("/")
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                service,
                {
                    method: grpc.stream_stream_rpc_method_handler(
                        echo_frames,
                        request_deserializer=pb.Frames.FromString,
                        response_serializer=pb.Frames.SerializeToString,
                    )
                },
            ),
        )
    )
    bound = server.add_secure_port(f"127.0.0.1:{port}", grpc.local_server_credentials(LOCAL))
    assert bound, f"port {port} could not be bound again"
    await server.start()
    return server, bound


def provider_server(port: int) -> SecurityServer:
    sid = SecurityServerId.parse("UY/GOV/DNIC/ss1")
    return SecurityServer(
        id=sid,
        address=f"127.0.0.1:{port}",
        auth_certificate=build_certificate(build_ca(), str(sid), kind="auth").certificate_der,
        subsystems=(SubsystemId.parse("UY/GOV/DNIC/identity"),),
    )


async def call(link: PeerLink, body: bytes) -> bytes:
    frame = await link.exchange(pb.SignedEnvelope(body=body), wait_seconds=2.0)
    return bytes(frame.response.body)


async def refuse_connections(listener: socket.socket, attempts: list[float]) -> None:
    """Accept each connection and close it at once, noting when (until cancelled)."""
    loop = asyncio.get_running_loop()
    while True:
        connection, _ = await loop.sock_accept(listener)
        attempts.append(time.monotonic())
        connection.close()


async def test_a_provider_back_from_a_long_outage_is_reconnected_to_within_2_s() -> None:
    server, port = await provider(0)
    link = PeerLink(provider_server(port), grpc.local_channel_credentials(LOCAL), 1 << 20)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
    listener.setblocking(False)
    try:
        assert await link.reachable(2.0)
        assert await call(link, b"before") == b"before"

        # the outage: the provider stops, its port refuses every connection
        await server.stop(None)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        down_since = time.monotonic()
        attempts: list[float] = []
        refusing = asyncio.create_task(refuse_connections(listener, attempts))
        with pytest.raises(GatewayError):
            await call(link, b"during")
        while time.monotonic() - down_since < OUTAGE_SECONDS:
            assert not await link.reachable(POKE_SECONDS)
            await asyncio.sleep(POKE_SECONDS)
        refusing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refusing
        outage_end = time.monotonic()
        listener.close()

        # the provider is back on the same port
        server, _ = await provider(port)
        back_at = time.monotonic()
        while not await link.reachable(0.1):
            assert time.monotonic() - back_at < 30, "never reconnected"
            await asyncio.sleep(0.02)
        assert await call(link, b"after") == b"after"
        took = time.monotonic() - back_at

        # every wait between attempts, and from the last one to the outage's end
        times = [down_since, *attempts, outage_end]
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
        print(f"\nwaits between connection attempts: {gaps}; call answered {took:.2f} s after")
        assert len(attempts) >= 4, gaps
        assert max(gaps) <= MAX_GAP_SECONDS, gaps
        assert took < RECONNECT_SECONDS, f"answered only {took:.2f} s after the provider was back"
    finally:
        listener.close()
        await link.close()
        with contextlib.suppress(Exception):
            await server.stop(None)
