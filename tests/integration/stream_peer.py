"""Misbehaving peers for streaming calls, over real mutual TLS.

`StreamingConsumer` speaks `Exchange.Stream` to a provider security server as a consumer
server does, with a registered server's TLS keys and its member's signing key, but lets a
test send any message in any order. `StreamingProvider` listens on a registered provider's
address with that server's keys (the real process stopped) and answers a real consumer
server's streams as the test says. Neither checks anything: the tests decide what the
real server should have done.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import grpc

from gateway.envelope import RequestHeader, StreamClose, decode_request, sha256_hex
from gateway.identifiers import SecurityServerId, ServiceId, SubsystemId, server_dns_name
from gateway.signing import EcdsaSigner
from gateway.streams import REQUEST, RESPONSE, Chain
from gateway.v1 import exchange_pb2 as pb

STREAM_METHOD = "/gateway.v1.Exchange/Stream"


def stream_open(
    signer: EcdsaSigner,
    *,
    message_id: str,
    client: str,
    service: str,
    method: str,
    purpose: str,
    sender: str,
    kind: str,
    created_at: datetime,
    signer_ocsp: bytes,
) -> pb.StreamOpen:
    header = RequestHeader(
        message_id=message_id,
        client=SubsystemId.parse(client),
        service=ServiceId.parse(service),
        method=method,
        purpose=purpose,
        sender=SecurityServerId.parse(sender),
        created_at=created_at,
        body_sha256=sha256_hex(b""),
        stream=kind,
    ).encode()
    return pb.StreamOpen(
        request=pb.SignedEnvelope(
            header=header,
            signature=signer.sign(header),
            signer_certificate=signer.certificate_der,
            signer_ocsp=signer_ocsp,
        ),
        timeout_ms=10_000,
    )


def data(seq: int, body: bytes, link: bytes) -> pb.StreamMessage:
    return pb.StreamMessage(data=pb.StreamData(seq=seq, body=body, link=link))


def signed_close(
    signer: EcdsaSigner,
    signer_ocsp: bytes,
    request_header: bytes,
    chain: Chain,
    sender: str,
    now: datetime,
    *,
    received: Chain | None = None,
    count: int | None = None,
    digest: str | None = None,
) -> pb.StreamMessage:
    """A close of `chain`'s direction signed by `signer` (count and digest overridable)."""
    request = decode_request(request_header)
    close = StreamClose(
        message_id=request.message_id,
        request_sha256=sha256_hex(request_header),
        service=request.service,
        direction=chain.direction,
        sender=SecurityServerId.parse(sender),
        created_at=now,
        count=chain.count if count is None else count,
        size=chain.size,
        digest=chain.digest if digest is None else digest,
        request_count=None if received is None else received.count,
        request_digest=None if received is None else received.digest,
    )
    header = close.encode()
    return pb.StreamMessage(
        close=pb.SignedEnvelope(
            header=header,
            signature=signer.sign(header),
            signer_certificate=signer.certificate_der,
            signer_ocsp=signer_ocsp,
        )
    )


class StreamingConsumer:
    """One `Exchange.Stream` call to a provider endpoint (use from a running loop)."""

    def __init__(
        self,
        address: str,
        provider_id: str,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        self.channel = grpc.aio.secure_channel(
            address,
            credentials,
            options=[
                (
                    "grpc.ssl_target_name_override",
                    server_dns_name(SecurityServerId.parse(provider_id)),
                ),
            ],
        )
        self.call: Any = self.channel.stream_stream(
            STREAM_METHOD,
            request_serializer=pb.StreamMessage.SerializeToString,
            response_deserializer=pb.StreamMessage.FromString,
        )(None, timeout=20)

    async def send(self, message: pb.StreamMessage) -> None:
        """Write a message; nothing happens once the provider has ended the stream (what it
        sent before ending, a refusal say, is still there to read)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.write(message)

    async def read(self, timeout: float = 10.0) -> pb.StreamMessage | None:
        """The provider's next message; None once its stream ended."""
        message = await asyncio.wait_for(self.call.read(), timeout)
        return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]

    async def refusal(self, timeout: float = 10.0) -> pb.Refusal:
        """Read until the provider refuses (failing if it ends the stream otherwise)."""
        while True:
            message = await self.read(timeout)
            assert message is not None, "the provider ended the stream without a refusal"
            if message.WhichOneof("kind") == "refusal":
                return message.refusal

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


Behaviour = Callable[[pb.StreamOpen], Iterator[pb.StreamMessage]]


class StreamingProvider:
    """A provider endpoint whose `Exchange.Stream` answers with `behaviour(open)`'s
    messages (after reading the consumer's open), on gRPC's thread-based server."""

    def __init__(self, address: str, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._behaviour: Behaviour = lambda _: iter(())
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=pb.StreamMessage.FromString,
            response_serializer=pb.StreamMessage.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("gateway.v1.Exchange", {"Stream": handler}),)
        )
        credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
        )
        if self._server.add_secure_port(address, credentials) == 0:
            raise RuntimeError(f"cannot listen on {address}")

    @property
    def behaviour(self) -> Behaviour:
        with self._lock:
            return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._behaviour = behaviour

    def _stream(
        self, messages: Iterator[pb.StreamMessage], context: Any
    ) -> Iterator[pb.StreamMessage]:
        first = next(messages)
        yield from self.behaviour(first.open)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None).wait()


def response_chain(request_header: bytes) -> Chain:
    return Chain(RESPONSE, request_header)


def request_chain(request_header: bytes) -> Chain:
    return Chain(REQUEST, request_header)
