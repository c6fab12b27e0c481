"""The exchange between two security servers as a sans-IO protocol, in the manner of h11.

The order of the security decisions lives here, in pure functions of typed inputs: what a
call brings (`Call`), a view of this server's node (`ExchangeNode`: its identity, keys,
configurations, the status of certificates, replay and rate state) and the clock's
reading. They answer with typed decisions and the records to log (`gateway.records`):

- consumer, as a call arrives: `start_call` gives `Outgoing` (the signed envelope to send
  and the request record to make durable first) or a `Refusal`;
- provider, as an envelope arrives: `accept_request` gives `Accepted` (the request record,
  and what the backend is called with) or a `Refusal`; then `answer` signs the backend's
  answer into the response envelope and its record;
- consumer again, as the provider answers: `accept_response` gives `Incoming` (the
  response and its record) or a `Refusal`.

The gRPC shells (`security_server.consumer`, `security_server.provider`) only move bytes,
await the log (nothing leaves before its record is durable) and call backends; the
in-memory harness of the unit tests (`tests/unit/exchange_harness.py`) drives these
functions with no socket, and the refusal cases run there in milliseconds.

Every function here is synchronous and reads no clock, file or socket: the node's parts it
calls (`ExchangeNode`) are caches and checks in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from cryptography import x509

from gateway import canonical
from gateway.agreements import Agreement, RateLimiter
from gateway.audit import RecordKind, Role
from gateway.configuration import GlobalConfiguration, SecurityServer, Service
from gateway.envelope import (
    RequestHeader,
    ResponseHeader,
    check_body,
    check_free_text,
    check_message_id,
    check_method,
    check_purpose,
    decode_request,
    decode_response,
    is_message_id,
    sha256_hex,
)
from gateway.errors import (
    AuthorizationError,
    Code,
    GatewayError,
    RequestError,
    TrustError,
    UnavailableError,
    bound_message,
)
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.records import MAX_RECORD_TEXT, Facts, LogRecord, claimed
from gateway.replay import ReplayGuard
from gateway.signing import EcdsaSigner, certificate_sha256, common_name, verify_signature
from gateway.streams import check_kind

# what a log keeps beside a record: SHA-256 -> (kind, bytes) (certificates, OCSP, bodies)
Evidence = Mapping[str, tuple[str, bytes]]

REQUIRED = ("gateway-client", "gateway-service", "gateway-purpose")

# most bytes of a refused frame's header and signature kept in its refusal record: the
# peer chooses them (up to a frame's size), and the log keeps records forever
MAX_REFUSED_HEADER_BYTES = 4096
MAX_REFUSED_SIGNATURE_BYTES = 1024


# ---- what the protocol asks of the node --------------------------------------------------


class Limits(Protocol):
    @property
    def max_concurrent_calls(self) -> int: ...
    @property
    def max_message_bytes(self) -> int: ...


class Configurations(Protocol):
    def require(self, now: datetime) -> GlobalConfiguration: ...


class Federated(Protocol):
    """Our configuration and those of the federated instances this server follows."""

    @property
    def own(self) -> Configurations: ...
    def require(self, instance: str, now: datetime) -> GlobalConfiguration: ...
    def ended(self, instance: str, now: datetime) -> bool: ...
    def server_by_certificate(
        self, fingerprint: str, now: datetime, claimed: str | None = None
    ) -> tuple[GlobalConfiguration, SecurityServer] | None: ...


class Statuses(Protocol):
    """Checks of stapled OCSP answers (`security_server.certificate_status.StatusChecker`)."""

    def signer(
        self,
        staple: bytes,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
        at: datetime,
    ) -> None: ...
    def peer(
        self,
        staple: bytes,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
        at: datetime,
    ) -> None: ...
    def peer_server(
        self, staple: bytes, server: SecurityServer, config: GlobalConfiguration, at: datetime
    ) -> None: ...


class Staples(Protocol):
    def staple(self, certificate_sha256: str) -> bytes: ...


class ExchangeNode(Protocol):
    """What the protocol reads of one security server (`security_server.node.Node`)."""

    @property
    def server_id(self) -> SecurityServerId: ...
    @property
    def auth_certificate(self) -> x509.Certificate: ...
    @property
    def auth_sha256(self) -> str: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def config(self) -> Configurations: ...
    @property
    def federated(self) -> Federated: ...
    @property
    def own_status(self) -> Staples: ...
    @property
    def status(self) -> Statuses: ...
    @property
    def replay(self) -> ReplayGuard: ...
    @property
    def rate_limiter(self) -> RateLimiter: ...
    def signer_for(self, member: MemberId) -> EcdsaSigner: ...
    def check_timestamping(self) -> None: ...
    def pseudonym(self, subject: str | None) -> str | None: ...
    def hosts(self, config: GlobalConfiguration, subsystem: SubsystemId) -> bool: ...
    def evidence(
        self,
        certificate: x509.Certificate,
        certificate_der: bytes,
        certificate_sha256: str,
        staple: bytes,
        body: bytes,
        body_sha256: str,
        config: GlobalConfiguration,
    ) -> tuple[str | None, Evidence]: ...


# ---- what travels ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A signed request or response as it travels between the servers."""

    header: bytes
    body: bytes
    signature: bytes
    signer_certificate: bytes
    signer_ocsp: bytes


