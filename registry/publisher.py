"""Builds, signs, stores and pushes the global configuration.

A new version is published at start-up, every `refresh_seconds`, and whenever the
content changes (`publish` is called); each one is valid for `validity_seconds`. Besides
the catalogue and the agreements it lists every federation (active and ended, with the
other instance's anchor), the instance's policy `outbound_approval_required` and its
approved outbound approvals. Every
watcher (a security server's Watch stream) receives each new version at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from gateway.configuration import (
    MAX_CONFIGURATION_BYTES,
    SignedConfiguration,
    build_content,
    compress_content,
    sign_configuration,
)
from gateway.signing import Signer
from registry.metrics import RegistryMetrics, timer
from registry.store import RegistryStore

log = structlog.get_logger("registry.publisher")


class Publisher:
    def __init__(
        self,
        *,
        store: RegistryStore,
        instance: str,
        signer: Signer,
        ca_certificates: tuple[bytes, ...],
        validity: timedelta,
        clock: Callable[[], datetime],
        outbound_approval_required: bool = False,
        metrics: RegistryMetrics | None = None,
        max_message_bytes: int = MAX_CONFIGURATION_BYTES,
    ) -> None:
        self.metrics = metrics
        # the largest configuration message the configuration service may send
        self.max_message_bytes = max_message_bytes
        self.store = store
        self.instance = instance
        self.signer = signer
        self.ca_certificates = ca_certificates
        self.validity = validity
        self.clock = clock
        self.outbound_approval_required = outbound_approval_required
        self.current: SignedConfiguration | None = None
        # the current content compressed once for every watcher (`compress_content`)
        self.compressed = b""
        self.version = 0
        # when the current version stops being valid (readiness and metrics read it)
        self.expires_at: datetime | None = None
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()

    async def publish(self) -> SignedConfiguration:
        """Publish a new version from the store's current content."""
        async with self._lock:
            elapsed = timer()
            topology = await self.store.content()
            version = max(self.version, await self.store.last_version()) + 1
            now = self.clock()
            # encoding, signing and compressing a national instance's configuration take
            # seconds: a worker thread does it, so that the API and watch streams go on
            content, signed, compressed = await asyncio.to_thread(
                self._encode,
                instance=self.instance,
                version=version,
                generated_at=now,
                expires_at=now + self.validity,
                ca_certificates=self.ca_certificates,
                members=topology.members,
                servers=topology.servers,
                services=topology.services,
                agreements=topology.agreements,
                federations=topology.federations,
                outbound_approval_required=self.outbound_approval_required,
                outbound_approvals=topology.outbound_approvals,
            )
            await self.store.save_configuration(version, signed)
            # all three change together (no await in between): watchers read them as one
            self.version = version
            self.current = signed
            self.compressed = compressed
            self.expires_at = now + self.validity
            if len(compressed) + len(signed.signature) + 4096 > self.max_message_bytes:
                log.error(
                    "configuration_too_large",
                    version=version,
                    content_bytes=len(content),
                    compressed_bytes=len(compressed),
                    max_message_bytes=self.max_message_bytes,
                    hint="raise max_message_bytes here and limits.max_configuration_bytes "
                    "on the security servers",
                )
            if self.metrics is not None:
                states = await self.store.agreement_states()
                self.metrics.published(version, elapsed(), states)
        async with self._changed:
            self._changed.notify_all()
        log.info(
            "configuration_published",
            instance=self.instance,
            version=version,
            bytes=len(signed.content),
            compressed_bytes=len(compressed),
        )
        return signed

    def _encode(self, **parts: Any) -> tuple[bytes, SignedConfiguration, bytes]:
        content = build_content(**parts)
        return content, sign_configuration(content, self.signer), compress_content(content)

    async def wait_newer(self, version: int) -> SignedConfiguration:
        """Wait until a version newer than `version` is published, and return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > version)
            assert self.current is not None
            return self.current
