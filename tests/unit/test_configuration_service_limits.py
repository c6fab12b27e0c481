"""The registry's configuration service answers anyone, so what one source may hold open is
bounded (`configuration_calls_per_address`): a red-team review pinned 242 MiB of a
registry's memory with 200 Fetch calls of one connection that never read their answers.

The real ConfigurationService on a real grpc.aio server on loopback, behind a stand-in
publisher; calls are counted until they end (an answer sent, a stream cancelled)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import pytest

from gateway.configuration import SignedConfiguration
from gateway.v1 import configuration_pb2 as pb
from registry.main import ConfigurationService

WATCH = "/gateway.v1.Configuration/Watch"
FETCH = "/gateway.v1.Configuration/Fetch"


class Publisher:
    """One version, never a newer one."""

    version = 1
    max_message_bytes = 4 * 1024 * 1024

    async def whole(self) -> tuple[int, SignedConfiguration, bytes]:
        signed = SignedConfiguration(content=b"", signature=b"s", signer_certificate=b"c")
        return 1, signed, b"\x1f\x8b" + b"x" * 1000

    async def wait_newer(self, version: int) -> Any:
        await asyncio.Event().wait()


async def _served(limit: int) -> tuple[grpc.aio.Server, int, ConfigurationService, list[int]]:
    refused: list[int] = []
    service = ConfigurationService(
        Publisher(),  # type: ignore[arg-type]
        "UY",
        calls_per_address=limit,
        on_refused=lambda: refused.append(1),
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, service, refused


async def test_one_address_holds_at_most_its_limit_of_calls_open() -> None:
    server, port, service, refused = await _served(3)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        watch = channel.unary_stream(
            WATCH,
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        open_ = [watch(pb.WatchRequest(instance="UY")) for _ in range(3)]
        for call in open_:
            await call.read()  # each watch answered and held open
        assert service.calls.held("127.0.0.1") == 3
        fourth = watch(pb.WatchRequest(instance="UY"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fourth.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 3 configuration calls from one address" in str(caught.value.details())
        fetch = channel.unary_unary(FETCH, pb.FetchRequest.SerializeToString, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch(pb.FetchRequest(instance="UY"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(refused) == 2  # each counted
        # a watch ends: its place is given back, and a Fetch is answered and gives back its own
        open_[0].cancel()
        for _ in range(100):
            if service.calls.held("127.0.0.1") < 3:
                break
            await asyncio.sleep(0.02)
        assert len(await fetch(pb.FetchRequest(instance="UY"))) > 1000
        for _ in range(100):
            if service.calls.held("127.0.0.1") == 2:
                break
            await asyncio.sleep(0.02)
        assert service.calls.held("127.0.0.1") == 2
        for call in open_[1:]:
            call.cancel()
    finally:
        await channel.close(None)
        await server.stop(None)


async def test_a_refused_call_and_a_wrong_instance_give_back_what_they_took() -> None:
    server, port, service, _ = await _served(1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        fetch = channel.unary_unary(FETCH, pb.FetchRequest.SerializeToString, None)
        for _ in range(5):  # another instance's: refused NOT_FOUND, and nothing stays held
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fetch(pb.FetchRequest(instance="AR"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for _ in range(100):
            if service.calls.held("127.0.0.1") == 0:
                break
            await asyncio.sleep(0.02)
        assert service.calls.held("127.0.0.1") == 0
        assert len(await fetch(pb.FetchRequest(instance="UY"))) > 1000
    finally:
        await channel.close(None)
        await server.stop(None)


WHOLE_BYTES = 1_260_000  # README's national-scale document, as sent


class NationalPublisher(Publisher):
    def __init__(self) -> None:
        signed = SignedConfiguration(content=b"", signature=b"s" * 72, signer_certificate=b"c")
        self._whole = (1, signed, os.urandom(WHOLE_BYTES))

    async def whole(self) -> tuple[int, SignedConfiguration, bytes]:
        return self._whole


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _unread_fetches(port: int, count: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    """One HTTP/2 connection asking `count` Fetch calls with a flow-control window of 0: it
    never reads an answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sock.sendall(conn.data_to_send())
    for _ in range(count):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", FETCH),
                (":authority", f"127.0.0.1:{port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream, b"\x00" + struct.pack(">I", 0), end_stream=True)
        sock.sendall(conn.data_to_send())
    sock.setblocking(False)
    return sock, conn


def _pump(sock: socket.socket, conn: h2.connection.H2Connection) -> None:
    """Answer SETTINGS and PING (h2 does), never open the window."""
    with contextlib.suppress(BlockingIOError, h2.exceptions.ProtocolError):
        while data := sock.recv(65536):
            conn.receive_data(data)
    if out := conn.data_to_send():
        sock.sendall(out)


async def test_answers_one_source_never_reads_pin_no_more_than_its_limit() -> None:
    """60 Fetch calls of the national document on one connection that never opens its
    window: without the limit each answer's copy stays in memory (72 MiB); with 8 at most,
    about 10 MiB."""
    service = ConfigurationService(NationalPublisher(), "UY", calls_per_address=8)  # type: ignore[arg-type]
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 4 * WHOLE_BYTES)])
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await asyncio.sleep(0.2)
        before = _rss_mib()
        sock, conn = await asyncio.to_thread(_unread_fetches, port, 60)
        try:
            for _ in range(30):
                await asyncio.sleep(0.1)
                _pump(sock, conn)
            grown = _rss_mib() - before
        finally:
            sock.close()
        assert service.calls.held("127.0.0.1") <= 8
        assert grown < 32, f"60 unread Fetch calls of one source pinned {grown:.0f} MiB"
    finally:
        await server.stop(None)