@dataclass(slots=True)
class Progress:
    """How far a decision got: for the shells' metrics, the client once it may be named in
    a label and the service's catalogue entry once found; for the provider's refusal
    record, the peer's name, the request's header once read and whether its signature was
    verified as the client member's."""

    client: str | None = None
    service: Service | None = None
    peer: str | None = None
    header: RequestHeader | None = None
    verified: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused call or envelope: its error, and the record of the refusal to log."""

    error: GatewayError
    record: LogRecord
    progress: Progress = field(default_factory=Progress)

    @property
    def message_id(self) -> str | None:
        return self.record.facts.message_id


def refusal_record(err: GatewayError, role: Role, facts: Facts, now: datetime) -> LogRecord:
    """The record of a refusal known only by what the peer claims (`facts`, never trusted):
    a peer refused before its first frame is read, or a bug before a request is accepted."""
    return _refusal(err, role, facts, now).record


def _refusal(
    err: GatewayError,
    role: Role,
    facts: Facts,
    now: datetime,
    *,
    header: bytes | None = None,
    signature: bytes | None = None,
    signer_certificate_sha256: str | None = None,
    body_sha256: str | None = None,
    message: str | None = None,
    progress: Progress | None = None,
) -> Refusal:
    return Refusal(
        err,
        LogRecord(
            kind=RecordKind.REFUSAL,
            role=role,
            logged_at=now,
            facts=facts,
            header=header,
            signature=signature,
            signer_certificate_sha256=signer_certificate_sha256,
            body_sha256=body_sha256,
            status="refused",
            error_code=err.code.value,
            error_message=err.message if message is None else message,
        ),
        progress or Progress(),
    )


# ---- consumer: a call leaves -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """What one of the agency's backends brings to the consumer endpoint."""

    method: str
    metadata: Mapping[str, str]
    body: bytes
    # calls this endpoint is handling, this one included
    in_flight: int
    # a message id to use when the caller gave none, or a malformed one
    generated_id: str
    # the common names of the caller's TLS certificate when callers must authenticate
    # (consumer.client_ca); None when they need not
    tls_names: tuple[str, ...] | None = None
    # the kind of a streaming call ("server", "client" or "bidi", from the catalogue), whose
    # messages follow the signed header (`gateway.streams`); None for a unary call
    stream: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A call that may leave: the envelope to send once `record` is durable."""

    facts: Facts
    header: RequestHeader
    envelope: Envelope
    provider: SecurityServer
    # the provider's instance's configuration (ours, or a federated one's)
    remote: GlobalConfiguration
    record: LogRecord
    evidence: Evidence
    # every server hosting the service, `provider` (the first) among them
    providers: tuple[SecurityServer, ...]

    def via(self, provider: SecurityServer) -> Outgoing:
        """The same call sent to another server hosting the service (the header names no
        provider server: any of them may answer it, and the response must come from the
        one it went to)."""
        if provider.id == self.provider.id:
            return self
        facts = replace(self.facts, peer=str(provider.id))
        return replace(
            self, provider=provider, facts=facts, record=replace(self.record, facts=facts)
        )


def message_id_of(call: Call) -> str:
    given = call.metadata.get("gateway-id")
    return given if given and is_message_id(given) else call.generated_id


def start_call(call: Call, node: ExchangeNode, now: datetime) -> Outgoing | Refusal:
    """Decide whether a call may leave, and sign what leaves."""
    metadata = call.metadata
    message_id = message_id_of(call)
    facts = Facts(
        message_id=message_id,
        method=call.method,
        purpose=metadata.get("gateway-purpose"),
        user_id=metadata.get("gateway-user-id"),
        subject_ref=node.pseudonym(metadata.get("gateway-subject")),
    )
    progress = Progress()
    try:
        return _start(call, node, now, facts, progress)
    except GatewayError as err:
        if progress.client is None:
            # unverified claims: the client is not known to be served here
            facts.client = claimed(metadata.get("gateway-client"))
            facts.service = claimed(metadata.get("gateway-service"))
        return _refusal(err, Role.CONSUMER, facts, now, progress=progress)


def _start(
    call: Call, node: ExchangeNode, now: datetime, facts: Facts, progress: Progress
) -> Outgoing:
    metadata, method, body = call.metadata, call.method, call.body
    limits = node.limits
    if call.in_flight > limits.max_concurrent_calls:
        raise GatewayError(
            f"this security server is handling its limit of {limits.max_concurrent_calls} "
            "calls at once; retry with backoff",
            code=Code.OVERLOADED,
        )
    missing = [k for k in REQUIRED if not metadata.get(k)]
    if missing:
        raise RequestError(
            f"request metadata {', '.join(missing)} is missing; every call needs "
            "gateway-client, gateway-service and gateway-purpose",
            code=Code.MISSING_METADATA,
        )
    given_id = metadata.get("gateway-id")
    if given_id and given_id != facts.message_id:
        check_generated_id(given_id, call.generated_id)
    client = SubsystemId.parse(metadata["gateway-client"])
    if call.tls_names is not None and list(call.tls_names) != [str(client)]:
        raise GatewayError(
            f"the caller's TLS certificate does not name client {client}: use the "
            "client certificate issued for that subsystem",
            code=Code.CLIENT_NOT_AUTHENTICATED,
        )
    service_id = ServiceId.parse(metadata["gateway-service"])
    purpose = check_purpose(metadata["gateway-purpose"])
    check_method(method)
    user_id = metadata.get("gateway-user-id")
    subject = metadata.get("gateway-subject")
    if user_id is not None:
        check_free_text("gateway-user-id", user_id)
    if subject is not None:
        check_free_text("gateway-subject", subject)
    if len(body) > limits.max_message_bytes:
        raise RequestError(
            f"the request body has {len(body)} bytes, over this server's limit of "
            f"{limits.max_message_bytes}",
            code=Code.BODY_TOO_LARGE,
        )
    config = node.config.require(now)
    if not node.hosts(config, client):
        raise GatewayError(
            f"client {client} is not a subsystem served by security server {node.server_id}",
            code=Code.CLIENT_NOT_SERVED,
        )
    facts.client, facts.service = str(client), str(service_id)
    progress.client = facts.client
    # the provider's instance describes the service and holds the agreement: ours, or a
    # federated instance's (the federation active, allowed here, its copy current)
    remote = (
        config
        if service_id.member.instance == config.instance
        else node.federated.require(service_id.member.instance, now)
    )
    service = remote.services.get(service_id)
    providers = remote.servers_hosting(service_id.subsystem)
    if service is None or not providers:
        raise GatewayError(
            f"service {service_id} is not in the global configuration of {remote.instance}",
            code=Code.UNKNOWN_SERVICE,
        )
    progress.service = service
    service.check_method(method)
    if call.stream != service.stream_kind(method):
        raise GatewayError(
            f"method {method} is {service.stream_kind(method) or 'unary'} in the catalogue of "
            f"{remote.instance}; call it with a stub of that kind",
            code=Code.UNKNOWN_METHOD,
        )
    facts.agreement_id = remote.agreements.decide(client, service_id, purpose, now).id
    if remote is not config:
        check_outbound_approval(config, client, service_id, purpose)
    signer = node.signer_for(client.member)
    # what the provider would refuse, refused here: our own signing certificate (valid
    # now, from a configured CA, naming the member) and our certificates' status
    config.trust.signing_member(signer.certificate_der, now)
    staple = node.own_status.staple(signer.certificate_sha256)
    node.status.signer(staple, signer.certificate, config, now)
    node.status.peer(node.own_status.staple(node.auth_sha256), node.auth_certificate, config, now)
    node.check_timestamping()
    provider = providers[0]
    header = RequestHeader(
        message_id=facts.message_id or call.generated_id,
        client=client,
        service=service_id,
        method=method,
        purpose=purpose,
        sender=node.server_id,
        created_at=now,
        body_sha256=sha256_hex(body),
        user_id=user_id,
        subject_ref=facts.subject_ref,
        stream=call.stream,
    )
    header_bytes = header.encode()
    signature = signer.sign(header_bytes)
    facts.peer = str(provider.id)
    staple_sha, evidence = node.evidence(
        signer.certificate,
        signer.certificate_der,
        signer.certificate_sha256,
        staple,
        body,
        header.body_sha256,
        config,
    )
    return Outgoing(
        facts=facts,
        header=header,
        envelope=Envelope(
            header=header_bytes,
            body=body,
            signature=signature,
            signer_certificate=signer.certificate_der,
            signer_ocsp=staple,
        ),
        provider=provider,
        providers=providers,
        remote=remote,
        record=LogRecord(
            kind=RecordKind.REQUEST,
            role=Role.CONSUMER,
            logged_at=now,
            facts=facts,
            header=header_bytes,
            signature=signature,
            signer_certificate_sha256=signer.certificate_sha256,
            signer_ocsp_sha256=staple_sha,
            body_sha256=header.body_sha256,
        ),
        evidence=evidence,
    )


def check_still_agreed(
    header: RequestHeader, node: ExchangeNode, now: datetime, *, consumer: bool = False
) -> None:
    """For an open stream: its agreement is still in force in the current configuration of
    the service's instance (`GatewayError` naming why not: suspended, revoked, expired);
    on the `consumer` side of a cross-border stream, its own instance's approval too."""
    own = node.config.require(now)
    instance = header.service.member.instance
    config = own if instance == own.instance else node.federated.require(instance, now)
    config.agreements.decide(header.client, header.service, header.purpose, now)
    if consumer and config is not own:
        check_outbound_approval(own, header.client, header.service, header.purpose)


