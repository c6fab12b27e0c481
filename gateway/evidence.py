"""Evidence bundles: everything needed to prove one exchange offline, and their verification.

A bundle (a zip written by `gateway audit export`) holds, for each log record of one
message (the request and the response, as one security server logged them):

    N-KIND/record.json    the record's fields, its sequence number and hashes
    N-KIND/record.bin     the exact bytes whose SHA-256 is the record's chain hash
    N-KIND/header.json    the canonical signed header
    N-KIND/signature.der  the ECDSA signature over header.json
    N-KIND/signer.pem     the signing certificate
    N-KIND/ocsp.der       the OCSP answer about it that travelled with the message
    N-KIND/body.bin       the body, when the server stores bodies
    N-KIND/merkle.json    the record's inclusion proof in its time-stamped batch
    N-KIND/timestamp.tst  the RFC 3161 token over that batch's Merkle root

with `ca.pem` (the CAs the certificates chain to), `tsa.pem` (the TSA's certificate),
`manifest.json` and `VERIFY.md` (the OpenSSL commands that check each piece by hand).

`verify_bundle` checks every piece and raises `BundleError` naming the first that fails;
it never needs our database or the network. Pure: it takes the bundle's files as bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import merkle, ocsp, tsp
from gateway.audit import RECORD_FIELDS, FieldValue, parse_preimage
from gateway.envelope import (
    RequestHeader,
    ResponseHeader,
    StreamClose,
    decode_answer,
    decode_request,
    sha256_hex,
)
from gateway.errors import AuditError, GatewayError, IdentifierError
from gateway.identifiers import SubsystemId
from gateway.records import MAX_RECORD_TEXT
from gateway.signing import TrustStore, verify_signature
from gateway.streams import chain_of
from gateway.timeutil import parse_time

FORMAT = "gateway-evidence/1"
# how old an OCSP answer may have been when the message was sent, for an auditor
OCSP_AGE_LIMIT = timedelta(days=1)
# how far the clocks of a server and its TSA may differ, and how late a batch's token may
# be after a record (the default TSA failure period, stamping interval and TSA timeout,
# plus the skew): as `gateway audit verify` judges a token's time
CLOCK_SKEW = timedelta(seconds=300)
TOKEN_GRACE = timedelta(seconds=600 + 1 + 5) + CLOCK_SKEW
# JSON errors of a hostile file: deep nesting raises RecursionError, not ValueError
_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, RecursionError)


class BundleError(AuditError):
    """A piece of the bundle does not verify; `piece` names the file."""

    def __init__(self, piece: str, why: str) -> None:
        super().__init__(f"{piece}: {why}")
        self.piece = piece


def encode_fields(fields: Mapping[str, FieldValue]) -> dict[str, object]:
    """JSON form of record fields: bytes as {"base64": ...}."""
    return {
        k: ({"base64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


def decode_fields(doc: Mapping[str, object]) -> dict[str, FieldValue]:
    out: dict[str, FieldValue] = {}
    for k in RECORD_FIELDS:
        v = doc[k]
        if isinstance(v, dict):
            out[k] = base64.b64decode(str(v["base64"]), validate=True)
        elif v is None or (isinstance(v, str | int) and not isinstance(v, bool)):
            out[k] = v
        else:
            raise ValueError(f"field {k!r} has an unexpected type")
    return out


@dataclass(frozen=True, slots=True)
class RecordReport:
    folder: str
    kind: str
    seq: int
    signer: str
    ocsp_status: str
    ocsp_this_update: datetime
    stamped_at: datetime
    body: bool


@dataclass(slots=True)
class BundleReport:
    message_id: str
    ca_fingerprints: list[str]
    records: list[RecordReport] = field(default_factory=list)


def _load_pems(data: bytes, piece: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BundleError(piece, "is not a PEM certificate file") from None


def _need(files: Mapping[str, bytes], name: str) -> bytes:
    data = files.get(name)
    if data is None:
        raise BundleError(name, "is missing from the bundle")
    return data


def _fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def verify_bundle(
    files: Mapping[str, bytes],
    *,
    trusted: Sequence[x509.Certificate] | None = None,
    token_grace: timedelta = TOKEN_GRACE,
    clock_skew: timedelta = CLOCK_SKEW,
) -> BundleReport:
    """Verify a bundle's files; `trusted` pins the CAs (else the bundle's own ca.pem is used).

    Times: each record was logged within `clock_skew` before and `token_grace` after the
    header it holds was made, and its token within `clock_skew` before and `token_grace`
    after it was logged (a token asked for later would let an operator stamp a record
    rewritten since); an answer was made no earlier than its request."""

    try:
        manifest = json.loads(_need(files, "manifest.json"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        folders = [str(f) for f in manifest["records"]]
        message_id = str(manifest["message_id"])
        digests = {str(k): str(v) for k, v in dict(manifest["sha256"]).items()}
    except _MALFORMED as exc:
        raise BundleError("manifest.json", f"is malformed ({exc})") from None
    if not folders:
        raise BundleError("manifest.json", "lists no records")
    cas = _load_pems(_need(files, "ca.pem"), "ca.pem")
    if trusted is not None:
        pinned = {_fingerprint(c) for c in trusted}
        for ca in cas:
            if _fingerprint(ca) not in pinned:
                raise BundleError(
                    "ca.pem", f"holds a CA that is not trusted: {ca.subject.rfc4514_string()}"
                )
    tsa_certificates = _load_pems(files["tsa.pem"], "tsa.pem") if "tsa.pem" in files else []
    report = BundleReport(message_id=message_id, ca_fingerprints=[_fingerprint(c) for c in cas])
    checker = _RecordChecker(
        files,
        TrustStore(cas=tuple(cas)),
        cas,
        tsa_certificates,
        message_id,
        token_grace,
        clock_skew,
    )
    for folder in folders:
        report.records.append(checker.verify(folder))
    # the response (and a stream's close) answers the request (when the bundle has both), and
    # its record files it under the request's client, method, purpose, user and subject
    request = checker.headers.get("request")
    for kind in ("response", "stream-close"):
        answer = checker.headers.get(kind)
        if request is None or answer is None:
            continue
        answered = decode_answer(answer[1])
        asked = decode_request(request[1])
        if answered.request_sha256 != sha256_hex(request[1]):
            raise BundleError(
                f"{answer[0]}/header.json", "does not answer the request's header in the bundle"
            )
        if answered.created_at < asked.created_at - clock_skew:
            raise BundleError(
                f"{answer[0]}/header.json",
                f"was made at {answered.created_at.isoformat()}, before the request it answers "
                f"({asked.created_at.isoformat()})",
            )
        name, fields = checker.fields[kind]
        _check_record_says(name, fields, request_facts(asked), "the request")
    # the manifest's digests (a convenience for `sha256sum`; each piece was checked above)
    for name, digest in digests.items():
        if name in files and hashlib.sha256(files[name]).hexdigest() != digest:
            raise BundleError(name, "does not match its digest in manifest.json")
    return report


def request_facts(header: RequestHeader) -> dict[str, str | None]:
    """What a request's header signs that every record of its exchange files it under."""
    return {
        "client": str(header.client),
        "method": header.method,
        "purpose": header.purpose,
        "user_id": header.user_id,
        "subject_ref": header.subject_ref,
    }


