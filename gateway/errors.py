"""The error hierarchy of the gateway, with stable codes.

Every error the gateway reports to a caller or a peer is a `GatewayError` with a stable
`code` (safe to show a peer; carried in gRPC trailing metadata `gateway-error`) and a
message that says what happened and what to do. Each code maps to exactly one gRPC
status, in `STATUS_BY_CODE`, the only place where that mapping is made.

The groups are shallow, as in httpcore: a caller usually catches `GatewayError` and
reads `code`. This module must never include internal detail (paths, stack traces,
SQL) in a message that may reach a peer.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Status(StrEnum):
    """gRPC status names (the I/O edge turns them into `grpc.StatusCode`)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    DATA_LOSS = "DATA_LOSS"
    INTERNAL = "INTERNAL"


class Code(StrEnum):
    """Stable error codes. Never renumber or rename one: callers match on them."""

    # the caller's request is malformed
    MISSING_METADATA = "missing_metadata"
    MALFORMED_IDENTIFIER = "malformed_identifier"
    BODY_TOO_LARGE = "body_too_large"
    OVERLOADED = "overloaded"
    # routing and authorisation
    CLIENT_NOT_SERVED = "client_not_served"
    CLIENT_NOT_AUTHENTICATED = "client_not_authenticated"
    UNKNOWN_SERVICE = "unknown_service"
    UNKNOWN_METHOD = "unknown_method"
    NO_AGREEMENT = "no_agreement"
    PURPOSE_NOT_COVERED = "purpose_not_covered"
    AGREEMENT_NOT_YET_VALID = "agreement_not_yet_valid"
    AGREEMENT_EXPIRED = "agreement_expired"
    AGREEMENT_SUSPENDED = "agreement_suspended"
    AGREEMENT_REVOKED = "agreement_revoked"
    RATE_LIMITED = "rate_limited"
    # peer authentication and message integrity
    PEER_NOT_REGISTERED = "peer_not_registered"
    PEER_MEMBER_MISMATCH = "peer_member_mismatch"
    UNTRUSTED_SIGNER = "untrusted_signer"
    BAD_SIGNATURE = "bad_signature"
    BODY_DIGEST_MISMATCH = "body_digest_mismatch"
    MALFORMED_ENVELOPE = "malformed_envelope"
    RESPONSE_MISMATCH = "response_mismatch"
    REPLAYED_MESSAGE = "replayed_message"
    STALE_MESSAGE = "stale_message"
    # streams (security_server.streams): a message out of sequence (missing, repeated or
    # reordered), a message or close whose hash chain does not match, a stream that ended
    # without its signed close, and the stream limits
    STREAM_OUT_OF_ORDER = "stream_out_of_order"
    STREAM_DIGEST_MISMATCH = "stream_digest_mismatch"
    STREAM_INCOMPLETE = "stream_incomplete"
    STREAM_TOO_LONG = "stream_too_long"
    STREAM_TOO_MANY_MESSAGES = "stream_too_many_messages"
    TOO_MANY_STREAMS = "too_many_streams"
    # certificate status (OCSP) and time-stamps
    SIGNER_CERTIFICATE_REVOKED = "signer_certificate_revoked"
    PEER_CERTIFICATE_REVOKED = "peer_certificate_revoked"
    CERTIFICATE_STATUS_STALE = "certificate_status_stale"
    CERTIFICATE_STATUS_INVALID = "certificate_status_invalid"
    TIMESTAMP_INVALID = "timestamp_invalid"
    # configuration
    CONFIGURATION_UNAVAILABLE = "configuration_unavailable"
    CONFIGURATION_EXPIRED = "configuration_expired"
    CONFIGURATION_INVALID = "configuration_invalid"
    # federation (calls between instances)
    INSTANCE_NOT_FEDERATED = "instance_not_federated"
    FEDERATION_ENDED = "federation_ended"
    FEDERATION_NOT_ALLOWED = "federation_not_allowed"
    FEDERATED_CONFIGURATION_UNAVAILABLE = "federated_configuration_unavailable"
    FEDERATED_CONFIGURATION_EXPIRED = "federated_configuration_expired"
    OUTBOUND_APPROVAL_MISSING = "outbound_approval_missing"
    # availability of the path
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    LOG_UNAVAILABLE = "log_unavailable"
    TIMESTAMPING_UNAVAILABLE = "timestamping_unavailable"
    INTERNAL = "internal_error"
    # the audit chain
    AUDIT_CHAIN_BROKEN = "audit_chain_broken"