def check_generated_id(given: str, generated: str) -> None:
    """Refuse a malformed caller's message id, naming the id generated in its place (the
    one the refusal carries and its record keeps)."""
    try:
        check_message_id(given)
    except RequestError as err:
        raise RequestError(
            f"{err.message}; this refusal carries the generated message id {generated}",
            code=err.code,
        ) from None


def check_outbound_approval(
    own: GlobalConfiguration, client: SubsystemId, service: ServiceId, purpose: str
) -> None:
    """Where our instance's policy says so, a cross-border exchange also needs our own
    registry's approval, for this client, service and purpose."""
    if not own.outbound_approval_required:
        return
    approval = own.outbound_approvals.get((client, service))
    if approval is None or purpose not in approval.purposes:
        raise AuthorizationError(
            f"instance {own.instance} requires its own approval of exchanges with other "
            f"instances, and none covers {client} calling {service} for {purpose!r}; ask "
            "your registry administrator",
            code=Code.OUTBOUND_APPROVAL_MISSING,
        )


def check_provider_not_revoked(
    peer_staple: bytes, out: Outgoing, node: ExchangeNode, now: datetime
) -> None:
    """Send nothing to a provider whose last stapled answer says its TLS certificate is
    revoked. (Only revocation stops sending: a stale answer is refreshed by the provider's
    next response, which needs a request to come.)"""
    if not peer_staple:
        return
    try:
        node.status.peer_server(peer_staple, out.provider, out.remote, now)
    except TrustError as err:
        if err.code is Code.PEER_CERTIFICATE_REVOKED:
            raise


