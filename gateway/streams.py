"""Streaming calls between two security servers, sans IO: the hash chain of each direction
and the signed closes.

A streaming call opens with a signed request header (`RequestHeader.stream` names its kind)
that goes through the same decisions as a unary call (`gateway.exchange`). Then each
direction carries messages, numbered from 1, and each message extends that direction's
hash chain:

    link[0] = SHA-256("request\\n" || request header)      (or "response\\n" || ...)
    link[i] = SHA-256(link[i-1] || message i)

Every message travels with its number and its link, so that a receiver refuses at once a
message out of order (`stream_out_of_order`: missing, repeated or reordered) or one that
does not extend the chain (`stream_digest_mismatch`). When a direction ends, its sender
signs a `StreamClose` with the count, the bytes and the last link, bound to the request
header; the provider's close (the response direction) carries the backend's status and
also the count and last link of the request messages it received. The closes are what
prove a stream: they are logged by both servers, and anyone holding the messages can
recompute the links with `openssl dgst -sha256` (README, *Verifying a stream*).

Nothing here reads a clock, a socket or a file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from gateway.audit import RecordKind, Role
from gateway.configuration import GlobalConfiguration
from gateway.envelope import RequestHeader, StreamClose, decode_close, sha256_hex
from gateway.errors import Code, GatewayError, TrustError
from gateway.identifiers import SecurityServerId
from gateway.records import Facts, LogRecord
from gateway.signing import EcdsaSigner, verify_signature

REQUEST, RESPONSE = "request", "response"

# the links a sender keeps of the messages it sent (32 bytes each, 128 KiB in all): a
# provider whose backend ends before the request stream does signs the count it received,
# which may be behind what was sent by the messages the HTTP/2 windows held; a count further
# behind than this is refused (stream_digest_mismatch)
KEPT_LINKS = 4096


def frame_messages(messages: list[bytes]) -> bytes:
    """Messages as the log keeps a direction's: each as its 4-byte big-endian length and its
    bytes."""
    return b"".join(len(m).to_bytes(4, "big") + m for m in messages)


def unframe_messages(data: bytes) -> list[bytes]:
    """The messages of `frame_messages`; `ValueError` when `data` is not such a framing."""
    messages, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError("a message's length is cut short")
        size = int.from_bytes(data[at : at + 4], "big")
        if at + 4 + size > len(data):
            raise ValueError("a message is cut short")
        messages.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return messages


def chain_of(direction: str, request_header: bytes, messages: list[bytes]) -> Chain:
    """The chain of `messages` sent in `direction` (to check a close against them)."""
    chain = Chain(direction, request_header)
    for message in messages:
        chain.extend(message)
    return chain


def seed(direction: str, request_header: bytes) -> bytes:
    """The first link of a direction's chain, bound to the signed request header."""
    return hashlib.sha256(direction.encode() + b"\n" + request_header).digest()


