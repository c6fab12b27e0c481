"""Consumer endpoint: where the agency's own backends call peer services.

Any gRPC method is accepted and forwarded as opaque bytes, routed by request metadata:

    gateway-client    client subsystem id (required)
    gateway-service   service id (required)
    gateway-purpose   purpose of the call (required)
    gateway-user-id   end user on whose behalf the call is made (optional)
    gateway-subject   data subject the call is about (optional; logged as a pseudonym)
    gateway-id        message id (optional; generated when absent)

The message id is always returned in trailing metadata `gateway-id`, with timings
(`gateway-total-us`, `gateway-provider-us`, `gateway-backend-us`); a refusal carries
its stable code in `gateway-error`. A backend's own error status is passed through.

Junk calls (`COUNTED` codes: no metadata, a malformed id, a client this server does not
serve or that did not authenticate) beyond `limits.refusal_rate` per source address are
refused as usual but only counted, into one `refusal-aggregate` record per source, code and
interval, instead of one durable record each; refusals of a served, well-formed client are
always logged one by one. `grpc.health.v1` probes are answered by another handler and never
reach this one.

With tracing on (`[tracing]`), each call has a span ("consumer call"), child of the
caller's `traceparent` metadata when that is well formed, with spans for its checks, its
log commits, the provider leg and the response's checks; the provider leg's `traceparent`
goes to the provider inside the request frame (see `gateway_ops.tracing`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import structlog
from cryptography import x509
from opentelemetry.trace import SpanKind

from gateway.audit import RecordKind, Role
from gateway.configuration import GlobalConfiguration, SecurityServer
from gateway.envelope import (
    RequestHeader,
    ResponseHeader,
    check_body,
    check_free_text,
    check_message_id,
    check_method,
    check_purpose,
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
    bound_message,
)
from gateway.identifiers import ServiceId, SubsystemId
from gateway.signing import certificate_sha256, verify_signature
from gateway.v1 import exchange_pb2 as pb
from gateway_ops.tracing import (
    NO_TRACE,
    OFF,
    OK,
    CallTrace,
    Tracing,
    current_call,
    traceparent_of,
)
from security_server.endpoint_limits import backstop
from security_server.floods import RefusalCounter, TokenBuckets, peer_host
from security_server.metrics import CallLabels, ServerMetrics, backend_code
from security_server.node import Node
from security_server.peers import PeerLink, PeerPool
from security_server.records import claimed, record
from security_server.status import ID_KEY, abort

log = structlog.get_logger("security_server.consumer")

REQUIRED = ("gateway-client", "gateway-service", "gateway-purpose")

# refusals that say nothing about a client this server serves: beyond a per-source rate they
# are counted, not logged one by one
COUNTED = frozenset(
    (
        Code.MISSING_METADATA,
        Code.MALFORMED_IDENTIFIER,
        Code.CLIENT_NOT_SERVED,
        Code.CLIENT_NOT_AUTHENTICATED,
    )
)


class ConsumerService(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(
        self,
        node: Node,
        peers: PeerPool,
        *,
        authenticate_clients: bool = False,
        refusal_limit: TokenBuckets | None = None,
        refusals: RefusalCounter | None = None,
        metrics: ServerMetrics | None = None,
        tracing: Tracing = OFF,
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.peers = peers
        self.tracing = tracing
        self.authenticate_clients = authenticate_clients
        # junk refusals logged one by one per source (None: every one), and the count of
        # the others, written by an `AggregateFlusher`
        self.refusal_limit = refusal_limit
        self.refusals = RefusalCounter() if refusals is None else refusals
        self._handlers: dict[str, Any] = {}
        self.in_flight = 0

    # grpc.GenericRpcHandler: one unary handler per method path, bytes in and out
    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:

            async def handle(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                return await self.call(method, body, context)

            handler = grpc.unary_unary_rpc_method_handler(handle)
            if len(self._handlers) < 10_000:
                self._handlers[method] = handler
        return handler

    async def call(
        self, method: str, body: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        self.in_flight += 1
        labels = CallLabels()
        started = time.perf_counter()
        trace = NO_TRACE
        try:
            if self.in_flight > backstop(self.node.limits):
                # far past the limit: refused at once, without a record
                labels.code = Code.OVERLOADED.value
                await abort(
                    context,
                    Code.OVERLOADED,
                    f"this security server is handling over {backstop(self.node.limits)} calls "
                    "at once; retry with backoff",
                    None,
                )
            if self.tracing.enabled:
                trace = self.tracing.start_call(
                    "consumer call", traceparent_of(context.invocation_metadata())
                )
            return await self._call(method, body, context, labels, trace)
        finally:
            self.in_flight -= 1
            trace.finish()
            if self.metrics is not None:
                self.metrics.call("consumer", labels, time.perf_counter() - started)

    async def _call(
        self,
        method: str,
        body: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        labels: CallLabels,
        trace: CallTrace,
    ) -> bytes:
        node = self.node
        started = time.perf_counter()
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        # the caller's message id is used (and echoed) only when well formed: a malformed one
        # is replaced by a generated id, which its refusal carries
        given_id = metadata.get("gateway-id")
        message_id = given_id if given_id and is_message_id(given_id) else uuid.uuid4().hex
        now = node.clock()
        facts: dict[str, Any] = {
            "message_id": message_id,
            # unverified claims until the client is known to be served here (records.claimed)
            "client": claimed(metadata.get("gateway-client")),
            "service": claimed(metadata.get("gateway-service")),
            "method": method,
            "purpose": metadata.get("gateway-purpose"),
            "user_id": metadata.get("gateway-user-id"),
            "subject_ref": node.pseudonym(metadata.get("gateway-subject")),
        }
        trace.describe(message_id=message_id)
        checks = trace.start("consumer checks")
        try:
            if self.in_flight > node.limits.max_concurrent_calls:
                raise GatewayError(
                    f"this security server is handling its limit of {node.limits.max_concurrent_calls} "
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
            if given_id and given_id != message_id:
                check_generated_id(given_id, message_id)
            client = SubsystemId.parse(metadata["gateway-client"])
            if self.authenticate_clients:
                self._authenticate(context, client)
            service_id = ServiceId.parse(metadata["gateway-service"])
            purpose = check_purpose(metadata["gateway-purpose"])
            check_method(method)
            user_id = metadata.get("gateway-user-id")
            subject = metadata.get("gateway-subject")
            if user_id is not None:
                check_free_text("gateway-user-id", user_id)
            if subject is not None:
                check_free_text("gateway-subject", subject)
            if len(body) > node.limits.max_message_bytes:
                raise RequestError(
                    f"the request body has {len(body)} bytes, over this server's limit of "
                    f"{node.limits.max_message_bytes}",
                    code=Code.BODY_TOO_LARGE,
                )
            config = node.config.require(now)
            if not node.hosts(config, client):
                raise GatewayError(
                    f"client {client} is not a subsystem served by security server {node.server_id}",
                    code=Code.CLIENT_NOT_SERVED,
                )
            facts["client"], facts["service"] = str(client), str(service_id)
            labels.client = facts["client"]
            # the provider's instance describes the service and holds the agreement: ours, or
            # a federated instance's (the federation active, allowed here, its copy current)
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
            labels.known_service(service, method)
            service.check_method(method)
            facts["agreement_id"] = remote.agreements.decide(client, service_id, purpose, now).id
            if remote is not config:
                check_outbound_approval(config, client, service_id, purpose)
            signer = node.signer_for(client.member)
            # what the provider would refuse, refused here: our own certificates' status
            staple = node.own_status.staple(signer.certificate_sha256)
            node.status.signer(staple, signer.certificate, config, now)
            node.status.peer(
                node.own_status.staple(node.auth_sha256), node.auth_certificate, config, now
            )
            node.check_timestamping()
            provider = providers[0]
            header = RequestHeader(
                message_id=message_id,
                client=client,
                service=service_id,
                method=method,
                purpose=purpose,
                sender=node.server_id,
                created_at=now,
                body_sha256=sha256_hex(body),
                user_id=user_id,
                subject_ref=facts["subject_ref"],
            )
            header_bytes = header.encode()
            signature = signer.sign(header_bytes)
        except GatewayError as err:
            trace.end(checks, err.code.value)
            return await self._refuse(context, err, facts, labels)
        trace.end(checks)
        # checked against the configuration: safe to name in spans
        trace.describe(client=facts["client"], service=facts["service"], method=method)

        facts["peer"] = str(provider.id)
        staple_sha, evidence = node.evidence(
            signer.certificate,
            signer.certificate_der,
            signer.certificate_sha256,
            staple,
            body,
            header.body_sha256,
            config,
        )
        try:
            with trace.step("log commit"):
                await node.log.append(
                    record(
                        kind=RecordKind.REQUEST,
                        role=Role.CONSUMER,
                        logged_at=now,
                        header=header_bytes,
                        signature=signature,
                        signer_certificate_sha256=signer.certificate_sha256,
                        signer_ocsp_sha256=staple_sha,
                        body_sha256=header.body_sha256,
                        **facts,
                    ),
                    evidence,
                )
        except GatewayError as err:
            return await self._abort(context, err, message_id, labels)

        remaining = context.time_remaining()
        wait = min(remaining if remaining is not None else 1e9, node.limits.deadline_seconds)
        try:
            link = self.peers.link(provider, remote)
            self._check_provider_not_revoked(link, provider, remote)
            sent = time.perf_counter()
            with trace.step("provider leg", SpanKind.CLIENT) as leg:
                frame = await link.exchange(
                    pb.SignedEnvelope(
                        header=header_bytes,
                        body=body,
                        signature=signature,
                        signer_certificate=signer.certificate_der,
                        signer_ocsp=staple,
                    ),
                    wait,
                    trace.traceparent(leg),
                )
            if self.metrics is not None:
                self.metrics.provider_seconds.observe(time.perf_counter() - sent)
            if frame.HasField("refusal"):
                raise provider_refusal(frame.refusal)
            with trace.step("response checks"):
                response, response_certificate = self._check_response(
                    frame, header, header_bytes, provider, link, remote
                )
        except GatewayError as err:
            return await self._refuse(context, err, facts, labels)

        env = frame.response
        response_signer = certificate_sha256(env.signer_certificate)
        response_staple_sha, response_evidence = node.evidence(
            response_certificate,
            env.signer_certificate,
            response_signer,
            env.signer_ocsp,
            env.body,
            response.body_sha256,
            remote,
        )
        status = OK if response.grpc_status == 0 else "backend_error"
        try:
            with trace.step("log commit"):
                await node.log.append(
                    record(
                        kind=RecordKind.RESPONSE,
                        role=Role.CONSUMER,
                        logged_at=node.clock(),
                        header=env.header,
                        signature=env.signature,
                        signer_certificate_sha256=response_signer,
                        signer_ocsp_sha256=response_staple_sha,
                        body_sha256=response.body_sha256,
                        status=status,
                        error_message=response.grpc_message or None,
                        **facts,
                    ),
                    response_evidence,
                )
        except GatewayError as err:
            return await self._abort(context, err, message_id, labels)
        trailing = (
            (ID_KEY, message_id),
            ("gateway-total-us", str(int((time.perf_counter() - started) * 1e6))),
            ("gateway-provider-us", str(frame.provider_micros)),
            ("gateway-backend-us", str(frame.backend_micros)),
        )
        trace.outcome(status)
        if response.grpc_status != 0:
            labels.code = backend_code(response.grpc_status)
            await context.abort(
                grpc.StatusCode[_STATUS_NAMES[response.grpc_status]],
                bound_message(response.grpc_message),
                trailing_metadata=trailing,
            )
        context.set_trailing_metadata(trailing)
        return bytes(env.body)

    @staticmethod
    def _authenticate(context: grpc.aio.ServicerContext[Any, Any], client: SubsystemId) -> None:
        """The caller's TLS certificate (from the local CA) must name the client subsystem."""
        names = context.auth_context().get("x509_common_name") or []
        if [n.decode() if isinstance(n, bytes) else str(n) for n in names] != [str(client)]:
            raise GatewayError(
                f"the caller's TLS certificate does not name client {client}: use the "
                "client certificate issued for that subsystem",
                code=Code.CLIENT_NOT_AUTHENTICATED,
            )

    def _check_provider_not_revoked(
        self, link: PeerLink, provider: SecurityServer, config: GlobalConfiguration
    ) -> None:
        """Send nothing to a provider whose last stapled answer says its TLS certificate is
        revoked. (Only revocation stops sending: a stale answer is refreshed by the
        provider's next response, which needs a request to come.)"""
        if not link.peer_staple:
            return
        try:
            self.node.status.peer_server(link.peer_staple, provider, config, self.node.clock())
        except TrustError as err:
            if err.code is Code.PEER_CERTIFICATE_REVOKED:
                raise

    def _check_response(
        self,
        frame: pb.Frame,
        request: RequestHeader,
        request_bytes: bytes,
        provider: SecurityServer,
        link: PeerLink,
        config: GlobalConfiguration,
    ) -> tuple[ResponseHeader, x509.Certificate]:
        if not frame.HasField("response"):
            raise TrustError(
                "the provider sent neither a response nor a refusal", code=Code.MALFORMED_ENVELOPE
            )
        env = frame.response
        response = decode_response(env.header)
        if (
            response.message_id != request.message_id
            or response.request_sha256 != sha256_hex(request_bytes)
            or response.service != request.service
            or response.sender != provider.id
        ):
            raise TrustError(
                "the provider's response does not answer this request", code=Code.RESPONSE_MISMATCH
            )
        now = self.node.clock()
        self.node.status.peer_server(link.peer_staple, provider, config, now)
        certificate, member = config.trust.signing_member(env.signer_certificate, now)
        if member != request.service.member:
            raise TrustError(
                f"the response is signed by {member}, not by the service's member",
                code=Code.UNTRUSTED_SIGNER,
            )
        verify_signature(certificate, env.header, env.signature)
        check_body(response.body_sha256, env.body)
        self.node.status.signer(env.signer_ocsp, certificate, config, now)
        return response, certificate

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        err: GatewayError,
        facts: dict[str, Any],
        labels: CallLabels,
    ) -> bytes:
        if err.code in COUNTED and self.refusal_limit is not None:
            source = peer_host(context.peer())
            if self.refusal_limit.take(source):
                self.refusals.add(source, err.code.value, self.node.clock())
                return await self._abort(context, err, facts["message_id"], labels)
        log.info(
            "call_refused",
            code=err.code.value,
            message_id=facts["message_id"],
            client=facts["client"],
        )
        await self.node.log_failure(
            record(
                kind=RecordKind.REFUSAL,
                role=Role.CONSUMER,
                logged_at=self.node.clock(),
                status="refused",
                error_code=err.code.value,
                error_message=err.message,
                **facts,
            )
        )
        return await self._abort(context, err, facts["message_id"], labels)

    @staticmethod
    async def _abort(
        context: grpc.aio.ServicerContext[Any, Any],
        err: GatewayError,
        message_id: str,
        labels: CallLabels,
    ) -> bytes:
        labels.code = err.code.value
        current_call().outcome(err.code.value)
        await abort(context, err.code, err.message, message_id)
        return b""  # not reached: abort raises


_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def provider_refusal(refusal: pb.Refusal) -> GatewayError:
    """The error to pass on for a provider's refusal: its code if it is one of ours (else
    internal_error, naming the code it sent), with its message bounded."""
    try:
        code = Code(refusal.code)
    except ValueError:
        return GatewayError(
            "the provider refused with a code this server does not know "
            f"({bound_message(refusal.code[:64])!r}): {bound_message(refusal.message)}",
            code=Code.INTERNAL,
        )
    return GatewayError(bound_message(refusal.message), code=code)


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
