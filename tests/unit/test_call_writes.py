"""A write to a call the server has ended leaves what the server said readable
(security_server.call_writes, the way around grpc/grpc#36066): a provider's refusal and a
backend's own status, ending a stream while the other side still sends, are not turned
into gRPC's "Internal error from Core".

A real grpc.aio server and channel on loopback: the bug lives in gRPC's client call."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from security_server.call_writes import PeerGone, write


@contextlib.asynccontextmanager
async def _one_call(handler: Callable[[Any, Any], Awaitable[None]]) -> AsyncIterator[Any]:
    """A bidirectional call to a grpc.aio server on loopback whose only method is
    `handler`."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Service", {"Call": grpc.stream_stream_rpc_method_handler(handler)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel.stream_stream("/test.Service/Call", None, None)(None, timeout=10)
    finally:
        await channel.close(None)
        await server.stop(None)


async def _after_the_server_ended(
    send: Callable[[Any, bytes], Awaitable[None]],
) -> tuple[bool, list[bytes], grpc.StatusCode, str]:
    """A bidirectional call whose server reads one message, answers with a refusal and
    aborts with its own status; once that status has reached the client, the client sends
    again with `send`, then reads: (whether the send failed, messages read, status, details)."""
    ended = asyncio.Event()

    async def handler(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.read()
        await context.write(b"refused: federation_ended")
        ended.set()
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the federation has ended")

    async with _one_call(handler) as call:
        await write(call, b"hello")
        await ended.wait()
        # sends go on until one fails: the trailers and the stream's reset reach the client
        failed = await _until_refused(send, call)
        read: list[bytes] = []
        try:
            while (message := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                read.append(message)
        except grpc.aio.AioRpcError:
            pass
        return failed, read, await call.code(), await call.details()


async def _until_refused(send: Callable[[Any, bytes], Awaitable[None]], call: Any) -> bool:
    """Send on `call` until a send fails (True), for 10 s at most (False)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await send(call, b"still there?")
        except (PeerGone, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return True
        await asyncio.sleep(0.01)
    return False


def test_a_write_after_the_server_ended_the_call_keeps_its_messages_and_status() -> None:
    failed, read, code, details = asyncio.run(_after_the_server_ended(write))
    assert failed  # PeerGone: the caller learns the call has ended
    assert read == [b"refused: federation_ended"]
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "the federation has ended")


def test_grpcs_own_write_loses_them_which_is_why_call_writes_exists() -> None:
    """The control: with grpc.aio's `write`, the same call reads as INTERNAL. Skipped once a
    gRPC release fixes #36066 (then `call_writes` can go)."""

    async def grpcs_write(call: Any, message: bytes) -> None:
        await call.write(message)

    failed, read, code, details = asyncio.run(_after_the_server_ended(grpcs_write))
    if code is grpc.StatusCode.PERMISSION_DENIED:
        pytest.skip("this gRPC release keeps the server's status: grpc/grpc#36066 is fixed")
    assert failed
    assert (read, code) == ([], grpc.StatusCode.INTERNAL), details


def test_the_first_write_to_a_call_refused_at_once_keeps_the_refusal() -> None:
    """A server that refuses a call before reading anything (a consumer server refusing a
    replayed message id): the caller's first write raises PeerGone, and the call says why."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, "replayed_message")

    async def run() -> tuple[grpc.StatusCode, str]:
        async with _one_call(refuse) as call:
            # from the first write on, before or after the refusal arrived: PeerGone at last
            assert await _until_refused(write, call)
            return await call.code(), await call.details()

    assert asyncio.run(run()) == (grpc.StatusCode.ALREADY_EXISTS, "replayed_message")


def test_a_write_waiting_for_a_call_to_start_ends_when_the_call_is_cancelled() -> None:
    """A call that cannot start (nothing listens; it waits to be ready) is cancelled while a
    write waits for its start: the write ends with PeerGone, it does not wait forever."""

    async def run() -> None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]  # nothing listens there once closed
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            call: Any = channel.stream_stream("/test.Never/Call", None, None)(
                None, timeout=30, wait_for_ready=True
            )
            writing = asyncio.ensure_future(write(call, b"hello"))
            await asyncio.sleep(0.2)
            assert not writing.done()  # waiting for the call's start
            call.cancel()
            with pytest.raises(PeerGone):
                await asyncio.wait_for(writing, 5)
        finally:
            await channel.close(None)

    asyncio.run(run())