class Chain:
    """One direction's hash chain, as its sender extends it or its receiver checks it."""

    __slots__ = ("_bodies", "_cap", "_kept", "count", "direction", "link", "size")

    def __init__(
        self, direction: str, request_header: bytes, *, keep: int = 0, bodies: int = 0
    ) -> None:
        self.direction = direction
        self.link = seed(direction, request_header)
        self.count = 0
        self.size = 0
        # the links of the last `keep` messages (a sender's, see KEPT_LINKS): message n's at
        # ((n - 1) % keep) * 32
        self._kept = bytearray(32 * keep) if keep else None
        # the messages themselves, framed (`frame_messages`), while they fit in `bodies`
        # bytes (log.stream_body_bytes); None once they do not, or when none are kept
        self._cap = bodies
        self._bodies: bytearray | None = bytearray() if bodies else None

    def extend(self, body: bytes) -> tuple[int, bytes]:
        """Add the next message; its number and link."""
        digest = hashlib.sha256(self.link)
        digest.update(body)
        self.link = digest.digest()
        self.count += 1
        self.size += len(body)
        if self._bodies is not None:
            self._keep(body)
        if self._kept is not None:
            at = ((self.count - 1) * 32) % len(self._kept)
            self._kept[at : at + 32] = self.link
        return self.count, self.link

    def accept(self, seq: int, body: bytes, link: bytes) -> None:
        """Check a received message against the chain, and add it; `GatewayError` when it is
        out of order or does not extend the chain."""
        if seq != self.count + 1:
            what = "repeated or reordered" if seq <= self.count else "after a missing one"
            raise TrustError(
                f"{self.direction} stream message {seq} arrived where {self.count + 1} was due "
                f"({what})",
                code=Code.STREAM_OUT_OF_ORDER,
            )
        digest = hashlib.sha256(self.link)
        digest.update(body)
        expected = digest.digest()
        if link != expected:
            raise TrustError(
                f"{self.direction} stream message {seq} does not extend the hash chain: it was "
                "altered",
                code=Code.STREAM_DIGEST_MISMATCH,
            )
        self.link = expected
        self.count = seq
        self.size += len(body)
        if self._bodies is not None:
            self._keep(body)

    def _keep(self, body: bytes) -> None:
        assert self._bodies is not None
        if len(self._bodies) + 4 + len(body) > self._cap:
            self._bodies = None  # over the cap: none of this direction's messages are kept
        else:
            self._bodies += len(body).to_bytes(4, "big")
            self._bodies += body

    @property
    def bodies(self) -> bytes | None:
        """The direction's messages, framed, when they were kept and fit the cap."""
        return None if self._bodies is None else bytes(self._bodies)

    def link_at(self, count: int) -> bytes | None:
        """The link after message `count` (0: the seed is not kept; None when not kept)."""
        if count == self.count:
            return self.link
        if self._kept is None or not 0 < count <= self.count:
            return None
        if self.count - count >= len(self._kept) // 32:
            return None  # older than what is kept
        at = ((count - 1) * 32) % len(self._kept)
        return bytes(self._kept[at : at + 32])

    @property
    def digest(self) -> str:
        return self.link.hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedClose:
    header: bytes
    close: StreamClose
    signature: bytes


def sign_close(
    request: RequestHeader,
    request_header: bytes,
    sent: Chain,
    signer: EcdsaSigner,
    sender: SecurityServerId,
    now: datetime,
    *,
    received: Chain | None = None,
    grpc_status: int = 0,
    grpc_message: str = "",
) -> SignedClose:
    """Sign the end of the direction `sent`; the provider's (response) close also names
    what it `received` of the request stream and the backend's status."""
    close = StreamClose(
        message_id=request.message_id,
        request_sha256=sha256_hex(request_header),
        service=request.service,
        direction=sent.direction,
        sender=sender,
        created_at=now,
        count=sent.count,
        size=sent.size,
        digest=sent.digest,
        grpc_status=grpc_status,
        grpc_message=grpc_message[:1024],
        request_count=None if received is None else received.count,
        request_digest=None if received is None else received.digest,
    )
    header = close.encode()
    return SignedClose(header=header, close=close, signature=signer.sign(header))


