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

import asyncio
import functools
import time
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.x509.oid import NameOID
from opentelemetry.trace import SpanKind

from gateway.errors import Code, GatewayError, TrustError, UnavailableError, bound_message
from gateway.exchange import (
    Call,
    Outgoing,
    Progress,
    Refusal,
    accept_response,
    check_provider_not_revoked,
    consumer_refusal,
    message_id_of,
    provider_refusal,
    start_call,
)
from gateway.identifiers import ServiceId
from gateway_ops.failpoints import failpoint
from gateway_ops.sources import peer_host
from gateway_ops.tracing import (
    NO_TRACE,
    OFF,
    CallTrace,
    Tracing,
    current_call,
    traceparent_of,
)
from security_server.endpoint_limits import backstop
from security_server.floods import RefusalCounter, TokenBuckets
from security_server.metrics import UNKNOWN, CallLabels, ServerMetrics, backend_code
from security_server.node import Node
from security_server.peers import (
    PeerLink,
    PeerPool,
    ProviderChoice,
    envelope_of,
    signed_envelope,
)
from security_server.status import ID_KEY, abort
from security_server.streams import ConsumerStreams

log = structlog.get_logger("security_server.consumer")

# how long the consumer waits for a provider server's connection before trying another
# server hosting the service (or refusing with provider_unavailable)
CONNECT_SECONDS = 2.0

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
        # which server hosting a service a call goes to (the fastest reachable)
        self.choice = ProviderChoice()
        self.tracing = tracing
        self.authenticate_clients = authenticate_clients
        # junk refusals logged one by one per source (None: every one), and the count of
        # the others, written by an `AggregateFlusher`
        self.refusal_limit = refusal_limit
        self.refusals = RefusalCounter() if refusals is None else refusals
        self._handlers: dict[str, Any] = {}
        self.in_flight = 0
        # message ids callers chose, claimed by the calls under way (see `claim_id`)
        self.claimed_ids: set[str] = set()
        self.streams = ConsumerStreams(self)

    def _stream_kind(self, method: str, metadata: Any) -> str | None:
        """The streaming kind the catalogue gives the method of the service a call names
        (`gateway-service`), or None: a unary call (also when the service is unknown, or
        no configuration is held yet; the unary path then refuses it with its code)."""
        service_name = next((v for k, v in metadata or () if k == "gateway-service"), None)
        if not isinstance(service_name, str):
            return None
        try:
            service_id = ServiceId.parse(service_name)
            now = self.node.clock()
            config = self.node.config.require(now)
            instance = service_id.member.instance
            if instance != config.instance:
                config = self.node.federated.require(instance, now)
        except Exception:  # whatever is wrong, the unary path says it with its code
            return None
        service = config.services.get(service_id)
        return None if service is None else service.stream_kind(method)

    # grpc.GenericRpcHandler: one unary handler per method path, bytes in and out
    def service(self, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        kind = self._stream_kind(method, handler_call_details.invocation_metadata)
        if kind is not None:
            return self.streams.handler(method, kind)
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
            # the call, once it passed the checks: a bug past that point is recorded
            # against it; and the caller's own message id it claimed (released at its end)
            seen: list[Outgoing] = []
            claims: list[str] = []
            try:
                return await self._call(method, body, context, labels, trace, seen, claims)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:  # a bug: a clear refusal and a record, never a traceback
                log.exception("consumer_internal_error")
                err = GatewayError("internal error in the consumer's server", code=Code.INTERNAL)
                trace.outcome(err.code.value)
                if not seen:
                    return await self._abort(context, err, "", labels)
                refusal = consumer_refusal(err, seen[-1], self.node.clock())
                await self.node.log_failure(refusal.record.fields())
                return await self._abort(context, err, seen[-1].header.message_id, labels)
        finally:
            self.claimed_ids.difference_update(claims)
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
        seen: list[Outgoing],
        claims: list[str],
    ) -> bytes:
        node = self.node
        started = time.perf_counter()
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        call = Call(
            method=method,
            metadata=metadata,
            body=body,
            in_flight=self.in_flight,
            generated_id=uuid.uuid4().hex,
            tls_names=self._tls_names(context) if self.authenticate_clients else None,
        )
        trace.describe(message_id=message_id_of(call))
        checks = trace.start("consumer checks")
        out = start_call(call, node, node.clock())
        if isinstance(out, Refusal):
            trace.end(checks, out.error.code.value)
            self._label(labels, out.progress, method)
            return await self._refuse(context, out, labels)
        trace.end(checks)
        seen.append(out)
        facts = out.facts
        labels.client = facts.client or UNKNOWN
        labels.known_service(out.remote.services[out.header.service], method)
        # checked against the configuration: safe to name in spans
        trace.describe(
            client=str(out.header.client), service=str(out.header.service), method=method
        )
        message_id = out.header.message_id
        try:
            if await self.claim_id(metadata, out):
                claims.append(message_id)
            out, link = await self._route(out)
        except GatewayError as err:
            return await self._refuse(context, consumer_refusal(err, out, node.clock()), labels)
        seen.append(out)
        try:
            with trace.step("log commit"):
                await node.log.append(out.record.fields(), out.evidence)
        except GatewayError as err:
            return await self._abort(context, err, message_id, labels)
        failpoint("consumer-logged", message_id)

        remaining = context.time_remaining()
        wait = min(remaining if remaining is not None else 1e9, node.limits.deadline_seconds)
        try:
            check_provider_not_revoked(link.peer_staple, out, node, node.clock())
            sent = time.perf_counter()
            with trace.step("provider leg", SpanKind.CLIENT) as leg:
                frame = await link.exchange(
                    signed_envelope(out.envelope),
                    wait,
                    trace.traceparent(leg),
                )
            answered_in = time.perf_counter() - sent
            self.choice.answered(out.provider, answered_in)
            if self.metrics is not None:
                self.metrics.provider_seconds.observe(answered_in)
            if frame.HasField("refusal"):
                raise provider_refusal(frame.refusal.code, frame.refusal.message)
            with trace.step("response checks"):
                incoming = accept_response(
                    envelope_of(frame.response) if frame.HasField("response") else None,
                    out,
                    link.peer_staple,
                    node,
                    node.clock(),
                )
        except GatewayError as err:
            if err.code is Code.PROVIDER_UNAVAILABLE:
                self.choice.unreachable(out.provider)
            return await self._refuse(context, consumer_refusal(err, out, node.clock()), labels)

        try:
            with trace.step("log commit"):
                await node.log.append(incoming.record.fields(), incoming.evidence)
        except GatewayError as err:
            return await self._abort(context, err, message_id, labels)
        response = incoming.response
        trailing = (
            (ID_KEY, message_id),
            ("gateway-total-us", str(int((time.perf_counter() - started) * 1e6))),
            ("gateway-provider-us", str(frame.provider_micros)),
            ("gateway-backend-us", str(frame.backend_micros)),
        )
        trace.outcome(incoming.record.status)
        if response.grpc_status != 0:
            labels.code = backend_code(response.grpc_status)
            await context.abort(
                grpc.StatusCode[_STATUS_NAMES[response.grpc_status]],
                bound_message(response.grpc_message),
                trailing_metadata=trailing,
            )
        context.set_trailing_metadata(trailing)
        return bytes(incoming.envelope.body)

    async def claim_id(self, metadata: Mapping[str, str], out: Outgoing) -> bool:
        """A message id the caller chose names one exchange of this server's log: refused
        (`replayed_message`) when a call under way holds it, or when the log holds a
        request under it from another client or to another service; claimed for this call
        otherwise (True: released at its end, when its request is in the log or it was
        refused). Without this, a backend of one subsystem could log a request under
        another's id and make that exchange's evidence ambiguous (found by a red-team
        review). The same client and service may try again under an id whose request the
        provider refused, as the README promises (the provider refuses an id it accepted).
        An id this server generated needs no check (False)."""
        if not metadata.get("gateway-id"):
            return False
        message_id = out.header.message_id
        used = message_id in self.claimed_ids
        if not used:
            self.claimed_ids.add(message_id)  # before the look-up: a twin waits for nothing
            try:
                logged = await self.node.log.exchanges_under(message_id, "consumer")
            except BaseException:
                self.claimed_ids.discard(message_id)
                raise
            used = bool(logged - {(str(out.header.client), str(out.header.service))})
            if used:
                self.claimed_ids.discard(message_id)
        if used:
            raise TrustError(
                f"message id {message_id} names another exchange on this server: send "
                "each call with a new id",
                code=Code.REPLAYED_MESSAGE,
            )
        return True

    async def _route(self, out: Outgoing) -> tuple[Outgoing, PeerLink]:
        """The server hosting the service that has answered fastest lately and can be
        reached now, with its link. A server that cannot be reached is skipped before
        anything is sent to it, so that no request reaches two backends."""
        for provider in self.choice.order(out.providers):
            link = self.peers.link(provider, out.remote)
            if await link.reachable(CONNECT_SECONDS):
                return out.via(provider), link
            self.choice.unreachable(provider)
            log.warning("provider_unreachable", provider=str(provider.id), address=provider.address)
        servers = ", ".join(str(p.id) for p in out.providers)
        raise UnavailableError(
            f"no security server hosting {out.header.service} can be reached ({servers}); "
            "retry later or ask its operator",
            code=Code.PROVIDER_UNAVAILABLE,
        )

    @staticmethod
    def _tls_names(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, ...]:
        """The common names of the caller's TLS certificate (from the local CA), every one
        of them, as the certificate holds them (see `certificate_common_names`)."""
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        return certificate_common_names(bytes(pems[0])) if pems else ()

    @staticmethod
    def _label(labels: CallLabels, progress: Progress, method: str) -> None:
        if progress.client is not None:
            labels.client = progress.client
        if progress.service is not None:
            labels.known_service(progress.service, method)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        refusal: Refusal,
        labels: CallLabels,
    ) -> bytes:
        err, facts = refusal.error, refusal.record.facts
        message_id = facts.message_id or ""
        if err.code in COUNTED and self.refusal_limit is not None:
            source = peer_host(context.peer())
            if self.refusal_limit.take(source):
                self.refusals.add(source, err.code.value, self.node.clock())
                return await self._abort(context, err, message_id, labels)
        log.info("call_refused", code=err.code.value, message_id=message_id, client=facts.client)
        await self.node.log_failure(refusal.record.fields())
        return await self._abort(context, err, message_id, labels)

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


@functools.lru_cache(maxsize=1024)
def certificate_common_names(pem: bytes) -> tuple[str, ...]:
    """Every common name in a certificate's subject, whole. gRPC's own `x509_common_name`
    gives only the first, cut at a NUL byte: a certificate naming `clinics` then `billing`
    (which some tools read as `billing`), or `clinics` followed by a NUL and `.billing`,
    passed for `clinics`. The caller's check wants exactly one name, equal to the client it
    calls as. A certificate that cannot be read has none."""
    try:
        subject = x509.load_pem_x509_certificate(pem).subject
        attributes = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ()
    return tuple(str(a.value) for a in attributes)
