"""An attacker's client for the exchange protocol between security servers.

It talks to a provider security server directly, the way a consumer security server
does (`security_server/peers.py`), but lets a test choose every byte of a frame: the TLS
client certificate, the header, the body, the signature and the signer certificate. It
never checks anything itself; the tests decide what the provider should have done.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
from cryptography import x509

from gateway.envelope import RequestHeader, sha256_hex
from gateway.identifiers import SecurityServerId, ServiceId, SubsystemId, server_dns_name
from gateway.ocsp import build_request as ocsp_request
from gateway.signing import Signer
from gateway.v1 import exchange_pb2 as pb
from security_server.call_writes import PeerGone, write

EXCHANGE_METHOD = "/gateway.v1.Exchange/Exchange"
ERROR_KEY = "gateway-error"


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamError:
    """The stream ended with a gRPC error status instead of answering a frame."""

    code: grpc.StatusCode
    details: str
    trailing: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        """The stable gateway error code in trailing metadata `gateway-error`, if any."""
        return self.trailing.get(ERROR_KEY)


def _trailing(pairs: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (pairs or ())}


class AttackStream:
    """One bidirectional exchange stream; `send` writes a frame and reads one answer."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float, staple: bytes = b"") -> None:
        self.channel = channel
        # the OCSP answer stapled to the first stream message (as a security server does)
        self.staple = staple
        open_call = channel.stream_stream(
            EXCHANGE_METHOD,
            request_serializer=pb.Frames.SerializeToString,
            response_deserializer=pb.Frames.FromString,
        )
        # no request iterator: frames are written one by one with `write`
        self._call: Any = open_call(None, timeout=timeout)
        self._buffered: list[pb.Frame] = []

    async def _status(self) -> StreamError:
        call = self._call
        return StreamError(
            code=await call.code(),
            details=str(await call.details() or ""),
            trailing=_trailing(await call.trailing_metadata()),
        )

    async def send(self, frame: pb.Frame, timeout: float = 10.0) -> pb.Frame | StreamError:
        """Write `frame` and return the next frame the provider sends, or the stream's error."""
        call = self._call
        try:
            with contextlib.suppress(PeerGone):  # ended: what the provider said is read next
                await write(call, pb.Frames(frames=[frame], ocsp_staple=self.staple))
            self.staple = b""
            if self._buffered:
                return self._buffered.pop(0)
            answer = await asyncio.wait_for(call.read(), timeout)
        except grpc.aio.AioRpcError as exc:
            return StreamError(
                code=exc.code(),
                details=str(exc.details() or ""),
                trailing=_trailing(exc.trailing_metadata()),
            )
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            # the call had already ended when we wrote: report how it ended
            return await self._status()
        if answer is grpc.aio.EOF:  # type: ignore[attr-defined]
            return await self._status()
        assert isinstance(answer, pb.Frames) and answer.frames
        # a stream message may carry several answers: keep the rest for the next call
        self._buffered.extend(answer.frames[1:])
        return answer.frames[0]

    async def close(self) -> None:
        self._call.cancel()
        await self.channel.close(None)

    async def __aenter__(self) -> AttackStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def open_stream(
    address: str,
    server_id_for_tls_name: str,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    *,
    timeout: float = 20.0,
    staple: bytes = b"",
) -> AttackStream:
    """Open a mutual-TLS exchange stream to a provider endpoint (call from a running loop).

    The provider's certificate is checked against `ca_pem` and the DNS name of
    `server_id_for_tls_name`, as a real consumer security server does; `cert_pem` and
    `key_pem` are the client certificate and key the attacker presents.
    """
    channel = peer_channel(address, server_id_for_tls_name, ca_pem, cert_pem, key_pem)
    return AttackStream(channel, timeout, staple)


def peer_channel(
    address: str, server_id_for_tls_name: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes
) -> grpc.aio.Channel:
    """A mutual-TLS channel to a provider endpoint, checking its certificate as a consumer
    security server does, presenting `cert_pem` and `key_pem`."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    return grpc.aio.secure_channel(
        address,
        credentials,
        options=[
            (
                "grpc.ssl_target_name_override",
                server_dns_name(SecurityServerId.parse(server_id_for_tls_name)),
            ),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )


def fetch_ocsp(url: str, certificate_pem: bytes, issuer_pem: bytes) -> bytes:
    """The OCSP answer about a certificate from a responder, as a security server staples it."""
    request = urllib.request.Request(
        url,
        data=ocsp_request(
            x509.load_pem_x509_certificate(certificate_pem),
            x509.load_pem_x509_certificate(issuer_pem),
        ),
        headers={"Content-Type": "application/ocsp-request"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return bytes(answer.read())


def request_header(
    *,
    message_id: str,
    client: str,
    service: str,
    method: str,
    purpose: str,
    sender: str,
    body: bytes,
    created_at: datetime,
    stream: str | None = None,
) -> RequestHeader:
    """The request header a consumer security server would sign for these facts (`stream`:
    the kind of a streaming call it opens, whose body is empty)."""
    return RequestHeader(
        message_id=message_id,
        client=SubsystemId.parse(client),
        service=ServiceId.parse(service),
        method=method,
        purpose=purpose,
        sender=SecurityServerId.parse(sender),
        created_at=created_at,
        body_sha256=sha256_hex(body),
        stream=stream,
    )


def build_request(
    signer: Signer,
    *,
    message_id: str,
    client: str,
    service: str,
    method: str,
    purpose: str,
    sender: str,
    body: bytes,
    created_at: datetime,
    signer_ocsp: bytes = b"",
    stream: str | None = None,
) -> pb.SignedEnvelope:
    """A request envelope signed properly by `signer` (whatever key that is); `stream`, a
    streaming call's kind, makes it a stream's open."""
    header = request_header(
        message_id=message_id,
        client=client,
        service=service,
        method=method,
        purpose=purpose,
        sender=sender,
        body=body,
        created_at=created_at,
        stream=stream,
    ).encode()
    return pb.SignedEnvelope(
        header=header,
        body=body,
        signature=signer.sign(header),
        signer_certificate=signer.certificate_der,
        signer_ocsp=signer_ocsp,
    )


def request_frame(
    envelope: pb.SignedEnvelope, correlation_id: int = 1, timeout_ms: int = 10_000
) -> pb.Frame:
    return pb.Frame(correlation_id=correlation_id, request=envelope, timeout_ms=timeout_ms)
