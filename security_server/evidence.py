"""`gateway audit export`: the evidence bundle of one exchange, read from a message log.

The layout is described in `gateway.evidence`, which also verifies bundles. Everything is
read from the log's database: the records, the certificates, OCSP answers and bodies kept
beside them (`log_evidence`), and the time-stamped batch each record belongs to, from whose
records' hashes the inclusion proof is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from gateway import merkle
from gateway.audit import ChainedRecord, record_preimage
from gateway.envelope import StreamClose, decode_answer
from gateway.errors import AuditError, GatewayError
from gateway.evidence import FORMAT, encode_fields
from gateway.streams import unframe_messages
from gateway.timeutil import format_time
from security_server.message_log import log_evidence, message_log, row_to_record, timestamp_batches
from security_server.private_files import open_private


class NotStampedYet(AuditError):
    """A record of the exchange is not covered by a time-stamp yet: retry shortly."""


async def _evidence(conn: AsyncConnection, sha: str | None) -> tuple[str, bytes] | None:
    if sha is None:
        return None
    row = (
        await conn.execute(
            sa.select(log_evidence.c.kind, log_evidence.c.data).where(log_evidence.c.sha256 == sha)
        )
    ).first()
    return None if row is None else (str(row.kind), bytes(row.data))


def _is_close(header: bytes) -> bool:
    try:
        return isinstance(decode_answer(header), StreamClose)
    except GatewayError:
        return False


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)


async def export_bundle(url: str, message_id: str) -> dict[str, bytes]:
    """The files of the evidence bundle of `message_id` (raise `AuditError` if it cannot be made)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await export_records(conn, message_id)
    finally:
        await engine.dispose()


# the records of an exchange that hold a signed message: its request and response, and a
# stream's close of its request direction
EVIDENCE_KINDS = ("request", "response", "stream-close")


async def export_records(
    conn: AsyncConnection, message_id: str, *, member: str | None = None
) -> dict[str, bytes]:
    """The bundle's files, read on an open connection to the log (the auditor API's): only
    the records whose client or service belongs to `member` when one is given. A message
    id names one exchange; when the log holds requests of several under it (a client
    chooses its message ids), no bundle is made: `AuditError`."""
    query = sa.select(message_log).where(
        message_log.c.message_id == message_id, message_log.c.kind.in_(EVIDENCE_KINDS)
    )
    if member is not None:
        query = query.where(
            sa.or_(
                message_log.c.client.startswith(f"{member}/", autoescape=True),
                message_log.c.service.startswith(f"{member}/", autoescape=True),
            )
        )
    rows = await conn.execute(
        query.order_by(message_log.c.logged_at, message_log.c.chain, message_log.c.seq)
    )
    records = [row_to_record(r) for r in rows]
    if not records:
        raise AuditError(f"this log holds no request or response of message {message_id}")
    exchanges = {(r.fields.get("client"), r.fields.get("service")) for r in records}
    if len(exchanges) > 1:
        raise AuditError(
            f"message id {message_id} names {len(exchanges)} exchanges in this log (different "
            "clients or services); no single bundle can be made"
        )
    files: dict[str, bytes] = {}
    cas: dict[str, bytes] = {}
    tsa: dict[str, bytes] = {}
    folders: list[str] = []
    for number, record in enumerate(records, start=1):
        folder = f"{number}-{record.fields['kind']!s}"
        folders.append(folder)
        await _export_record(conn, record, folder, files, cas)
    for der in cas.values():
        files.setdefault("ca.pem", b"")
        files["ca.pem"] += _pem(der)
    for folder in folders:
        for der in _token_certificates(files[f"{folder}/timestamp.tst"]):
            if hashlib.sha256(der).hexdigest() not in cas:
                tsa[hashlib.sha256(der).hexdigest()] = der
    if tsa:
        files["tsa.pem"] = b"".join(_pem(der) for der in tsa.values())
    files["VERIFY.md"] = verify_text(message_id, folders, files).encode()
    files["manifest.json"] = json.dumps(
        {
            "format": FORMAT,
            "message_id": message_id,
            "exported_at": format_time(datetime.now(UTC)),
            "records": folders,
            "sha256": {
                name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())
            },
        },
        indent=2,
    ).encode()
    return files


def _token_certificates(token: bytes) -> list[bytes]:
    from asn1crypto import cms  # type: ignore[import-untyped]

    signed = cms.ContentInfo.load(token)["content"]
    return [c.chosen.dump() for c in signed["certificates"] or []]


