"""Consumer side of the exchange: one long-lived, multiplexed mTLS stream per provider server.

Each request frame carries a correlation id; a reader task matches response frames to the
waiting calls. When the stream breaks, every waiting call fails with a clear error and
the next call opens a new stream. The provider's TLS certificate must chain to a CA of the
global configuration and name the expected server (`server_dns_name`); the provider
checks ours against the registered certificate. Each side staples the OCSP answer about
its own authentication certificate to the first message of a stream, and again whenever
it has a newer one (`Frames.ocsp_staple`); the consumer checks the provider's with every
response.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.configuration import GlobalConfiguration, SecurityServer
from gateway.errors import Code, GatewayError, UnavailableError
from gateway.exchange import Envelope
from gateway.identifiers import SecurityServerId, server_dns_name
from gateway.signing import certificate_fingerprint, load_certificate
from gateway.v1 import exchange_pb2 as pb
from security_server.call_writes import PeerGone, write
from security_server.status import ERROR_KEY

log = structlog.get_logger("security_server.peers")

EXCHANGE_METHOD = "/gateway.v1.Exchange/Exchange"
# most frames carried by one stream message
MAX_FRAMES_PER_MESSAGE = 64
# room for everything around the bodies in one stream message (main's `_FRAME_OVERHEAD`:
# a stream message may be `limits.max_message_bytes` plus this)
ENVELOPE_ROOM = 64 * 1024


def frame_size(frame: pb.Frame) -> int:
    """About the bytes `frame` takes in a stream message (its variable fields, plus room for
    the rest), without encoding it."""
    env = frame.response if frame.HasField("response") else frame.request
    return (
        len(env.body)
        + len(env.header)
        + len(env.signature)
        + len(env.signer_certificate)
        + len(env.signer_ocsp)
        + len(frame.refusal.message)
        + 256
    )


class FrameBatcher:
    """Takes the frames queued at the moment, for one stream message: at most
    `MAX_FRAMES_PER_MESSAGE` frames, and more than one only while their sizes add up to
    `budget` bytes (so that a batch never exceeds what the other side's gRPC accepts, even
    when several answers at the size limit are ready at once). `None` in the queue ends
    the stream, after the frames queued before it."""

    def __init__(self, queue: asyncio.Queue[Any], budget: int) -> None:
        self.queue = queue
        self.budget = budget
        self._carried: pb.Frame | None = None
        self._ended = False

    async def next(self) -> list[pb.Frame] | None:
        """The next batch, or None once the stream has ended."""
        if self._ended:
            return None
        first = self._carried if self._carried is not None else await self.queue.get()
        self._carried = None
        if first is None:
            self._ended = True
            return None
        batch = [first]
        size = frame_size(first)
        while len(batch) < MAX_FRAMES_PER_MESSAGE and not self.queue.empty():
            more = self.queue.get_nowait()
            if more is None:
                self._ended = True
                break
            size += frame_size(more)
            if size > self.budget:
                self._carried = more
                break
            batch.append(more)
        return batch


def error_from_rpc(exc: grpc.aio.AioRpcError, server: SecurityServer) -> GatewayError:
    """Translate a failed stream into the gateway error the caller should see."""
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == ERROR_KEY:
            try:
                return GatewayError(str(exc.details()), code=Code(str(value)))
            except ValueError:
                break
    return UnavailableError(
        f"the provider's security server {server.id} at {server.address} cannot be reached "
        f"({exc.code().name}); retry later or ask its operator",
        code=Code.PROVIDER_UNAVAILABLE,
    )


class PeerLink:
    def __init__(
        self,
        server: SecurityServer,
        credentials: grpc.ChannelCredentials,
        max_bytes: int,
        staple: Callable[[], bytes] = bytes,
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.server = server
        # our authentication certificate's current OCSP answer, and the provider's latest
        self.staple = staple
        self.peer_staple = b""
        self.max_bytes = max_bytes
        self.channel = grpc.aio.secure_channel(
            server.address,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", server_dns_name(server.id)),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                # a provider server back from a restart is tried again within 2 s (gRPC's
                # own backoff grows to 2 minutes), so that failover finds it
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 2_000),
                *options,
            ],
        )
        self._open: Any = self.channel.stream_stream(
            EXCHANGE_METHOD,
            request_serializer=pb.Frames.SerializeToString,
            response_deserializer=pb.Frames.FromString,
        )
        self._call: Any = None
        self._outbox: asyncio.Queue[pb.Frame] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.Frame]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        # the provider said it is stopping: no new call goes on this stream; the calls
        # already sent are answered on it, and the provider ends it once idle (its server
        # then takes no new connection, which `reachable` sees)
        self.draining = False

    async def reachable(self, timeout: float) -> bool:
        """Whether a request can be handed to the provider now: its stream is open, or its
        connection becomes ready within `timeout` seconds. False means nothing was sent
        (the call may go to another server hosting the service without being delivered
        twice)."""
        if self.draining:
            return False
        if self._call is not None:
            return True
        channel = self.channel
        state = channel.get_state(try_to_connect=True)
        try:
            async with asyncio.timeout(timeout):
                while state is not grpc.ChannelConnectivity.READY:
                    if state in (
                        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                        grpc.ChannelConnectivity.SHUTDOWN,
                    ):
                        return False
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True

    def _stream(self) -> asyncio.Queue[pb.Frame]:
        """The outbox of the current stream, opening a stream (with its reader and writer) if needed."""
        if self._call is None:
            call = self._open()
            self._call = call
            # a new stream: the provider staples its current answer to its first message
            self.peer_staple = b""
            self._outbox = asyncio.Queue()
            for job in (self._read(call), self._write(call, self._outbox)):
                task = asyncio.create_task(job, name=f"peer-{self.server.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return self._outbox

    async def _write(self, call: Any, outbox: asyncio.Queue[pb.Frame]) -> None:
        """Send every frame queued at the moment in one stream message, until the stream ends."""
        stapled = b""
        batches = FrameBatcher(outbox, max(1, self.max_bytes - ENVELOPE_ROOM))
        try:
            while (frames := await batches.next()) is not None:
                staple = self.staple()
                if staple != stapled:
                    stapled = staple
                    await write(call, pb.Frames(frames=frames, ocsp_staple=staple))
                else:
                    await write(call, pb.Frames(frames=frames))
        except PeerGone:
            pass  # Core refused the write: the call has ended, and the reader reads how
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            # the reader sees the stream's end and fails every waiting call
            call.cancel()

    async def _read(self, call: Any) -> None:
        error: GatewayError
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    error = UnavailableError(
                        f"the provider's security server {self.server.id} closed the stream",
                        code=Code.PROVIDER_UNAVAILABLE,
                    )
                    break
                if message.ocsp_staple:
                    self.peer_staple = message.ocsp_staple
                if message.draining and not self.draining:
                    self.draining = True
                    log.info("peer_draining", peer=str(self.server.id))
                for frame in message.frames:
                    future = self._pending.get(frame.correlation_id)
                    if future is not None and not future.done():
                        future.set_result(frame)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc, self.server)
            log.info("peer_stream_closed", peer=str(self.server.id), status=exc.code().name)
        if self._call is call:
            self._call = None
            self.draining = False
        call.cancel()
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)

    async def exchange(
        self, envelope: pb.SignedEnvelope, wait_seconds: float, traceparent: str = ""
    ) -> pb.Frame:
        """Send one request envelope and wait for its response or refusal frame;
        `traceparent` (W3C Trace Context, unsigned) makes the provider's spans children of
        the consumer's."""
        correlation_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.Frame] = loop.create_future()
        self._pending[correlation_id] = future
        # a timer on the future itself: cheaper than asyncio.wait_for's extra task
        timer = loop.call_later(wait_seconds, self._expire, future)
        try:
            self._stream().put_nowait(
                pb.Frame(
                    correlation_id=correlation_id,
                    request=envelope,
                    timeout_ms=int(wait_seconds * 1000),
                    traceparent=traceparent.encode(),
                )
            )
            return await future
        finally:
            timer.cancel()
            self._pending.pop(correlation_id, None)

    def _expire(self, future: asyncio.Future[pb.Frame]) -> None:
        if not future.done():
            future.set_exception(
                GatewayError(
                    f"no answer from {self.server.id} within the deadline",
                    code=Code.DEADLINE_EXCEEDED,
                )
            )

    async def close(self) -> None:
        await self.channel.close(None)
        for task in list(self._tasks):
            task.cancel()


