"""The security server's client of the registry's signed global configuration.

It verifies every configuration against the instance anchor, refuses one older than the
version it holds (a rollback), keeps the last good one on disk (written atomically), and
serves from it while the registry is unreachable. Calls are refused with
`CONFIGURATION_EXPIRED` once that copy has expired, and resume by themselves as soon as
a fresh one arrives: the watch stream reconnects with backoff, without a restart.

A configuration arrives gzip-compressed and is inflated up to `max_message_bytes`
(`limits.max_configuration_bytes`; an update in parts, all its parts together), the same
bound as the gRPC message itself; a larger
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
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import grpc
import structlog

from gateway.config_parts import BUCKETS, Held, Update, apply_update, sha256
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


def update_from_message(message: pb.PartsUpdate, max_bytes: int) -> Update:
    """A parts update as the core checks it, its parts inflated up to `max_bytes` in all
    (the bound of a whole configuration, which holds every part an update may carry). This
    runs before any signature is checked: each part bounded alone, a thousand parts of a
    small message could inflate to tens of gigabytes. Bucket numbers are in range and
    given once."""
    left = [max_bytes]

    def inflate(data: bytes) -> bytes:
        content = inflate_content(data, left[0], in_all=max_bytes)
        left[0] -= len(content)
        return content

    numbers = [b.bucket for b in message.buckets]
    if len(set(numbers)) != len(numbers) or any(not 0 <= n < BUCKETS for n in numbers):
        raise ConfigurationError(
            f"global configuration rejected: the update's bucket numbers must be distinct "
            f"and below {BUCKETS}",
            code=Code.CONFIGURATION_INVALID,
        )
    return Update(
        directory=signed_from_message(message.directory, max_bytes),
        base_version=message.base_version,
        catalogue=inflate(message.catalogue_gzip) if message.catalogue_gzip else None,
        digests=message.bucket_digests if message.base_version == 0 else None,
        changed={c.bucket: c.sha256 for c in message.changed},
        buckets={b.bucket: inflate(b.gzip_content) for b in message.buckets},
    )


# the index of the parts kept on disk
HELD = "held.json"


def _read_floor(path: Path) -> int:
    """The newest version a client installed (0: none yet, or the file unreadable)."""
    try:
        return max(0, int(path.read_text().strip()))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("configuration_floor_unreadable", path=str(path), error=str(exc))
        return 0


def _write_atomically(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open_private(tmp) as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_parts(
    folder: Path, anchor: Anchor, *, server: str = "", subsystems: Iterable[str] = ()
) -> Held:
    """The configuration in parts a server kept in `folder` (`STATE_DIR/configuration-parts`),
    checked as a snapshot from the registry would be: the directory against the anchor, every
    part against its digest. `OSError`, `ValueError`, `KeyError` or `TypeError` when the
    files cannot be read; `ConfigurationError` when they do not check out."""
    index = json.loads((folder / HELD).read_text())

    def part(digest_hex: str) -> bytes:
        return (folder / digest_hex).read_bytes()

    update = Update(
        directory=SignedConfiguration(
            content=base64.b64decode(index["directory"]),
            signature=base64.b64decode(index["signature"]),
            signer_certificate=base64.b64decode(index["signer_certificate"]),
        ),
        base_version=0,
        catalogue=part(index["catalogue"]),
        digests=part(index["digests"]),
        buckets={int(b): part(h) for b, h in index["buckets"].items()},
    )
    return apply_update(None, update, anchor, server=server, subsystems=subsystems)


class ConfigurationClient:
    def __init__(
        self,
        *,
        anchor: Anchor,
        cache_file: Path,
        clock: Callable[[], datetime],
        max_message_bytes: int = MAX_CONFIGURATION_BYTES,
        server: str = "",
        subsystems: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        """`server` (this server's id) and `subsystems` say which agreement buckets to
        follow: those of the subsystems the catalogue says `server` hosts, and of the
        subsystems `subsystems()` gives when the watch opens (for a federated instance,
        those this server hosts in its own)."""
        self.anchor = anchor
        self.max_message_bytes = max_message_bytes
        self.server = server
        self.subsystems = subsystems
        # what is held of the configuration in parts (None: nothing, or a whole document)
        self.held: Held | None = None
        self.cache_file = cache_file
        # the configuration in parts is kept in this folder (the directory, then one file
        # per part, named by its SHA-256)
        self.parts_dir = cache_file.with_name(cache_file.stem + "-parts")
        # the newest version ever installed, kept apart from the copies (which a restart may
        # find unusable, and then loads nothing): none older is installed again, whoever
        # answers in the registry's place (its channel is not encrypted) with an older one
        self.floor_file = cache_file.with_name(cache_file.stem + "-version")
        self.floor = _read_floor(self.floor_file)
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
        """Load the last good configuration from disk, if there is one that still verifies:
        the one in parts when there is one, else the whole document. Parts that no longer
        check out (a bucket of a subsystem hosted since is missing, say) load nothing: a
        whole document beside them can only be older (one replaces the other on disk), and
        installing it would roll back what the parts held (an agreement suspended since);
        the registry's next answer installs the current one."""
        if (self.parts_dir / HELD).exists():
            try:
                held = read_parts(
                    self.parts_dir,
                    self.anchor,
                    server=self.server,
                    subsystems=tuple(self.subsystems()),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "configuration_cache_unreadable", path=str(self.parts_dir), error=str(exc)
                )
            except ConfigurationError as exc:
                log.warning("configuration_cache_rejected", error=exc.message)
                return
            else:
                if self._older_than_installed(held.config):
                    return
                self.held = held
                self._install(held.config, None, persist=False)
                return
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
            config = verify_configuration(signed, self.anchor)
        except ConfigurationError as exc:
            log.warning("configuration_cache_rejected", error=exc.message)
            return
        if not self._older_than_installed(config):
            self._install(config, signed, persist=False)

    def _older_than_installed(self, config: GlobalConfiguration) -> bool:
        """Whether a copy on disk is older than a version installed before (someone put it
        there): then it is not loaded, and the registry's next answer installs the current
        one."""
        if config.version >= self.floor:
            return False
        log.warning("configuration_cache_older", version=config.version, installed=self.floor)
        return True

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
        held = max(self.floor, current.version if current is not None else 0)
        if config.version < held or (current is not None and config.version <= held):
            if config.version < held:
                log.warning("configuration_rollback_refused", offered=config.version, held=held)
            return False
        return True

    def _install(
        self, config: GlobalConfiguration, signed: SignedConfiguration | None, *, persist: bool
    ) -> None:
        if persist and signed is not None:
            self._persist(signed)
        if config.version > self.floor:
            self.floor_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.floor_file, f"{config.version}\n".encode())
            self.floor = config.version
        self.current = config
        self.available.set()
        log.info("configuration_installed", instance=config.instance, version=config.version)
        for listener in self._listeners:
            listener(config)

    def _persist(self, signed: SignedConfiguration) -> None:
        self.held = None  # a whole document replaces what was held in parts
        (self.parts_dir / HELD).unlink(missing_ok=True)
        doc = {
            "content": base64.b64encode(signed.content).decode(),
            "signature": base64.b64encode(signed.signature).decode(),
            "signer_certificate": base64.b64encode(signed.signer_certificate).decode(),
        }
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.cache_file, json.dumps(doc).encode())

    def _write_parts(self, held: Held) -> None:
        """Keep what is held on disk: each part in a file named by its SHA-256 (written once,
        fsynced), then the index naming them replaced atomically, then unnamed parts removed;
        a crash at any point leaves the previous index and its parts whole."""
        folder = self.parts_dir
        folder.mkdir(parents=True, exist_ok=True)
        named: dict[str, bytes] = {
            sha256(held.catalogue).hex(): held.catalogue,
            sha256(held.digests).hex(): held.digests,
            **{sha256(content).hex(): content for content, _ in held.buckets.values()},
        }
        for name, content in named.items():
            if not (folder / name).exists():
                _write_atomically(folder / name, content)
        index = {
            "directory": base64.b64encode(held.signed.content).decode(),
            "signature": base64.b64encode(held.signed.signature).decode(),
            "signer_certificate": base64.b64encode(held.signed.signer_certificate).decode(),
            "catalogue": sha256(held.catalogue).hex(),
            "digests": sha256(held.digests).hex(),
            "buckets": {str(b): sha256(c).hex() for b, (c, _) in held.buckets.items()},
        }
        _write_atomically(folder / HELD, json.dumps(index).encode())
        for path in folder.iterdir():
            if path.name not in named and path.name != HELD:
                path.unlink(missing_ok=True)
        # parts replace a whole document kept before (as `_persist` does the reverse): an
        # older version left beside them could be installed again by a later start
        self.cache_file.unlink(missing_ok=True)

    async def receive_parts(self, message: pb.PartsUpdate, subsystems: tuple[str, ...]) -> bool:
        """Check a parts update (in a worker thread: inflating, verifying, parsing and
        storing) and install the configuration it makes; False when it is not newer."""

        def check() -> Held:
            update = update_from_message(message, self.max_message_bytes)
            base = None if update.base_version == 0 else self.held
            return apply_update(
                base, update, self.anchor, server=self.server, subsystems=subsystems
            )

        held = await asyncio.to_thread(check)
        if not self._newer(held.config):
            if self.current is not None and held.config.version == self.current.version:
                self.held = held  # the same version again, as a snapshot: deltas follow it
            return False
        await asyncio.to_thread(self._write_parts, held)
        if not self._newer(held.config):  # another copy was installed meanwhile
            return False
        self.held = held
        self._install(held.config, None, persist=False)
        return True

    async def run(self) -> None:
        """Watch the registry for new configurations until cancelled, reconnecting with backoff."""
        backoff = 0.2
        while True:
            for address in self.anchor.addresses:
                try:
                    await self._watch_parts(address)
                    backoff = 0.2
                except grpc.aio.AioRpcError as exc:
                    detail = exc.details() or ""
                    resource = exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    if resource and "configuration calls from one address" in detail:
                        # the registry's bound on calls per source address (servers behind
                        # one NAT address share it)
                        log.error(
                            "registry_calls_per_address_refused",
                            address=address,
                            detail=detail[:300],
                            hint="raise the registry's configuration_calls_per_address",
                        )
                    elif resource:
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

    async def _watch_parts(self, address: str) -> None:
        """Follow the registry's configuration in parts; a registry without `WatchParts`
        (an older one) is followed through `Watch`, whole."""
        async with self._channel(address) as channel:
            watch = channel.unary_stream(
                "/gateway.v1.Configuration/WatchParts",
                request_serializer=pb.WatchPartsRequest.SerializeToString,
                response_deserializer=pb.PartsUpdate.FromString,
            )
            subsystems = tuple(self.subsystems())
            call = watch(
                pb.WatchPartsRequest(
                    instance=self.anchor.instance, server=self.server, subsystems=subsystems
                )
            )
            try:
                async for message in call:
                    await self.receive_parts(message, subsystems)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("registry_without_parts", address=address)
            else:
                return
            finally:
                call.cancel()
        await self._watch(address)

    def _channel(self, address: str) -> grpc.aio.Channel:
        """A channel to a registry: kept alive, taking messages up to our limit."""
        options = [*_KEEPALIVE, ("grpc.max_receive_message_length", self.max_message_bytes)]
        return grpc.aio.insecure_channel(address, options=options)

    async def _watch(self, address: str) -> None:
        async with self._channel(address) as channel:
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
