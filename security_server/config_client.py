"""The security server's client of the registry's signed global configuration.

It verifies every configuration against the instance anchor, refuses one older than the
version it holds (a rollback), keeps the last good one on disk (written atomically), and
serves from it while the registry is unreachable. Calls are refused with
`CONFIGURATION_EXPIRED` once that copy has expired, and resume by themselves as soon as
a fresh one arrives: the watch stream reconnects with backoff, without a restart.

A configuration arrives gzip-compressed and is inflated up to `max_message_bytes`
(`limits.max_configuration_bytes`), the same bound as the gRPC message itself; a larger
one is refused and logged as `configuration_too_large`, not as an unreachable registry.
Verifying, parsing and storing a national instance's configuration take seconds, so they
run in a worker thread: the event loop goes on serving calls with the configuration in
force until the new one is installed, at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
import structlog

from gateway.configuration import (
    MAX_CONFIGURATION_BYTES,
    Anchor,
    GlobalConfiguration,
    SignedConfiguration,
    inflate_content,
    verify_configuration,
)
from gateway.errors import Code, ConfigurationError
from gateway.v1 import configuration_pb2 as pb
from security_server.private_files import open_private

log = structlog.get_logger("security_server.config")

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def signed_from_message(message: pb.SignedConfiguration, max_bytes: int) -> SignedConfiguration:
    """The signed configuration a registry sent, its content inflated when compressed (up
    to `max_bytes`, else `ConfigurationError`)."""
    content = message.content
    if message.gzip_content:
        if content:
            raise ConfigurationError(
                "global configuration rejected: it carries both plain and compressed content",
                code=Code.CONFIGURATION_INVALID,
            )
        content = inflate_content(message.gzip_content, max_bytes)
    return SignedConfiguration(
        content=content,
        signature=message.signature,
        signer_certificate=message.signer_certificate,
    )


class ConfigurationClient:
    def __init__(
        self,
        *,
        anchor: Anchor,
        cache_file: Path,
        clock: Callable[[], datetime],
        max_message_bytes: int = MAX_CONFIGURATION_BYTES,
    ) -> None:
        self.anchor = anchor
        self.max_message_bytes = max_message_bytes
        self.cache_file = cache_file
        self.clock = clock
        self.current: GlobalConfiguration | None = None
        self.available = asyncio.Event()
        self._listeners: list[Callable[[GlobalConfiguration], None]] = []

    def on_change(self, listener: Callable[[GlobalConfiguration], None]) -> None:
        self._listeners.append(listener)

    def require(self, now: datetime) -> GlobalConfiguration:
        """The configuration to decide a call with, or a `ConfigurationError` saying why none."""
        config = self.current
        if config is None:
            raise ConfigurationError(
                "this security server has no global configuration yet: the registry has not "
                "been reached; retry shortly",
                code=Code.CONFIGURATION_UNAVAILABLE,
            )
        config.check_current(now)
        return config

    def load_cached(self) -> None:
        """Load the last good configuration from disk, if there is one that still verifies."""
        try:
            doc = json.loads(self.cache_file.read_text())
            signed = SignedConfiguration(
                content=base64.b64decode(doc["content"]),
                signature=base64.b64decode(doc["signature"]),
                signer_certificate=base64.b64decode(doc["signer_certificate"]),
            )
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("configuration_cache_unreadable", path=str(self.cache_file), error=str(exc))
            return
        try:
            self._install(verify_configuration(signed, self.anchor), signed, persist=False)
        except ConfigurationError as exc:
            log.warning("configuration_cache_rejected", error=exc.message)

    def accept(self, signed: SignedConfiguration) -> bool:
        """Verify and install a configuration from the registry; False when it is not newer."""
        config = verify_configuration(signed, self.anchor)
        if not self._newer(config):
            return False
        self._install(config, signed, persist=True)
        return True

    async def receive(self, signed: SignedConfiguration) -> bool:
        """`accept`, with verifying, parsing and storing in a worker thread."""
        config = await asyncio.to_thread(verify_configuration, signed, self.anchor)
        if not self._newer(config):
            return False
        await asyncio.to_thread(self._persist, signed)
        if not self._newer(config):  # another copy was installed meanwhile
            return False
        self._install(config, signed, persist=False)
        return True

    def _newer(self, config: GlobalConfiguration) -> bool:
        current = self.current
        if current is not None and config.version <= current.version:
            if config.version < current.version:
                log.warning(
                    "configuration_rollback_refused", offered=config.version, held=current.version
                )
            return False
        return True

    def _install(
        self, config: GlobalConfiguration, signed: SignedConfiguration, *, persist: bool
    ) -> None:
        if persist:
            self._persist(signed)
        self.current = config
        self.available.set()
        log.info("configuration_installed", instance=config.instance, version=config.version)
        for listener in self._listeners:
            listener(config)

    def _persist(self, signed: SignedConfiguration) -> None:
        doc = {
            "content": base64.b64encode(signed.content).decode(),
            "signature": base64.b64encode(signed.signature).decode(),
            "signer_certificate": base64.b64encode(signed.signer_certificate).decode(),
        }
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        with open_private(tmp) as f:
            f.write(json.dumps(doc).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.cache_file)

    async def run(self) -> None:
        """Watch the registry for new configurations until cancelled, reconnecting with backoff."""
        backoff = 0.2
        while True:
            for address in self.anchor.addresses:
                try:
                    await self._watch(address)
                    backoff = 0.2
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        log.error(
                            "configuration_too_large",
                            address=address,
                            max_message_bytes=self.max_message_bytes,
                            detail=(exc.details() or "")[:300],
                            hint="raise limits.max_configuration_bytes (and the registry's "
                            "max_message_bytes)",
                        )
                    else:
                        log.info("registry_unreachable", address=address, status=exc.code().name)
                except ConfigurationError as exc:
                    log.error("configuration_rejected", address=address, error=exc.message)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch(self, address: str) -> None:
        options = [*_KEEPALIVE, ("grpc.max_receive_message_length", self.max_message_bytes)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            watch = channel.unary_stream(
                "/gateway.v1.Configuration/Watch",
                request_serializer=pb.WatchRequest.SerializeToString,
                response_deserializer=pb.SignedConfiguration.FromString,
            )
            known = self.current.version if self.current else 0
            call = watch(pb.WatchRequest(instance=self.anchor.instance, known_version=known))
            try:
                async for message in call:
                    await self.receive(signed_from_message(message, self.max_message_bytes))
            finally:
                call.cancel()