# ---- consumer: the answer comes back -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Incoming:
    """An accepted response: the backend's answer, and its record to make durable before
    the answer goes to the caller."""

    response: ResponseHeader
    envelope: Envelope
    record: LogRecord
    evidence: Evidence


def provider_refusal(code: str, message: str) -> GatewayError:
    """The error to pass on for a provider's refusal: its code if it is one of ours (else
    internal_error, naming the code it sent), with its message bounded."""
    try:
        known = Code(code)
    except ValueError:
        return GatewayError(
            "the provider refused with a code this server does not know "
            f"({bound_message(code[:64])!r}): {bound_message(message)}",
            code=Code.INTERNAL,
        )
    return GatewayError(bound_message(message), code=known)


def accept_response(
    answer: Envelope | None,
    out: Outgoing,
    peer_staple: bytes,
    node: ExchangeNode,
    now: datetime,
) -> Incoming:
    """Check the provider's response to `out` (None: it sent neither a response nor a
    refusal); raise `GatewayError` when it is not acceptable."""
    if answer is None:
        raise TrustError(
            "the provider sent neither a response nor a refusal", code=Code.MALFORMED_ENVELOPE
        )
    response = decode_response(answer.header)
    request = out.header
    if (
        response.message_id != request.message_id
        or response.request_sha256 != sha256_hex(out.envelope.header)
        or response.service != request.service
        or response.sender != out.provider.id
    ):
        raise TrustError(
            "the provider's response does not answer this request", code=Code.RESPONSE_MISMATCH
        )
    config = out.remote
    node.status.peer_server(peer_staple, out.provider, config, now)
    certificate, member = config.trust.signing_member(answer.signer_certificate, now)
    if member != request.service.member:
        raise TrustError(
            f"the response is signed by {member}, not by the service's member",
            code=Code.UNTRUSTED_SIGNER,
        )
    verify_signature(certificate, answer.header, answer.signature)
    check_body(response.body_sha256, answer.body)
    node.status.signer(answer.signer_ocsp, certificate, config, now)
    signer_sha = certificate_sha256(answer.signer_certificate)
    staple_sha, evidence = node.evidence(
        certificate,
        answer.signer_certificate,
        signer_sha,
        answer.signer_ocsp,
        answer.body,
        response.body_sha256,
        config,
    )
    return Incoming(
        response=response,
        envelope=answer,
        record=LogRecord(
            kind=RecordKind.RESPONSE,
            role=Role.CONSUMER,
            logged_at=now,
            facts=out.facts,
            header=answer.header,
            signature=answer.signature,
            signer_certificate_sha256=signer_sha,
            signer_ocsp_sha256=staple_sha,
            body_sha256=response.body_sha256,
            status="ok" if response.grpc_status == 0 else "backend_error",
            error_message=response.grpc_message or None,
        ),
        evidence=evidence,
    )


