"""Streaming calls through both security servers (server, client and bidirectional).

The consumer endpoint takes a call as a stream when the catalogue lists its method as
streaming (`Service.streams`); the agency's stub needs nothing else. The call's signed
header goes through the same decisions as a unary call (`gateway.exchange`), its record is
made durable, and then it opens its own HTTP/2 stream to the provider server
(`Exchange.Stream`), which checks it in turn, makes its own record durable and opens the
backend call. Messages are then forwarded as they come, one at a time in each direction:
a server reads the next message only once the previous one was handed on, so a slow
reader slows the writer through both servers (HTTP/2 flow control) and neither server
holds more than one message per direction of a stream beyond gRPC's HTTP/2 windows.

Each message extends its direction's hash chain and is checked by the receiving server
(`gateway.streams`); each side signs and logs its direction's close. Deadlines and
cancellation travel with the gRPC calls in both directions. While a stream is open, both
servers check its agreement again every `limits.stream_check_seconds`: a suspended or
revoked agreement ends it with `agreement_suspended` or `agreement_revoked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from opentelemetry.trace import SpanKind

from gateway.audit import Role
from gateway.configuration import GlobalConfiguration
from gateway.envelope import RequestHeader, StreamClose
from gateway.errors import Code, GatewayError, TrustError, UnavailableError, bound_message
from gateway.exchange import (
    Accepted,
    Call,
    Evidence,
    Outgoing,
    Peer,
    Refusal,
    accept_request,
    check_provider_not_revoked,
    check_still_agreed,
    consumer_refusal,
    provider_refusal,
    refusal_record,
    refuse_accepted,
    registered_peer,
    start_call,
)
from gateway.identifiers import SecurityServerId
from gateway.records import Facts, LogRecord
from gateway.signing import EcdsaSigner, certificate_sha256
from gateway.streams import (
    KEPT_LINKS,
    REQUEST,
    RESPONSE,
    Chain,
    SignedClose,
    check_close,
    close_record,
    incomplete,
    sign_close,
    too_large,
    too_long,
    too_many,
)
from gateway.v1 import exchange_pb2 as pb
from gateway_ops.tracing import OK, CallTrace, traceparent_of
from security_server.call_writes import PeerGone, write
from security_server.metrics import CallLabels, backend_code
from security_server.node import Node
from security_server.peers import envelope_of, error_from_rpc, peer_certificate, signed_envelope
from security_server.settings import LimitsSection
from security_server.status import ID_KEY, abort

if TYPE_CHECKING:
    from security_server.consumer import ConsumerService
    from security_server.provider import ProviderService

log = structlog.get_logger("security_server.streams")

STREAM_METHOD = "/gateway.v1.Exchange/Stream"
# how long a provider waits for a stream's `open`, and, once its backend has ended, for
# the consumer's close of the request direction (a server-streaming call's arrives at once)
OPEN_WAIT_SECONDS = 5.0
CLOSE_WAIT_SECONDS = 2.0
# a server-streaming call's request close follows its one message at once: waited for
# longer, as a consumer under load may be slow to send it
SERVER_CLOSE_WAIT_SECONDS = 10.0
# how long a consumer goes on with a stream whose provider's last OCSP answer (held from an
# earlier exchange) is not fresh, waiting for the fresh one the provider sends first
STAPLE_WAIT_SECONDS = 10.0
# an OCSP answer is a few kilobytes (with its responder's certificate); a staple sent alone
# is a newer answer its sender fetched (every ocsp.refresh_seconds, its own setting): a
# peer may send STAPLES_AHEAD of them plus one per STAPLE_ALONE_SECONDS the stream has
# lasted, a rate no setting of either side exceeds in practice
MAX_STAPLE_BYTES = 64 * 1024
STAPLES_AHEAD = 8
STAPLE_ALONE_SECONDS = 0.5


# what writing to (or ending) a gRPC call raises once the call has ended
ENDED = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, PeerGone)


class OpenStreams:
    """Streaming calls open per key (a client subsystem), bounded by `limit`, and in all
    (with those still opening on a provider), bounded by `total`."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.total = 0
        # provider: streams whose open has not arrived yet
        self.opening = 0

    def check_total(self, total: int) -> None:
        if self.total + self.opening >= total:
            raise GatewayError(
                f"this security server has {self.total + self.opening} streaming calls open, "
                "the most allowed (limits.max_streams); retry later",
                code=Code.TOO_MANY_STREAMS,
            )

    def take(self, key: str, limit: int, total: int) -> None:
        held = self.open.get(key, 0)
        self.check_total(total)
        if held >= limit:
            raise GatewayError(
                f"{key} has {held} streaming calls open here, the most allowed "
                "(limits.max_streams_per_client); end one before opening another",
                code=Code.TOO_MANY_STREAMS,
            )
        self.open[key] = held + 1
        self.total += 1

    def give(self, key: str) -> None:
        held = self.open.get(key, 0)
        if held > 1:
            self.open[key] = held - 1
        else:
            self.open.pop(key, None)
        if held:
            self.total -= 1


