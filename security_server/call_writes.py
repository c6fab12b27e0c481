"""Writes on our side of a gRPC call whose messages we send (a stream to a provider, to a
backend), that leave what the other side said readable once it has ended the call.

grpc.aio (1.85, grpc/grpc#36066) marks a call INTERNAL ("Internal error from Core") when
a write fails because the server has already ended the call. From then on the call's
`read` raises that error instead of returning the messages the server sent before its
status, and the status itself is lost. A provider refusing a stream (its refusal is a
message) while the consumer's caller is still sending would reach the caller as an
internal error, and a backend's own status, ending a bidirectional call early, would be
logged as INTERNAL. These writes go to gRPC's Core directly, as `write` does, but a
failed one raises `PeerGone` and leaves the call as Core has it: the server's messages,
then its status."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc._cython import cygrpc  # type: ignore[attr-defined]


class PeerGone(Exception):
    """A write to a call that has ended: the other side went away."""


async def write(call: Any, message: Any) -> None:
    """Send `message` on `call` (a `grpc.aio` stream-request call); `PeerGone` when the
    call has ended, before or during the write, without changing what reading the call
    gives."""
    core = getattr(call, "_cython_call", None)
    started = getattr(call, "_metadata_sent", None)
    if core is None or started is None or not hasattr(call, "_request_serializer"):
        await call.write(message)  # gRPC's insides have changed: its own write is all there is
        return
    if getattr(call, "_done_writing_flag", False):
        raise asyncio.InvalidStateError("the call's messages were closed")
    if call.done():
        raise PeerGone("the call has ended")
    if not started.is_set():  # the call's start is still under way (its metadata)
        await _started_or_ended(call, started)
    if call.done():
        raise PeerGone("the call has ended")
    serialize = call._request_serializer
    data = message if serialize is None else serialize(message)
    try:
        await core.send_serialized_message(data)
    except cygrpc.InternalError as exc:  # Core refused the write: the call has ended
        raise PeerGone(str(exc)) from exc
    except asyncio.CancelledError:
        if not call.cancelled():
            call.cancel()
        raise


async def _started_or_ended(call: Any, started: asyncio.Event) -> None:
    """Wait until the call's start was sent or the call ended (a call cancelled before it
    started never sends it)."""
    ended = asyncio.get_running_loop().create_future()

    def end(_: object) -> None:
        if not ended.done():
            ended.set_result(None)

    call.add_done_callback(end)
    waiting = asyncio.ensure_future(started.wait())
    try:
        await asyncio.wait((waiting, ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        ended.cancel()