def consumer_refusal(err: GatewayError, out: Outgoing, now: datetime) -> Refusal:
    """The refusal of a call that was sent (the provider refused, or its answer failed
    its checks)."""
    return _refusal(err, Role.CONSUMER, out.facts, now)


# ---- provider: an envelope arrives -------------------------------------------------------


@dataclass(slots=True)
class Peer:
    """What one exchange stream knows of its peer: its TLS certificate (and the SHA-256 of
    its DER) and the latest OCSP answer it stapled."""

    certificate: x509.Certificate | None
    fingerprint: str | None
    staple: bytes = b""

    @property
    def claimed_instance(self) -> str | None:
        """The instance the peer's certificate claims (unverified: only to say why an
        unknown peer is refused)."""
        if self.certificate is None:
            return None
        try:
            return SecurityServerId.parse(common_name(self.certificate)).owner.instance
        except GatewayError:
            return None

    @property
    def name(self) -> str:
        return f"certificate:{self.fingerprint}"


def registered_peer(
    federated: Federated, peer: Peer, now: datetime
) -> tuple[GlobalConfiguration, SecurityServer]:
    """The security server whose registered TLS certificate the peer presented, with the
    configuration that registers it: ours, or a federated instance's (then only while that
    federation is active and allowed here). The server must belong to the instance of the
    configuration that registers it. When ours lists a federation with the instance the
    peer's certificate names as ended, the refusal says so."""
    found = federated.server_by_certificate(peer.fingerprint or "", now, peer.claimed_instance)
    if found is None:
        claimed_by_peer = peer.claimed_instance
        if claimed_by_peer is not None and federated.ended(claimed_by_peer, now):
            own = federated.own.require(now).instance
            raise GatewayError(
                f"the federation of instance {own} with instance {claimed_by_peer} was ended: "
                "this server no longer exchanges with its members",
                code=Code.FEDERATION_ENDED,
            )
        raise TrustError(
            "the TLS client certificate is not the authentication certificate of any "
            "security server registered in the global configuration (ours or a federated "
            "instance's)",
            code=Code.PEER_NOT_REGISTERED,
        )
    config, server = found
    if server.id.owner.instance != config.instance:
        # parse_content refuses such a configuration; never rely on that alone
        raise TrustError(
            f"security server {server.id} is registered by instance {config.instance}, which "
            "may register only its own servers",
            code=Code.PEER_MEMBER_MISMATCH,
        )
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """The client and service a request header names, read without trusting or fully
    checking it: for refusal records, as unverified claims."""

    client: str | None = None
    service: str | None = None

    @classmethod
    def read(cls, header: bytes) -> Claims:
        try:
            doc = canonical.decode(header)
        except canonical.NotCanonicalError:
            return cls()
        if not isinstance(doc, dict):
            return cls()
        client, service = doc.get("client"), doc.get("service")
        return cls(
            client=client if isinstance(client, str) else None,
            service=service if isinstance(service, str) else None,
        )

    def facts(self, peer: str | None = None) -> Facts:
        return Facts(
            message_id=None, client=claimed(self.client), service=claimed(self.service), peer=peer
        )