async def _watch(
    check: Callable[[], None],
    every: float,
    started: float,
    limit: float,
    push: Callable[[], None],
) -> GatewayError:
    """Wait until `check` raises or the stream outlives `limit` seconds; the error. Every
    `every` seconds, from the start, `push` has what the peer must have again (our newest
    OCSP answer) sent, without waiting for it: a peer that stops reading blocks writes, and
    must not stop the checks."""
    while True:
        push()
        await asyncio.sleep(every)
        if time.monotonic() - started > limit:
            return too_long(time.monotonic() - started, limit)
        try:
            check()
        except GatewayError as err:
            return err


async def _first(*jobs: Awaitable[Any], outlet: Outlet) -> None:
    """Run `jobs` until one ends; settle `outlet` (no write is cut off), cancel the others
    and wait for them; raise what the ended one raised. When several end at once, a normal
    end wins (a stream whose closes were both checked is not then refused by a watcher that
    fired in the same instant)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await outlet.settle(CLOSE_WAIT_SECONDS)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ended = [t for t in tasks if t in done and not t.cancelled()]
    if any(t.exception() is None for t in ended):
        return
    for task in ended:
        task.result()


class Staples:
    """The OCSP answer about our TLS certificate that a stream's peer holds. It goes with
    our first message on the stream, and again, alone in a message (`ocsp_staple` with no
    `kind`), whenever a newer one is fetched: each side checks the other's every
    `limits.stream_check_seconds`, so a stream outliving an answer's freshness, or a
    certificate revoked meanwhile, ends as a new call would be refused."""

    __slots__ = ("_own", "_sending", "_sent", "_write")

    def __init__(self, own: Callable[[], bytes], write: Callable[[bytes], Awaitable[None]]) -> None:
        self._own = own
        self._write = write  # sends a staple alone; never raises for a call that ended
        self._sent = b""
        self._sending: asyncio.Task[None] | None = None

    def due(self) -> bytes:
        """Our answer, to go with a message being sent, when the peer has not been sent it
        yet on this stream (b"" else); once returned it counts as sent."""
        staple = self._own()
        if not staple or staple == self._sent:
            return b""
        self._sent = staple
        return staple

    def push(self) -> None:
        """Send our answer alone when it is due, in the background, one at a time."""
        if self._sending is not None and not self._sending.done():
            return  # the last one is still under way (the peer is not reading)
        staple = self.due()
        if staple:
            self._sending = asyncio.ensure_future(self._write(staple))

    def cancel(self) -> None:
        if self._sending is not None:
            self._sending.cancel()


class Outlet:
    """One side's writes, one at a time, never cut off by the stream's own ending: before
    the jobs of a stream are cancelled, `settle` stops further writes and waits for the one
    under way, so that a refusal written next does not meet a half-done write."""

    __slots__ = ("_broken", "_idle", "_turn", "_write", "stopped")

    def __init__(self, write: Callable[[Any], Awaitable[None]]) -> None:
        self._write = write
        self._idle = asyncio.Event()
        self._idle.set()
        # a write was cancelled under way: gRPC's send may still be pending, and another
        # write would fail (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS); `settle` then says so
        self._broken = False
        # the stream's messages and the staples pushed beside them take turns
        self._turn = asyncio.Lock()
        self.stopped = False

    async def write(self, message: Any) -> None:
        """Write `message`; `PeerGone` when the call has ended under it (grpc raises errors
        of its own, some private, for a write to a call that has ended), or the stream is
        ending (`settle`)."""
        async with self._turn:
            if self.stopped:
                raise PeerGone("the stream is ending")
            self._idle.clear()
            try:
                await self._write(message)
            except asyncio.CancelledError:
                self._broken = True
                raise
            except (grpc.aio.BaseError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                raise PeerGone(str(exc)) from exc
            finally:
                if not self._broken:
                    self._idle.set()

    async def settle(self, timeout: float) -> bool:
        """Take no more writes, and wait up to `timeout` seconds for the one under way;
        whether none is left."""
        self.stopped = True
        if self._broken:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    async def last(self, message: Any) -> None:
        """Write the stream's last message (a refusal), once settled."""
        await self._write(message)


