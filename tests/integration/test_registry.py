"""The registry's configuration service over real gRPC: Fetch, Watch, and what a server accepts."""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc
import pytest

from gateway.configuration import (
    MAX_CONFIGURATION_BYTES,
    Anchor,
    SignedConfiguration,
    verify_configuration,
)
from gateway.errors import ConfigurationError
from gateway.identifiers import ServiceId, SubsystemId
from gateway.v1 import configuration_pb2 as pb
from gateway_demo.runner import Runner
from security_server.config_client import signed_from_message

from .conftest import CLINICS, POPULATION


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    return make_runner(refresh_seconds=0.5)


def signed(message: pb.SignedConfiguration) -> SignedConfiguration:
    """The message's configuration: its content arrives compressed, never also in plain."""
    assert message.gzip_content and not message.content
    return signed_from_message(message, MAX_CONFIGURATION_BYTES)


async def test_fetch_returns_a_configuration_that_verifies_against_the_anchor(
    runner: Runner,
) -> None:
    """Fetch gives the signed configuration; it verifies and carries the topology's agreement."""
    anchor = Anchor.from_json(json.loads((runner.pki / "anchor.json").read_text()))
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        fetch = channel.unary_unary(
            "/gateway.v1.Configuration/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        message = await fetch(pb.FetchRequest(instance="UY"))
    config = verify_configuration(signed(message), anchor)
    assert config.instance == "UY"
    assert config.version >= 1
    assert len(config.servers) == 2
    decided = config.agreements.decide(
        SubsystemId.parse(CLINICS),
        ServiceId.parse(POPULATION),
        "healthcare-identification",
        config.generated_at,
    )
    assert decided.id == "AGR-2026-0001"
    original = signed(message)
    tampered = SignedConfiguration(
        content=original.content.replace(
            b"healthcare-identification", b"healthcare-identificatioN"
        ),
        signature=original.signature,
        signer_certificate=original.signer_certificate,
    )
    with pytest.raises(ConfigurationError):
        verify_configuration(tampered, anchor)


async def test_fetch_for_another_instance_is_refused(runner: Runner) -> None:
    """Asking this registry for another instance's configuration gets NOT_FOUND."""
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        fetch = channel.unary_unary(
            "/gateway.v1.Configuration/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch(pb.FetchRequest(instance="AR"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_pushes_each_new_version(runner: Runner) -> None:
    """Watch sends the current version at once, then every newer one as it is published."""
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        watch = channel.unary_stream(
            "/gateway.v1.Configuration/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        call = watch(pb.WatchRequest(instance="UY", known_version=0))
        anchor = Anchor.from_json(json.loads((runner.pki / "anchor.json").read_text()))
        versions = []
        async for message in call:
            versions.append(verify_configuration(signed(message), anchor).version)
            if len(versions) == 3:
                break
        call.cancel()
    assert versions == sorted(versions)
    assert len(set(versions)) == 3


async def test_watch_parts_for_too_many_subsystems_is_refused(runner: Runner) -> None:
    """Anyone may watch, so what one stream may ask for is bounded: naming more than
    10,000 subsystems is refused with INVALID_ARGUMENT before anything is sent."""
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        watch = channel.unary_stream(
            "/gateway.v1.Configuration/WatchParts",
            request_serializer=pb.WatchPartsRequest.SerializeToString,
            response_deserializer=pb.PartsUpdate.FromString,
        )
        subsystems = [f"UY/GOV/X{i}/s" for i in range(10_001)]
        call = watch(pb.WatchPartsRequest(instance="UY", subsystems=subsystems))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 10000 subsystems" in (caught.value.details() or "")
