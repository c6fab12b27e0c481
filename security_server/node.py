"""What both endpoints of one security server share: identity, keys, configuration, log."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog
from cryptography import x509

from gateway.agreements import RateLimiter
from gateway.audit import FieldValue
from gateway.configuration import GlobalConfiguration
from gateway.errors import Code, ConfigFileError, GatewayError
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId
from gateway.pseudonym import subject_pseudonym
from gateway.replay import ReplayGuard
from gateway.signing import EcdsaSigner
from security_server.certificate_status import OwnStatus, StatusChecker
from security_server.config_client import ConfigurationClient
from security_server.federation import Federations
from security_server.message_log import Evidence, MessageLog
from security_server.replay_ledger import ReplayLedger
from security_server.settings import LimitsSection
from security_server.timestamper import Timestamper

log = structlog.get_logger("security_server")


@dataclass(slots=True, kw_only=True)
class Node:
    server_id: SecurityServerId
    # this server's authentication (TLS) certificate and the SHA-256 of its DER
    auth_certificate: x509.Certificate
    auth_sha256: str
    signers: dict[MemberId, EcdsaSigner]
    config: ConfigurationClient
    # our configuration and those of the federated instances this server follows
    federated: Federations
    log: MessageLog
    limits: LimitsSection
    replay: ReplayGuard
    subject_secret: bytes
    clock: Callable[[], datetime]
    # the agreements' rate limits, enforced by the provider endpoint only (it is the
    # authority for its own data, and counting on both sides would count every call twice)
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    # OCSP: the answers about our own certificates, and the checker of peers' staples
    own_status: OwnStatus
    status: StatusChecker
    # batch time-stamps of the log (None when no TSA is configured)
    timestamper: Timestamper | None = None
    # keep bodies in the log's evidence (log.store_bodies)
    store_bodies: bool = False
    # with them, up to this many bytes of each direction of a stream (log.stream_body_bytes;
    # 0: none)
    stream_body_bytes: int = 0
    # message ids claimed in the log database shared by replicas (PostgreSQL; None: SQLite)
    replay_ledger: ReplayLedger | None = None

    def check_timestamping(self) -> None:
        if self.timestamper is not None:
            self.timestamper.check()

    def evidence(
        self,
        certificate: x509.Certificate,
        certificate_der: bytes,
        certificate_sha256: str,
        staple: bytes,
        body: bytes,
        body_sha256: str,
        config: GlobalConfiguration,
    ) -> tuple[str | None, Evidence]:
        """(SHA-256 of the OCSP answer, the evidence to keep) for one signed message."""
        return evidence_of(
            self.status,
            self.store_bodies,
            certificate,
            certificate_der,
            certificate_sha256,
            staple,
            body,
            body_sha256,
            config,
        )

    def signer_for(self, member: MemberId) -> EcdsaSigner:
        signer = self.signers.get(member)
        if signer is None:
            raise GatewayError(
                f"security server {self.server_id} holds no signing key for member {member}",
                code=Code.CLIENT_NOT_SERVED,
            )
        return signer

    def pseudonym(self, subject: str | None) -> str | None:
        return None if subject is None else subject_pseudonym(self.subject_secret, subject)

    def hosts(self, config: GlobalConfiguration, subsystem: SubsystemId) -> bool:
        return any(s.id == self.server_id for s in config.servers_hosting(subsystem))

    async def log_failure(self, fields: dict[str, FieldValue]) -> None:
        """Append the record of a refusal or failure; if even that fails, say so in the
        process log (the caller is refused either way, so nothing is forwarded unlogged)."""
        try:
            await self.log.append(fields)
        except GatewayError as err:
            log.error("refusal_not_logged", code=fields.get("error_code"), error=err.message)


def evidence_of(
    status: StatusChecker,
    store_bodies: bool,
    certificate: x509.Certificate,
    certificate_der: bytes,
    certificate_sha256: str,
    staple: bytes,
    body: bytes,
    body_sha256: str,
    config: GlobalConfiguration,
) -> tuple[str | None, Evidence]:
    """(SHA-256 of the OCSP answer, the evidence to keep) for one signed message: the
    signing certificate and its CA, the OCSP answer, and the body (under the digest its
    signed header gives) if bodies are kept."""
    _, ca_sha, ca_der = status.issuer(certificate, config)
    kept: dict[str, tuple[str, bytes]] = {
        certificate_sha256: ("certificate", certificate_der),
        ca_sha: ("ca", ca_der),
    }
    staple_sha = None
    if staple:
        staple_sha = hashlib.sha256(staple).hexdigest()
        kept[staple_sha] = ("ocsp", staple)
    if store_bodies and body_sha256:  # a stream's close has no body of its own
        kept[body_sha256] = ("body", body)
    return staple_sha, kept


def load_subject_secret(state_dir: Path, configured: Path | None = None) -> bytes:
    """The secret of subject pseudonyms: the configured file (shared by every server of the
    instance), or else a per-server file in the state folder, created on first start (0600)."""
    if configured is not None:
        try:
            secret = configured.read_bytes()
        except OSError as exc:
            raise ConfigFileError(
                f"server.subject_key: cannot read {configured}: {exc.strerror}"
            ) from None
        if len(secret) < 16:
            raise ConfigFileError(
                f"server.subject_key: {configured} holds {len(secret)} bytes; at least 16 are needed"
            )
        return secret
    path = state_dir / "subject-pseudonym.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret
