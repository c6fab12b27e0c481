"""Message log records: the facts of one exchange (`Facts`) and a typed record
(`LogRecord`) whose `fields()` are what the log chains and stores, built in one place for
both endpoints (and the auditor API's and refusal-aggregate records, through `record`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from gateway.audit import RECORD_FIELDS, FieldValue, RecordKind, Role
from gateway.timeutil import format_time

_MAX_TEXT = 256
# most characters of a text field (longer values are cut), for callers that compose one
MAX_RECORD_TEXT = _MAX_TEXT

# an unverified claim of a party is stored as `claimed:<value>`, so that a member-scoped
# auditor's prefix match (`MEMBER/`) never takes it for that member's own record
CLAIM_PREFIX = "claimed:"
_MAX_CLAIM = 200


def printable(value: str) -> str:
    """`value` with each character that is not printable (control characters, line breaks,
    bidirectional overrides) written as its Python escape: no record column shows an
    auditor's terminal a fake line or a colour."""
    if value.isprintable():
        return value
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value
    )


def claimed(value: str | None) -> str | None:
    """An unverified client or service id as a log column: `claimed:` + the value with
    control characters escaped, cut to 200 characters + `…sha256:<16 hex>` of the whole."""
    if value is None:
        return None
    shown = printable(value)
    if len(shown) > _MAX_CLAIM:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        shown = f"{shown[:_MAX_CLAIM]}…sha256:{digest}"
    return CLAIM_PREFIX + shown


def _clip(value: str | None) -> str | None:
    """A text column: printable (a refused call's unchecked purpose, user or method may hold
    anything a raw HTTP/2 client sends), cut to its bound."""
    return None if value is None else printable(value)[:_MAX_TEXT]


@dataclass(slots=True, kw_only=True)
class Facts:
    """What is known of one exchange, for its records: client and service as verified ids,
    or as unverified claims (`claimed`) until they are checked."""

    message_id: str | None
    client: str | None = None
    service: str | None = None
    method: str | None = None
    purpose: str | None = None
    agreement_id: str | None = None
    user_id: str | None = None
    subject_ref: str | None = None
    peer: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "message_id": self.message_id,
            "client": self.client,
            "service": self.service,
            "method": self.method,
            "purpose": self.purpose,
            "agreement_id": self.agreement_id,
            "user_id": self.user_id,
            "subject_ref": self.subject_ref,
            "peer": self.peer,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRecord:
    """One record of the message log, before the log chains it."""

    kind: RecordKind
    role: Role
    logged_at: datetime
    facts: Facts
    header: bytes | None = None
    signature: bytes | None = None
    signer_certificate_sha256: str | None = None
    signer_ocsp_sha256: str | None = None
    body_sha256: str | None = None
    status: str = "ok"
    error_code: str | None = None
    error_message: str | None = None

    def fields(self) -> dict[str, FieldValue]:
        """The record's fields as the log stores them (texts cut to their bounds)."""
        return record(
            kind=self.kind,
            role=self.role,
            logged_at=self.logged_at,
            header=self.header,
            signature=self.signature,
            signer_certificate_sha256=self.signer_certificate_sha256,
            signer_ocsp_sha256=self.signer_ocsp_sha256,
            body_sha256=self.body_sha256,
            status=self.status,
            error_code=self.error_code,
            error_message=self.error_message,
            **self.facts.as_dict(),
        )


def record(
    *,
    kind: RecordKind,
    role: Role,
    logged_at: datetime,
    message_id: str | None,
    client: str | None = None,
    service: str | None = None,
    method: str | None = None,
    purpose: str | None = None,
    agreement_id: str | None = None,
    user_id: str | None = None,
    subject_ref: str | None = None,
    peer: str | None = None,
    header: bytes | None = None,
    signature: bytes | None = None,
    signer_certificate_sha256: str | None = None,
    signer_ocsp_sha256: str | None = None,
    body_sha256: str | None = None,
    status: str = "ok",
    error_code: str | None = None,
    error_message: str | None = None,
) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {
        "logged_at": format_time(logged_at),
        "message_id": _clip(message_id),
        "kind": kind.value,
        "role": role.value,
        "client": _clip(client),
        "service": _clip(service),
        "method": _clip(method),
        "purpose": _clip(purpose),
        "agreement_id": _clip(agreement_id),
        "user_id": _clip(user_id),
        "subject_ref": subject_ref,
        "peer": _clip(peer),
        "header": header,
        "signature": signature,
        "signer_certificate_sha256": signer_certificate_sha256,
        "signer_ocsp_sha256": signer_ocsp_sha256,
        "body_sha256": body_sha256,
        "status": status,
        "error_code": error_code,
        "error_message": _clip(error_message),
    }
    assert tuple(fields) == RECORD_FIELDS
    return fields
