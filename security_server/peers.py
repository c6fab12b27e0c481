"""Consumer side of the exchange: one long-lived, multiplexed mTLS stream per provider server.

Each request frame carries a correlation id; a reader task matches response frames to the
waiting calls. When the stream breaks, every waiting call fails with a clear error and
the next call opens a new stream. The provider's TLS certificate must chain to a CA of the
global configuration and name the expected server (`server_dns_name`); the provider
checks ours against the registered certificate.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from typing import Any

import grpc
import structlog

from gateway.configuration import GlobalConfiguration, SecurityServer
from gateway.errors import Code, GatewayError, UnavailableError
from gateway.identifiers import SecurityServerId, server_dns_name
from gateway.signing import pem_bundle
from gateway.v1 import exchange_pb2 as pb
from security_server.status import ERROR_KEY

log = structlog.get_logger("security_server.peers")

EXCHANGE_METHOD = "/gateway.v1.Exchange/Exchange"


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
        self, server: SecurityServer, credentials: grpc.ChannelCredentials, max_bytes: int
    ) -> None:
        self.server = server
        self.channel = grpc.aio.secure_channel(
            server.address,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", server_dns_name(server.id)),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self._open: Any = self.channel.stream_stream(
            EXCHANGE_METHOD,
            request_serializer=pb.Frame.SerializeToString,
            response_deserializer=pb.Frame.FromString,
        )
        self._call: Any = None
        self._pending: dict[int, asyncio.Future[pb.Frame]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    def _stream(self) -> Any:
        if self._call is None:
            call = self._open()
            self._call = call
            self._reader = asyncio.create_task(
                self._read(call), name=f"peer-reader-{self.server.id}"
            )
        return self._call

    async def _read(self, call: Any) -> None:
        error: GatewayError
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:  # type: ignore[attr-defined]
                    error = UnavailableError(
                        f"the provider's security server {self.server.id} closed the stream",
                        code=Code.PROVIDER_UNAVAILABLE,
                    )
                    break
                future = self._pending.get(frame.correlation_id)
                if future is not None and not future.done():
                    future.set_result(frame)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc, self.server)
            log.info("peer_stream_closed", peer=str(self.server.id), status=exc.code().name)
        if self._call is call:
            self._call = None
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(error)

    async def exchange(self, envelope: pb.SignedEnvelope, wait_seconds: float) -> pb.Frame:
        """Send one request envelope and wait for its response or refusal frame."""
        correlation_id = next(self._ids)
        future: asyncio.Future[pb.Frame] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        frame = pb.Frame(
            correlation_id=correlation_id, request=envelope, timeout_ms=int(wait_seconds * 1000)
        )
        try:
            call = self._stream()
            async with self._write_lock:
                await call.write(frame)
            return await asyncio.wait_for(future, wait_seconds)
        except grpc.aio.AioRpcError as exc:
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            raise error_from_rpc(exc, self.server) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            raise UnavailableError(
                f"the stream to {self.server.id} broke while sending; retry",
                code=Code.PROVIDER_UNAVAILABLE,
            ) from None
        except TimeoutError:
            raise GatewayError(
                f"no answer from {self.server.id} within the deadline", code=Code.DEADLINE_EXCEEDED
            ) from None
        finally:
            self._pending.pop(correlation_id, None)

    async def close(self) -> None:
        await self.channel.close(None)


class PeerPool:
    """The links of this server to its providers, rebuilt when their trust settings change."""

    def __init__(self, *, tls_certificate: bytes, tls_key: bytes, max_bytes: int) -> None:
        self.tls_certificate = tls_certificate
        self.tls_key = tls_key
        self.max_bytes = max_bytes
        self._links: dict[SecurityServerId, tuple[tuple[str, str], PeerLink]] = {}
        self._retired: list[PeerLink] = []
        self._roots_of: tuple[GlobalConfiguration, bytes, str] | None = None

    def _roots(self, config: GlobalConfiguration) -> tuple[bytes, str]:
        """The PEM bundle of the configuration's CAs and its digest, computed once per version."""
        if self._roots_of is None or self._roots_of[0] is not config:
            roots = pem_bundle(config.ca_certificates)
            self._roots_of = (config, roots, hashlib.sha256(roots).hexdigest())
        return self._roots_of[1], self._roots_of[2]

    def link(self, server: SecurityServer, config: GlobalConfiguration) -> PeerLink:
        roots, digest = self._roots(config)
        key = (server.address, digest)
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
        link = PeerLink(server, credentials, self.max_bytes)
        self._links[server.id] = (key, link)
        return link

    async def close(self) -> None:
        for link in [*(entry[1] for entry in self._links.values()), *self._retired]:
            await link.close()
        self._links.clear()
        self._retired.clear()