async def _export_record(
    conn: AsyncConnection,
    record: ChainedRecord,
    folder: str,
    files: dict[str, bytes],
    cas: dict[str, bytes],
) -> None:
    f = record.fields
    files[f"{folder}/record.json"] = json.dumps(
        {
            "chain": record.chain,
            "seq": record.seq,
            "prev_hash": record.prev_hash.hex(),
            "hash": record.hash.hex(),
            "fields": encode_fields(f),
        },
        indent=2,
    ).encode()
    files[f"{folder}/record.bin"] = record_preimage(record.seq, record.prev_hash, f)
    header, signature = f["header"], f["signature"]
    if not isinstance(header, bytes) or not isinstance(signature, bytes):
        raise AuditError(f"record {record.seq} holds no signed header: it is not evidence")
    files[f"{folder}/header.json"] = header
    files[f"{folder}/signature.der"] = signature
    certificate = await _evidence(conn, _text(f["signer_certificate_sha256"]))
    if certificate is None:
        raise AuditError(f"record {record.seq}: its signing certificate is not in the log")
    files[f"{folder}/signer.pem"] = _pem(certificate[1])
    answer = await _evidence(conn, _text(f["signer_ocsp_sha256"]))
    if answer is None:
        raise AuditError(f"record {record.seq}: its OCSP answer is not in the log")
    files[f"{folder}/ocsp.der"] = answer[1]
    body = await _evidence(conn, _text(f["body_sha256"]))
    if body is not None and _is_close(header):
        # a stream's kept messages: one file each, as the README's OpenSSL procedure reads them
        for number, message in enumerate(unframe_messages(body[1]), start=1):
            files[f"{folder}/messages/msg-{number}.bin"] = message
    elif body is not None:
        files[f"{folder}/body.bin"] = body[1]
    issuer = x509.load_der_x509_certificate(certificate[1]).issuer
    for row in await conn.execute(
        sa.select(log_evidence.c.data).where(log_evidence.c.kind == "ca")
    ):
        ca = bytes(row.data)
        if x509.load_der_x509_certificate(ca).subject == issuer:
            cas[hashlib.sha256(ca).hexdigest()] = ca
    batch = (
        await conn.execute(
            sa.select(timestamp_batches).where(
                timestamp_batches.c.chain == record.chain,
                timestamp_batches.c.first_seq <= record.seq,
                timestamp_batches.c.last_seq >= record.seq,
            )
        )
    ).first()
    if batch is None:
        raise NotStampedYet(
            f"record {record.seq} is not time-stamped yet (stamps are made every few seconds; "
            "retry shortly, and check the server's time-stamping authorities if it persists)"
        )
    leaves = [
        bytes(r.hash)
        for r in await conn.execute(
            sa.select(message_log.c.hash)
            .where(
                message_log.c.chain == record.chain,
                message_log.c.seq.between(batch.first_seq, batch.last_seq),
            )
            .order_by(message_log.c.seq)
        )
    ]
    if len(leaves) != batch.last_seq - batch.first_seq + 1:
        raise AuditError(f"records of the batch {batch.first_seq}..{batch.last_seq} are missing")
    index = record.seq - batch.first_seq
    files[f"{folder}/merkle.json"] = json.dumps(
        {
            "index": index,
            "size": len(leaves),
            "first_seq": batch.first_seq,
            "last_seq": batch.last_seq,
            "proof": [h.hex() for h in merkle.inclusion_proof(leaves, index)],
            "root": bytes(batch.root).hex(),
            "tsa": batch.tsa,
        },
        indent=2,
    ).encode()
    files[f"{folder}/timestamp.tst"] = bytes(batch.token)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def zip_bytes(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            archive.writestr(name, files[name])
    return buffer.getvalue()


def write_zip(path: str, files: Mapping[str, bytes]) -> None:
    with open_private(path) as out:
        out.write(zip_bytes(files))


def read_zip(path: str, max_bytes: int = 256 * 1024 * 1024) -> dict[str, bytes]:
    """The files of a bundle (refusing archives that would unpack beyond `max_bytes`)."""
    with zipfile.ZipFile(path) as archive:
        if sum(i.file_size for i in archive.infolist()) > max_bytes:
            raise AuditError(f"{path} unpacks to more than {max_bytes} bytes")
        for info in archive.infolist():
            # `gateway audit export` writes plain deflated entries: anything else is not
            # a bundle of ours (zipfile raises RuntimeError and NotImplementedError for them)
            if info.flag_bits & 0x1:
                raise AuditError(f"{path}: {info.filename} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise AuditError(
                    f"{path}: {info.filename} uses compression method {info.compress_type}, "
                    "not stored or deflated"
                )
        return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}


