"""`gateway server serve`: the security server process.

Start-up order: load keys and the anchor, open the message log, load the cached
configuration (or wait for the registry), then open the provider endpoint (mutual TLS)
and the consumer endpoint. On stop, both endpoints drain, then the log is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import structlog

from gateway.audit import Role
from gateway.configuration import Anchor
from gateway.errors import ConfigFileError, GatewayError
from gateway.identifiers import SecurityServerId
from gateway.replay import ReplayGuard
from gateway.settings import database_url
from gateway.signing import EcdsaSigner, load_private_key
from gateway_ops.auth import OidcSettings, TokenVerifier, auditor_api_audience
from gateway_ops.readiness import Readiness
from gateway_ops.server import Ops, server_tls
from gateway_ops.tracing import Tracing
from security_server.archive import Archiver
from security_server.auditor_api import PATH as AUDITOR_PATH
from security_server.auditor_api import AuditorApi
from security_server.auditor_api import start as start_auditor_api
from security_server.certificate_status import OwnStatus, StatusChecker, der_sha256
from security_server.checkpoints import CheckpointSender
from security_server.config_client import ConfigurationClient
from security_server.consumer import ConsumerService
from security_server.endpoint_limits import consumer_options, window_options
from security_server.federation import Federations
from security_server.floods import AggregateFlusher, CountedEndpoint, RefusalCounter, TokenBuckets
from security_server.health import ReadinessHealth
from security_server.keys import KeyReloader, Keys, load_keys
from security_server.message_log import ChainInUseError, MessageLog
from security_server.metrics import OwnCertificate, ServerMetrics, StateCollector
from security_server.node import Node, load_subject_secret
from security_server.peers import PeerPool
from security_server.provider import BackendClient, ProviderService
from security_server.replay_ledger import ReplayLedger
from security_server.search import Searcher
from security_server.settings import ServerSettings
from security_server.timestamper import Timestamper

log = structlog.get_logger("security_server")

# room for the envelope around a body at the size limit
_FRAME_OVERHEAD = 64 * 1024


def _clock() -> datetime:
    return datetime.now(UTC)


class TlsRoots:
    """Server credentials whose client-CA list follows the current configurations: our
    instance's CAs and those of the federated instances this server follows."""

    def __init__(self, federations: Federations, certificate: bytes, key: bytes) -> None:
        self.federations = federations
        self.certificate = certificate
        self.key = key
        self._served: tuple[bytes, bytes] | None = None

    def current(self) -> Any:
        roots = self.federations.ca_pem()
        self._served = (roots, self.certificate)
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.certificate)], root_certificates=roots
        )

    def fetch(self) -> Any:
        # called by gRPC before each handshake: None keeps the current credentials
        roots = self.federations.ca_pem()
        if not roots or (roots, self.certificate) == self._served:
            return None
        return self.current()

    def use(self, certificate: bytes, key: bytes) -> None:
        """Present this certificate (PEM) from the next handshake on (a renewal)."""
        self.certificate, self.key = certificate, key

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current(), self.fetch, require_client_authentication=True
        )


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def auditor_token_verifier(settings: ServerSettings, server_id: SecurityServerId) -> TokenVerifier:
    """Tokens of the registry (through its JWKS URL), where instance-wide auditors exist."""
    registry = f"gateway-registry:{server_id.owner.instance}"
    issuer = settings.auditor.issuer or registry
    try:
        trust = OidcSettings(
            jwks_url=settings.auditor.jwks_url,
            issuer=issuer,
            audience=settings.auditor.audience or registry,
            algorithms=("ES256", "RS256"),
            # only the registry grants instance-wide auditors; another provider's auditor
            # tokens must name a member, as the registry itself requires
            instance_wide_auditors=issuer == registry,
        )
    except ValueError as exc:
        raise ConfigFileError(f"auditor: {exc}") from None
    # besides the auditors' own tokens, those the registry's console forwards to this server
    # only (good nowhere else)
    return TokenVerifier(issuer=None, oidc=trust, also_audiences=(auditor_api_audience(server_id),))


def _ready_when(
    readiness: Readiness,
    config: ConfigurationClient,
    message_log: MessageLog,
    own_status: OwnStatus,
    timestamper: Timestamper | None,
) -> None:
    """What a security server needs to do its job now, each named for `/readyz`."""

    def configuration() -> str | None:
        try:
            config.require(_clock())
        except GatewayError as exc:
            return exc.message
        return None

    def log_writable() -> str | None:
        if message_log.unwritable is None:
            return None
        return f"the message log cannot be written: {message_log.unwritable}"

    def stamping() -> str | None:
        if timestamper is None:
            return None
        try:
            timestamper.check()
        except GatewayError as exc:
            return exc.message
        return None

    readiness.add("configuration", configuration)
    readiness.add("log", log_writable)
    readiness.add("ocsp", own_status.stale)
    readiness.add("timestamping", stamping)


