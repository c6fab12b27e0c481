"""`gateway registry serve`: the registry process.

Migrates the store, imports what the topology file (the seed) holds and the store does
not, publishes the signed configuration, serves it over gRPC (`gateway.v1.Configuration`:
Fetch, Watch; and Checkpoint, where security servers report their logs' heads, see
`registry.checkpoints`) and serves the admin REST API (`registry.api`). Every change made through
the API publishes a new configuration at once, which Watch pushes to security servers.
Every `refresh_seconds` it expires agreements whose validity ended and republishes.
SIGHUP imports the topology file again. Settings are described by `RegistrySettings`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.checkpoint import SignedCheckpoint
from gateway.config_parts import EMPTY_DIGEST
from gateway.configuration import MAX_CONFIGURATION_BYTES, Anchor
from gateway.errors import ConfigFileError
from gateway.settings import database_url
from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from gateway.timeutil import format_time
from gateway.v1 import configuration_pb2 as pb
from gateway.workflow import Policy
from gateway_ops import http_sites
from gateway_ops.auth import OidcSettings, TokenIssuer, TokenVerifier, load_or_create_token_key
from gateway_ops.readiness import failure_reason
from gateway_ops.server import Ops, OpsSettings, server_tls
from gateway_ops.sources import OpenCalls, source_of
from registry.api import AdminApi
from registry.checkpoints import CheckpointBook, CheckpointRefused
from registry.governance import AdminError, Governance
from registry.metrics import RegistryMetrics
from registry.publisher import Publisher, Version, follow_notifications
from registry.store import RegistryStore
from registry.topology import load_topology

log = structlog.get_logger("registry")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    """The `[api]` table: the admin REST API and its tokens."""

    # host:port of the admin REST API: HTTPS with tls_certificate and tls_key, else plain
    # HTTP (then keep it on loopback, or put a TLS-terminating proxy in front of it)
    listen: str = "127.0.0.1:7080"
    # the API's TLS certificate (chain, PEM) and key; both or neither
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    # largest request body accepted, in bytes
    max_body_bytes: int = 65536
    # the registry's token-signing key (P-256, PEM); created at first start when missing
    token_key: Path | None = None
    # how long `gateway registry token` tokens live unless told otherwise
    token_ttl_seconds: float = 3600.0
    # tokens of an external OpenID Connect provider, accepted alongside the registry's own
    oidc: OidcSettings | None = None
    # the web console at /console/ on the same address (see registry.console)
    console: bool = True
    # the longest a console session lasts, in seconds (the token signed in with may end it
    # sooner)
    console_session_seconds: float = 900.0
    # the security servers' auditor APIs the console's auditor pages read, by server id
    # ("UY/GOV/MSP/ss1" = "https://ss1.msp.example:7443"), with the auditor's own session
    auditor_apis: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicySettings:
    """The `[policy]` table: the instance's rules for agreements."""

    # false: the provider's approval activates an agreement without a registry administrator
    registry_approval_required: bool = True
    # true: this instance must approve each exchange of its subsystems with another
    # instance's service (an outbound approval), published for its security servers
    outbound_approval_required: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistrySettings:
    """The registry's configuration file (TOML, top-level keys)."""

    # the instance code, e.g. "UY"
    instance: str
    # host:port of the gRPC configuration service
    listen: str = "127.0.0.1:7000"
    # the configuration addresses this instance's anchor names (`gateway registry anchor`);
    # empty: `listen`
    anchor_addresses: tuple[str, ...] = ()
    # SQLite file path or database URL
    database: str = "registry.db"
    # topology file imported at start-up and on SIGHUP
    topology: Path | None = None
    # PEM files of the CAs the instance trusts
    ca_certificates: tuple[Path, ...] = ()
    # the configuration-signing certificate and key (PEM)
    signing_certificate: Path
    signing_key: Path
    # how long a published configuration stays valid, and how often a new one is published
    validity_seconds: float = 600.0
    refresh_seconds: float = 60.0
    # largest configuration message sent to a security server, in bytes (gzip-compressed
    # content, signature and certificate); servers take up to limits.max_configuration_bytes
    max_message_bytes: int = MAX_CONFIGURATION_BYTES
    # configuration service calls (Fetch, Watch, WatchParts, Checkpoint) one source address
    # (an IPv4 address, an IPv6 /64) may have open at once, until each is answered and sent
    # (0: no limit). A server keeps one watch open; an answer its caller does not read
    # holds a copy of the configuration in the registry's memory
    configuration_calls_per_address: int = 8
    api: ApiSettings = field(default_factory=ApiSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    ops: OpsSettings = field(default_factory=OpsSettings)

    def token_key_path(self, base: Path) -> Path:
        return self.api.token_key or base / "registry-token.key"


def token_issuer(settings: RegistrySettings, base: Path) -> TokenIssuer:
    """The registry's own token issuer (its key is created when missing)."""
    return TokenIssuer(
        load_or_create_token_key(settings.token_key_path(base)),
        issuer=f"gateway-registry:{settings.instance}",
        audience=f"gateway-registry:{settings.instance}",
    )


def instance_anchor(settings: RegistrySettings, addresses: Sequence[str] = ()) -> Anchor:
    """This registry's instance anchor: its instance, its configuration-signing certificate
    and the configuration addresses (`addresses`, else `anchor_addresses`, else `listen`).

    The same content as the `anchor.json` that `gateway pki init` writes; another
    instance's registry administrator imports it to federate with this one. Raises
    `ConfigFileError` when the certificate cannot be read.
    """
    try:
        certificate = load_certificate(settings.signing_certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigFileError(
            f"cannot read the configuration-signing certificate {settings.signing_certificate}: "
            f"{exc}"
        ) from None
    chosen = tuple(addresses) or settings.anchor_addresses or (settings.listen,)
    for address in chosen:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigFileError(f"anchor address {address!r} is not HOST:PORT")
    return Anchor(
        instance=settings.instance,
        signing_certificates=(certificate.public_bytes(serialization.Encoding.DER),),
        addresses=chosen,
    )


# most subsystems one WatchParts stream may name
MAX_WATCHED_SUBSYSTEMS = 10_000
# what a call refused for its source's open calls is told (servers tell it apart from a
# configuration too large, both RESOURCE_EXHAUSTED)
CALLS_PER_ADDRESS_REFUSED = "configuration calls from one address at once"


def _directory(version: Version) -> pb.SignedConfiguration:
    return pb.SignedConfiguration(
        content=version.directory.content,
        signature=version.directory.signature,
        signer_certificate=version.directory.signer_certificate,
    )


def _serialised(message: bytes) -> bytes:
    """Fetch and Watch answer with a `SignedConfiguration` serialised once per version."""
    return message


class ConfigurationService:
    def __init__(
        self,
        publisher: Publisher,
        instance: str,
        checkpoints: CheckpointBook | None = None,
        *,
        calls_per_address: int = 8,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.publisher = publisher
        self.instance = instance
        self.checkpoints = checkpoints
        # the service answers anyone: what one source may hold open is bounded
        self.calls = OpenCalls(calls_per_address)
        self._on_refused = on_refused
        # Watch and WatchParts streams open now (a metric)
        self.watchers = 0
        # the current version's whole document, serialised once for every Fetch and watcher
        self._message = (0, b"")

    async def _current(self) -> tuple[int, bytes]:
        """The current version and its serialised `SignedConfiguration` (format 1, content
        gzipped), built once per version when first asked for."""
        version, signed, packed = await self.publisher.whole()
        if self._message[0] != version:
            self._message = (
                version,
                pb.SignedConfiguration(
                    gzip_content=packed,
                    signature=signed.signature,
                    signer_certificate=signed.signer_certificate,
                ).SerializeToString(),
            )
        return self._message

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Count the call against its source until it ends (its answer sent, or the call
        cancelled), or refuse it (RESOURCE_EXHAUSTED) when the source has its limit open:
        an answer its caller never reads stays in memory until then."""
        source = source_of(context.peer())
        if not self.calls.take(source):
            self._on_refused()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self.calls.per_source} {CALLS_PER_ADDRESS_REFUSED}",
            )

        def ended(_: object) -> None:
            self.calls.give(source)

        context.add_done_callback(ended)  # type: ignore[arg-type]

    async def _check_instance(
        self, instance: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if instance and instance != self.instance:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"this registry serves instance {self.instance}, not {instance}",
            )

    async def fetch(
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        await self._admit(context)
        await self._check_instance(request.instance, context)
        return (await self._current())[1]

    async def watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await self._admit(context)
        await self._check_instance(request.instance, context)
        self.watchers += 1
        try:
            known = request.known_version
            while True:
                if self.publisher.version <= known:
                    await self.publisher.wait_newer(known)
                known, message = await self._current()
                yield message
        finally:
            self.watchers -= 1

    async def watch_parts(
        self, request: pb.WatchPartsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """A snapshot of what the watcher needs, then each version's changes (see
        gateway/config_parts.py)."""
        await self._admit(context)
        await self._check_instance(request.instance, context)
        if len(request.subsystems) > MAX_WATCHED_SUBSYSTEMS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_WATCHED_SUBSYSTEMS} subsystems may be watched, not "
                f"{len(request.subsystems)}",
            )
        publisher, book = self.publisher, self.publisher.book
        extra = tuple(request.subsystems)
        self.watchers += 1
        try:
            sent = 0  # the version the watcher holds
            held: dict[int, bytes] = {}  # wanted bucket -> digest the watcher holds
            catalogue = b""  # digest of the catalogue the watcher holds
            while True:
                if publisher.version <= sent:
                    await publisher.wait_newer(sent)
                current = publisher.current
                assert current is not None
                changed = None if not sent else publisher.changed_since(sent)
                update = pb.PartsUpdate(directory=_directory(current))
                if changed is None:  # a snapshot
                    held.clear()
                    update.bucket_digests = bytes(book.buckets.digests)
                else:
                    update.base_version = sent
                    update.changed.extend(
                        pb.BucketDigest(bucket=b, sha256=book.buckets.digest(b))
                        for b in sorted(changed)
                    )
                if changed is None or catalogue != book.catalogue.sha256:
                    update.catalogue_gzip = book.gzip(book.catalogue.content, book.catalogue.sha256)
                for b in sorted(book.wanted(request.server, extra)):
                    digest = book.buckets.digest(b)
                    if held.get(b) != digest and digest != EMPTY_DIGEST:
                        packed = book.gzip(book.buckets.contents[b], digest)
                        update.buckets.append(pb.Bucket(bucket=b, gzip_content=packed))
                    held[b] = digest
                message = update.SerializeToString()
                if len(message) > publisher.max_message_bytes:
                    log.error(
                        "configuration_too_large",
                        version=current.number,
                        message_bytes=len(message),
                        max_message_bytes=publisher.max_message_bytes,
                        server=request.server[:300],
                    )
                sent, catalogue = current.number, current.catalogue_sha256
                yield message
        finally:
            self.watchers -= 1

    async def checkpoint(
        self, request: pb.SignedCheckpoint, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckpointReceipt:
        await self._admit(context)
        if self.checkpoints is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this registry keeps no checkpoints")
        assert self.checkpoints is not None
        try:
            received = await self.checkpoints.receive(
                SignedCheckpoint(content=request.content, signature=request.signature)
            )
        except CheckpointRefused as exc:
            status = (
                grpc.StatusCode.FAILED_PRECONDITION
                if exc.kind == "conflict"
                else grpc.StatusCode.PERMISSION_DENIED
            )
            await context.abort(status, exc.message[:1000])
        return pb.CheckpointReceipt(received_at=format_time(received))

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "gateway.v1.Configuration",
            {
                "Fetch": grpc.unary_unary_rpc_method_handler(
                    self.fetch,
                    request_deserializer=pb.FetchRequest.FromString,
                    response_serializer=_serialised,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch,
                    request_deserializer=pb.WatchRequest.FromString,
                    response_serializer=_serialised,
                ),
                "WatchParts": grpc.unary_stream_rpc_method_handler(
                    self.watch_parts,
                    request_deserializer=pb.WatchPartsRequest.FromString,
                    response_serializer=_serialised,
                ),
                "Checkpoint": grpc.unary_unary_rpc_method_handler(
                    self.checkpoint,
                    request_deserializer=pb.SignedCheckpoint.FromString,
                    response_serializer=pb.CheckpointReceipt.SerializeToString,
                ),
            },
        )


class DatabaseProbe:
    """Whether the registry's database answered its last probe (readiness reads it)."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self.error: str | None = None

    async def probe(self) -> None:
        try:
            await asyncio.wait_for(self.store.ping(), timeout=5.0)
        except Exception as exc:  # whatever a query would meet
            self.error = failure_reason(exc)
        else:
            self.error = None

    async def run(self, interval: float = 2.0) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(interval)

    def condition(self) -> str | None:
        return None if self.error is None else f"the database does not answer: {self.error}"


def _published(publisher: Publisher, clock: Callable[[], datetime]) -> str | None:
    if publisher.current is None or publisher.expires_at is None:
        return "no signed configuration is published yet"
    if publisher.expires_at <= clock():
        return (
            f"the published configuration (version {publisher.version}) expired at "
            f"{format_time(publisher.expires_at)}: publishing has failed since"
        )
    return None


async def serve(
    settings: RegistrySettings,
    *,
    base: Path,
    stop: asyncio.Event,
    reload: asyncio.Event,
    on_ready: Callable[[dict[str, Any]], None],
) -> None:
    store = await RegistryStore.open(database_url(settings.database, base=base))
    verifier: TokenVerifier | None = None
    try:
        cert = load_certificate(settings.signing_certificate.read_bytes())
        signer = EcdsaSigner(load_private_key(settings.signing_key.read_bytes()), cert)
        cas = tuple(
            x509.load_pem_x509_certificate(p.read_bytes()).public_bytes(serialization.Encoding.DER)
            for p in settings.ca_certificates
        )

        def clock() -> datetime:
            return datetime.now(UTC)

        ops = Ops("registry")
        metrics = RegistryMetrics(ops.registry) if settings.ops.metrics else None
        publisher = Publisher(
            store=store,
            instance=settings.instance,
            signer=signer,
            ca_certificates=cas,
            validity=timedelta(seconds=settings.validity_seconds),
            clock=clock,
            outbound_approval_required=settings.policy.outbound_approval_required,
            metrics=metrics,
            max_message_bytes=settings.max_message_bytes,
        )

        async def publish_after_change() -> None:
            # the change is committed: a failure to publish it now must not fail the
            # request (its client would try it again); the next refresh, or another registry
            # process, publishes it
            try:
                await publisher.publish()
            except Exception as exc:  # whatever the database or signing meets
                log.error("publish_after_change_failed", error=failure_reason(exc))

        governance = Governance(
            store,
            instance=settings.instance,
            policy=Policy(registry_approval_required=settings.policy.registry_approval_required),
            clock=clock,
            on_change=publish_after_change,
            ca_certificates=cas,
        )

        async def import_topology() -> None:
            if settings.topology is not None:
                try:
                    added = await governance.seed(
                        load_topology(settings.topology), settings.topology.name
                    )
                except AdminError as exc:  # the file asks for something the registry refuses
                    raise ConfigFileError(f"{settings.topology}: {exc.message}") from None
                log.info("topology_imported", file=str(settings.topology), added=added)

        database = DatabaseProbe(store)
        ops.readiness.add("database", database.condition)
        ops.readiness.add("configuration", lambda: _published(publisher, clock))
        prober = asyncio.create_task(database.run(), name="database-probe")
        ops_url = await ops.start(settings.ops)
        await import_topology()
        await governance.expire_due()
        await publisher.publish()
        # other registry processes on the same PostgreSQL database publish too
        follower = (
            asyncio.create_task(follow_notifications(publisher), name="configuration-follower")
            if store.is_postgres
            else None
        )
        checkpoints = CheckpointBook(store, clock)
        issuer = token_issuer(settings, base)
        verifier = TokenVerifier(issuer=issuer, oidc=settings.api.oidc)
        api = AdminApi(
            governance,
            verifier,
            issuer,
            max_body_bytes=settings.api.max_body_bytes,
            clock=clock,
            checkpoints=checkpoints,
            metrics=metrics,
        )
        app = api.app()
        if settings.api.console:
            from registry.console import Console

            if not settings.api.console_session_seconds > 0:
                raise ConfigFileError("api.console_session_seconds must be a positive number")

            console = Console(
                governance,
                verifier,
                issuer,
                clock=clock,
                session_seconds=settings.api.console_session_seconds,
                auditor_apis=settings.api.auditor_apis,
                oidc=settings.api.oidc,
            )
            app.add_subapp("/console", console.app())
        api_host, api_port = settings.api.listen.rsplit(":", 1)
        # bounds on what one source holds of the API (its connections, a request head that
        # never ends): the process's descriptors serve the configuration service too
        runner, api_bound, _ = await http_sites.serve(
            app,
            api_host,
            int(api_port),
            ssl_context=server_tls(settings.api.tls_certificate, settings.api.tls_key, "api"),
        )
        scheme = "https" if settings.api.tls_certificate is not None else "http"
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", settings.max_message_bytes)
        ]
        if settings.configuration_calls_per_address:
            # calls one connection may open at once (HTTP/2 streams); none with no limit
            # (channels of one process may share a connection)
            limit = max(8, settings.configuration_calls_per_address)
            options.append(("grpc.max_concurrent_streams", limit))
        server = grpc.aio.server(options=options)
        configuration = ConfigurationService(
            publisher,
            settings.instance,
            checkpoints,
            calls_per_address=settings.configuration_calls_per_address,
            on_refused=metrics.calls_refused.inc if metrics is not None else lambda: None,
        )
        if metrics is not None:
            metrics.watchers.set_function(lambda: configuration.watchers)
        server.add_generic_rpc_handlers((configuration.handler(),))
        port = server.add_insecure_port(settings.listen)
        await server.start()
        host = settings.listen.rsplit(":", 1)[0]
        log.info(
            "registry_started",
            instance=settings.instance,
            listen=f"{host}:{port}",
            api=f"{scheme}://{api_host}:{api_bound}",
        )
        ready: dict[str, Any] = {
            "listen": f"{host}:{port}",
            "api": f"{scheme}://{api_host}:{api_bound}",
            "version": publisher.version,
        }
        if ops_url is not None:
            ready["ops"] = ops_url
        on_ready(ready)
        try:
            while not stop.is_set():
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(reload.wait())}
                _, pending = await asyncio.wait(
                    waiters, timeout=settings.refresh_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                for w in pending:
                    w.cancel()
                if stop.is_set():
                    break
                if reload.is_set():
                    reload.clear()
                    try:
                        await import_topology()
                    except Exception as exc:  # keep serving the last good content
                        log.error("topology_reload_failed", error=str(exc))
                try:
                    await governance.expire_due()
                    await publisher.refresh(timedelta(seconds=settings.refresh_seconds))
                except Exception:  # a database hiccup must not stop the registry
                    log.exception("refresh_failed")
        finally:
            ops.readiness.stopping()
            await server.stop(grace=1.0)
            await runner.cleanup()
            prober.cancel()
            if follower is not None:
                follower.cancel()
            await ops.close()
    finally:
        if verifier is not None:
            await verifier.close()
        await store.close()