def check_close(
    header: bytes,
    signature: bytes,
    signer_certificate: bytes,
    *,
    request: RequestHeader,
    request_header: bytes,
    received: Chain,
    sender: SecurityServerId,
    config: GlobalConfiguration,
    now: datetime,
    sent: Chain | None = None,
) -> StreamClose:
    """Check the close of the direction `received` from its `sender`, signed by the member
    that must sign it (the client's for the request direction, the service's for the
    response); for the response, also that it names a request count and link this side
    did send (`sent`). `GatewayError` when it is not acceptable."""
    close = decode_close(header)
    if (
        close.message_id != request.message_id
        or close.request_sha256 != sha256_hex(request_header)
        or close.service != request.service
        or close.direction != received.direction
        or close.sender != sender
    ):
        raise TrustError(
            f"the {received.direction} stream's close does not belong to this stream",
            code=Code.RESPONSE_MISMATCH,
        )
    member = request.client.member if received.direction == REQUEST else request.service.member
    certificate, signed_by = config.trust.signing_member(signer_certificate, now)
    if signed_by != member:
        raise TrustError(
            f"the {received.direction} stream's close is signed by {signed_by}, not by {member}",
            code=Code.UNTRUSTED_SIGNER,
        )
    verify_signature(certificate, header, signature)
    if (close.count, close.size, close.digest) != (received.count, received.size, received.digest):
        raise TrustError(
            f"the {received.direction} stream's close signs {close.count} messages of "
            f"{close.size} bytes ending in {close.digest[:16]}…, but {received.count} of "
            f"{received.size} bytes arrived ending in {received.digest[:16]}…",
            code=Code.STREAM_DIGEST_MISMATCH,
        )
    if sent is not None:
        count = close.request_count if close.request_count is not None else -1
        link = sent.link_at(count) if 0 < count <= sent.count else None
        if count == 0:
            link = seed(sent.direction, request_header)
        if link is None or link.hex() != close.request_digest:
            raise TrustError(
                f"the provider's close signs {count} request messages with a digest this "
                f"server did not send ({sent.count} were sent)",
                code=Code.STREAM_DIGEST_MISMATCH,
            )
    return close


def check_kind(request: RequestHeader, catalogued: str | None) -> None:
    """A streaming request must name the kind the catalogue gives its method."""
    if request.stream != catalogued:
        raise GatewayError(
            f"method {request.method} is {catalogued or 'unary'} in the catalogue, but the "
            f"request opens it as {request.stream or 'unary'}",
            code=Code.UNKNOWN_METHOD,
        )


def too_long(seconds: float, limit: float) -> GatewayError:
    return GatewayError(
        f"the stream has lasted {seconds:.0f} s, over this server's limit of {limit:.0f} s "
        "(limits.max_stream_seconds)",
        code=Code.STREAM_TOO_LONG,
    )


def too_many(direction: str, count: int, limit: int) -> GatewayError:
    return GatewayError(
        f"the {direction} stream has {count} messages, over this server's limit of {limit} "
        "(limits.max_stream_messages)",
        code=Code.STREAM_TOO_MANY_MESSAGES,
    )


def too_large(direction: str, size: int, limit: int) -> GatewayError:
    return GatewayError(
        f"a {direction} stream message has {size} bytes, over this server's limit of {limit} "
        "(limits.max_message_bytes)",
        code=Code.BODY_TOO_LARGE,
    )


def incomplete(direction: str, why: str) -> GatewayError:
    return GatewayError(
        f"the {direction} stream ended without its signed close ({why})",
        code=Code.STREAM_INCOMPLETE,
    )


def close_record(
    role: Role,
    facts: Facts,
    signed: SignedClose | tuple[bytes, StreamClose, bytes],
    signer_certificate_sha256: str,
    signer_ocsp_sha256: str | None,
    now: datetime,
    bodies_sha256: str | None = None,
) -> LogRecord:
    """The record of a direction's close: `stream-close` for the request direction,
    `response` for the response direction (the stream's answer, with the backend's status)."""
    header, close, signature = (
        (signed.header, signed.close, signed.signature)
        if isinstance(signed, SignedClose)
        else signed
    )
    response = close.direction == RESPONSE
    return LogRecord(
        kind=RecordKind.RESPONSE if response else RecordKind.STREAM_CLOSE,
        role=role,
        logged_at=now,
        facts=facts,
        header=header,
        signature=signature,
        signer_certificate_sha256=signer_certificate_sha256,
        signer_ocsp_sha256=signer_ocsp_sha256,
        # the direction's messages, framed, when the log keeps them (log.store_bodies)
        body_sha256=bodies_sha256,
        status=("ok" if close.grpc_status == 0 else "backend_error") if response else "ok",
        error_message=close.grpc_message or None,
    )