class PeerPool:
    """The links of this server to its providers, rebuilt when their trust settings or our
    authentication certificate change."""

    def __init__(
        self,
        *,
        tls_certificate: bytes,
        tls_key: bytes,
        max_bytes: int,
        staple: Callable[[str], bytes] = lambda sha: b"",
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        # the current OCSP answer about one of our certificates, by the SHA-256 of its DER
        self.staple = staple
        self.max_bytes = max_bytes
        # gRPC options of every link (the HTTP/2 window: endpoint_limits.window_options)
        self.options = tuple(options)
        self._links: dict[SecurityServerId, tuple[tuple[str, bytes, bytes], PeerLink]] = {}
        self._retired: list[PeerLink] = []
        self.use(tls_certificate, tls_key)

    def use(self, tls_certificate: bytes, tls_key: bytes) -> None:
        """Open the next streams with this certificate (PEM) and key (a renewal): streams
        already open finish with the one they have."""
        self.tls_certificate = tls_certificate
        self.tls_key = tls_key
        self._sha = certificate_fingerprint(load_certificate(tls_certificate)).hex()

    def link(self, server: SecurityServer, config: GlobalConfiguration) -> PeerLink:
        roots = config.ca_pem
        key = (server.address, roots, self.tls_certificate)
        entry = self._links.get(server.id)
        if entry is not None and entry[0] == key:
            return entry[1]
        if entry is not None:
            # calls under way finish on the old link; it is closed with the pool
            self._retired.append(entry[1])
        credentials = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=self.tls_key,
            certificate_chain=self.tls_certificate,
        )
        # a stream staples the answer about the certificate it was opened with
        sha = self._sha
        link = PeerLink(server, credentials, self.max_bytes, lambda: self.staple(sha), self.options)
        self._links[server.id] = (key, link)
        return link

    async def close(self) -> None:
        for link in [*(entry[1] for entry in self._links.values()), *self._retired]:
            await link.close()
        self._links.clear()
        self._retired.clear()