def _check_record_says(
    where: str, fields: Mapping[str, FieldValue], signed: Mapping[str, str | None], source: str
) -> None:
    """Each record column in `signed` holds the signed value (texts cut as the log cuts them:
    `gateway.records`; digests and pseudonyms are never cut)."""
    for name, value in signed.items():
        cut = value is not None and name not in ("subject_ref", "body_sha256")
        expected = value[:MAX_RECORD_TEXT] if cut and value is not None else value
        if fields[name] != expected:
            raise BundleError(where, f"names the {name} {fields[name]!r}, {source} {expected!r}")


class _RecordChecker:
    def __init__(
        self,
        files: Mapping[str, bytes],
        trust: TrustStore,
        cas: Sequence[x509.Certificate],
        tsa_certificates: Sequence[x509.Certificate],
        message_id: str,
        token_grace: timedelta,
        clock_skew: timedelta,
    ) -> None:
        self.token_grace = token_grace
        self.clock_skew = clock_skew
        self.files = files
        self.trust = trust
        self.cas = cas
        self.tsa_certificates = tsa_certificates
        self.message_id = message_id
        # kind -> (folder, signed header bytes), and (record.json's name, the record's fields)
        self.headers: dict[str, tuple[str, bytes]] = {}
        self.fields: dict[str, tuple[str, Mapping[str, FieldValue]]] = {}

    def need(self, name: str) -> bytes:
        return _need(self.files, name)

    def verify(self, folder: str) -> RecordReport:
        def piece(name: str) -> str:
            return f"{folder}/{name}"

        # the record: its fields, and the bytes its chain hash is computed over
        try:
            doc = json.loads(self.need(piece("record.json")))
            record_hash = bytes.fromhex(doc["hash"])
            seq, prev = int(doc["seq"]), bytes.fromhex(doc["prev_hash"])
            fields = decode_fields(doc["fields"])
        except _MALFORMED as exc:
            raise BundleError(piece("record.json"), f"is malformed ({exc})") from None
        preimage = self.need(piece("record.bin"))
        if hashlib.sha256(preimage).digest() != record_hash:
            raise BundleError(piece("record.bin"), "does not hash to the record's chain hash")
        try:
            parsed = parse_preimage(preimage)
        except ValueError as exc:
            raise BundleError(piece("record.bin"), f"is malformed ({exc})") from None
        if parsed != (seq, prev, fields):
            raise BundleError(piece("record.json"), "differs from the record in record.bin")
        if fields["message_id"] != self.message_id:
            raise BundleError(piece("record.json"), "is the record of another message")
        kind = str(fields["kind"])

        # the signed header and its signature, as the record holds them
        header = self.need(piece("header.json"))
        if header != fields["header"]:
            raise BundleError(piece("header.json"), "is not the header the record holds")
        try:
            decoded: RequestHeader | ResponseHeader | StreamClose = (
                decode_request(header) if kind == "request" else decode_answer(header)
            )
        except GatewayError as err:
            raise BundleError(piece("header.json"), err.message) from None
        if kind in self.headers:
            raise BundleError(
                piece("record.json"), f"is a second {kind} record: a bundle holds one exchange"
            )
        if isinstance(decoded, StreamClose) != (kind == "stream-close") and not (
            kind == "response" and isinstance(decoded, StreamClose)
        ):
            raise BundleError(piece("header.json"), f"is not the header of a {kind} record")
        if isinstance(decoded, StreamClose) and decoded.direction != (
            "request" if kind == "stream-close" else "response"
        ):
            raise BundleError(piece("header.json"), f"closes the wrong direction for a {kind}")
        self.headers[kind] = (folder, header)
        signature = self.need(piece("signature.der"))
        if signature != fields["signature"]:
            raise BundleError(piece("signature.der"), "is not the signature the record holds")
        signers = _load_pems(self.need(piece("signer.pem")), piece("signer.pem"))
        if len(signers) != 1:
            raise BundleError(piece("signer.pem"), "must hold exactly one certificate")
        certificate = signers[0]
        der = certificate.public_bytes(Encoding.DER)
        if hashlib.sha256(der).hexdigest() != fields["signer_certificate_sha256"]:
            raise BundleError(piece("signer.pem"), "is not the certificate the record names")
        at = decoded.created_at
        try:
            issuer = self.trust.issuer_of(certificate)
            self.trust.check_valid(certificate, issuer, at)
        except GatewayError as err:
            raise BundleError(piece("signer.pem"), err.message) from None
        try:
            verify_signature(certificate, header, signature)
        except GatewayError as err:
            raise BundleError(piece("signature.der"), err.message) from None
        self._check_signatory(piece, kind, decoded, fields, der, at)

        # the body, when stored; a stream's messages, when kept, against its close
        body = self.files.get(piece("body.bin"))
        if body is not None and sha256_hex(body) != decoded.body_sha256:
            raise BundleError(piece("body.bin"), "does not match the digest in the signed header")
        messages = self._messages(folder)
        if messages and not isinstance(decoded, StreamClose):
            raise BundleError(piece("messages"), "only a stream's close may hold messages")
        if messages and isinstance(decoded, StreamClose):
            self._check_messages(folder, decoded, messages)

        # the signing certificate's OCSP status when the message was made
        answer = self.need(piece("ocsp.der"))
        if hashlib.sha256(answer).hexdigest() != fields["signer_ocsp_sha256"]:
            raise BundleError(piece("ocsp.der"), "is not the OCSP answer the record names")
        try:
            status = ocsp.check_response(
                answer, certificate=certificate, issuer=issuer, at=at, freshness=OCSP_AGE_LIMIT
            )
        except GatewayError as err:
            raise BundleError(piece("ocsp.der"), err.message) from None
        if status.status is not ocsp.CertStatus.GOOD:
            raise BundleError(piece("ocsp.der"), f"says the certificate is {status.status}")

        # the Merkle proof up to the time-stamped root, and the token over that root
        try:
            proof_doc = json.loads(self.need(piece("merkle.json")))
            root = bytes.fromhex(proof_doc["root"])
            computed = merkle.root_from_proof(
                record_hash,
                int(proof_doc["index"]),
                int(proof_doc["size"]),
                [bytes.fromhex(h) for h in proof_doc["proof"]],
            )
        except _MALFORMED as exc:
            raise BundleError(piece("merkle.json"), f"is malformed ({exc})") from None
        if computed != root:
            raise BundleError(
                piece("merkle.json"), "the inclusion proof does not lead to the stamped root"
            )
        try:
            stamp = tsp.verify_token(
                self.need(piece("timestamp.tst")),
                digest=root,
                cas=self.cas,
                extra_certificates=self.tsa_certificates,
            )
        except GatewayError as err:
            raise BundleError(piece("timestamp.tst"), err.message) from None
        try:
            logged_at = parse_time(str(fields["logged_at"]))
        except ValueError as exc:
            raise BundleError(piece("record.json"), f"has a malformed logged_at ({exc})") from None
        if not at - self.clock_skew <= logged_at <= at + self.token_grace:
            raise BundleError(
                piece("record.json"),
                f"was logged at {logged_at.isoformat()}, too far from its header's time "
                f"{at.isoformat()} (at most {self.clock_skew} before, {self.token_grace} after)",
            )
        if stamp.gen_time < logged_at - self.clock_skew:
            raise BundleError(piece("timestamp.tst"), "is older than the record it stamps")
        if stamp.gen_time > logged_at + self.token_grace:
            raise BundleError(
                piece("timestamp.tst"),
                f"was made at {stamp.gen_time.isoformat()}, more than {self.token_grace} after "
                f"the record it stamps was logged ({logged_at.isoformat()}): a token asked "
                "for that late proves nothing about the record as first logged (widen "
                "--token-grace knowingly for a log whose TSAs were down longer)",
            )
        return RecordReport(
            folder=folder,
            kind=kind,
            seq=seq,
            signer=certificate.subject.rfc4514_string(),
            ocsp_status=status.status.value,
            ocsp_this_update=status.this_update,
            stamped_at=stamp.gen_time,
            body=body is not None or bool(messages),
        )

    def _check_signatory(
        self,
        piece: Callable[[str], str],
        kind: str,
        decoded: RequestHeader | ResponseHeader | StreamClose,
        fields: Mapping[str, FieldValue],
        der: bytes,
        at: datetime,
    ) -> None:
        """The signer is the member the message speaks for: the client's member for a request
        (and the close of its stream), the service's member for an answer. A valid signature
        by any other member's certificate from a trusted CA proves nothing about who asked or
        who answered. And the record says what the header signs: auditors search and report
        by the record's columns, so an operator re-filing a genuine signed message under
        another id, client or purpose would mislead them."""
        try:
            _, signed_by = self.trust.signing_member(der, at)
        except GatewayError as err:
            raise BundleError(piece("signer.pem"), err.message) from None
        signed: dict[str, str | None] = {
            "message_id": decoded.message_id,
            "service": str(decoded.service),
        }
        if isinstance(decoded, RequestHeader):
            signed |= request_facts(decoded)
        if isinstance(decoded, RequestHeader | ResponseHeader):
            signed["body_sha256"] = decoded.body_sha256
        _check_record_says(piece("record.json"), fields, signed, "the signed header")
        try:
            client = SubsystemId.parse(str(fields["client"]))
        except IdentifierError:
            raise BundleError(
                piece("record.json"), f"names no valid client ({fields['client']!r})"
            ) from None
        for_client = isinstance(decoded, RequestHeader) or (
            isinstance(decoded, StreamClose) and decoded.direction == "request"
        )
        party, expected = (
            ("client", client.member) if for_client else ("service", decoded.service.member)
        )
        if signed_by != expected:
            raise BundleError(
                piece("signer.pem"),
                f"is the signing certificate of {signed_by}, but a {kind} is signed by the "
                f"{party}'s member, {expected}",
            )
        self.fields[kind] = (piece("record.json"), fields)

    def _messages(self, folder: str) -> list[bytes]:
        """A close's kept messages, msg-1.bin onwards (a gap in the numbering is refused)."""
        prefix = f"{folder}/messages/"
        names = [n for n in self.files if n.startswith(prefix)]
        expected = [f"{prefix}msg-{i}.bin" for i in range(1, len(names) + 1)]
        if sorted(names) != sorted(expected):
            raise BundleError(prefix, "must hold msg-1.bin to msg-N.bin and nothing else")
        return [self.files[n] for n in expected]

    def _check_messages(self, folder: str, close: StreamClose, messages: list[bytes]) -> None:
        request = self.headers.get("request")
        if request is None:
            raise BundleError(f"{folder}/messages", "cannot be checked without the request")
        chain = chain_of(close.direction, request[1], messages)
        if (chain.count, chain.size, chain.digest) != (close.count, close.size, close.digest):
            raise BundleError(
                f"{folder}/messages",
                f"lead to {chain.count} messages ending in {chain.digest[:16]}…, not to the "
                f"{close.count} ending in {close.digest[:16]}… that the close signs",
            )
