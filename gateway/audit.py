"""The hash chain of the message log: append, and verify naming the first bad record.

Each record's hash covers a domain tag, its sequence number, the previous record's hash
and a length-prefixed, type-tagged encoding of all its fields, so any edit of a field, a deletion (a gap in
the sequence or a broken link) or a reordering is detected by `verify_chain`, which
names the first bad record. The chain starts from `GENESIS`.

Pure functions: the store that holds the records lives in `security_server.message_log`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import AuditError

GENESIS = bytes(32)
_TAG = b"gateway-message-log/2\n"

FieldValue = str | int | bytes | None


class RecordKind(StrEnum):
    REQUEST = "request"
    RESPONSE = "response"
    REFUSAL = "refusal"


class Role(StrEnum):
    CONSUMER = "consumer"
    PROVIDER = "provider"


# The fields of a message log record, in the order of the table's columns.
RECORD_FIELDS: tuple[str, ...] = (
    "logged_at",
    "message_id",
    "kind",
    "role",
    "client",
    "service",
    "method",
    "purpose",
    "user_id",
    "subject_ref",
    "peer",
    "header",
    "signature",
    "signer_certificate_sha256",
    "body_sha256",
    "status",
    "error_code",
    "error_message",
)


def _encode_field(value: FieldValue) -> bytes:
    """Type tag, length and bytes of one field: unambiguous, and cheap on the hot path."""
    if value is None:
        return b"N"
    if isinstance(value, bytes):
        data, tag = value, b"B"
    elif isinstance(value, str):
        data, tag = value.encode("utf-8"), b"S"
    elif isinstance(value, int) and not isinstance(value, bool):
        data, tag = str(value).encode("ascii"), b"I"
    else:
        raise TypeError(f"a record field cannot hold {type(value).__name__}")
    return tag + len(data).to_bytes(4, "big") + data


def record_hash(seq: int, prev_hash: bytes, fields: Mapping[str, FieldValue]) -> bytes:
    """The chain hash of record `seq` with these fields, following `prev_hash`.

    SHA-256 over a domain tag, the sequence number, the previous hash and every field in
    the order of `RECORD_FIELDS`, each as a type tag (None, bytes, text, integer), a
    4-byte length and its bytes, so that no two different records encode alike.
    """
    if len(fields) != len(RECORD_FIELDS) or any(k not in fields for k in RECORD_FIELDS):
        raise ValueError(f"record fields must be exactly {RECORD_FIELDS}")
    h = hashlib.sha256(_TAG)
    h.update(seq.to_bytes(8, "big"))
    h.update(prev_hash)
    h.update(b"".join([_encode_field(fields[k]) for k in RECORD_FIELDS]))
    return h.digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainedRecord:
    seq: int
    prev_hash: bytes
    hash: bytes
    fields: Mapping[str, FieldValue]


@dataclass(slots=True)
class ChainHead:
    """Where a chain ends: the next sequence number and the hash to link to."""

    next_seq: int = 1
    last_hash: bytes = GENESIS

    def link(self, fields: Mapping[str, FieldValue]) -> ChainedRecord:
        """Chain a new record after the head and advance the head."""
        digest = record_hash(self.next_seq, self.last_hash, fields)
        record = ChainedRecord(
            seq=self.next_seq, prev_hash=self.last_hash, hash=digest, fields=fields
        )
        self.next_seq += 1
        self.last_hash = digest
        return record


class ChainBrokenError(AuditError):
    """The chain does not verify; `seq` names the first bad record."""

    def __init__(self, seq: int, message_id: str | None, why: str) -> None:
        where = f"record {seq}" + (f" (message {message_id})" if message_id else "")
        super().__init__(f"{where}: {why}")
        self.seq = seq
        self.message_id = message_id


def verify_chain(records: Iterable[ChainedRecord], head: ChainHead | None = None) -> ChainHead:
    """Verify records in sequence order from `head` (genesis by default); return the new head.

    Raises `ChainBrokenError` at the first record that is missing, out of order, unlinked
    or altered.
    """
    head = ChainHead() if head is None else ChainHead(head.next_seq, head.last_hash)
    for r in records:
        mid = r.fields.get("message_id")
        mid_text = mid if isinstance(mid, str) else None
        if r.seq != head.next_seq:
            if r.seq > head.next_seq:
                raise ChainBrokenError(
                    head.next_seq, None, f"is missing (the next record present is {r.seq})"
                )
            raise ChainBrokenError(r.seq, mid_text, f"is out of order (expected {head.next_seq})")
        if r.prev_hash != head.last_hash:
            raise ChainBrokenError(r.seq, mid_text, "does not link to the record before it")
        if record_hash(r.seq, r.prev_hash, r.fields) != r.hash:
            raise ChainBrokenError(
                r.seq, mid_text, "was altered: its content does not match its hash"
            )
        head.next_seq += 1
        head.last_hash = r.hash
    return head