STATUS_BY_CODE: dict[Code, Status] = {
    Code.MISSING_METADATA: Status.INVALID_ARGUMENT,
    Code.MALFORMED_IDENTIFIER: Status.INVALID_ARGUMENT,
    Code.BODY_TOO_LARGE: Status.RESOURCE_EXHAUSTED,
    Code.OVERLOADED: Status.RESOURCE_EXHAUSTED,
    Code.CLIENT_NOT_SERVED: Status.PERMISSION_DENIED,
    Code.CLIENT_NOT_AUTHENTICATED: Status.UNAUTHENTICATED,
    Code.UNKNOWN_SERVICE: Status.NOT_FOUND,
    Code.UNKNOWN_METHOD: Status.UNIMPLEMENTED,
    Code.NO_AGREEMENT: Status.PERMISSION_DENIED,
    Code.PURPOSE_NOT_COVERED: Status.PERMISSION_DENIED,
    Code.AGREEMENT_NOT_YET_VALID: Status.PERMISSION_DENIED,
    Code.AGREEMENT_EXPIRED: Status.PERMISSION_DENIED,
    Code.AGREEMENT_SUSPENDED: Status.PERMISSION_DENIED,
    Code.AGREEMENT_REVOKED: Status.PERMISSION_DENIED,
    Code.RATE_LIMITED: Status.RESOURCE_EXHAUSTED,
    Code.PEER_NOT_REGISTERED: Status.UNAUTHENTICATED,
    Code.PEER_MEMBER_MISMATCH: Status.PERMISSION_DENIED,
    Code.UNTRUSTED_SIGNER: Status.UNAUTHENTICATED,
    Code.BAD_SIGNATURE: Status.UNAUTHENTICATED,
    Code.BODY_DIGEST_MISMATCH: Status.UNAUTHENTICATED,
    Code.MALFORMED_ENVELOPE: Status.INVALID_ARGUMENT,
    Code.RESPONSE_MISMATCH: Status.UNAUTHENTICATED,
    Code.REPLAYED_MESSAGE: Status.ALREADY_EXISTS,
    Code.STALE_MESSAGE: Status.FAILED_PRECONDITION,
    Code.STREAM_OUT_OF_ORDER: Status.DATA_LOSS,
    Code.STREAM_DIGEST_MISMATCH: Status.DATA_LOSS,
    Code.STREAM_INCOMPLETE: Status.DATA_LOSS,
    Code.STREAM_TOO_LONG: Status.DEADLINE_EXCEEDED,
    Code.STREAM_TOO_MANY_MESSAGES: Status.RESOURCE_EXHAUSTED,
    Code.TOO_MANY_STREAMS: Status.RESOURCE_EXHAUSTED,
    Code.SIGNER_CERTIFICATE_REVOKED: Status.UNAUTHENTICATED,
    Code.PEER_CERTIFICATE_REVOKED: Status.UNAUTHENTICATED,
    Code.CERTIFICATE_STATUS_STALE: Status.UNAUTHENTICATED,
    Code.CERTIFICATE_STATUS_INVALID: Status.UNAUTHENTICATED,
    Code.TIMESTAMP_INVALID: Status.INTERNAL,
    Code.CONFIGURATION_UNAVAILABLE: Status.UNAVAILABLE,
    Code.CONFIGURATION_EXPIRED: Status.UNAVAILABLE,
    Code.INSTANCE_NOT_FEDERATED: Status.PERMISSION_DENIED,
    Code.FEDERATION_ENDED: Status.PERMISSION_DENIED,
    Code.FEDERATION_NOT_ALLOWED: Status.PERMISSION_DENIED,
    Code.FEDERATED_CONFIGURATION_UNAVAILABLE: Status.UNAVAILABLE,
    Code.FEDERATED_CONFIGURATION_EXPIRED: Status.UNAVAILABLE,
    Code.OUTBOUND_APPROVAL_MISSING: Status.PERMISSION_DENIED,
    Code.CONFIGURATION_INVALID: Status.FAILED_PRECONDITION,
    Code.PROVIDER_UNAVAILABLE: Status.UNAVAILABLE,
    Code.BACKEND_UNAVAILABLE: Status.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
    Code.LOG_UNAVAILABLE: Status.UNAVAILABLE,
    Code.TIMESTAMPING_UNAVAILABLE: Status.UNAVAILABLE,
    Code.INTERNAL: Status.INTERNAL,
    Code.AUDIT_CHAIN_BROKEN: Status.INTERNAL,
}


# how much of a caller's input an error message quotes, and how long a message sent to a
# caller or a peer may be: gRPC refuses trailers past 16 KiB (and may past 8 KiB), so a
# message quoting its input whole could make the refusal itself unreadable
QUOTE_CHARS = 64
MAX_MESSAGE_CHARS = 1024
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def quote(value: str) -> str:
    """An input as an error message shows it: its first `QUOTE_CHARS` characters, quoted
    with non-printable ones escaped (never raw control bytes), and its length when cut."""
    if len(value) <= QUOTE_CHARS:
        return repr(value)
    return f"{value[:QUOTE_CHARS]!r}... ({len(value)} characters)"


def bound_message(message: str) -> str:
    """A message safe to send in a status: printable ASCII (anything else escaped), cut to
    `MAX_MESSAGE_CHARS` characters with a mark that it was cut."""
    safe = _UNSAFE.sub(lambda m: ascii(m.group())[1:-1], message)
    if len(safe) <= MAX_MESSAGE_CHARS:
        return safe
    mark = " [cut]"
    return safe[: MAX_MESSAGE_CHARS - len(mark)] + mark


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    @property
    def status(self) -> Status:
        return STATUS_BY_CODE[self.code]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r})"


class RequestError(GatewayError):
    """The local caller's request is malformed or incomplete: the caller must fix it."""


class IdentifierError(RequestError):
    """An identifier does not have one of the accepted forms."""

    code = Code.MALFORMED_IDENTIFIER


class AuthorizationError(GatewayError):
    """The request is well formed but no agreement or registration allows it."""


class TrustError(GatewayError):
    """A peer, a certificate or a signature cannot be trusted; treat as an attack."""


class ConfigurationError(GatewayError):
    """The global configuration is missing, invalid or expired."""


class UnavailableError(GatewayError):
    """A part of the path (provider server, backend, log) cannot be reached now."""


class AuditError(GatewayError):
    """The message log does not verify."""

    code = Code.AUDIT_CHAIN_BROKEN


class ConfigFileError(Exception):
    """A local configuration file (TOML) is invalid; raised at start-up only."""