def bounded_refusal(
    header: bytes, signature: bytes, message: str
) -> tuple[bytes | None, bytes | None, str]:
    """What a refusal record keeps of a refused frame's header and signature, and its error
    message. A header or signature over its bound is cut to its first bytes, and the
    message ends by saying so with the SHA-256 of the whole (so that the frame can still
    be matched to the record); the message keeps its first words within the record's
    limit for text."""
    notes: list[str] = []
    kept: list[bytes | None] = []
    for name, value, bound in (
        ("header", header, MAX_REFUSED_HEADER_BYTES),
        ("signature", signature, MAX_REFUSED_SIGNATURE_BYTES),
    ):
        if len(value) > bound:
            notes.append(f"{name} of {len(value)} bytes cut to {bound}, sha256 {sha256_hex(value)}")
            value = value[:bound]
        kept.append(value or None)
    if notes:
        note = f" [{'; '.join(notes)}]"
        message = message[: max(0, MAX_RECORD_TEXT - len(note))] + note
    return kept[0], kept[1], message


def request_facts(header: RequestHeader, peer: str, *, verified: bool = True) -> Facts:
    """A request's facts for its records; client and service as unverified claims unless
    `verified`."""
    client, service = str(header.client), str(header.service)
    return Facts(
        message_id=header.message_id,
        client=client if verified else claimed(client),
        service=service if verified else claimed(service),
        method=header.method,
        purpose=header.purpose,
        user_id=header.user_id,
        # the consumer's pseudonym of the subject, as signed (same instance, same key)
        subject_ref=header.subject_ref,
        peer=peer,
    )


def refuse_accepted(accepted: Accepted, err: GatewayError, now: datetime) -> Refusal:
    """The refusal of a request that passed `accept_request` but failed a later check of
    the shell's (its id already claimed by another replica)."""
    facts = request_facts(accepted.header, accepted.facts.peer or "")
    return _refused_envelope(err, accepted.envelope, facts, now, Progress())


