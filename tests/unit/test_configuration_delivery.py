"""Delivery of the signed configuration at size: compressed on the wire, inflated only up to
the receiver's limit, too large said as such, and the last good copy kept.

The registry here is a small gRPC server in the test (real gRPC on loopback) that answers
`Watch` with whatever messages the test gives it, as a broken or hostile registry would;
the security server's side is its real `ConfigurationClient`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
from collections.abc import AsyncIterator, Callable, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from gateway import canonical
from gateway.config_parts import EMPTY_BUCKET, bucket_of, build_directory, sha256
from gateway.configuration import (
    SignedConfiguration,
    build_content,
    catalogue_json,
    compress_content,
    inflate_content,
    sign_configuration,
)
from gateway.errors import Code, ConfigurationError
from gateway.v1 import configuration_pb2 as pb
from registry.parts import Buckets
from security_server.config_client import (
    ConfigurationClient,
    signed_from_message,
    update_from_message,
)
from tests.unit.test_configuration import IDENTITY, SS_DNIC, World, expect_invalid

# the fixture `world` (a signed UY configuration), shared with the core's tests
from tests.unit.test_configuration import world as world

MIB = 1024 * 1024


def message(signed: SignedConfiguration) -> bytes:
    """What our registry sends: the content gzipped, not in plain."""
    return pb.SignedConfiguration(
        gzip_content=compress_content(signed.content),
        signature=signed.signature,
        signer_certificate=signed.signer_certificate,
    ).SerializeToString()


def test_compressed_content_inflates_to_the_signed_bytes(world: World) -> None:
    """The same content always compresses to the same bytes, and inflates back exactly."""
    packed = compress_content(world.content)
    assert packed == compress_content(world.content)
    assert inflate_content(packed, MIB) == world.content
    decoded = signed_from_message(pb.SignedConfiguration.FromString(message(world.signed)), MIB)
    assert decoded == world.signed


def test_a_compression_bomb_is_refused_without_inflating_it() -> None:
    """100 MiB of zeros gzip to about 100 KB: refused at the limit, never inflated whole."""
    bomb = gzip.compress(bytes(100 * MIB), compresslevel=9)
    assert len(bomb) < 200_000
    error = expect_invalid(lambda: inflate_content(bomb, MIB))
    assert "inflates to more than 1048576 bytes" in error.message


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not gzip at all", "not gzip"),
        (compress_content(b'{"a":1}')[:-6], "truncated"),
        (compress_content(b'{"a":1}') + b"extra", "followed by other bytes"),
    ],
)
def test_malformed_compressed_content_is_refused(data: bytes, why: str) -> None:
    assert why in expect_invalid(lambda: inflate_content(data, MIB)).message


def test_plain_and_compressed_content_together_are_refused(world: World) -> None:
    both = pb.SignedConfiguration(
        content=world.content,
        gzip_content=compress_content(world.content),
        signature=world.signed.signature,
        signer_certificate=world.signed.signer_certificate,
    )
    with pytest.raises(ConfigurationError) as caught:
        signed_from_message(both, MIB)
    assert caught.value.code is Code.CONFIGURATION_INVALID


class Registry:
    """A Watch service on 127.0.0.1 answering every stream with `messages`, then holding it."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.parts: list[bytes] | None = None

    async def _watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[bytes]:
        for m in self.messages:
            yield m
        await asyncio.Event().wait()

    async def _watch_parts(self, request: Any, context: Any) -> AsyncIterator[bytes]:
        if self.parts is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no parts here")
        for m in self.parts or ():
            yield m
        await asyncio.Event().wait()

    async def start(self) -> str:
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * MIB)])
        handler = grpc.method_handlers_generic_handler(
            "gateway.v1.Configuration",
            {
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self._watch,
                    request_deserializer=pb.WatchRequest.FromString,
                    response_serializer=lambda b: b,
                ),
                "WatchParts": grpc.unary_stream_rpc_method_handler(
                    self._watch_parts,
                    request_deserializer=pb.WatchPartsRequest.FromString,
                    response_serializer=lambda b: b,
                ),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"


async def follow(
    world: World,
    tmp_path: Path,
    messages: list[bytes],
    until: Callable[[list[MutableMapping[str, Any]]], bool],
    parts: list[bytes] | None = None,
) -> tuple[ConfigurationClient, list[MutableMapping[str, Any]]]:
    """Run a client (as ss1 of DNIC) with a 1 MiB limit against a registry sending
    `messages` on Watch and `parts` on WatchParts (none: it does not know WatchParts) until
    the logged lines satisfy `until` (at most 10 s)."""
    registry = Registry(messages)
    registry.parts = parts
    address = await registry.start()
    client = ConfigurationClient(
        anchor=dataclasses.replace(world.anchor, addresses=(address,)),
        cache_file=tmp_path / "configuration.json",
        clock=lambda: world.now,
        max_message_bytes=MIB,
        server=str(SS_DNIC),
    )
    with capture_logs() as logged:
        task = asyncio.create_task(client.run())
        try:
            for _ in range(200):
                if until(logged):
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await registry.server.stop(None)
    return client, logged


def events(logged: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(line["event"]) for line in logged]


async def test_a_configuration_over_the_limit_is_logged_as_too_large_and_the_last_kept(
    world: World, tmp_path: Path
) -> None:
    """A message over limits.max_configuration_bytes: `configuration_too_large` at error
    level, naming the limit, never `registry_unreachable`; the version held stays."""
    newer = dict(world.content_args, version=43)
    big = sign_configuration(build_content(**newer), world.config_signer)
    oversized = pb.SignedConfiguration(
        gzip_content=os.urandom(2 * MIB),  # incompressible: the message itself is too large
        signature=big.signature,
        signer_certificate=big.signer_certificate,
    ).SerializeToString()
    client, logged = await follow(
        world,
        tmp_path,
        [message(world.signed), oversized],
        lambda lines: "configuration_too_large" in events(lines),
    )
    assert client.current is not None and client.current.version == 42
    (line,) = [x for x in logged if x["event"] == "configuration_too_large"][:1]
    assert line["log_level"] == "error" and line["max_message_bytes"] == MIB
    assert "registry_unreachable" not in events(logged)


async def test_a_compression_bomb_from_a_registry_is_refused_and_the_last_kept(
    world: World, tmp_path: Path
) -> None:
    """A small message that would inflate past the limit is refused as invalid (logged as
    `configuration_rejected`), and the version held stays."""
    bomb = pb.SignedConfiguration(
        gzip_content=gzip.compress(bytes(64 * MIB), compresslevel=9),
        signature=world.signed.signature,
        signer_certificate=world.signed.signer_certificate,
    ).SerializeToString()
    client, logged = await follow(
        world,
        tmp_path,
        [message(world.signed), bomb],
        lambda lines: "configuration_rejected" in events(lines),
    )
    assert client.current is not None and client.current.version == 42
    (line,) = [x for x in logged if x["event"] == "configuration_rejected"][:1]
    assert "inflates to more than" in line["error"]


def parts_messages(world: World) -> tuple[bytes, Callable[[int, bytes, bytes], bytes], bytes]:
    """A snapshot (version 42) of the world in parts for ss1 of DNIC, a function making a
    delta to version 43, and the content of DNIC's bucket."""
    args = world.content_args
    catalogue = canonical.encode(
        catalogue_json(
            ca_certificates=args["ca_certificates"],
            members=args["members"],
            servers=args["servers"],
            services=args["services"],
        )
    )
    buckets = Buckets.of(args["agreements"])
    mine = bucket_of(IDENTITY)

    def directory(version: int, root: bytes) -> pb.SignedConfiguration:
        signed = sign_configuration(
            build_directory(
                instance="UY",
                version=version,
                generated_at=world.now,
                expires_at=world.now + timedelta(hours=1),
                catalogue_sha256=sha256(catalogue),
                agreements_root=root,
            ),
            world.config_signer,
        )
        return pb.SignedConfiguration(
            content=signed.content,
            signature=signed.signature,
            signer_certificate=signed.signer_certificate,
        )

    snapshot = pb.PartsUpdate(
        directory=directory(42, buckets.root()),
        catalogue_gzip=compress_content(catalogue),
        bucket_digests=bytes(buckets.digests),
        buckets=[pb.Bucket(bucket=mine, gzip_content=compress_content(buckets.contents[mine]))],
    ).SerializeToString()

    def delta(base: int, content: bytes, digest: bytes) -> bytes:
        """Version 43 from `base`: bucket `mine` with `digest` in the signed root, and
        `content` sent for it."""
        digests = bytearray(buckets.digests)
        digests[mine * 32 : (mine + 1) * 32] = digest
        return pb.PartsUpdate(
            directory=directory(43, sha256(bytes(digests))),
            base_version=base,
            changed=[pb.BucketDigest(bucket=mine, sha256=digest)],
            buckets=[pb.Bucket(bucket=mine, gzip_content=compress_content(content))],
        ).SerializeToString()

    return snapshot, delta, buckets.contents[mine]


@pytest.mark.parametrize(
    ("attack", "why"),
    [
        ("altered bucket", "does not match its digest"),
        ("delta from another version", "does not apply to the version held, 42"),
    ],
)
async def test_a_bad_part_from_a_registry_is_refused_and_the_last_good_kept(
    world: World, tmp_path: Path, attack: str, why: str
) -> None:
    """Over WatchParts: a snapshot is installed; then a delta whose bucket was altered after
    the directory was signed, or which applies to a version the server does not hold, is
    refused (`configuration_rejected`, naming why) and version 42 stays in force."""
    snapshot, delta, content = parts_messages(world)
    altered = content.replace(b"benefit-eligibility", b"benefit-eligibilitY")
    bad = (
        delta(42, altered, sha256(content))
        if attack == "altered bucket"
        else delta(41, content, sha256(content))
    )
    client, logged = await follow(
        world,
        tmp_path,
        [],
        lambda lines: "configuration_rejected" in events(lines),
        parts=[snapshot, bad],
    )
    assert client.current is not None and client.current.version == 42
    assert client.held is not None and client.held.directory.version == 42
    (line,) = [x for x in logged if x["event"] == "configuration_rejected"][:1]
    assert why in line["error"], line
    assert len(client.current.agreements) == 1  # DNIC's bucket: the one agreement


async def test_a_good_delta_over_watchparts_is_installed_and_kept_on_disk(
    world: World, tmp_path: Path
) -> None:
    """The same snapshot, then a delta that removes the agreement: installed as version 43,
    and a new client reading the disk holds 43 too, from the parts alone."""
    snapshot, delta, _ = parts_messages(world)
    client, _ = await follow(
        world,
        tmp_path,
        [],
        lambda lines: any(
            x["event"] == "configuration_installed" and x.get("version") == 43 for x in lines
        ),
        parts=[snapshot, delta(42, EMPTY_BUCKET, sha256(EMPTY_BUCKET))],
    )
    assert client.current is not None and client.current.version == 43
    assert len(client.current.agreements) == 0
    again = ConfigurationClient(
        anchor=world.anchor,
        cache_file=tmp_path / "configuration.json",
        clock=lambda: world.now,
        server=str(SS_DNIC),
    )
    again.load_cached()
    assert again.current is not None and again.current.version == 43


async def test_parts_replace_the_whole_document_on_disk_and_an_older_one_is_never_loaded(
    world: World, tmp_path: Path
) -> None:
    """Version 41 arrives whole, 42 in parts: the whole document leaves the disk. When the
    subsystems hosted change (a federated instance's client is started again) and the parts
    no longer check out (a bucket now needed is missing), nothing is loaded: version 41 left
    beside them would have been, rolling back what 42 holds, such as an agreement suspended
    since. (Found by a red-team review.)"""
    hosted: list[tuple[str, ...]] = [(str(IDENTITY),)]
    cache = tmp_path / "configuration.json"

    def client() -> ConfigurationClient:
        return ConfigurationClient(
            anchor=world.anchor,
            cache_file=cache,
            clock=lambda: world.now,
            subsystems=lambda: hosted[0],
        )

    old = sign_configuration(
        build_content(**{**world.content_args, "version": 41}), world.config_signer
    )
    first = client()
    assert first.accept(old)
    assert cache.exists()
    snapshot, _, _ = parts_messages(world)
    assert await first.receive_parts(pb.PartsUpdate.FromString(snapshot), hosted[0])
    assert first.current is not None and first.current.version == 42
    assert not cache.exists()
    again = client()
    again.load_cached()
    assert again.current is not None and again.current.version == 42
    hosted[0] = (str(IDENTITY), "UY/GOV/BPS/benefits")  # its bucket is not on disk
    restarted = client()
    with capture_logs() as logged:
        restarted.load_cached()
    assert restarted.current is None
    assert any(x["event"] == "configuration_cache_rejected" for x in logged)
    # whoever sits on the registry's unencrypted channel answers with version 41, signed
    # and not expired: the newest version installed is kept apart from the copies, and
    # none older is installed again (found by a second red-team review)
    with capture_logs() as logged:
        assert not restarted.accept(old)
    assert restarted.current is None
    assert [x["held"] for x in logged if x["event"] == "configuration_rollback_refused"] == [42]
    assert (tmp_path / "configuration-version").read_text() == "42\n"


def test_an_updates_parts_are_bounded_in_all_before_any_signature_is_checked() -> None:
    """Each part within the bound, but together over it: refused before anything is
    verified (a small message of many parts could otherwise inflate to gigabytes; found by
    a red-team review). Bucket numbers given twice, or out of range, are refused too."""
    part = compress_content(b"x" * 400)

    def update(*numbers: int) -> pb.PartsUpdate:
        return pb.PartsUpdate(
            catalogue_gzip=part, buckets=[pb.Bucket(bucket=n, gzip_content=part) for n in numbers]
        )

    with pytest.raises(ConfigurationError, match="inflate to more than 1000 bytes in all"):
        update_from_message(update(1, 2), 1000)
    assert len(update_from_message(update(1), 1000).buckets) == 1
    for numbers in ((1, 1), (4096,)):
        with pytest.raises(ConfigurationError, match="bucket numbers must be distinct"):
            update_from_message(update(*numbers), 10_000)


def test_a_copy_on_disk_older_than_a_version_installed_is_not_loaded(
    world: World, tmp_path: Path
) -> None:
    """Someone who can write to the state folder puts back an older copy (an old backup's,
    say): the newest version installed is known apart from it, and it is not loaded."""
    cache = tmp_path / "configuration.json"
    first = ConfigurationClient(anchor=world.anchor, cache_file=cache, clock=lambda: world.now)
    old = sign_configuration(
        build_content(**{**world.content_args, "version": 41}), world.config_signer
    )
    assert first.accept(old)
    saved = cache.read_bytes()
    assert first.accept(
        sign_configuration(
            build_content(**{**world.content_args, "version": 43}), world.config_signer
        )
    )
    cache.write_bytes(saved)  # version 41 again
    again = ConfigurationClient(anchor=world.anchor, cache_file=cache, clock=lambda: world.now)
    with capture_logs() as logged:
        again.load_cached()
    assert again.current is None
    assert [x["installed"] for x in logged if x["event"] == "configuration_cache_older"] == [43]


def test_no_configuration_yet_is_configuration_unavailable(world: World, tmp_path: Path) -> None:
    """Before the registry was ever reached (the endpoints open only once a configuration
    is held; a check that runs earlier gets this code)."""
    client = ConfigurationClient(
        anchor=world.anchor, cache_file=tmp_path / "configuration.json", clock=lambda: world.now
    )
    with pytest.raises(ConfigurationError) as unavailable:
        client.require(world.now)
    assert unavailable.value.code is Code.CONFIGURATION_UNAVAILABLE
