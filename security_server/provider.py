"""Provider endpoint: the mutual-TLS side that peer security servers call.

For every stream it checks that the TLS peer's certificate is the authentication
certificate registered for a security server in the global configuration; for every
request on it, that the peer is a server of the client's member, that the envelope is
well formed, signed by the client member's signing certificate from a trusted CA, fresh
and not replayed, that the OCSP answers stapled for the peer's authentication certificate
(to the stream) and for the signing certificate (to the envelope) are fresh and "good",
that the service is provided here, that an agreement in force covers
(client, service, purpose), and that the call is within that agreement's rate limit
(counted here only: the provider is the authority, and the consumer side does not count,
so no call is counted twice). Only then is the request logged durably and passed to the
backend; the backend's answer is signed, logged and returned. Every refusal is logged
and answered with a stable code.

What a peer can make this endpoint hold is bounded: at most `limits.max_streams_per_peer`
streams per peer server; on each, at most `limits.max_frames_per_stream` requests in
progress or answered and not yet taken (past it the stream is not read, and HTTP/2 flow
control makes the peer wait); and the call slots are shared fairly among peers
(`PeerSlots`). A refused frame's record keeps a bounded prefix of what the peer sent.

The peer, its registered server, the signed sender, the client and the signing
certificate's CA all belong to the one instance whose configuration registers that
server: a federated instance never vouches for a member of another. A refusal record keeps
the client and service the frame names; until the envelope's signature is verified as
the client member's, they are stored as unverified claims (`claimed:...`, see
`records.claimed`), so that no member-scoped auditor takes them for that member's own.
A peer whose certificate is unknown but whose certificate names an instance our
configuration lists as ended is answered `federation_ended`.

With tracing on (`[tracing]`), each request frame has a span ("provider call"), child of the
frame's `traceparent` when that is well formed (else the root of a new trace), with spans
for its checks, its log commits and the backend call; the backend call's `traceparent`
goes to the backend in gRPC metadata. The frame's `traceparent` is not signed and decides
nothing: it is only ever a parent id (see `gateway_ops.tracing`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import structlog
from opentelemetry.trace import SpanKind

from gateway.audit import Role
from gateway.errors import Code, GatewayError, UnavailableError, bound_message
from gateway.exchange import (
    Accepted,
    Claims,
    Peer,
    Refusal,
    accept_request,
    answer,
    backend_failure,
    refusal_record,
    refuse_accepted,
    registered_peer,
)
from gateway.fair_share import FairShare
from gateway.v1 import exchange_pb2 as pb
from gateway_ops.failpoints import failpoint
from gateway_ops.tracing import OFF, TRACEPARENT, CallTrace, Tracing, current_call
from security_server.metrics import CallLabels, ServerMetrics, backend_code
from security_server.node import Node
from security_server.peers import FrameBatcher, envelope_of, peer_certificate, signed_envelope
from security_server.status import abort
from security_server.streams import ProviderStreams

log = structlog.get_logger("security_server.provider")

# how long a refused peer's stream is kept open for its first frames (to record who it
# claims to call as); a consumer security server sends them as soon as it opens a stream
CLAIMS_WAIT_SECONDS = 2.0

# put in a stream's answer queue when the server starts draining: sent as `Frames.draining`
DRAIN = pb.Frame()


class PeerSlots:
    """The provider's call slots (`limits.max_concurrent_calls`), shared fairly among peer
    servers (`gateway.fair_share`): a call over its peer's share waits for a slot; its stream
    is not read meanwhile, so the peer is slowed down, never refused."""

    def __init__(self, capacity: int, per_peer: int) -> None:
        self.share: FairShare[tuple[str, asyncio.Future[None]]] = FairShare(capacity, per_peer)

    async def acquire(self, peer: str) -> None:
        if self.share.try_acquire(peer):  # the usual case, without a future
            return
        ticket = (peer, asyncio.get_running_loop().create_future())
        if self.share.acquire(peer, ticket):
            return
        try:
            await ticket[1]
        except asyncio.CancelledError:
            if ticket[1].done() and not ticket[1].cancelled():
                self.release(peer)  # granted just as we gave up
            else:  # still waiting (or its grant already gave the slot back): withdraw
                self._start(self.share.cancel(peer, ticket))
            raise

    def release(self, peer: str) -> None:
        self._start(self.share.release(peer))

    def _start(self, granted: list[tuple[str, asyncio.Future[None]]]) -> None:
        for peer, future in granted:
            if future.done():  # its waiter gave up: the slot goes back at once
                self.release(peer)
            else:
                future.set_result(None)


class BackendClient:
    """Plain gRPC calls to the provider's backends, forwarding opaque bytes."""

    def __init__(
        self,
        addresses: dict[str, str],
        max_bytes: int,
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.addresses = addresses
        self.max_bytes = max_bytes
        self.options = tuple(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._methods: dict[tuple[str, str], Any] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_send_message_length", self.max_bytes),
                    ("grpc.max_receive_message_length", self.max_bytes),
                    *self.options,
                ],
            )
            self._channels[address] = channel
        return channel

    def _method(self, address: str, method: str) -> Any:
        key = (address, method)
        callable_ = self._methods.get(key)
        if callable_ is None:
            callable_ = self._channel(address).unary_unary(method, None, None)
            if len(self._methods) < 10_000:
                self._methods[key] = callable_
        return callable_

    async def call(
        self, service: str, method: str, body: bytes, wait_seconds: float, traceparent: str = ""
    ) -> tuple[int, str, bytes]:
        """(gRPC status number, message, response bytes) of the backend's answer;
        `traceparent`, when given, goes to the backend in metadata."""
        address = self.addresses[service]
        metadata = ((TRACEPARENT, traceparent),) if traceparent else None
        try:
            answer = await self._method(address, method)(
                body, timeout=wait_seconds, metadata=metadata
            )
            return 0, "", bytes(answer)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(
                    f"the provider's backend for {service} is unavailable; retry later",
                    code=Code.BACKEND_UNAVAILABLE,
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise GatewayError(
                    f"the provider's backend for {service} did not answer within the deadline",
                    code=Code.DEADLINE_EXCEEDED,
                ) from None
            return int(code.value[0]), str(exc.details() or ""), b""

    def open_stream(
        self, service: str, method: str, wait_seconds: float, traceparent: str = ""
    ) -> Any:
        """A streaming call to the backend of `service` (any kind: on the wire each is a
        stream of messages each way), forwarding opaque bytes; `traceparent`, when given,
        goes to the backend in metadata."""
        channel = self._channel(self.addresses[service])
        metadata = ((TRACEPARENT, traceparent),) if traceparent else None
        return channel.stream_stream(method, None, None)(
            None, timeout=wait_seconds, metadata=metadata
        )

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


class ProviderService:
    def __init__(
        self,
        node: Node,
        backends: BackendClient,
        metrics: ServerMetrics | None = None,
        tracing: Tracing = OFF,
    ) -> None:
        self.node = node
        self.backends = backends
        self.metrics = metrics
        self.tracing = tracing
        self.in_flight = 0
        self.slots = PeerSlots(node.limits.max_concurrent_calls, node.limits.max_calls_per_peer)
        # exchange streams open per peer server (limits.max_streams_per_peer)
        self.streams: dict[str, int] = {}
        # the answer queues of the open streams, and whether the server is draining
        self._outs: set[asyncio.Queue[pb.Frame | None]] = set()
        self.draining = False
        self.stream_calls = ProviderStreams(self)

    def drain(self) -> None:
        """The server is stopping: tell every peer on every open stream (`Frames.draining`)
        so that it sends its next calls elsewhere; the frames read meanwhile are still
        answered, until the drain deadline."""
        self.draining = True
        for out in self._outs:
            out.put_nowait(DRAIN)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "gateway.v1.Exchange",
            {
                "Exchange": grpc.stream_stream_rpc_method_handler(
                    self.exchange,
                    request_deserializer=pb.Frames.FromString,
                    response_serializer=pb.Frames.SerializeToString,
                ),
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.stream_calls.stream,
                    request_deserializer=pb.StreamMessage.FromString,
                    response_serializer=pb.StreamMessage.SerializeToString,
                ),
            },
        )

    async def exchange(
        self, messages: AsyncIterator[pb.Frames], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Frames]:
        node = self.node
        certificate, fingerprint = peer_certificate(context)
        stream = Peer(certificate, fingerprint)
        now = node.clock()
        try:
            _, peer = registered_peer(node.federated, stream, now)
            peer_key = str(peer.id)
            open_streams = self.streams.get(peer_key, 0)
            if open_streams >= node.limits.max_streams_per_peer:
                raise GatewayError(
                    f"security server {peer_key} has {open_streams} exchange streams open "
                    "here, the most allowed (limits.max_streams_per_peer); one stream "
                    "carries many calls at once: reuse it",
                    code=Code.OVERLOADED,
                )
        except GatewayError as err:
            log.warning(
                "peer_refused",
                code=err.code.value,
                peer_certificate=fingerprint,
                peer=context.peer(),
            )
            # who the peer claims to call as, from its first frame (never trusted)
            claims = await self._first_claims(messages)
            await node.log_failure(
                refusal_record(err, Role.PROVIDER, claims.facts(stream.name), now).fields()
            )
            await abort(context, err.code, err.message, None)
            return
        log.info("peer_stream_opened", peer=peer_key)
        out: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        # Backpressure: a frame is read only when the stream has a credit. A credit is held
        # from reading a frame until its answer is handed to gRPC, so the requests in
        # progress plus the answers the peer has not taken stay under
        # `limits.max_frames_per_stream`; past it this stream is not read, and HTTP/2 flow
        # control stops the peer. A call slot (fair share among peers) is held while the
        # call runs. Neither drops a frame: they only make the peer wait.
        credits = asyncio.Semaphore(node.limits.max_frames_per_stream)
        # when the peer last sent a stream message, and its frames not yet being handled
        last_read, waiting = [time.monotonic()], [0]

        def release_slot(_: asyncio.Task[None]) -> None:
            self.slots.release(peer_key)

        async def pump() -> None:
            try:
                async for message in messages:
                    last_read[0] = time.monotonic()
                    waiting[0] = len(message.frames)
                    if message.ocsp_staple:
                        stream.staple = message.ocsp_staple
                    for frame in message.frames:
                        await credits.acquire()
                        await self.slots.acquire(peer_key)
                        task = asyncio.create_task(self._handle(frame, stream, out))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        task.add_done_callback(release_slot)
                        waiting[0] -= 1
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                out.put_nowait(None)

        self.streams[peer_key] = open_streams + 1
        self._outs.add(out)
        if self.draining:
            out.put_nowait(DRAIN)
        pumping = asyncio.create_task(pump())
        ending: asyncio.Task[None] | None = None

        async def end_when_idle() -> None:
            # draining: the stream ends once nothing is in progress on it and the peer has
            # sent nothing for a second (it sends its new calls elsewhere meanwhile)
            while True:
                await asyncio.sleep(0.25)
                idle = not tasks and not waiting[0] and out.empty()
                if idle and time.monotonic() - last_read[0] > 1.0:
                    out.put_nowait(None)
                    return

        stapled = b""
        try:
            # every answer ready at the moment goes out in one stream message, with the OCSP
            # answer about our authentication certificate when the peer has not had it yet,
            # and the drain notice once the server is stopping
            batches = FrameBatcher(out, node.limits.max_message_bytes)
            while (batch := await batches.next()) is not None:
                frames = [f for f in batch if f is not DRAIN]
                message = pb.Frames(frames=frames, draining=len(frames) != len(batch))
                if message.draining and ending is None:
                    ending = asyncio.create_task(end_when_idle())
                staple = node.own_status.staple(node.auth_sha256)
                if staple != stapled:
                    stapled = staple
                    message.ocsp_staple = staple
                yield message
                # gRPC has taken these answers: their credits let the pump read on
                for _ in frames:
                    credits.release()
        finally:
            self._outs.discard(out)
            pumping.cancel()
            if ending is not None:
                ending.cancel()
            if self.streams[peer_key] > 1:
                self.streams[peer_key] -= 1
            else:
                del self.streams[peer_key]

    @staticmethod
    async def _first_claims(messages: AsyncIterator[pb.Frames]) -> Claims:
        """What the first request frame of a refused stream names (nothing when none comes
        in time, or it cannot be read: the refusal is recorded all the same)."""
        try:
            message = await asyncio.wait_for(anext(aiter(messages)), CLAIMS_WAIT_SECONDS)
        except Exception:  # no frame, a dead stream, or bytes gRPC cannot decode as Frames
            return Claims()
        for frame in message.frames:
            if frame.HasField("request"):
                return Claims.read(frame.request.header)
        return Claims()

    async def _handle(
        self, frame: pb.Frame, stream: Peer, out: asyncio.Queue[pb.Frame | None]
    ) -> None:
        started = time.perf_counter()
        labels = CallLabels()
        trace = self.tracing.start_call("provider call", frame.traceparent)
        self.in_flight += 1
        # the request, once accepted: a bug past that point is recorded against it
        seen: list[Accepted] = []
        try:
            answer = await self._process(frame, stream, started, labels, trace, seen)
        except Exception:  # never let one message take the stream down
            log.exception("provider_internal_error")
            trace.outcome(Code.INTERNAL.value)
            labels.code = Code.INTERNAL.value
            err = GatewayError("internal error in the provider's server", code=Code.INTERNAL)
            now = self.node.clock()
            if seen:
                record = refuse_accepted(seen[0], err, now).record
            else:  # who the frame claims to be from (never trusted)
                claims = (
                    Claims.read(frame.request.header) if frame.HasField("request") else Claims()
                )
                record = refusal_record(err, Role.PROVIDER, claims.facts(stream.name), now)
            await self.node.log_failure(record.fields())
            answer = self._refusal(frame, err, record.facts.message_id, started, 0)
        finally:
            self.in_flight -= 1
            trace.finish()
        out.put_nowait(answer)
        if self.metrics is not None:
            if answer.HasField("refusal"):
                labels.code = answer.refusal.code  # one of our own codes: a bounded set
            self.metrics.call("provider", labels, time.perf_counter() - started)

    async def _process(
        self,
        frame: pb.Frame,
        stream: Peer,
        started: float,
        labels: CallLabels,
        trace: CallTrace,
        seen: list[Accepted],
    ) -> pb.Frame:
        node = self.node
        env = frame.request
        now = node.clock()
        checks = trace.start("provider checks")
        accepted = accept_request(
            envelope_of(env) if frame.HasField("request") else None,
            stream,
            node,
            self.backends.addresses,
            now,
        )
        if isinstance(accepted, Accepted) and node.replay_ledger is not None:
            try:
                # last: only a request about to be accepted claims its id for every replica
                await node.replay_ledger.claim(accepted.header.message_id, now)
            except GatewayError as err:
                accepted = refuse_accepted(accepted, err, node.clock())
        if isinstance(accepted, Refusal):
            trace.end(checks, accepted.error.code.value)
            if accepted.progress.service is not None:
                labels.known_service(accepted.progress.service, accepted.record.facts.method or "")
            if accepted.progress.client is not None:
                labels.client = accepted.progress.client
            return await self._refuse(frame, accepted, started)
        trace.end(checks)
        header = accepted.header
        labels.known_service(accepted.config.services[header.service], header.method)
        labels.client = str(header.client)
        # verified and checked against the configuration: safe to name in spans
        trace.describe(
            client=str(header.client),
            service=str(header.service),
            method=header.method,
            message_id=header.message_id,
        )
        try:
            with trace.step("log commit"):
                await node.log.append(accepted.record.fields(), accepted.evidence)
        except GatewayError as err:
            return self._refusal(frame, err, header.message_id, started, 0)
        seen.append(accepted)
        failpoint("provider-logged", header.message_id)

        wait = min(
            frame.timeout_ms / 1000 if frame.timeout_ms else 1e9, node.limits.deadline_seconds
        )
        backend_started = time.perf_counter()
        try:
            with trace.step("backend call", SpanKind.CLIENT) as call:
                status, message, body = await self.backends.call(
                    str(header.service), header.method, env.body, wait, trace.traceparent(call)
                )
        except GatewayError as err:
            backend_micros = int((time.perf_counter() - backend_started) * 1e6)
            await node.log_failure(backend_failure(accepted, err, now).fields())
            return self._refusal(frame, err, header.message_id, started, backend_micros)
        backend_micros = int((time.perf_counter() - backend_started) * 1e6)
        labels.code = backend_code(status)
        if self.metrics is not None:
            self.metrics.backend_seconds.observe(backend_micros / 1e6)

        signed = answer(accepted, status, message, body, node, node.clock())
        try:
            with trace.step("log commit"):
                await node.log.append(signed.record.fields(), signed.evidence)
        except GatewayError as err:
            return self._refusal(frame, err, header.message_id, started, backend_micros)
        trace.outcome(signed.record.status)
        return pb.Frame(
            correlation_id=frame.correlation_id,
            response=signed_envelope(signed.envelope),
            provider_micros=int((time.perf_counter() - started) * 1e6),
            backend_micros=backend_micros,
        )

    async def _refuse(self, frame: pb.Frame, refusal: Refusal, started: float) -> pb.Frame:
        facts = refusal.record.facts
        log.warning(
            "request_refused",
            code=refusal.error.code.value,
            peer=facts.peer,
            message_id=facts.message_id,
        )
        await self.node.log_failure(refusal.record.fields())
        return self._refusal(frame, refusal.error, facts.message_id, started, 0)

    @staticmethod
    def _refusal(
        frame: pb.Frame,
        err: GatewayError,
        message_id: str | None,
        started: float,
        backend_micros: int,
    ) -> pb.Frame:
        current_call().outcome(err.code.value)
        return pb.Frame(
            correlation_id=frame.correlation_id,
            refusal=pb.Refusal(
                code=err.code.value, message=bound_message(err.message), message_id=message_id or ""
            ),
            provider_micros=int((time.perf_counter() - started) * 1e6),
            backend_micros=backend_micros,
        )