class StreamError(Exception):
    """Ends a stream: `error` goes to the caller (and the log) as a refusal."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


def outgoing(body: bytes, sent: Chain, limits: LimitsSection) -> pb.StreamMessage:
    """The stream message carrying the next message a server sends in `sent`'s direction,
    within the limits of a message's size and a direction's count."""
    if len(body) > limits.max_message_bytes:
        raise StreamError(too_large(sent.direction, len(body), limits.max_message_bytes))
    if sent.count >= limits.max_stream_messages:
        raise StreamError(too_many(sent.direction, sent.count + 1, limits.max_stream_messages))
    seq, link = sent.extend(body)
    return pb.StreamMessage(data=pb.StreamData(seq=seq, body=body, link=link))


def incoming(data: pb.StreamData, received: Chain, limits: LimitsSection) -> bytes:
    """A message received in `received`'s direction, checked against the limits and the
    chain (`Chain.accept`); its bytes, to forward."""
    if len(data.body) > limits.max_message_bytes:
        raise StreamError(too_large(received.direction, len(data.body), limits.max_message_bytes))
    if data.seq > limits.max_stream_messages:
        raise StreamError(too_many(received.direction, data.seq, limits.max_stream_messages))
    received.accept(data.seq, data.body, data.link)
    return data.body


class PeerStaples:
    """The staples a peer sends on one stream: each within MAX_STAPLE_BYTES, and those sent
    alone within their budget (STAPLES_AHEAD); the latest is what the watcher checks."""

    __slots__ = ("_alone", "_started", "latest")

    def __init__(self, latest: bytes) -> None:
        self.latest = latest
        self._started = time.monotonic()
        self._alone = 0

    def take(self, message: pb.StreamMessage) -> bool:
        """Keep a message's staple; whether the message was a staple alone."""
        staple = message.ocsp_staple
        if staple:
            if len(staple) > MAX_STAPLE_BYTES:
                raise StreamError(
                    TrustError(
                        f"a stapled OCSP answer of {len(staple)} bytes, more than the "
                        f"{MAX_STAPLE_BYTES} accepted",
                        code=Code.CERTIFICATE_STATUS_INVALID,
                    )
                )
            self.latest = staple
        if message.WhichOneof("kind") is not None or not staple:
            return False
        self._alone += 1
        allowed = STAPLES_AHEAD + (time.monotonic() - self._started) / STAPLE_ALONE_SECONDS
        if self._alone > allowed:
            raise StreamError(
                TrustError(
                    f"{self._alone} OCSP answers sent alone in "
                    f"{time.monotonic() - self._started:.1f} s: more than a peer fetches",
                    code=Code.MALFORMED_ENVELOPE,
                )
            )
        return True


# ---- consumer ----------------------------------------------------------------------------