class ProviderChoice:
    """Which of the security servers hosting a service a call goes to: the one that has
    answered fastest lately (a moving average of each server's answer times, as X-Road
    prefers the server that answers first), a server never measured before first (so that
    it gets measured), and one found unreachable only after `retry_seconds`, when every
    other one was tried."""

    def __init__(
        self, *, retry_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._seconds: dict[SecurityServerId, float] = {}
        self._down_until: dict[SecurityServerId, float] = {}

    def order(self, servers: tuple[SecurityServer, ...]) -> list[SecurityServer]:
        if len(servers) == 1:
            return list(servers)
        now = self.clock()

        def rank(server: SecurityServer) -> tuple[bool, float]:
            down = self._down_until.get(server.id, 0.0) > now
            return down, self._seconds.get(server.id, 0.0)

        return sorted(servers, key=rank)

    def answered(self, server: SecurityServer, seconds: float) -> None:
        self._down_until.pop(server.id, None)
        before = self._seconds.get(server.id)
        self._seconds[server.id] = seconds if before is None else 0.8 * before + 0.2 * seconds

    def unreachable(self, server: SecurityServer) -> None:
        self._down_until[server.id] = self.clock() + self.retry_seconds


def peer_certificate(
    context: grpc.aio.ServicerContext[Any, Any],
) -> tuple[x509.Certificate | None, str | None]:
    """The TLS peer's certificate and the SHA-256 of its DER, or (None, None) without one."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None, None
    certificate = x509.load_pem_x509_certificate(next(iter(pems)))
    der = certificate.public_bytes(serialization.Encoding.DER)
    return certificate, hashlib.sha256(der).hexdigest()


def envelope_of(env: pb.SignedEnvelope) -> Envelope:
    """The core's view of a signed envelope received on a stream."""
    return Envelope(
        header=env.header,
        body=env.body,
        signature=env.signature,
        signer_certificate=env.signer_certificate,
        signer_ocsp=env.signer_ocsp,
    )


def signed_envelope(envelope: Envelope) -> pb.SignedEnvelope:
    """A signed envelope of the core, as a stream carries it."""
    return pb.SignedEnvelope(
        header=envelope.header,
        body=envelope.body,
        signature=envelope.signature,
        signer_certificate=envelope.signer_certificate,
        signer_ocsp=envelope.signer_ocsp,
    )