def _refused_envelope(
    err: GatewayError, envelope: Envelope, facts: Facts, now: datetime, progress: Progress
) -> Refusal:
    """A refusal record keeping a bounded prefix of what the peer sent."""
    kept_header, kept_signature, message = bounded_refusal(
        envelope.header, envelope.signature, err.message
    )
    return _refusal(
        err,
        Role.PROVIDER,
        facts,
        now,
        header=kept_header,
        signature=kept_signature,
        signer_certificate_sha256=(
            certificate_sha256(envelope.signer_certificate) if envelope.signer_certificate else None
        ),
        body_sha256=sha256_hex(envelope.body),
        message=message,
        progress=progress,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """A request the provider serves: its record to make durable, then the backend call."""

    facts: Facts
    header: RequestHeader
    envelope: Envelope
    agreement: Agreement
    # our configuration, and that of the instance registering the peer
    config: GlobalConfiguration
    peer_config: GlobalConfiguration
    # the key that signs the answer, and the OCSP answer about its certificate
    signer: EcdsaSigner
    own_staple: bytes
    record: LogRecord
    evidence: Evidence


def accept_request(
    envelope: Envelope | None,
    peer: Peer,
    node: ExchangeNode,
    backends: Container[str],
    now: datetime,
    monotonic: Callable[[], float] = time.monotonic,
    *,
    stream: bool = False,
) -> Accepted | Refusal:
    """Decide whether the provider serves a request envelope from `peer` (None: the frame
    held no request); `stream` when it opens a streaming call. A refusal's record keeps a
    bounded prefix of what the peer sent, and the client and service it names as claims
    until its signature is verified."""
    progress = Progress(peer=peer.name)
    try:
        return _accept(envelope, peer, node, backends, now, monotonic, progress, stream)
    except GatewayError as err:
        name = progress.peer or peer.name
        if progress.header is not None:
            facts = request_facts(progress.header, name, verified=progress.verified)
        elif envelope is not None:
            # unreadable or not checked yet: what it names, as claims
            facts = Claims.read(envelope.header).facts(name)
        else:
            facts = Facts(message_id=None, peer=name)
        if envelope is None:
            return _refusal(err, Role.PROVIDER, facts, now, progress=progress)
        return _refused_envelope(err, envelope, facts, now, progress)


def _accept(
    envelope: Envelope | None,
    peer: Peer,
    node: ExchangeNode,
    backends: Container[str],
    now: datetime,
    monotonic: Callable[[], float],
    progress: Progress,
    stream: bool,
) -> Accepted:
    config = node.config.require(now)
    # the peer's instance vouches for the peer: its servers, CAs and OCSP responders
    peer_config, server = registered_peer(node.federated, peer, now)
    progress.peer = str(server.id)
    assert peer.certificate is not None  # a registered peer presented one
    node.status.peer(peer.staple, peer.certificate, peer_config, now)
    if envelope is None:
        raise TrustError("expected a request frame", code=Code.MALFORMED_ENVELOPE)
    header = decode_request(envelope.header)
    progress.header = header
    if (header.stream is not None) != stream:
        raise TrustError(
            "a unary request cannot open a stream: it travels in an exchange frame"
            if stream
            else "a streaming request must open a stream (Exchange.Stream), not ride in a frame",
            code=Code.MALFORMED_ENVELOPE,
        )
    if len(envelope.body) > node.limits.max_message_bytes:
        raise GatewayError(
            f"the request body has {len(envelope.body)} bytes, over the limit of "
            f"{node.limits.max_message_bytes}",
            code=Code.BODY_TOO_LARGE,
        )
    if header.sender != server.id or header.client.member != server.id.owner:
        raise TrustError(
            f"the TLS peer {server.id} is not a security server of the client's member "
            f"{header.client.member}",
            code=Code.PEER_MEMBER_MISMATCH,
        )
    # only the CAs of the instance that registers the peer vouch for its members
    certificate, member = peer_config.trust.signing_member(envelope.signer_certificate, now)
    if member != header.client.member or member.instance != peer_config.instance:
        raise TrustError(
            f"the request is signed by member {member}, not by the client's member",
            code=Code.UNTRUSTED_SIGNER,
        )
    verify_signature(certificate, envelope.header, envelope.signature)
    check_body(header.body_sha256, envelope.body)
    node.status.signer(envelope.signer_ocsp, certificate, peer_config, now)
    # signed by the client's member, with a certificate in good standing
    progress.verified = True
    node.replay.check_fresh(header.created_at, now)
    service = config.services.get(header.service)
    if service is None or not node.hosts(config, header.service.subsystem):
        raise GatewayError(
            f"service {header.service} is not provided by this security server",
            code=Code.UNKNOWN_SERVICE,
        )
    progress.service = service
    service.check_method(header.method)
    check_kind(header, service.stream_kind(header.method))
    agreement = config.agreements.decide(header.client, header.service, header.purpose, now)
    # a client our configuration names in an agreement: a bounded label
    progress.client = str(header.client)
    node.rate_limiter.check(agreement, monotonic())
    if str(header.service) not in backends:
        raise UnavailableError(
            f"no backend is configured for {header.service} on this server",
            code=Code.BACKEND_UNAVAILABLE,
        )
    signer = node.signer_for(header.service.member)
    own_staple = node.own_status.staple(signer.certificate_sha256)
    node.status.signer(own_staple, signer.certificate, config, now)
    # nor do we serve with a TLS certificate whose status we could not staple
    node.status.peer(node.own_status.staple(node.auth_sha256), node.auth_certificate, config, now)
    node.check_timestamping()
    # last: only a request about to be accepted claims its id (as the replica-wide ledger
    # does), so that a member with no agreement cannot use up the ids another client will
    # send, and a client refused for any other reason may send again with the same id
    node.replay.remember(header.message_id, now)
    facts = request_facts(header, str(server.id))
    facts.agreement_id = agreement.id
    signer_sha = certificate_sha256(envelope.signer_certificate)
    staple_sha, evidence = node.evidence(
        certificate,
        envelope.signer_certificate,
        signer_sha,
        envelope.signer_ocsp,
        envelope.body,
        header.body_sha256,
        peer_config,
    )
    return Accepted(
        facts=facts,
        header=header,
        envelope=envelope,
        agreement=agreement,
        config=config,
        peer_config=peer_config,
        signer=signer,
        own_staple=own_staple,
        record=LogRecord(
            kind=RecordKind.REQUEST,
            role=Role.PROVIDER,
            logged_at=now,
            facts=facts,
            header=envelope.header,
            signature=envelope.signature,
            signer_certificate_sha256=signer_sha,
            signer_ocsp_sha256=staple_sha,
            body_sha256=header.body_sha256,
        ),
        evidence=evidence,
    )


# ---- provider: the backend answered ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The signed response to send once `record` is durable."""

    envelope: Envelope
    response: ResponseHeader
    record: LogRecord
    evidence: Evidence


def answer(
    accepted: Accepted,
    status: int,
    message: str,
    body: bytes,
    node: ExchangeNode,
    now: datetime,
) -> Answer:
    """Sign the backend's answer (its gRPC status, message and bytes) to `accepted`."""
    response = ResponseHeader(
        message_id=accepted.header.message_id,
        request_sha256=sha256_hex(accepted.envelope.header),
        service=accepted.header.service,
        sender=node.server_id,
        created_at=now,
        body_sha256=sha256_hex(body),
        grpc_status=status,
        grpc_message=message[:1024],
    )
    response_bytes = response.encode()
    signer = accepted.signer
    signature = signer.sign(response_bytes)
    # our newest answer about the signer (the backend may have taken long)
    staple = node.own_status.staple(signer.certificate_sha256)
    own_sha, evidence = node.evidence(
        signer.certificate,
        signer.certificate_der,
        signer.certificate_sha256,
        staple,
        body,
        response.body_sha256,
        accepted.config,
    )
    return Answer(
        envelope=Envelope(
            header=response_bytes,
            body=body,
            signature=signature,
            signer_certificate=signer.certificate_der,
            signer_ocsp=staple,
        ),
        response=response,
        record=LogRecord(
            kind=RecordKind.RESPONSE,
            role=Role.PROVIDER,
            logged_at=now,
            facts=accepted.facts,
            header=response_bytes,
            signature=signature,
            signer_certificate_sha256=signer.certificate_sha256,
            signer_ocsp_sha256=own_sha,
            body_sha256=response.body_sha256,
            status="ok" if status == 0 else "backend_error",
            error_message=message or None,
        ),
        evidence=evidence,
    )


def backend_failure(accepted: Accepted, err: GatewayError, now: datetime) -> LogRecord:
    """The record of a backend that could not be reached or did not answer in time."""
    return LogRecord(
        kind=RecordKind.RESPONSE,
        role=Role.PROVIDER,
        logged_at=now,
        facts=accepted.facts,
        status="error",
        error_code=err.code.value,
        error_message=err.message,
    )
