"""The hash chains of the message log and the admin log: append, and verify naming the first bad record.

Each record's hash covers a domain tag, its sequence number, the previous record's hash
and a length-prefixed, type-tagged encoding of all its fields, so any edit of a field, a deletion (a gap in
the sequence or a broken link) or a reordering is detected by `verify_chain`, which
names the first bad record. The chain starts from `GENESIS`.

The message log (`MESSAGE_LOG`) and the registry's admin log (`ADMIN_LOG`) share this
code; each has its own domain tag and field list (`ChainFormat`), so a record of one can
never pass for a record of the other.

Pure functions: the stores that hold the records live in `security_server.message_log`
and `registry.store`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import AuditError

GENESIS = bytes(32)

# a chain's name (`log.chain`): it names archive files and travels in checkpoints, so
# letters, digits, '.', '_' and '-' only, at most 64
CHAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"

FieldValue = str | int | bytes | None


class RecordKind(StrEnum):
    REQUEST = "request"
    RESPONSE = "response"
    REFUSAL = "refusal"
    # the end of a stream's request direction, with the consumer's signed close (a
    # stream's response direction ends with a `response` record holding the provider's)
    STREAM_CLOSE = "stream-close"
    # a query made through the auditor API (auditor access is itself logged)
    AUDIT_QUERY = "audit-query"
    # refusals counted over an interval instead of logged one by one (floods; see
    # security_server.floods): one record per source, reason and interval, with the count
    REFUSAL_AGGREGATE = "refusal-aggregate"


class Role(StrEnum):
    CONSUMER = "consumer"
    PROVIDER = "provider"
    AUDITOR = "auditor"


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
    "agreement_id",
    "user_id",
    "subject_ref",
    "peer",
    "header",
    "signature",
    "signer_certificate_sha256",
    "signer_ocsp_sha256",
    "body_sha256",
    "status",
    "error_code",
    "error_message",
)


# The fields of an admin log entry: who did what to which record, from which state to which.
ADMIN_FIELDS: tuple[str, ...] = (
    "logged_at",
    "actor",
    "role",
    "action",
    "target",
    "from_state",
    "to_state",
    "reason",
    "details",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainFormat:
    """One kind of chain: its domain tag, its fields, and the field that names a record."""

    tag: bytes
    fields: tuple[str, ...]
    label: str


MESSAGE_LOG = ChainFormat(tag=b"gateway-message-log/4\n", fields=RECORD_FIELDS, label="message_id")
ADMIN_LOG = ChainFormat(tag=b"gateway-admin-log/1\n", fields=ADMIN_FIELDS, label="target")


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


def record_preimage(
    seq: int,
    prev_hash: bytes,
    fields: Mapping[str, FieldValue],
    fmt: ChainFormat = MESSAGE_LOG,
) -> bytes:
    """The exact bytes whose SHA-256 is the chain hash of record `seq` (see `record_hash`).

    The evidence bundle ships them, so that `openssl dgst -sha256` alone recomputes a
    record's hash.
    """
    names = fmt.fields
    if len(fields) != len(names) or any(k not in fields for k in names):
        raise ValueError(f"record fields must be exactly {names}")
    return b"".join(
        [fmt.tag, seq.to_bytes(8, "big"), prev_hash, *[_encode_field(fields[k]) for k in names]]
    )


def record_hash(
    seq: int,
    prev_hash: bytes,
    fields: Mapping[str, FieldValue],
    fmt: ChainFormat = MESSAGE_LOG,
) -> bytes:
    """The chain hash of record `seq` with these fields, following `prev_hash`.

    SHA-256 over the format's domain tag, the sequence number, the previous hash and every
    field in the order of `fmt.fields`, each as a type tag (None, bytes, text, integer), a
    4-byte length and its bytes, so that no two different records encode alike.
    """
    return hashlib.sha256(record_preimage(seq, prev_hash, fields, fmt)).digest()


def parse_preimage(
    data: bytes, fmt: ChainFormat = MESSAGE_LOG
) -> tuple[int, bytes, dict[str, FieldValue]]:
    """(seq, previous hash, fields) encoded in `record_preimage` bytes; `ValueError` if malformed."""
    if not data.startswith(fmt.tag) or len(data) < len(fmt.tag) + 40:
        raise ValueError("not a record of this log format")
    at = len(fmt.tag)
    seq = int.from_bytes(data[at : at + 8], "big")
    prev = data[at + 8 : at + 40]
    at += 40
    fields: dict[str, FieldValue] = {}
    for name in fmt.fields:
        tag = data[at : at + 1]
        at += 1
        if tag == b"N":
            fields[name] = None
            continue
        if tag not in (b"B", b"S", b"I") or at + 4 > len(data):
            raise ValueError(f"field {name!r} is malformed")
        size = int.from_bytes(data[at : at + 4], "big")
        raw = data[at + 4 : at + 4 + size]
        if len(raw) != size:
            raise ValueError(f"field {name!r} is truncated")
        at += 4 + size
        fields[name] = raw if tag == b"B" else raw.decode() if tag == b"S" else int(raw)
    if at != len(data):
        raise ValueError("bytes follow the last field")
    return seq, prev, fields


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainedRecord:
    seq: int
    prev_hash: bytes
    hash: bytes
    fields: Mapping[str, FieldValue]
    # which chain of the log (one per replica); empty in single-chain logs such as the admin log
    chain: str = ""


@dataclass(slots=True)
class ChainHead:
    """Where a chain ends: the next sequence number and the hash to link to."""

    next_seq: int = 1
    last_hash: bytes = GENESIS
    fmt: ChainFormat = MESSAGE_LOG

    def link(self, fields: Mapping[str, FieldValue]) -> ChainedRecord:
        """Chain a new record after the head and advance the head."""
        digest = record_hash(self.next_seq, self.last_hash, fields, self.fmt)
        record = ChainedRecord(
            seq=self.next_seq, prev_hash=self.last_hash, hash=digest, fields=fields
        )
        self.next_seq += 1
        self.last_hash = digest
        return record


class ChainBrokenError(AuditError):
    """The chain does not verify; `seq` names the first bad record."""

    def __init__(
        self,
        seq: int,
        message_id: str | None,
        why: str,
        label: str = "message",
        *,
        chain: str = "",
    ) -> None:
        where = f"record {seq}" + (f" ({label} {message_id})" if message_id else "")
        if chain:
            where = f"chain {chain}, {where}"
        super().__init__(f"{where}: {why}")
        self.seq = seq
        self.message_id = message_id
        self.chain = chain


def verify_chain(
    records: Iterable[ChainedRecord],
    head: ChainHead | None = None,
    fmt: ChainFormat = MESSAGE_LOG,
) -> ChainHead:
    """Verify records in sequence order from `head` (genesis by default); return the new head.

    Without a head the chain starts at genesis in format `fmt`; with one, the head's
    format applies. Raises `ChainBrokenError` at the first record that is missing, out of order, unlinked
    or altered.
    """
    head = (
        ChainHead(fmt=fmt) if head is None else ChainHead(head.next_seq, head.last_hash, head.fmt)
    )
    fmt = head.fmt
    label = fmt.label.removesuffix("_id")
    for r in records:
        mid = r.fields.get(fmt.label)
        mid_text = mid if isinstance(mid, str) else None
        if r.seq != head.next_seq:
            if r.seq > head.next_seq:
                raise ChainBrokenError(
                    head.next_seq,
                    None,
                    f"is missing (the next record present is {r.seq})",
                    chain=r.chain,
                )
            raise ChainBrokenError(
                r.seq, mid_text, f"is out of order (expected {head.next_seq})", label, chain=r.chain
            )
        if r.prev_hash != head.last_hash:
            raise ChainBrokenError(
                r.seq, mid_text, "does not link to the record before it", label, chain=r.chain
            )
        if record_hash(r.seq, r.prev_hash, r.fields, fmt) != r.hash:
            raise ChainBrokenError(
                r.seq,
                mid_text,
                "was altered: its content does not match its hash",
                label,
                chain=r.chain,
            )
        head.next_seq += 1
        head.last_hash = r.hash
    return head