def verify_text(message_id: str, folders: list[str], files: Mapping[str, bytes]) -> str:
    """VERIFY.md: the OpenSSL commands that check each piece of this bundle by hand."""
    lines = [
        f"# Evidence of message {message_id}",
        "",
        "`gateway audit verify-bundle THIS.zip` checks everything below at once. To check",
        "each piece by hand, unzip the bundle and run these commands in its folder (OpenSSL 3).",
        "Compare the SHA-256 fingerprint of `ca.pem` with the CA your instance's anchor trusts:",
        "",
        "    openssl x509 -in ca.pem -noout -fingerprint -sha256",
        "",
    ]
    for folder in folders:
        proof = json.loads(files[f"{folder}/merkle.json"])
        record = json.loads(files[f"{folder}/record.json"])
        lines += [
            f"## {folder}",
            "",
            "1. The signing certificate chains to the CA, and its CN is the member who speaks:",
            "   the client's member (the `client` of the request's header, without its last",
            "   part) for a request or the close of its stream, the service's member for a",
            "   response:",
            "",
            f"       openssl verify -CAfile ca.pem {folder}/signer.pem",
            f"       openssl x509 -in {folder}/signer.pem -noout -subject",
            "",
            "2. The signature over the signed header (`Verified OK`):",
            "",
            f"       openssl x509 -in {folder}/signer.pem -noout -pubkey > {folder}/signer.pub",
            f"       openssl dgst -sha256 -verify {folder}/signer.pub "
            f"-signature {folder}/signature.der {folder}/header.json",
            "",
        ]
        messages = sum(1 for name in files if name.startswith(f"{folder}/messages/"))
        if messages:
            direction = "request" if folder.endswith("-stream-close") else "response"
            request = next((f for f in folders if f.endswith("-request")), "1-request")
            lines += [
                f"3. The {messages} messages of this direction of the stream lead to the close's",
                '   `"digest"`:',
                "",
                f"       {{ printf '{direction}\\n'; cat {request}/header.json; }} | "
                "openssl dgst -sha256 -binary > link.bin",
                f"       for i in $(seq 1 {messages}); do cat link.bin {folder}/messages/msg-$i.bin"
                " | openssl dgst -sha256 -binary > next.bin && mv next.bin link.bin; done",
                "       od -An -v -tx1 link.bin | tr -d ' \\n'",
                "",
            ]
        elif f"{folder}/body.bin" in files:
            lines += [
                "3. The body matches the `body_sha256` of the signed header:",
                "",
                f"       openssl dgst -sha256 {folder}/body.bin",
                f'       grep -o \'"body_sha256":"[0-9a-f]*"\' {folder}/header.json',
                "",
            ]
        else:
            lines += ["3. The body was not stored (`log.store_bodies` is off).", ""]
        lines += [
            "4. The OCSP answer that travelled with the message says `good` and verifies",
            "   (`-validity_period` accepts an answer whose next update has passed since):",
            "",
            f"       openssl ocsp -respin {folder}/ocsp.der -issuer ca.pem -CAfile ca.pem "
            f"-cert {folder}/signer.pem -validity_period 315360000 -resp_text",
            "",
            f"5. The record's chain hash is `{record['hash']}`:",
            "",
            f"       openssl dgst -sha256 {folder}/record.bin",
            "",
            f"6. The Merkle proof leads from it to the stamped root `{proof['root']}`",
            f"   (leaf {proof['index']} of {proof['size']}; RFC 9162 2.1.3.2): start from",
            "   SHA-256(00 || record hash), then combine with each hash of `proof` in order as",
            "   SHA-256(01 || left || right), the proof hash on the side the algorithm says.",
            "   `gateway audit verify-bundle` does exactly this.",
            "",
            "7. The time-stamp token over that root (`Verification: OK`):",
            "",
            f"       openssl ts -verify -digest {proof['root']} -token_in "
            f"-in {folder}/timestamp.tst -CAfile ca.pem"
            + (" -untrusted tsa.pem" if "tsa.pem" in files else ""),
            f"       openssl ts -reply -token_in -in {folder}/timestamp.tst -text",
            "",
        ]
    return "\n".join(lines)