def own_certificates(keys: Keys) -> list[OwnCertificate]:
    """This server's certificates as its metrics label them."""
    return [
        OwnCertificate("authentication", keys.auth_certificate, der_sha256(keys.auth_certificate)),
        *(
            OwnCertificate(f"signing:{member}", s.certificate, s.certificate_sha256)
            for member, s in keys.signers.items()
        ),
    ]


async def reload_on(event: asyncio.Event, reload: Callable[[], Awaitable[bool]]) -> None:
    while True:
        await event.wait()
        event.clear()
        await reload()


async def serve(
    settings: ServerSettings,
    *,
    base: Path,
    stop: asyncio.Event,
    on_ready: Callable[[dict[str, Any]], None],
    reload: asyncio.Event | None = None,
    read: Callable[[], ServerSettings] | None = None,
) -> None:
    """Run the server until `stop`; each time `reload` is set (SIGHUP), `read` gives the
    settings again and their keys are switched to (`security_server.keys`)."""
    local = settings.consumer
    if (local.tls_certificate is None) != (local.tls_key is None):
        raise ConfigFileError("consumer.tls_certificate and consumer.tls_key go together")
    if local.client_ca is not None and local.tls_certificate is None:
        raise ConfigFileError(
            "consumer.client_ca needs consumer.tls_certificate and consumer.tls_key"
        )
    server_id = SecurityServerId.parse(settings.server.id)
    anchor = Anchor.from_json(json.loads(settings.server.anchor.read_text()))
    keys = load_keys(settings)
    signers = keys.signers
    state_dir = settings.server.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    config = ConfigurationClient(
        anchor=anchor,
        cache_file=state_dir / "configuration.json",
        clock=_clock,
        max_message_bytes=settings.limits.max_configuration_bytes,
        server=settings.server.id,
    )
    config.load_cached()
    federations = Federations(
        config,
        allowed=frozenset(settings.federation.allowed),
        state_dir=state_dir,
        clock=_clock,
    )
    subject_secret = load_subject_secret(state_dir, settings.server.subject_key)
    try:
        message_log = await MessageLog.open(
            database_url(settings.log.database, base=base),
            chain=settings.log.chain,
            max_batch=settings.log.max_batch,
            audit_queue=settings.log.audit_queue,
        )
    except ChainInUseError as exc:
        raise ConfigFileError(str(exc)) from None
    replay = ReplayGuard(window=timedelta(seconds=settings.limits.clock_skew_seconds))
    # replicas share a PostgreSQL log: each accepted message id is claimed there as well
    replay_ledger = (
        ReplayLedger(message_log.engine, settings.log.chain, replay.window)
        if message_log.engine.dialect.name == "postgresql"
        else None
    )
    tls_cert, tls_key, auth_certificate = keys.tls_certificate, keys.tls_key, keys.auth_certificate
    own_status = OwnStatus(
        settings=settings.ocsp,
        certificates=[auth_certificate, *(s.certificate for s in signers.values())],
        folder=state_dir / "ocsp",
        config=lambda: config.current,
        clock=_clock,
    )
    timestamper = (
        Timestamper(
            message_log,
            settings.timestamping,
            lambda: config.current.trust.cas if config.current else (),
        )
        if settings.timestamping.urls
        else None
    )
    node = Node(
        server_id=server_id,
        auth_certificate=auth_certificate,
        auth_sha256=der_sha256(auth_certificate),
        own_status=own_status,
        status=StatusChecker(settings.ocsp.freshness_seconds),
        timestamper=timestamper,
        store_bodies=settings.log.store_bodies,
        stream_body_bytes=settings.log.stream_body_bytes if settings.log.store_bodies else 0,
        signers=signers,
        config=config,
        log=message_log,
        limits=settings.limits,
        replay=replay,
        subject_secret=subject_secret,
        clock=_clock,
        federated=federations,
        replay_ledger=replay_ledger,
    )
    now = _clock()
    # ids the provider accepted recently, so that a restart does not reopen them to replay
    replay.preload(await message_log.recent_message_ids(now - 2 * replay.window, "provider"), now)
    if replay_ledger is not None:
        replay_ledger.start()
    watcher = asyncio.create_task(config.run(), name="configuration-watch")
    federations.start()
    background = [watcher]
    checkpoints = CheckpointSender(
        message_log=message_log,
        server=server_id,
        signer=EcdsaSigner(load_private_key(tls_key), auth_certificate),
        addresses=anchor.addresses,
        settings=settings.checkpoints,
        clock=_clock,
    )
    background.append(asyncio.create_task(checkpoints.run(), name="checkpoints"))
    max_frame = settings.limits.max_message_bytes + _FRAME_OVERHEAD
    peers = PeerPool(
        tls_certificate=tls_cert,
        tls_key=tls_key,
        max_bytes=max_frame,
        staple=own_status.staple,
        options=window_options(settings.limits),
    )
    backends = BackendClient(dict(settings.backends), max_frame, window_options(settings.limits))
    servers: list[grpc.aio.Server] = []
    provider_service: ProviderService | None = None
    closers: list[Callable[[], Awaitable[None]]] = []
    # junk refusals and refused auditor requests, counted and written once per interval
    consumer_refusals = RefusalCounter()
    auditor_refusals = RefusalCounter()
    aggregates = AggregateFlusher(
        message_log.append_audit,
        [
            CountedEndpoint(counter=consumer_refusals, role=Role.CONSUMER),
            CountedEndpoint(
                counter=auditor_refusals, role=Role.AUDITOR, method=f"GET {AUDITOR_PATH}"
            ),
        ],
        interval=settings.limits.aggregate_seconds,
        clock=_clock,
    )

    ops = Ops("security-server")
    # spans of every call, exported over OTLP/HTTP when [tracing] names a collector
    tracing = Tracing(settings.tracing, service_name=str(server_id))
    _ready_when(ops.readiness, config, message_log, own_status, timestamper)
    metrics = ServerMetrics(ops.registry) if settings.ops.metrics else None
    if metrics is not None:
        message_log.on_commit = metrics.commit
    state = StateCollector(
        clock=_clock,
        configurations=lambda: [
            c for c in (config.current, *federations.configurations()) if c is not None
        ],
        certificates=own_certificates(keys),
        ocsp_produced_at=own_status.produced_at,
        tsa_failures=lambda: timestamper.failures if timestamper is not None else 0,
    )
    ops.registry.register(state)
    health = ReadinessHealth(ops.readiness.ready)
    if settings.log.retention_days > 0:
        archiver = Archiver(
            message_log.engine,
            settings.log.chain,
            _path(settings.log.archive_dir, base)
            if settings.log.archive_dir
            else state_dir / "archive",
            retention=timedelta(days=settings.log.retention_days),
            interval=settings.log.archive_interval_seconds,
            max_records=settings.log.archive_max_records,
            clock=_clock,
        )
        background.append(asyncio.create_task(archiver.run(), name="archiver"))
    background.append(asyncio.create_task(message_log.watch_writable(), name="log-probe"))
    try:
        # the operations port answers from the start: /readyz says what is still missing
        ops_url = await ops.start(settings.ops)
        if config.current is None:
            log.info("waiting_for_configuration", registry=list(anchor.addresses))
            waiting = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {waiting, asyncio.ensure_future(config.available.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiting.cancel()
            if stop.is_set():
                return
        # our certificates' OCSP status is fetched (or tried) before we take any call
        fetched = asyncio.Event()
        background.append(asyncio.create_task(own_status.run(fetched), name="ocsp-refresh"))
        await fetched.wait()
        if timestamper is not None:
            # the backlog left by the last run, queued before any new record is written
            await message_log.load_unstamped()
            background.append(asyncio.create_task(timestamper.run(), name="timestamper"))
        provider = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_frame),
                ("grpc.max_send_message_length", max_frame),
                *window_options(settings.limits),
            ]
        )
        health.register(provider)
        provider_service = ProviderService(node, backends, metrics, tracing)
        provider.add_generic_rpc_handlers((provider_service.handler(),))
        tls_roots = TlsRoots(federations, tls_cert, tls_key)
        provider_port = provider.add_secure_port(settings.provider.listen, tls_roots.credentials())

        def install(new: Keys) -> None:
            # no await from here to the end: every part switches together
            tls_roots.use(new.tls_certificate, new.tls_key)
            peers.use(new.tls_certificate, new.tls_key)
            node.auth_certificate = new.auth_certificate
            node.auth_sha256 = der_sha256(new.auth_certificate)
            node.signers = new.signers
            checkpoints.signer = EcdsaSigner(load_private_key(new.tls_key), new.auth_certificate)
            state.certificates = tuple(own_certificates(new))
            own_status.keep_only(
                [new.auth_certificate, *(s.certificate for s in new.signers.values())]
            )

        if reload is not None and read is not None:
            reloader = KeyReloader(
                settings=settings,
                read=read,
                config=lambda: config.current,
                fetch_status=own_status.take,
                install=install,
                clock=_clock,
                keys=keys,
            )
            background.append(
                asyncio.create_task(reload_on(reload, reloader.reload), name="key-reload")
            )
        # bodies up to twice the limit reach our code, which refuses and logs them with
        # body_too_large; larger ones are cut off by gRPC itself
        consumer_max = max(
            2 * settings.limits.max_message_bytes, settings.limits.max_message_bytes + (1 << 20)
        )
        # gRPC's own limits set from ours, so that a burst is answered with `overloaded`
        consumer = grpc.aio.server(
            options=consumer_options(settings.limits, max_receive=consumer_max, max_send=max_frame)
        )
        # probes first: the consumer's own handler takes every method
        health.register(consumer)
        consumer_service = ConsumerService(
            node,
            peers,
            authenticate_clients=local.client_ca is not None,
            refusal_limit=TokenBuckets(
                settings.limits.refusal_rate,
                settings.limits.refusal_burst,
                clock=time.monotonic,
            ),
            refusals=consumer_refusals,
            metrics=metrics,
            tracing=tracing,
        )
        consumer.add_generic_rpc_handlers((consumer_service,))
        if metrics is not None:
            metrics.watch(
                in_flight={
                    "consumer": lambda: consumer_service.in_flight,
                    "provider": lambda: provider_service.in_flight,
                },
                log_queue=lambda: message_log.queued,
                unstamped=lambda: len(message_log.unstamped),
                peer_streams=lambda: sum(provider_service.streams.values()),
            )
        if local.tls_certificate is not None and local.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(local.tls_key.read_bytes(), local.tls_certificate.read_bytes())],
                root_certificates=local.client_ca.read_bytes() if local.client_ca else None,
                require_client_auth=local.client_ca is not None,
            )
            consumer_port = consumer.add_secure_port(local.listen, credentials)
        else:
            consumer_port = consumer.add_insecure_port(local.listen)
        background.append(asyncio.create_task(health.run(), name="health"))
        aggregates.start()
        for s in (provider, consumer):
            await s.start()
            servers.append(s)
        ready = {
            "server": str(server_id),
            "provider": f"{settings.provider.listen.rsplit(':', 1)[0]}:{provider_port}",
            "consumer": f"{local.listen.rsplit(':', 1)[0]}:{consumer_port}",
        }
        if ops_url is not None:
            ready["ops"] = ops_url
        if settings.auditor.listen:
            verifier = auditor_token_verifier(settings, server_id)
            closers.append(verifier.close)
            api = AuditorApi(
                message_log,
                node.pseudonym,
                Searcher(message_log.engine),
                verifier,
                max_page=settings.auditor.max_page,
                source_limit=TokenBuckets(
                    settings.auditor.source_rate,
                    settings.auditor.source_burst,
                    clock=time.monotonic,
                ),
                token_limit=TokenBuckets(
                    settings.auditor.token_rate, settings.auditor.token_burst, clock=time.monotonic
                ),
                refusals=auditor_refusals,
            )
            auditor_runner, auditor_port = await start_auditor_api(
                api,
                settings.auditor.listen,
                server_tls(settings.auditor.tls_certificate, settings.auditor.tls_key, "auditor"),
            )
            closers.append(auditor_runner.cleanup)
            ready["auditor"] = f"{settings.auditor.listen.rsplit(':', 1)[0]}:{auditor_port}"
        log.info("security_server_started", **ready)
        on_ready(ready)
        await stop.wait()
    finally:
        # drain: readiness turns false first (balancers move away), peers are told to send
        # their next calls elsewhere, new calls and streams are refused, and the calls in
        # flight get limits.drain_seconds to finish; then the log is flushed and the final
        # checkpoint sent
        ops.readiness.stopping()
        await health.enter_graceful_shutdown()
        if provider_service is not None:
            provider_service.drain()
        for close in reversed(closers):
            await close()
        await asyncio.gather(*(s.stop(grace=settings.limits.drain_seconds) for s in servers))
        # what was counted until the endpoints stopped, written before the log closes
        await aggregates.close()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await federations.close()
        await peers.close()
        await backends.close()
        if replay_ledger is not None:
            await replay_ledger.close()
        await message_log.close()
        # the final head, once every record is durable (bounded by checkpoints.timeout)
        await checkpoints.close()
        # the spans of the last calls, exported before the process ends
        await tracing.close()
        await ops.close()
