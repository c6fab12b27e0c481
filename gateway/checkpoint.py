"""Signed checkpoints of a message log's chain heads, and the comparison of a log with them.

A security server signs, with its authentication key, "chain C of server S had N records,
the last one hashing to H, at time T" every few seconds and sends it to the registry, a
party outside its own database (see `registry.checkpoints`). Whoever later verifies the
log compares it with the checkpoints the registry kept: since every record's hash covers
all records before it, one matching checkpoint vouches for every record up to it, and a
mismatch names the first checkpoint a cut or rewrite broke.

The signed bytes are canonical JSON (`gateway.canonical`) with a domain tag of their own,
so a checkpoint signature can never pass for a configuration or an envelope signature.

Pure functions: no clock, network or database here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from gateway import canonical
from gateway.audit import CHAIN_NAME
from gateway.errors import AuditError, Code, GatewayError, TrustError, quote
from gateway.identifiers import SecurityServerId
from gateway.signing import Signer, verify_signature
from gateway.timeutil import format_time, parse_time

# the value of the "type" key: what the signature is about, and the format's version
CHECKPOINT_TYPE = "gateway-checkpoint/1"
# a chain's name as the log has it: the registry stores it and `audit verify` prints it
_CHAIN = re.compile(CHAIN_NAME)


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A chain head as the server saw it: `seq` records, the last hashing to `head`."""

    server: SecurityServerId
    chain: str
    seq: int
    head: bytes
    at: datetime

    def content(self) -> bytes:
        """The canonical bytes the server signs."""
        return canonical.encode(
            {
                "type": CHECKPOINT_TYPE,
                "server": str(self.server),
                "chain": self.chain,
                "seq": self.seq,
                "head": self.head.hex(),
                "time": format_time(self.at),
            }
        )

    @classmethod
    def parse(cls, content: bytes) -> Checkpoint:
        """The checkpoint in canonical bytes; `ValueError` when they are not one."""
        try:
            doc = canonical.decode(content)
            if doc.get("type") != CHECKPOINT_TYPE:
                raise ValueError(f"not a {CHECKPOINT_TYPE} document")
            seq = doc["seq"]
            head = bytes.fromhex(doc["head"])
            chain = doc["chain"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError("seq must be a positive integer")
            if len(head) != 32 or not isinstance(chain, str) or not _CHAIN.fullmatch(chain):
                raise ValueError(
                    "head must be 32 bytes, and chain 1 to 64 letters, digits, '.', '_' or '-'"
                )
            if set(doc) != {"type", "server", "chain", "seq", "head", "time"}:
                raise ValueError("unexpected or missing keys")
            return cls(
                server=SecurityServerId.parse(doc["server"]),
                chain=chain,
                seq=seq,
                head=head,
                at=parse_time(doc["time"]),
            )
        except (KeyError, TypeError, AttributeError, canonical.NotCanonicalError) as exc:
            raise ValueError(f"malformed checkpoint: {exc}") from None
        except GatewayError as exc:  # a malformed server id
            raise ValueError(f"malformed checkpoint: {exc.message}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedCheckpoint:
    content: bytes
    signature: bytes


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> SignedCheckpoint:
    content = checkpoint.content()
    return SignedCheckpoint(content=content, signature=signer.sign(content))


def verify_checkpoint(signed: SignedCheckpoint, certificate: x509.Certificate) -> Checkpoint:
    """The checkpoint, once its signature verifies with `certificate` (the registered
    authentication certificate of the server it names); `TrustError` otherwise."""
    try:
        checkpoint = Checkpoint.parse(signed.content)
    except ValueError as exc:
        raise TrustError(str(exc), code=Code.BAD_SIGNATURE) from None
    verify_signature(certificate, signed.content, signed.signature)
    return checkpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """A checkpoint as the registry kept it: what the server said, and when it arrived."""

    checkpoint: Checkpoint
    received_at: datetime

    def to_json(self) -> dict[str, object]:
        c = self.checkpoint
        return {
            "server": str(c.server),
            "chain": c.chain,
            "seq": c.seq,
            "head": c.head.hex(),
            "time": format_time(c.at),
            "received_at": format_time(self.received_at),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Received:
        try:
            chain = str(doc["chain"])
            if not _CHAIN.fullmatch(chain):
                raise ValueError(f"chain {quote(chain)} is not a chain's name")
            return cls(
                checkpoint=Checkpoint(
                    server=SecurityServerId.parse(str(doc["server"])),
                    chain=chain,
                    seq=int(str(doc["seq"])),
                    head=bytes.fromhex(str(doc["head"])),
                    at=parse_time(str(doc["time"])),
                ),
                received_at=parse_time(str(doc["received_at"])),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed checkpoint: {exc}") from None
        except GatewayError as exc:  # a malformed server id
            raise ValueError(f"malformed checkpoint: {exc.message}") from None


def encode_signature(signature: bytes) -> str:
    return base64.b64encode(signature).decode()


class CheckpointMismatchError(AuditError):
    """The log contradicts a checkpoint the registry received: it was cut or rewritten."""

    def __init__(self, checkpoint: Received, why: str) -> None:
        c = checkpoint.checkpoint
        super().__init__(
            f"chain {c.chain}, record {c.seq} (checkpointed at {format_time(c.at)}, received "
            f"by the registry at {format_time(checkpoint.received_at)}): {why}"
        )
        self.checkpoint = checkpoint


def wanted_seqs(checkpoints: Iterable[Received]) -> dict[str, set[int]]:
    """Per chain, the sequence numbers whose hashes a comparison needs."""
    wanted: dict[str, set[int]] = {}
    for r in checkpoints:
        wanted.setdefault(r.checkpoint.chain, set()).add(r.checkpoint.seq)
    return wanted


def compare_with_checkpoints(
    checkpoints: Iterable[Received],
    hashes: Mapping[tuple[str, int], bytes],
    ends: Mapping[str, int],
) -> int:
    """Check a verified log against its checkpoints; return how many it matched.

    `hashes` holds the log's hash at each checkpointed (chain, seq) it still has (in the
    database or its archives), `ends` the last sequence number of each chain. Raise
    `CheckpointMismatchError` at the earliest checkpoint the log contradicts: a chain that
    is gone, a tail cut below a checkpointed record, or a different hash at a checkpointed
    record (a rewrite at or before it)."""
    matched = 0
    ordered = sorted(checkpoints, key=lambda r: (r.checkpoint.chain, r.checkpoint.seq))
    for r in ordered:
        c = r.checkpoint
        end = ends.get(c.chain)
        if end is None:
            raise CheckpointMismatchError(
                r, f"the log has no chain {c.chain} at all, although it had {c.seq} record(s)"
            )
        if c.seq > end:
            raise CheckpointMismatchError(
                r,
                f"the log ends at record {end}, but the server had reached record {c.seq}: "
                f"records {end + 1}..{c.seq} (at least) were deleted",
            )
        found = hashes.get((c.chain, c.seq))
        if found is None:
            raise CheckpointMismatchError(r, "the log does not hold this record any more")
        if found != c.head:
            raise CheckpointMismatchError(
                r,
                f"the log's hash of this record is {found.hex()[:16]}…, the checkpoint's "
                f"{c.head.hex()[:16]}…: the log was rewritten at or before this record",
            )
        matched += 1
    return matched
