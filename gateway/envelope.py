"""Request and response envelopes and their canonical signed bytes.

A header is what a security server signs: the routing facts of one message plus the
SHA-256 digest of its body (which travels beside it, unsigned and opaque). The response
header also carries the digest of the request header it answers, binding the two. The
encoding is canonical JSON (`gateway.canonical`); `decode_*` accept only canonical bytes
and check every field, raising `TrustError(MALFORMED_ENVELOPE)` on anything else.

This module never reads the clock or draws random ids: the caller passes them in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway import canonical
from gateway.errors import Code, GatewayError, RequestError, TrustError, quote
from gateway.identifiers import SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time

PROTOCOL_VERSION = 1

_MESSAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_PURPOSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_FREE_TEXT = 256


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_message_id(value: str) -> bool:
    """Whether `value` has the form of a message id (and so may be echoed in metadata)."""
    return _MESSAGE_ID.fullmatch(value) is not None


def check_message_id(value: str) -> str:
    if not is_message_id(value):
        raise RequestError(
            f"message id {quote(value)} is malformed: use 1 to 128 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit",
            code=Code.MALFORMED_IDENTIFIER,
        )
    return value


def check_purpose(value: str) -> str:
    if not _PURPOSE.fullmatch(value):
        raise RequestError(
            f"purpose {quote(value)} is malformed: use 1 to 64 letters, digits, '.', '_' or '-'",
            code=Code.MALFORMED_IDENTIFIER,
        )
    return value


def check_method(value: str) -> str:
    if not _METHOD.fullmatch(value):
        raise RequestError(
            f"gRPC method {quote(value)} is malformed: expected /package.Service/Method",
            code=Code.MALFORMED_IDENTIFIER,
        )
    return value


def check_free_text(name: str, value: str) -> str:
    if not value or len(value) > _MAX_FREE_TEXT or not value.isprintable():
        raise RequestError(
            f"{name} must be 1 to {_MAX_FREE_TEXT} printable characters",
            code=Code.MALFORMED_IDENTIFIER,
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHeader:
    """The signed facts of a request."""

    message_id: str
    client: SubsystemId
    service: ServiceId
    method: str
    purpose: str
    sender: SecurityServerId
    created_at: datetime
    body_sha256: str
    user_id: str | None = None
    # the data subject's keyed pseudonym (HMAC under the instance's key), never the
    # identifier itself: the header is kept in both message logs
    subject_ref: str | None = None
    # a streaming call's kind ("server", "client" or "bidi"); None for a unary call. A
    # stream's messages travel after the header, each extending a hash chain, and each
    # side signs its direction's digest when it closes (`StreamClose`); `body_sha256` is
    # then the digest of no bytes.
    stream: str | None = None

    def encode(self) -> bytes:
        return canonical.encode(
            {
                **({"stream": self.stream} if self.stream is not None else {}),
                "v": PROTOCOL_VERSION,
                "type": "request",
                "message_id": self.message_id,
                "client": str(self.client),
                "service": str(self.service),
                "method": self.method,
                "purpose": self.purpose,
                "sender": str(self.sender),
                "created_at": format_time(self.created_at),
                "body_sha256": self.body_sha256,
                "user_id": self.user_id,
                "subject_ref": self.subject_ref,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHeader:
    """The signed facts of a response; `request_sha256` binds it to its request."""

    message_id: str
    request_sha256: str
    service: ServiceId
    sender: SecurityServerId
    created_at: datetime
    body_sha256: str
    # the backend's gRPC status (0 = OK) and message, passed through to the caller
    grpc_status: int = 0
    grpc_message: str = ""

    def encode(self) -> bytes:
        return canonical.encode(
            {
                "v": PROTOCOL_VERSION,
                "type": "response",
                "message_id": self.message_id,
                "request_sha256": self.request_sha256,
                "service": str(self.service),
                "sender": str(self.sender),
                "created_at": format_time(self.created_at),
                "body_sha256": self.body_sha256,
                "grpc_status": self.grpc_status,
                "grpc_message": self.grpc_message,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamClose:
    """The signed end of one direction of a streaming call: how many messages were sent,
    their bytes, and the last link of their hash chain (`gateway.streams`), bound to the
    request header. The response direction's close is the stream's response: it carries
    the backend's status, and also signs what its sender received of the request stream
    (`request_count`, `request_digest`), as a unary response signs the request."""

    message_id: str
    request_sha256: str
    service: ServiceId
    direction: str  # "request" or "response"
    sender: SecurityServerId
    created_at: datetime
    count: int
    size: int
    digest: str
    grpc_status: int = 0
    grpc_message: str = ""
    request_count: int | None = None
    request_digest: str | None = None

    # a close carries no body of its own (the stream's messages are covered by `digest`)
    body_sha256: str = ""

    def encode(self) -> bytes:
        return canonical.encode(
            {
                "v": PROTOCOL_VERSION,
                "type": "stream-close",
                "message_id": self.message_id,
                "request_sha256": self.request_sha256,
                "service": str(self.service),
                "direction": self.direction,
                "sender": str(self.sender),
                "created_at": format_time(self.created_at),
                "count": self.count,
                "bytes": self.size,
                "digest": self.digest,
                "grpc_status": self.grpc_status,
                "grpc_message": self.grpc_message,
                "request_count": self.request_count,
                "request_digest": self.request_digest,
            }
        )


def _malformed(why: str) -> TrustError:
    return TrustError(f"envelope header is malformed: {why}", code=Code.MALFORMED_ENVELOPE)


def _fields(data: bytes, kind: str, keys: set[str]) -> dict[str, Any]:
    try:
        value = canonical.decode(data)
    except canonical.NotCanonicalError as exc:
        raise _malformed(str(exc)) from None
    if not isinstance(value, dict):
        raise _malformed("not a JSON object")
    if set(value) != keys and not (kind == "request" and set(value) == keys | {"stream"}):
        raise _malformed(f"fields {quote(', '.join(sorted(value)))} differ from {sorted(keys)}")
    version = value["v"]
    if type(version) is not int or version != PROTOCOL_VERSION or value["type"] != kind:
        raise _malformed(f"not a version {PROTOCOL_VERSION} {kind} header")
    return value


def _text(fields: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = fields[key]
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _malformed(f"field {key!r} must be a string")
    return value


_REQUEST_KEYS = {
    "v", "type", "message_id", "client", "service", "method", "purpose", "sender",
    "created_at", "body_sha256", "user_id", "subject_ref",
}  # fmt: skip
_CLOSE_KEYS = {
    "v", "type", "message_id", "request_sha256", "service", "direction", "sender",
    "created_at", "count", "bytes", "digest", "grpc_status", "grpc_message",
    "request_count", "request_digest",
}  # fmt: skip
STREAM_KINDS = ("server", "client", "bidi")
_RESPONSE_KEYS = {
    "v", "type", "message_id", "request_sha256", "service", "sender", "created_at",
    "body_sha256", "grpc_status", "grpc_message",
}  # fmt: skip


def _digest(fields: dict[str, Any], key: str) -> str:
    value = _text(fields, key)
    if not _DIGEST.fullmatch(value):
        raise _malformed(f"field {key!r} is not a SHA-256 hex digest")
    return str(value)


def decode_request(data: bytes) -> RequestHeader:
    """Parse and check the canonical bytes of a request header."""
    f = _fields(data, "request", _REQUEST_KEYS)
    try:
        user_id = _text(f, "user_id", optional=True)
        subject_ref = _text(f, "subject_ref", optional=True)
        if subject_ref is not None and not _DIGEST.fullmatch(subject_ref):
            raise _malformed("field 'subject_ref' is not a pseudonym (64 hex digits)")
        stream = f.get("stream")
        if "stream" in f and stream not in STREAM_KINDS:
            raise _malformed(f"field 'stream' must be one of {', '.join(STREAM_KINDS)}")
        return RequestHeader(
            message_id=check_message_id(_text(f, "message_id")),
            client=SubsystemId.parse(_text(f, "client")),
            service=ServiceId.parse(_text(f, "service")),
            method=check_method(_text(f, "method")),
            purpose=check_purpose(_text(f, "purpose")),
            sender=SecurityServerId.parse(_text(f, "sender")),
            created_at=parse_time(_text(f, "created_at")),
            body_sha256=_digest(f, "body_sha256"),
            user_id=None if user_id is None else check_free_text("user id", user_id),
            subject_ref=subject_ref,
            stream=stream,
        )
    except (GatewayError, ValueError) as exc:
        if isinstance(exc, TrustError):
            raise
        raise _malformed(str(exc)) from None


def decode_response(data: bytes) -> ResponseHeader:
    """Parse and check the canonical bytes of a response header."""
    f = _fields(data, "response", _RESPONSE_KEYS)
    status = f["grpc_status"]
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 16:
        raise _malformed("field 'grpc_status' must be a gRPC status number")
    try:
        return ResponseHeader(
            message_id=check_message_id(_text(f, "message_id")),
            request_sha256=_digest(f, "request_sha256"),
            service=ServiceId.parse(_text(f, "service")),
            sender=SecurityServerId.parse(_text(f, "sender")),
            created_at=parse_time(_text(f, "created_at")),
            body_sha256=_digest(f, "body_sha256"),
            grpc_status=status,
            grpc_message=_text(f, "grpc_message"),
        )
    except (GatewayError, ValueError) as exc:
        if isinstance(exc, TrustError):
            raise
        raise _malformed(str(exc)) from None


def _count(fields: dict[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = fields[key]
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise _malformed(f"field {key!r} must be a count")
    return value


def decode_close(data: bytes) -> StreamClose:
    """Parse and check the canonical bytes of a stream's close."""
    f = _fields(data, "stream-close", _CLOSE_KEYS)
    status = f["grpc_status"]
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 16:
        raise _malformed("field 'grpc_status' must be a gRPC status number")
    direction = f["direction"]
    if direction not in ("request", "response"):
        raise _malformed("field 'direction' must be 'request' or 'response'")
    request_count = _count(f, "request_count", optional=True)
    request_digest = None if f["request_digest"] is None else _digest(f, "request_digest")
    named = (request_count is not None, request_digest is not None)
    if named != ((direction == "response"),) * 2:
        raise _malformed("only a response close, and every response close, names the request's")
    try:
        return StreamClose(
            message_id=check_message_id(_text(f, "message_id")),
            request_sha256=_digest(f, "request_sha256"),
            service=ServiceId.parse(_text(f, "service")),
            direction=direction,
            sender=SecurityServerId.parse(_text(f, "sender")),
            created_at=parse_time(_text(f, "created_at")),
            count=_count(f, "count") or 0,
            size=_count(f, "bytes") or 0,
            digest=_digest(f, "digest"),
            grpc_status=status,
            grpc_message=_text(f, "grpc_message"),
            request_count=request_count,
            request_digest=request_digest,
        )
    except (GatewayError, ValueError) as exc:
        if isinstance(exc, TrustError):
            raise
        raise _malformed(str(exc)) from None


def decode_answer(data: bytes) -> ResponseHeader | StreamClose:
    """A response header, or a stream's close (what a `response` record holds)."""
    try:
        kind = canonical.decode(data).get("type")
    except (canonical.NotCanonicalError, AttributeError):
        kind = None
    return decode_close(data) if kind == "stream-close" else decode_response(data)


def check_body(header_body_sha256: str, body: bytes) -> None:
    """Raise `TrustError(BODY_DIGEST_MISMATCH)` unless the body matches its signed digest."""
    if sha256_hex(body) != header_body_sha256:
        raise TrustError(
            "the message body does not match the digest in its signed header: it was altered",
            code=Code.BODY_DIGEST_MISMATCH,
        )