class ConsumerStreams:
    """The consumer endpoint's streaming calls."""

    def __init__(self, service: ConsumerService) -> None:
        self.service = service
        self.node = service.node
        self.clients = OpenStreams()

    def handler(self, method: str, kind: str) -> Any:
        async def handle(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self.call(method, kind, requests, context)

        return grpc.stream_stream_rpc_method_handler(handle)

    async def call(
        self,
        method: str,
        kind: str,
        requests: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        service = self.service
        trace = service.tracing.start_call(
            "consumer stream", traceparent_of(context.invocation_metadata())
        )
        try:
            await self._open(method, kind, requests, context, trace)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # a bug before the stream's own backstop: a clear refusal
            log.exception("stream_failed", code=Code.INTERNAL.value)
            trace.outcome(Code.INTERNAL.value)
            await abort(context, Code.INTERNAL, "internal error in the consumer's server", None)
        finally:
            trace.finish()

    async def _open(
        self,
        method: str,
        kind: str,
        requests: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        trace: CallTrace,
    ) -> None:
        node, service = self.node, self.service
        labels = CallLabels()
        started = time.perf_counter()
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        call = Call(
            method=method,
            metadata=metadata,
            body=b"",
            in_flight=service.in_flight + 1,
            generated_id=uuid.uuid4().hex,
            tls_names=service._tls_names(context) if service.authenticate_clients else None,
            stream=kind,
        )
        out = start_call(call, node, node.clock())
        if isinstance(out, Refusal):
            trace.outcome(out.error.code.value)
            await service._refuse(context, out, labels)
            return
        # checked against the configuration: safe to name in spans
        trace.describe(
            client=str(out.header.client),
            service=str(out.header.service),
            method=method,
            message_id=out.header.message_id,
        )
        client = str(out.header.client)
        labels.client = client
        labels.known_service(out.remote.services[out.header.service], method)
        try:
            self.clients.take(client, node.limits.max_streams_per_client, node.limits.max_streams)
        except GatewayError as err:
            await service._refuse(context, consumer_refusal(err, out, node.clock()), labels)
            return
        try:
            claimed = await service.claim_id(metadata, out)
        except GatewayError as err:
            self.clients.give(client)
            await service._refuse(context, consumer_refusal(err, out, node.clock()), labels)
            return
        try:
            await self._call(out, requests, context, labels, trace)
        finally:
            if claimed:
                service.claimed_ids.discard(out.header.message_id)
            trace.outcome(labels.code)
            self.clients.give(client)
            if service.metrics is not None:
                service.metrics.call("consumer", labels, time.perf_counter() - started)

    async def _call(
        self,
        out: Outgoing,
        requests: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        labels: CallLabels,
        trace: CallTrace,
    ) -> None:
        node, service = self.node, self.service
        message_id = out.header.message_id
        try:
            out, link = await service._route(out)
        except GatewayError as err:
            await service._refuse(context, consumer_refusal(err, out, node.clock()), labels)
            return
        try:
            await node.log.append(out.record.fields(), out.evidence)
        except GatewayError as err:
            await service._abort(context, err, message_id, labels)
            return
        limits = node.limits
        remaining = context.time_remaining()
        # the caller's deadline; past limits.max_stream_seconds the watcher ends it first
        wait = min(remaining if remaining is not None else 1e9, limits.max_stream_seconds + 5)
        header_bytes = out.envelope.header
        kept = node.stream_body_bytes
        sent = Chain(REQUEST, header_bytes, keep=KEPT_LINKS, bodies=kept)
        received = Chain(RESPONSE, header_bytes, bodies=kept)
        signer = node.signer_for(out.header.client.member)
        rpc: Any = None
        # the caller's messages have ended, and our close of them is logged and sent
        requests_ended, request_closed = asyncio.Event(), asyncio.Event()
        # the provider's close was checked and logged: the stream has its answer
        answered = asyncio.Event()
        theirs = PeerStaples(link.peer_staple)
        # our writes to the provider: the caller's messages, our close and our staples take
        # turns. Our direction is never half-closed: after our close, newer answers about our
        # certificate still go to the provider, which checks them as long as the stream lasts
        # (a server-streaming call outlives an answer's freshness)
        turn = asyncio.Lock()

        async def write_staple(staple: bytes) -> None:
            async with turn:
                with contextlib.suppress(*ENDED):
                    await write(rpc, pb.StreamMessage(ocsp_staple=staple))

        staples = Staples(link.staple, write_staple)
        to_caller = Outlet(context.write)
        # the provider leg: the provider's spans are its children
        leg = trace.start("provider leg", SpanKind.CLIENT)
        try:
            check_provider_not_revoked(link.peer_staple, out, node, node.clock())
            rpc = link.channel.stream_stream(
                STREAM_METHOD,
                request_serializer=pb.StreamMessage.SerializeToString,
                response_deserializer=pb.StreamMessage.FromString,
            )(None, timeout=wait)
            # the provider's stream may end under the open (its server gone, the deadline
            # spent): what it says is read below, in forward_responses
            with contextlib.suppress(PeerGone):
                await write(
                    rpc,
                    pb.StreamMessage(
                        open=pb.StreamOpen(
                            request=signed_envelope(out.envelope),
                            timeout_ms=int(wait * 1000),
                            traceparent=trace.traceparent(leg).encode(),
                        ),
                        ocsp_staple=staples.due(),
                    ),
                )

            async def to_provider(message: pb.StreamMessage) -> None:
                async with turn:
                    await write(rpc, message)

            async def forward_requests() -> None:
                # past the provider's end of its stream, what it sent says how the call ends
                with contextlib.suppress(*ENDED):
                    await send_requests()
                await asyncio.Future()  # the request direction is done: wait for the answer

            async def send_requests() -> None:
                try:
                    await send_messages()
                finally:
                    request_closed.set()

            async def send_messages() -> None:
                async for body in requests:
                    await to_provider(outgoing(body, sent, limits))
                requests_ended.set()
                now = node.clock()
                signed = sign_close(out.header, header_bytes, sent, signer, node.server_id, now)
                staple = node.own_status.staple(signer.certificate_sha256)
                # our own certificate: its CA is in our instance's configuration
                own = node.config.require(now)
                await _log_own_close(node, signed, signer, staple, sent, out.record, own)
                await to_provider(pb.StreamMessage(close=_close_envelope(signed, signer, staple)))

            async def forward_responses() -> None:
                async for message in rpc:
                    if theirs.take(message):
                        continue  # a newer answer about the provider's certificate: kept
                    which = message.WhichOneof("kind")
                    if which == "data":
                        await to_caller.write(incoming(message.data, received, limits))
                    elif which == "close":
                        ended = await self._closed(
                            out, message.close, sent, received, theirs.latest
                        )
                        answered.set()
                        # our own close, when the caller's messages have ended, is logged
                        # before the call ends
                        if requests_ended.is_set():
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(request_closed.wait(), CLOSE_WAIT_SECONDS)
                        # the last messages reach the caller before the status
                        await to_caller.settle(CLOSE_WAIT_SECONDS)
                        trailing = ((ID_KEY, out.header.message_id),)
                        labels.code = backend_code(ended.grpc_status)
                        if ended.grpc_status != 0:
                            await context.abort(
                                grpc.StatusCode[_STATUS_NAMES[ended.grpc_status]],
                                bound_message(ended.grpc_message),
                                trailing_metadata=trailing,
                            )
                        context.set_trailing_metadata(trailing)
                        return
                    elif which == "refusal":
                        raise provider_refusal(message.refusal.code, message.refusal.message)
                    else:
                        raise TrustError(
                            "the provider sent a stream message that is neither data, a close "
                            "nor a refusal",
                            code=Code.MALFORMED_ENVELOPE,
                        )
                raise incomplete(RESPONSE, "the provider's stream ended")

            await _first(
                forward_requests(),
                forward_responses(),
                self._watch(out, theirs, staples.push),
                outlet=to_caller,
            )
        except StreamError as exc:
            await self._fail(exc.error, out, context, to_caller, labels)
        except GatewayError as err:
            await self._fail(err, out, context, to_caller, labels)
        except grpc.aio.AioRpcError as exc:
            failed = error_from_rpc(exc, out.provider)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                failed = GatewayError(
                    "the stream did not end within its deadline", code=Code.DEADLINE_EXCEEDED
                )
            elif failed.code is Code.PROVIDER_UNAVAILABLE:
                failed = incomplete(RESPONSE, f"the provider's server {out.provider.id} went away")
            await self._fail(failed, out, context, to_caller, labels)
        except asyncio.CancelledError:
            # the caller cancelled (or its deadline passed): the provider's stream is
            # cancelled too, and the record says the stream was not closed (unless both
            # closes were logged)
            if rpc is not None:
                rpc.cancel()
            if answered.is_set():
                raise
            gone = incomplete(REQUEST, "the caller cancelled")
            labels.code = gone.code.value
            await node.log_failure(consumer_refusal(gone, out, node.clock()).record.fields())
            raise
        except grpc.aio.AbortError:
            raise  # the backend's own status, passed to the caller after both closes
        except PeerGone:
            gone = incomplete(RESPONSE, "the caller went away")
            labels.code = gone.code.value
            log.info("stream_ended", code=gone.code.value, message_id=out.header.message_id)
            await node.log_failure(consumer_refusal(gone, out, node.clock()).record.fields())
        except Exception:  # a bug: the stream is recorded as not closed, with what happened
            gone = GatewayError("internal error in the consumer's server", code=Code.INTERNAL)
            labels.code = gone.code.value
            log.exception("stream_failed", code=gone.code.value, message_id=out.header.message_id)
            await node.log_failure(consumer_refusal(gone, out, node.clock()).record.fields())
        finally:
            staples.cancel()
            trace.end(leg, None if labels.code == OK else labels.code)
            if rpc is not None:
                rpc.cancel()

    async def _watch(self, out: Outgoing, theirs: PeerStaples, push: Callable[[], None]) -> None:
        node = self.node
        opened = time.monotonic()

        def check() -> None:
            now = node.clock()
            check_still_agreed(out.header, node, now, consumer=True)
            # the provider's latest answer, as for a new call; at the start, one held from an
            # earlier exchange may be stale, or none held yet: the provider sends a fresh one
            # first (any other fault of an answer ends the stream at once)
            try:
                node.status.peer_server(theirs.latest, out.provider, out.remote, now)
            except TrustError as err:
                waiting = (
                    err.code is Code.CERTIFICATE_STATUS_STALE or not theirs.latest
                ) and time.monotonic() - opened <= STAPLE_WAIT_SECONDS
                if not waiting:
                    raise

        err = await _watch(
            check, node.limits.stream_check_seconds, opened, node.limits.max_stream_seconds, push
        )
        raise StreamError(err)

    async def _closed(
        self,
        out: Outgoing,
        close: pb.SignedEnvelope,
        sent: Chain,
        received: Chain,
        peer_staple: bytes,
    ) -> StreamClose:
        """The provider's close: checked and logged."""
        node = self.node
        now = node.clock()
        node.status.peer_server(peer_staple, out.provider, out.remote, now)
        return await _log_received_close(
            node, close, out.header, out.record, received, out.provider.id, out.remote, sent
        )

    async def _fail(
        self,
        err: GatewayError,
        out: Outgoing,
        context: grpc.aio.ServicerContext[Any, Any],
        to_caller: Outlet,
        labels: CallLabels,
    ) -> None:
        if err.code is Code.PROVIDER_UNAVAILABLE:
            self.service.choice.unreachable(out.provider)
        log.info("stream_ended", code=err.code.value, message_id=out.header.message_id)
        await to_caller.settle(CLOSE_WAIT_SECONDS)
        await self.service._refuse(context, consumer_refusal(err, out, self.node.clock()), labels)


async def _log_own_close(
    node: Node,
    signed: SignedClose,
    signer: EcdsaSigner,
    staple: bytes,
    sent: Chain,
    opened: LogRecord,
    config: GlobalConfiguration,
) -> None:
    """Log the close this server signed of the direction it `sent` (durable before it
    leaves), beside the record of the stream's open."""
    staple_sha, evidence = node.evidence(
        signer.certificate,
        signer.certificate_der,
        signer.certificate_sha256,
        staple,
        b"",
        "",
        config,
    )
    bodies_sha, evidence = _with_bodies(sent, evidence)
    record = close_record(
        opened.role,
        opened.facts,
        signed,
        signer.certificate_sha256,
        staple_sha,
        node.clock(),
        bodies_sha,
    )
    await node.log.append(record.fields(), evidence)


async def _log_received_close(
    node: Node,
    close: pb.SignedEnvelope,
    request: RequestHeader,
    opened: LogRecord,
    received: Chain,
    sender: SecurityServerId,
    config: GlobalConfiguration,
    sent: Chain | None = None,
) -> StreamClose:
    """Check the close the other server signed of the direction this one `received`
    (`gateway.streams.check_close`, and the OCSP answer about its signing certificate),
    and log it; the close."""
    now = node.clock()
    ended = check_close(
        close.header,
        close.signature,
        close.signer_certificate,
        request=request,
        request_header=opened.header or b"",
        received=received,
        sender=sender,
        config=config,
        now=now,
        sent=sent,
    )
    certificate, _ = config.trust.signing_member(close.signer_certificate, now)
    node.status.signer(close.signer_ocsp, certificate, config, now)
    signer_sha = certificate_sha256(close.signer_certificate)
    staple_sha, evidence = node.evidence(
        certificate, close.signer_certificate, signer_sha, close.signer_ocsp, b"", "", config
    )
    bodies_sha, evidence = _with_bodies(received, evidence)
    record = close_record(
        opened.role,
        opened.facts,
        (close.header, ended, close.signature),
        signer_sha,
        staple_sha,
        now,
        bodies_sha,
    )
    await node.log.append(record.fields(), evidence)
    return ended


def _with_bodies(chain: Chain, evidence: Evidence) -> tuple[str | None, Evidence]:
    """The SHA-256 of a direction's kept messages (framed), and the evidence with them; (None,
    the evidence) when the log keeps no messages, or they were over log.stream_body_bytes."""
    bodies = chain.bodies
    if bodies is None:
        return None, evidence
    digest = hashlib.sha256(bodies).hexdigest()
    return digest, {**evidence, digest: ("body", bodies)}


def _close_envelope(signed: SignedClose, signer: Any, staple: bytes) -> pb.SignedEnvelope:
    return pb.SignedEnvelope(
        header=signed.header,
        signature=signed.signature,
        signer_certificate=signer.certificate_der,
        signer_ocsp=staple,
    )


# ---- provider ----------------------------------------------------------------------------


class ProviderStreams:
    """The provider endpoint's streaming calls (`Exchange.Stream`)."""

    def __init__(self, service: ProviderService) -> None:
        self.service = service
        self.node = service.node
        self.clients = OpenStreams()

    async def stream(self, messages: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        node = self.node
        certificate, fingerprint = peer_certificate(context)
        peer = Peer(certificate, fingerprint)
        try:
            registered_peer(node.federated, peer, node.clock())
        except GatewayError as err:
            log.warning("peer_refused", code=err.code.value, peer_certificate=fingerprint)
            await self._refuse_peer(peer, err, context)
            return
        try:
            self.clients.check_total(node.limits.max_streams)
        except GatewayError as err:
            # refused before anything is read: what the peer may hold here is bounded
            log.warning("stream_refused", code=err.code.value, peer=peer.name)
            await abort(context, err.code, err.message, None)
            return
        self.clients.opening += 1
        try:
            await self._open(messages, peer, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # a bug before the stream's own backstop: a clear refusal
            log.exception("stream_failed", code=Code.INTERNAL.value)
            await abort(context, Code.INTERNAL, "internal error in the provider's server", None)
        finally:
            self.clients.opening -= 1

    async def _refuse_peer(
        self, peer: Peer, err: GatewayError, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Log and refuse a stream before any request of it was read (no message id)."""
        node = self.node
        await node.log_failure(
            refusal_record(
                err, Role.PROVIDER, Facts(message_id=None, peer=peer.name), node.clock()
            ).fields()
        )
        await abort(context, err.code, err.message, None)

    async def _open(
        self, messages: Any, peer: Peer, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), OPEN_WAIT_SECONDS)
        except grpc.aio.AioRpcError:
            return  # the peer went away before opening
        except TimeoutError:
            first = None
        if first is None or first is grpc.aio.EOF:  # type: ignore[attr-defined]
            late = TrustError(
                f"no stream open arrived within {OPEN_WAIT_SECONDS:.0f} s",
                code=Code.MALFORMED_ENVELOPE,
            )
            await self._refuse_peer(peer, late, context)
            return
        if first.ocsp_staple:
            peer.staple = first.ocsp_staple
        # the stream's span, child of the consumer's provider leg (its traceparent is never
        # trusted for anything else)
        trace = self.service.tracing.start_call(
            "provider stream", first.open.traceparent if first.HasField("open") else None
        )
        try:
            await self._accept(first, peer, context, trace)
        finally:
            trace.finish()

    async def _accept(
        self,
        first: pb.StreamMessage,
        peer: Peer,
        context: grpc.aio.ServicerContext[Any, Any],
        trace: CallTrace,
    ) -> None:
        node = self.node
        now = node.clock()
        accepted = accept_request(
            envelope_of(first.open.request) if first.HasField("open") else None,
            peer,
            node,
            self.service.backends.addresses,
            now,
            stream=True,
        )
        if isinstance(accepted, Accepted) and node.replay_ledger is not None:
            try:
                await node.replay_ledger.claim(accepted.header.message_id, now)
            except GatewayError as err:
                accepted = refuse_accepted(accepted, err, node.clock())
        if isinstance(accepted, Accepted):
            try:
                self.clients.take(
                    str(accepted.header.client),
                    node.limits.max_streams_per_client,
                    node.limits.max_streams + 1,  # this one's opening slot is given back
                )
            except GatewayError as err:
                accepted = refuse_accepted(accepted, err, node.clock())
        if isinstance(accepted, Refusal):
            trace.outcome(accepted.error.code.value)
            log.warning(
                "stream_refused",
                code=accepted.error.code.value,
                peer=accepted.record.facts.peer,
                message_id=accepted.record.facts.message_id,
            )
            await node.log_failure(accepted.record.fields())
            await self._refusal(context.write, accepted.error, accepted.record.facts.message_id)
            return
        # verified and checked against the configuration: safe to name in spans
        trace.describe(
            client=str(accepted.header.client),
            service=str(accepted.header.service),
            method=accepted.header.method,
            message_id=accepted.header.message_id,
        )
        labels = CallLabels()
        try:
            await self._serve(accepted, first, peer, context, labels, trace)
        finally:
            trace.outcome(labels.code)
            self.clients.give(str(accepted.header.client))

    async def _serve(
        self,
        accepted: Accepted,
        first: pb.StreamMessage,
        peer: Peer,
        context: grpc.aio.ServicerContext[Any, Any],
        labels: CallLabels,
        trace: CallTrace,
    ) -> None:
        node, limits = self.node, self.node.limits
        header = accepted.header
        labels.known_service(accepted.config.services[header.service], header.method)
        labels.client = str(header.client)
        started = time.perf_counter()
        try:
            await node.log.append(accepted.record.fields(), accepted.evidence)
        except GatewayError as err:
            await self._refusal(context.write, err, header.message_id)
            return
        header_bytes = accepted.envelope.header
        received = Chain(REQUEST, header_bytes, bodies=node.stream_body_bytes)
        sent = Chain(RESPONSE, header_bytes, bodies=node.stream_body_bytes)
        timeout = first.open.timeout_ms / 1000 if first.open.timeout_ms else 1e9
        wait = min(timeout, limits.max_stream_seconds + 5)
        backends = self.service.backends
        call_span = trace.start("backend call", SpanKind.CLIENT)
        backend = backends.open_stream(
            str(header.service), header.method, wait, trace.traceparent(call_span)
        )
        outlet = Outlet(context.write)
        theirs = PeerStaples(peer.staple)

        async def write_staple(staple: bytes) -> None:
            with contextlib.suppress(PeerGone):
                await outlet.write(pb.StreamMessage(ocsp_staple=staple))

        staples = Staples(lambda: node.own_status.staple(node.auth_sha256), write_staple)
        request_done = asyncio.Event()
        # our close was logged and handed to gRPC: the stream has its answer
        answered = asyncio.Event()
        backend_writable = [True]

        async def after_close() -> None:
            # the request direction is closed: only newer answers about the consumer's
            # certificate may follow, checked for as long as the stream lasts; the answer
            # ends the stream
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    await asyncio.Future()
                if not theirs.take(message):
                    raise TrustError(
                        "the consumer sent a stream message after its close",
                        code=Code.MALFORMED_ENVELOPE,
                    )

        async def forward_requests() -> None:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise incomplete(REQUEST, "the consumer's stream ended")
                if theirs.take(message):
                    continue  # a newer answer about the consumer's certificate: kept
                which = message.WhichOneof("kind")
                if which == "data":
                    body = incoming(message.data, received, limits)
                    if backend_writable[0]:
                        try:
                            await write(backend, body)
                        except ENDED:
                            backend_writable[0] = False  # the backend has ended: keep checking
                elif which == "close":
                    await self._request_closed(accepted, message.close, received, peer)
                    request_done.set()
                    if backend_writable[0]:
                        with contextlib.suppress(*ENDED):
                            await backend.done_writing()
                    await after_close()
                else:
                    raise TrustError(
                        "the consumer sent a stream message that is neither data nor a close",
                        code=Code.MALFORMED_ENVELOPE,
                    )

        async def forward_responses() -> None:
            status, details = 0, ""
            try:
                async for body in backend:
                    message = outgoing(body, sent, limits)
                    message.ocsp_staple = staples.due()
                    await outlet.write(message)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and sent.count == 0:
                    raise UnavailableError(
                        f"the provider's backend for {header.service} is unavailable; retry later",
                        code=Code.BACKEND_UNAVAILABLE,
                    ) from None
                status, details = int(code.value[0]), str(exc.details() or "")
            labels.code = backend_code(status)
            # a server-streaming call's request close follows its one message at once (it is
            # waited for, within the stream's limits); a bidirectional call whose backend
            # ended first signs what it received so far
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    request_done.wait(),
                    SERVER_CLOSE_WAIT_SECONDS if header.stream == "server" else CLOSE_WAIT_SECONDS,
                )
            await self._answer(accepted, sent, received, status, details, outlet, staples)
            answered.set()

        try:
            await _first(
                forward_requests(),
                forward_responses(),
                self._watch(accepted, peer, theirs, staples.push),
                outlet=outlet,
            )
        except StreamError as exc:
            await self._fail(accepted, exc.error, outlet, backend, labels)
        except GatewayError as err:
            await self._fail(accepted, err, outlet, backend, labels)
        except (grpc.aio.AioRpcError, PeerGone, asyncio.CancelledError) as exc:
            # the consumer went away (cancelled, or its server died): the backend call ends
            # and the record says the stream was not closed (unless it was answered: the
            # consumer then ends its side as soon as it has the close)
            backend.cancel()
            if answered.is_set():
                raise
            gone = incomplete(REQUEST, "the consumer's stream was cancelled")
            labels.code = gone.code.value
            log.warning("stream_ended", code=gone.code.value, message_id=header.message_id)
            await node.log_failure(refuse_accepted(accepted, gone, node.clock()).record.fields())
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:  # a bug: the stream is recorded as not closed, with what happened
            backend.cancel()
            gone = GatewayError("internal error in the provider's server", code=Code.INTERNAL)
            labels.code = gone.code.value
            log.exception("stream_failed", code=gone.code.value, message_id=header.message_id)
            await node.log_failure(refuse_accepted(accepted, gone, node.clock()).record.fields())
        finally:
            staples.cancel()
            backend.cancel()
            trace.end(call_span, None if labels.code == OK else labels.code)
            if self.service.metrics is not None:
                self.service.metrics.call("provider", labels, time.perf_counter() - started)

    async def _watch(
        self, accepted: Accepted, peer: Peer, theirs: PeerStaples, push: Callable[[], None]
    ) -> None:
        node = self.node

        def check() -> None:
            now = node.clock()
            # the peer too: a federation ended, or a federated configuration gone stale,
            # ends the stream with the refusal a new one would get (the agreement alone is
            # not enough: on the provider it lives in our own configuration, which does not
            # change when a federation ends)
            peer_config, _ = registered_peer(node.federated, peer, now)
            check_still_agreed(accepted.header, node, now)
            # and the consumer's latest answer about its TLS certificate, as for a new call
            assert peer.certificate is not None  # a registered peer presented one
            node.status.peer(theirs.latest, peer.certificate, peer_config, now)

        err = await _watch(
            check,
            node.limits.stream_check_seconds,
            time.monotonic(),
            node.limits.max_stream_seconds,
            push,
        )
        raise StreamError(err)

    async def _request_closed(
        self, accepted: Accepted, close: pb.SignedEnvelope, received: Chain, peer: Peer
    ) -> None:
        await _log_received_close(
            self.node,
            close,
            accepted.header,
            accepted.record,
            received,
            accepted.header.sender,
            accepted.peer_config,
        )

    async def _answer(
        self,
        accepted: Accepted,
        sent: Chain,
        received: Chain,
        status: int,
        details: str,
        outlet: Outlet,
        staples: Staples,
    ) -> None:
        node = self.node
        now = node.clock()
        signer = accepted.signer
        signed = sign_close(
            accepted.header,
            accepted.envelope.header,
            sent,
            signer,
            node.server_id,
            now,
            received=received,
            grpc_status=status,
            grpc_message=details,
        )
        # our newest answer about the signer: the one the stream began with may be stale
        # by now (a stream may outlive an answer's freshness)
        staple = node.own_status.staple(signer.certificate_sha256)
        await _log_own_close(node, signed, signer, staple, sent, accepted.record, accepted.config)
        message = pb.StreamMessage(close=_close_envelope(signed, signer, staple))
        message.ocsp_staple = staples.due()
        await outlet.write(message)

    async def _fail(
        self,
        accepted: Accepted,
        err: GatewayError,
        outlet: Outlet,
        backend: Any,
        labels: CallLabels,
    ) -> None:
        labels.code = err.code.value
        backend.cancel()
        log.warning("stream_ended", code=err.code.value, message_id=accepted.header.message_id)
        await self.node.log_failure(
            refuse_accepted(accepted, err, self.node.clock()).record.fields()
        )
        # the refusal follows the message being written, if the consumer takes either in time
        if await outlet.settle(CLOSE_WAIT_SECONDS):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._refusal(outlet.last, err, accepted.header.message_id),
                    CLOSE_WAIT_SECONDS,
                )

    @staticmethod
    async def _refusal(
        write: Callable[[Any], Awaitable[None]], err: GatewayError, message_id: str | None
    ) -> None:
        try:
            await write(
                pb.StreamMessage(
                    refusal=pb.Refusal(
                        code=err.code.value,
                        message=bound_message(err.message),
                        message_id=message_id or "",
                    )
                )
            )
        except ENDED:
            pass
        except Exception as exc:  # the call in a state gRPC will not write in: it ends
            # without the message (the refusal is in the log already)
            log.info("refusal_not_sent", code=err.code.value, error=repr(exc)[:300])


_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
