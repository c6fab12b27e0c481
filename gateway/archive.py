"""Archive files of the message log: the oldest records of one chain, hash-linked, offline.

When records pass the retention period they leave the database for an archive file. Each
file holds one contiguous run of one chain's records with everything their verification
needs: the records (fields, hashes), the time-stamped batches that cover them (Merkle root
and RFC 3161 token) and the evidence they name (certificates, OCSP answers, bodies). The
files of a chain are numbered 1, 2, 3...; each names the SHA-256 of the file before it,
and its first record links (by `prev_hash`) to the last record of the file before it, so a
missing, reordered or edited archive breaks the links and is named by `verify`.

Format (`FORMAT`): gzip (no name, mtime 0) of UTF-8 JSON lines. The first line is the
header {format, chain, number, first_seq, last_seq, prev_sha256, created_at}; then one line
per record {"record": {seq, prev_hash, hash, fields}}, per batch {"batch": {first_seq,
last_seq, root, token, tsa, gen_time}} and per evidence item {"evidence": {sha256, kind,
data}}; bytes are base64 (hashes hex).

Pure functions; the files are written and read by `security_server.archive`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.audit import CHAIN_NAME, ChainedRecord
from gateway.errors import AuditError
from gateway.evidence import decode_fields, encode_fields

FORMAT = "gateway-log-archive/1"
NO_ARCHIVE = "0" * 64  # what archive 1 names as the archive before it
_NAME = re.compile(rf"(?P<chain>{CHAIN_NAME})\.(?P<number>\d{{8,12}})\.log-archive\.gz")


class ArchiveError(AuditError):
    """An archive file cannot be read or does not verify."""


def file_name(chain: str, number: int) -> str:
    return f"{chain}.{number:08d}.log-archive.gz"


def parse_file_name(name: str) -> tuple[str, int] | None:
    """(chain, number) of an archive file's name, or None for any other file."""
    m = _NAME.fullmatch(name)
    if m is None or m["number"] != f"{int(m['number']):08d}":
        return None
    return m["chain"], int(m["number"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    first_seq: int
    last_seq: int
    root: bytes
    token: bytes
    tsa: str
    gen_time: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Archive:
    chain: str
    number: int
    first_seq: int
    last_seq: int
    prev_sha256: str
    created_at: str
    records: list[ChainedRecord]
    batches: list[Batch] = field(default_factory=list)
    evidence: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def encode(archive: Archive) -> bytes:
    """The archive file's bytes (deterministic: the same archive gives the same bytes)."""
    if not archive.records:
        raise ValueError("an archive holds at least one record")
    lines: list[dict[str, Any]] = [
        {
            "format": FORMAT,
            "chain": archive.chain,
            "number": archive.number,
            "first_seq": archive.first_seq,
            "last_seq": archive.last_seq,
            "prev_sha256": archive.prev_sha256,
            "created_at": archive.created_at,
        }
    ]
    lines += [
        {
            "record": {
                "seq": r.seq,
                "prev_hash": r.prev_hash.hex(),
                "hash": r.hash.hex(),
                "fields": encode_fields(r.fields),
            }
        }
        for r in archive.records
    ]
    lines += [
        {
            "batch": {
                "first_seq": b.first_seq,
                "last_seq": b.last_seq,
                "root": b.root.hex(),
                "token": base64.b64encode(b.token).decode(),
                "tsa": b.tsa,
                "gen_time": b.gen_time,
            }
        }
        for b in archive.batches
    ]
    lines += [
        {"evidence": {"sha256": sha, "kind": kind, "data": base64.b64encode(data).decode()}}
        for sha, (kind, data) in sorted(archive.evidence.items())
    ]
    text = "".join(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n" for line in lines)
    return gzip.compress(text.encode(), compresslevel=6, mtime=0)


def decode(data: bytes, *, where: str = "archive") -> Archive:
    """Parse an archive file; `ArchiveError` naming `where` when it is not one."""
    try:
        text = gzip.decompress(data).decode()
        lines = [json.loads(line) for line in text.splitlines()]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveError(f"{where} is not a readable archive file: {exc}") from None
    try:
        header = lines[0]
        if header.get("format") != FORMAT:
            raise ArchiveError(f"{where} is not in format {FORMAT}")
        chain = str(header["chain"])
        records: list[ChainedRecord] = []
        batches: list[Batch] = []
        evidence: dict[str, tuple[str, bytes]] = {}
        for line in lines[1:]:
            if "record" in line:
                r = line["record"]
                records.append(
                    ChainedRecord(
                        chain=chain,
                        seq=int(r["seq"]),
                        prev_hash=bytes.fromhex(r["prev_hash"]),
                        hash=bytes.fromhex(r["hash"]),
                        fields=decode_fields(r["fields"]),
                    )
                )
            elif "batch" in line:
                b = line["batch"]
                batches.append(
                    Batch(
                        first_seq=int(b["first_seq"]),
                        last_seq=int(b["last_seq"]),
                        root=bytes.fromhex(b["root"]),
                        token=base64.b64decode(b["token"], validate=True),
                        tsa=str(b["tsa"]),
                        gen_time=str(b["gen_time"]),
                    )
                )
            elif "evidence" in line:
                e = line["evidence"]
                evidence[str(e["sha256"])] = (
                    str(e["kind"]),
                    base64.b64decode(e["data"], validate=True),
                )
            else:
                raise ArchiveError(f"{where} holds a line that is no record, batch or evidence")
        return Archive(
            chain=chain,
            number=int(header["number"]),
            first_seq=int(header["first_seq"]),
            last_seq=int(header["last_seq"]),
            prev_sha256=str(header["prev_sha256"]),
            created_at=str(header["created_at"]),
            records=records,
            batches=batches,
            evidence=evidence,
        )
    except ArchiveError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as exc:
        raise ArchiveError(f"{where} is malformed: {type(exc).__name__} {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def evidence_names(fields: Mapping[str, object]) -> list[str]:
    """The evidence digests a record names (certificate, OCSP answer, body)."""
    names = ("signer_certificate_sha256", "signer_ocsp_sha256", "body_sha256")
    return [v for k in names if isinstance(v := fields.get(k), str)]
