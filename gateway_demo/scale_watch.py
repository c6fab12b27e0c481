"""Watchers of the registry's configuration for `gateway bench --scale`, as a subprocess.

`python -m gateway_demo.scale_watch ADDRESS INSTANCE COUNT` opens COUNT concurrent
`/gateway.v1.Configuration/WatchParts` streams, each on its own channel with a security
server's default receive limit (`MAX_CONFIGURATION_BYTES`), watcher i as the synthetic
world's server i (so each gets the buckets of its own subsystems, as a security server
would), and prints one JSON line per message received:
`{"w": i, "t": time.monotonic(), "bytes": n, "version": v}`, or
`{"w": i, "t": ..., "error": "STATUS: details"}` when a stream fails (it reconnects a
second later, as a security server would). `time.monotonic()` is the system-wide
CLOCK_MONOTONIC on Linux, so the bench compares it with its own clock.

`watch_configuration` and `fetch_configuration` are the only code here that speaks the
configuration protocol: adapt them when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator

import grpc

from gateway.configuration import MAX_CONFIGURATION_BYTES, SignedConfiguration
from gateway.v1 import configuration_pb2 as pb
from gateway_demo.scale_world import CLASSES
from security_server.config_client import signed_from_message

# canonical JSON sorts keys: the content's last key is its version
_VERSION = re.compile(rb'"version":([0-9]+)}$')


def _version(content: bytes) -> int | None:
    found = _VERSION.search(content[-64:])
    return int(found.group(1)) if found else None


def signed_document(message: pb.SignedConfiguration) -> SignedConfiguration:
    """The signed configuration a message carries (inflated when it came compressed)."""
    return signed_from_message(message, MAX_CONFIGURATION_BYTES)


async def watch_configuration(
    address: str, instance: str, server: str
) -> AsyncIterator[tuple[int, int | None]]:
    """Follow the WatchParts stream as `server`: (message bytes, version) for each version
    pushed (the first message a snapshot, then deltas). Raises `grpc.aio.AioRpcError` when
    the stream fails."""
    async for message in parts_stream(address, instance, server):
        yield message.ByteSize(), _version(signed_document(message.directory).content)


async def parts_stream(address: str, instance: str, server: str) -> AsyncIterator[pb.PartsUpdate]:
    """The WatchParts messages for `server`, as a security server receives them."""
    options = [("grpc.max_receive_message_length", MAX_CONFIGURATION_BYTES)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        watch = channel.unary_stream(
            "/gateway.v1.Configuration/WatchParts",
            request_serializer=pb.WatchPartsRequest.SerializeToString,
            response_deserializer=pb.PartsUpdate.FromString,
        )
        call = watch(pb.WatchPartsRequest(instance=instance, server=server))
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()


def synthetic_server(instance: str, index: int) -> str:
    """The id of the synthetic world's server `index` (see gateway_demo/scale_world.py)."""
    return f"{instance}/{CLASSES[index % len(CLASSES)]}/SYN{index:05d}/ss1"


async def fetch_configuration(
    address: str, instance: str, timeout: float = 120.0
) -> pb.SignedConfiguration:
    """The current signed configuration (Fetch), with no receive limit: the bench's own
    measuring instrument, not a security server."""
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        fetch = channel.unary_unary(
            "/gateway.v1.Configuration/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        message: pb.SignedConfiguration = await fetch(
            pb.FetchRequest(instance=instance), timeout=timeout
        )
        return message


def _emit(doc: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _watcher(index: int, address: str, instance: str) -> None:
    while True:
        try:
            server = synthetic_server(instance, index)
            async for size, version in watch_configuration(address, instance, server):
                _emit({"w": index, "t": time.monotonic(), "bytes": size, "version": version})
        except grpc.aio.AioRpcError as exc:
            _emit(
                {
                    "w": index,
                    "t": time.monotonic(),
                    "error": f"{exc.code().name}: {(exc.details() or '')[:200]}",
                }
            )
        await asyncio.sleep(1.0)


async def _main(address: str, instance: str, count: int) -> None:
    await asyncio.gather(*(_watcher(i, address, instance) for i in range(count)))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m gateway_demo.scale_watch ADDRESS INSTANCE COUNT", file=sys.stderr)
        return 2
    from gateway_ops.runtime import die_with_parent

    die_with_parent()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args[0], args[1], int(args[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
