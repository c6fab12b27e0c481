"""A misbehaving consumer server for streaming calls, over real mutual TLS.

`StreamingConsumer` speaks `Exchange.Stream` to a provider security server as a consumer
server does, with a registered server's TLS keys and its member's signing key, but lets a
test send any message in any order. It checks nothing: the tests decide what the real
server should have done. (The misbehaving provider is `malicious_provider.MaliciousProvider`,
whose `stream_behaviour` answers streams.)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

from gateway.envelope import StreamClose, decode_request, sha256_hex
from gateway.identifiers import SecurityServerId
from gateway.signing import EcdsaSigner
from gateway.streams import REQUEST, Chain
from gateway.v1 import exchange_pb2 as pb
from security_server.call_writes import PeerGone, write
from tests.integration.attacker import build_request, fetch_ocsp, peer_channel

from .clinics import signer_of
from .conftest import CLINICS, DNIC, MSP, POPULATION

if TYPE_CHECKING:
    from gateway_demo.runner import Runner

STREAM_METHOD = "/gateway.v1.Exchange/Stream"
CHAT = "/demo.population.v1.PopulationRegistry/Chat"
PURPOSE = "healthcare-identification"


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
    request = build_request(
        signer,
        message_id=message_id,
        client=client,
        service=service,
        method=method,
        purpose=purpose,
        sender=sender,
        body=b"",
        created_at=created_at,
        signer_ocsp=signer_ocsp,
        stream=kind,
    )
    return pb.StreamOpen(request=request, timeout_ms=10_000)


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
        *,
        timeout: float = 20.0,
    ) -> None:
        self.channel = peer_channel(address, provider_id, ca_pem, cert_pem, key_pem)
        self.call: Any = self.channel.stream_stream(
            STREAM_METHOD,
            request_serializer=pb.StreamMessage.SerializeToString,
            response_deserializer=pb.StreamMessage.FromString,
        )(None, timeout=timeout)

    async def send(self, message: pb.StreamMessage) -> None:
        """Write a message; nothing happens once the provider has ended the stream (what it
        sent before ending, a refusal say, is still there to read)."""
        with contextlib.suppress(PeerGone, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await write(self.call, message)  # as a consumer server writes (grpc/grpc#36066)

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


@dataclass
class OpenedChat:
    """A Chat stream opened by `open_chat`: the stream, ss-msp's member signer and the OCSP
    answer stapled to the open's envelope, the signed request header, the chain of the
    request direction, and the answer about ss-msp's TLS certificate stapled to the open."""

    consumer: StreamingConsumer
    signer: EcdsaSigner
    signer_ocsp: bytes
    header: bytes
    chain: Chain
    staple: bytes


async def open_chat(
    runner: Runner, message_id: str, *, timeout: float = 20.0, deadline_ms: int = 10_000
) -> OpenedChat:
    """ss-msp's keys opening a bidirectional Chat stream straight to ss-dnic's provider
    endpoint, correctly, with fresh OCSP answers; `deadline_ms` is the open's deadline (0:
    none)."""
    pki = runner.pki
    ca = (pki / "ca.crt").read_bytes()
    auth = (pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    signer = signer_of(pki, "UY_GOV_MSP")
    signer_ocsp = fetch_ocsp(runner.ocsp_url, (pki / "sign" / "UY_GOV_MSP.crt").read_bytes(), ca)
    consumer = StreamingConsumer(
        runner.providers[DNIC],
        DNIC,
        ca,
        auth,
        (pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
        timeout=timeout,
    )
    opened = stream_open(
        signer,
        message_id=message_id,
        client=CLINICS,
        service=POPULATION,
        method=CHAT,
        purpose=PURPOSE,
        sender=MSP,
        kind="bidi",
        created_at=datetime.now(UTC),
        signer_ocsp=signer_ocsp,
    )
    opened.timeout_ms = deadline_ms
    staple = fetch_ocsp(runner.ocsp_url, auth, ca)
    await consumer.send(pb.StreamMessage(open=opened, ocsp_staple=staple))
    header = opened.request.header
    return OpenedChat(consumer, signer, signer_ocsp, header, Chain(REQUEST, header), staple)
