"""The security server's configuration file (TOML), parsed once at start-up.

Every key is documented here and in the README; unknown keys are rejected with their
path, and any value can be overridden by `GATEWAY_<SECTION>_<KEY>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway_ops.server import OpsSettings
from gateway_ops.tracing import TracingSettings


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSection:
    # this server's identifier, INSTANCE/CLASS/CODE/SERVERCODE
    id: str
    # the instance anchor (JSON) the configuration is verified against
    anchor: Path
    # folder for the cached configuration, OCSP answers and (by default) the pseudonym secret
    state_dir: Path
    # file holding the secret (at least 16 bytes) that keys data-subject pseudonyms; give
    # every server and replica of the instance the same file, so that one subject has one
    # pseudonym everywhere; unset: STATE_DIR/subject-pseudonym.key, created on first start
    subject_key: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerSection:
    # host:port where local backends call
    listen: str = "127.0.0.1:8080"
    # TLS certificate and key (PEM) of the endpoint; without them it speaks plain gRPC
    # (then bind it to loopback or a private network)
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    # CA (PEM) of local clients' certificates: when set, every caller must present one
    # whose common name is the client subsystem it calls as (needs TLS)
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSection:
    # host:port of the mutual-TLS endpoint that peer security servers call
    listen: str = "0.0.0.0:5500"
    # this server's authentication (TLS) certificate and key, PEM
    tls_certificate: Path
    tls_key: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningKey:
    certificate: Path
    key: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSection:
    # SQLite file path (relative to the config file) or a database URL
    database: str = "messagelog.db"
    # largest number of records written in one transaction (group commit)
    max_batch: int = 512
    # keep request and response bodies beside their records (for evidence bundles); they
    # hold personal data, so this is off unless the agency's rules require it
    store_bodies: bool = False
    # with store_bodies, the messages of each direction of a stream are kept too, while they
    # add up to at most this many bytes (framed: 4 bytes of length before each); a direction
    # over it keeps none, only its digests
    stream_body_bytes: int = 1024 * 1024
    # this writer's hash chain; replicas sharing one database each need their own name
    # (letters, digits, '.', '_', '-'), such as the pod name
    chain: str = "main"
    # records older than this many days move into archive files and leave the database;
    # 0 keeps every record in the database
    retention_days: float = 0.0
    # folder of the archive files (relative to the config file); empty: STATE_DIR/archive.
    # Each server needs its own: files are named by chain, and never replaced
    archive_dir: str = ""
    # how often old records are archived, in seconds
    archive_interval_seconds: float = 3600.0
    # most records in one archive file
    archive_max_records: int = 100_000
    # most auditor-query and refusal-aggregate records waiting to be written; they go
    # after the exchanges' records, and past this an auditor query is refused (503)
    audit_queue: int = 256

    def __post_init__(self) -> None:
        from security_server.message_log import check_chain_name

        check_chain_name(self.chain)
        if self.retention_days < 0 or self.archive_interval_seconds <= 0:
            raise ValueError(
                "log.retention_days must be >= 0 and log.archive_interval_seconds positive"
            )
        if self.archive_max_records < 1:
            raise ValueError("log.archive_max_records must be at least 1")
        if self.audit_queue < 1:
            raise ValueError("log.audit_queue must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TimestampingSection:
    # RFC 3161 time-stamping authorities (HTTP URLs), tried in order; empty: no time-stamps
    urls: tuple[str, ...] = ()
    # how often the records logged since the last batch are stamped, in seconds
    interval_seconds: float = 1.0
    # how long every TSA may fail before new messages are refused, in seconds
    failure_period_seconds: float = 600.0
    # most records stamped by one token
    max_batch: int = 100_000
    # how long to wait for one TSA's answer, in seconds
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0 or self.max_batch < 1 or self.failure_period_seconds <= 0:
            raise ValueError(
                "timestamping.interval_seconds, failure_period_seconds and max_batch must be positive"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class OcspSection:
    # the OCSP responder (HTTP URL) answering for this server's certificates; empty: none,
    # and then this server refuses to send, as its peers would refuse what it sends
    url: str = ""
    # how often the status of this server's own certificates is fetched, in seconds
    refresh_seconds: float = 60.0
    # oldest OCSP answer accepted (stapled by a peer, or held for our own), in seconds
    freshness_seconds: float = 600.0
    # how long to wait for the responder's answer, in seconds
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.refresh_seconds < self.freshness_seconds:
            raise ValueError(
                "ocsp.refresh_seconds must be positive and below ocsp.freshness_seconds, "
                "or stapled answers go stale between two refreshes"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditorSection:
    # host:port of the auditor API (HTTP, or HTTPS with the two TLS settings); empty: off
    listen: str = ""
    # TLS certificate and key (PEM) of the auditor API; without them it speaks plain HTTP
    # (then bind it to loopback or a private network)
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    # where the registry publishes its token keys (JWKS), such as
    # http://registry:7080/.well-known/jwks.json (https, or http on loopback only)
    jwks_url: str = ""
    # the issuer and audience of accepted tokens; empty: the registry's own,
    # "gateway-registry:INSTANCE"
    issuer: str = ""
    audience: str = ""
    # most results in one page
    max_page: int = 500
    # requests per second (and burst) one client address may make; more get 429
    source_rate: float = 50.0
    source_burst: int = 200
    # requests per second (and burst) one token holder may make; more get 429
    token_rate: float = 20.0
    token_burst: int = 100

    def __post_init__(self) -> None:
        if (
            min(self.source_rate, self.token_rate) <= 0
            or min(self.source_burst, self.token_burst) < 1
        ):
            raise ValueError("auditor rates must be positive and bursts at least 1")
        if self.listen and not self.jwks_url:
            raise ValueError("auditor.listen needs auditor.jwks_url, to verify auditor tokens")
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("auditor.tls_certificate and auditor.tls_key go together")
        if not 1 <= self.max_page <= 10_000:
            raise ValueError("auditor.max_page must be between 1 and 10000")


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationSection:
    # the other instances (country codes) this server may exchange with, when our own
    # registry federates with them too; empty: none (the local policy's default)
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSection:
    # largest request or response body, in bytes
    max_message_bytes: int = 4 * 1024 * 1024
    # largest global configuration taken from a registry (ours or a federated one's), in
    # bytes, both as the gRPC message and once inflated: a national instance's is tens of
    # MB; a larger one is refused and logged as configuration_too_large
    max_configuration_bytes: int = 64 * 1024 * 1024
    # deadline for a call when the caller sets none, in seconds
    deadline_seconds: float = 30.0
    # calls handled at once on each endpoint; more wait
    max_concurrent_calls: int = 1000
    # how far a peer's clock may differ; also how long message ids are remembered for replays
    clock_skew_seconds: float = 300.0
    # provider: requests of one peer stream in progress or answered and not yet taken by the
    # peer; past it the stream is not read (HTTP/2 flow control pushes back on the peer)
    max_frames_per_stream: int = 256
    # provider: most calls one peer (security server) runs at once; 0: only the fair share
    # (max_concurrent_calls divided among the peers that have calls running or waiting)
    max_calls_per_peer: int = 0
    # provider: exchange streams one peer server may hold open at once (a server uses one;
    # its replicas one each); more are refused with `overloaded`
    max_streams_per_peer: int = 16
    # consumer endpoint: malformed or unknown-client refusals (missing_metadata,
    # malformed_identifier, client_not_served, client_not_authenticated) logged one by one
    # per source address and second (and burst); beyond, they are only counted
    refusal_rate: float = 10.0
    refusal_burst: int = 50
    # how often counted refusals (consumer endpoint, auditor API) are written, one record
    # per source, reason and interval, in seconds
    aggregate_seconds: float = 10.0
    # on SIGTERM, how long the calls in flight may take to finish before the server
    # exits, in seconds (readiness turns false and peers are told at once)
    drain_seconds: float = 10.0
    # streaming calls (each message is at most max_message_bytes): how long one may last,
    # in seconds; how many messages each direction may carry; how many streaming calls
    # one client subsystem may have open at once on each endpoint of this server. Past
    # each, the stream ends with its own code (stream_too_long, stream_too_many_messages,
    # too_many_streams)
    max_stream_seconds: float = 3600.0
    max_stream_messages: int = 10_000_000
    max_streams_per_client: int = 100
    # streaming calls open at once on each endpoint of this server, in all (on the provider,
    # with those whose open has not arrived yet): past it, too_many_streams
    max_streams: int = 1000
    # the HTTP/2 flow-control window of each stream on every connection of this server (its
    # endpoints, its links to providers and to backends), in bytes: what gRPC may hold of a
    # stream before its reader takes it; with one message per direction held by our own
    # code, it bounds what one streaming call makes a server hold
    stream_window_bytes: int = 4 * 1024 * 1024
    # how often an open stream's agreement is checked again, in seconds: a suspended or
    # revoked agreement ends its streams within this (plus the configuration's delivery)
    stream_check_seconds: float = 0.5

    def __post_init__(self) -> None:
        if (
            self.max_stream_seconds <= 0
            or self.max_stream_messages < 1
            or self.max_streams_per_client < 1
            or self.max_streams < 1
            or not 0 < self.stream_check_seconds <= 10
            or not 65535 <= self.stream_window_bytes <= 2**31 - 1
        ):
            raise ValueError(
                "limits.max_stream_seconds must be positive, limits.max_stream_messages, "
                "limits.max_streams_per_client and limits.max_streams at least 1, "
                "limits.stream_check_seconds "
                "between 0 and 10, limits.stream_window_bytes between 65535 and 2147483647"
            )
        if self.max_frames_per_stream < 1 or self.max_streams_per_peer < 1:
            raise ValueError(
                "limits.max_frames_per_stream and limits.max_streams_per_peer must be at least 1"
            )
        if self.max_configuration_bytes < 1024 * 1024:
            raise ValueError("limits.max_configuration_bytes must be at least 1048576 (1 MiB)")
        if self.max_calls_per_peer < 0:
            raise ValueError("limits.max_calls_per_peer must be at least 0")
        if self.refusal_rate <= 0 or self.refusal_burst < 1 or self.aggregate_seconds <= 0:
            raise ValueError(
                "limits.refusal_rate and limits.aggregate_seconds must be positive, "
                "limits.refusal_burst at least 1"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointsSection:
    # how often the head of this server's chain is signed and sent to the registry when it
    # moved, in seconds: the most an operator can cut or rewrite unseen while the registry
    # answers (see the README, "Checkpoints")
    interval_seconds: float = 5.0
    # how often an unchanged head is sent again, in seconds (shows the server alive)
    heartbeat_seconds: float = 60.0
    # how long to wait for the registry's answer, in seconds
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_seconds <= self.heartbeat_seconds or self.timeout_seconds <= 0:
            raise ValueError(
                "checkpoints.interval_seconds must be positive and at most "
                "checkpoints.heartbeat_seconds, and checkpoints.timeout_seconds positive"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    server: ServerSection
    provider: ProviderSection
    # signing key and certificate per member whose subsystems this server hosts
    signing: dict[str, SigningKey]
    consumer: ConsumerSection = field(default_factory=ConsumerSection)
    log: LogSection = field(default_factory=LogSection)
    timestamping: TimestampingSection = field(default_factory=TimestampingSection)
    ocsp: OcspSection = field(default_factory=OcspSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    auditor: AuditorSection = field(default_factory=AuditorSection)
    federation: FederationSection = field(default_factory=FederationSection)
    checkpoints: CheckpointsSection = field(default_factory=CheckpointsSection)
    ops: OpsSettings = field(default_factory=OpsSettings)
    # OpenTelemetry spans of each call, exported over OTLP/HTTP (off by default)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # backend address (host:port, plain gRPC) per service id this server provides
    backends: dict[str, str] = field(default_factory=dict)
