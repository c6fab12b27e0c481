"""The OCSP responder of the development CA (RFC 6960) and its revocation register.

The register is `revoked.json` in the PKI folder, one entry per revoked certificate:

    {"<serial in hex>": {"revoked_at": "<ISO 8601>", "reason": "<CRLReason>", "subject": "<CN>"}}

where the reason is the RFC 5280 5.3.1 name (`x509.ReasonFlags` value, e.g. "keyCompromise").
`revoke` adds an entry (the first revocation time is kept) and replaces the file
atomically; a running responder rereads it when it changes, so `gateway pki revoke` takes
effect on the next request.

`OcspResponder.respond` answers one DER `OCSPRequest` (RFC 6960 4.1) with a DER
`OCSPResponse` (4.2): `malformedRequest` for what does not parse, `unauthorized` for a
certificate of another issuer (2.3), otherwise a `BasicOCSPResponse` whose single response
is `good`, `revoked` (with time and reason) or `unknown` (2.2), with thisUpdate = now and
nextUpdate = now + validity (4.2.2.1), signed with SHA-256 by the delegated responder
(`ocsp.crt`: id-kp-OCSPSigning, 4.2.2.2) that it names by key hash (4.2.2.3) and includes.
A nonce in the request is echoed (4.4.1).

`ocsp_app` serves it over HTTP as RFC 6960 Appendix A.1 describes: POST of the DER
request with Content-Type application/ocsp-request, or GET of `/{url-encoded base64 DER}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Counter

from certs.pki import load_issued, write_atomically

log = structlog.get_logger("certs.ocsp")

REVOKED = "revoked.json"
_DER = serialization.Encoding.DER


def _load_ca(pki_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    if certificate == ca or certificate.issuer != ca.subject:
        return False
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def issued_certificates(pki_dir: Path) -> dict[int, x509.Certificate]:
    """Every `*.crt` under the folder that its `ca.crt` issued, by serial number."""
    ca = _load_ca(pki_dir)
    found: dict[int, x509.Certificate] = {}
    for path in sorted(pki_dir.rglob("*.crt")):
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        if _issued_by(certificate, ca):
            found[certificate.serial_number] = certificate
    return found


def revoke(
    pki_dir: Path, certificate: x509.Certificate, *, reason: x509.ReasonFlags, at: datetime
) -> None:
    """Record the revocation of `certificate`; a second revocation keeps the first entry."""
    if not _issued_by(certificate, _load_ca(pki_dir)):
        raise ValueError(f"{_subject(certificate)!r} was not issued by the CA of {pki_dir}")
    path = pki_dir / REVOKED
    register = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    serial = format(certificate.serial_number, "x")
    if serial in register:
        return
    register[serial] = {
        "revoked_at": at.astimezone(UTC).isoformat(),
        "reason": reason.value,
        "subject": _subject(certificate),
    }
    write_atomically(path, json.dumps(register, indent=2, sort_keys=True).encode(), 0o644)


def load_revoked(pki_dir: Path) -> dict[int, tuple[datetime, x509.ReasonFlags]]:
    """The register: serial number -> (revocation time, reason); empty if there is none."""
    try:
        register = json.loads((pki_dir / REVOKED).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {
        int(serial, 16): (
            datetime.fromisoformat(entry["revoked_at"]),
            x509.ReasonFlags(entry["reason"]),
        )
        for serial, entry in register.items()
    }


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(_DER)


class OcspResponder:
    """Answers OCSP requests about the certificates that the folder's CA issued."""

    def __init__(
        self,
        *,
        pki_dir: Path,
        clock: Callable[[], datetime],
        validity: timedelta = timedelta(minutes=10),
    ) -> None:
        self._dir, self._clock, self._validity = pki_dir, clock, validity
        self._ca = _load_ca(pki_dir)
        self._responder = load_issued(pki_dir, "ocsp")
        self._issued = issued_certificates(pki_dir)
        self._scanned = time.monotonic()
        self._revoked: dict[int, tuple[datetime, x509.ReasonFlags]] = {}
        self._revoked_stamp: tuple[int, int, int] | None = None
        self._own_hashes: dict[str, tuple[bytes, bytes]] = {}

    def _is_ours(self, request: ocsp.OCSPRequest) -> bool:
        """Whether the request's issuer name and key hashes are those of our CA."""
        algorithm = request.hash_algorithm
        own = self._own_hashes.get(algorithm.name)
        if own is None:
            ca = ocsp.OCSPRequestBuilder().add_certificate(self._ca, self._ca, algorithm).build()
            own = self._own_hashes[algorithm.name] = (ca.issuer_name_hash, ca.issuer_key_hash)
        return (request.issuer_name_hash, request.issuer_key_hash) == own

    def _revocations(self) -> dict[int, tuple[datetime, x509.ReasonFlags]]:
        try:
            st = (self._dir / REVOKED).stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._revoked_stamp:
            self._revoked = load_revoked(self._dir)
            self._revoked_stamp = stamp
        return self._revoked

    def _known(self, serial: int) -> bool:
        if serial not in self._issued and time.monotonic() - self._scanned >= 1.0:
            self._issued = issued_certificates(self._dir)
            self._scanned = time.monotonic()
        return serial in self._issued

    def respond(self, request_der: bytes) -> bytes:
        """The DER OCSPResponse to a DER OCSPRequest; never raises."""
        return self.answer(request_der)[0]

    def answer(self, request_der: bytes) -> tuple[bytes, str]:
        """The DER OCSPResponse to a DER OCSPRequest, and what it says (good, revoked,
        unknown, malformed_request, unauthorized or internal_error); never raises."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            serial = request.serial_number
            ours = self._is_ours(request)
            nonce = next(
                (e.value for e in request.extensions if isinstance(e.value, x509.OCSPNonce)),
                None,
            )
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as exc:
            log.info("ocsp_request", status="malformed_request", error=str(exc))
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST), "malformed_request"
        if not ours:
            log.info("ocsp_request", serial=f"{serial:x}", status="unauthorized")
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED), "unauthorized"
        try:
            revoked = self._revocations().get(serial)
            if revoked is not None:
                status = ocsp.OCSPCertStatus.REVOKED
            elif self._known(serial):
                status = ocsp.OCSPCertStatus.GOOD
            else:
                status = ocsp.OCSPCertStatus.UNKNOWN
            now = self._clock()
            builder = (
                ocsp.OCSPResponseBuilder()
                .add_response_by_hash(
                    request.issuer_name_hash,
                    request.issuer_key_hash,
                    serial,
                    request.hash_algorithm,
                    status,
                    this_update=now,
                    next_update=now + self._validity,
                    revocation_time=None if revoked is None else revoked[0],
                    revocation_reason=None if revoked is None else revoked[1],
                )
                .responder_id(ocsp.OCSPResponderEncoding.HASH, self._responder.certificate)
                .certificates([self._responder.certificate])
            )
            if nonce is not None:
                builder = builder.add_extension(nonce, critical=False)
            response = builder.sign(self._responder.key, hashes.SHA256())
        except Exception:  # a broken register must not take the responder down: fail closed
            log.exception("ocsp_request", serial=f"{serial:x}", status="internal_error")
            return _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR), "internal_error"
        log.info("ocsp_request", serial=f"{serial:x}", status=status.name.lower())
        return response.public_bytes(_DER), status.name.lower()


def ocsp_app(
    responder: OcspResponder,
    *,
    max_request_bytes: int = 16 * 1024,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """HTTP transport of RFC 6960 Appendix A.1, plus GET /healthz; answers are counted in
    `gateway_ocsp_requests_total{answer}` when a metrics registry is given."""
    answers = (
        Counter(
            "gateway_ocsp_requests_total",
            "OCSP requests answered, by what the answer says",
            ["answer"],
            registry=registry,
        )
        if registry is not None
        else None
    )

    def answer(request_der: bytes) -> web.Response:
        der, said = responder.answer(request_der)
        if answers is not None:
            answers.labels(said).inc()
        return web.Response(body=der, content_type="application/ocsp-response")

    async def post(request: web.Request) -> web.Response:
        if request.content_type != "application/ocsp-request":
            return web.Response(status=415, text="Content-Type must be application/ocsp-request\n")
        if (request.content_length or 0) > max_request_bytes:
            return web.Response(status=413, text="OCSP request too large\n")
        return answer(await request.read())  # client_max_size bounds a chunked body

    async def get(request: web.Request) -> web.Response:
        try:
            der = base64.b64decode(unquote(request.match_info["request"]), validate=True)
        except (binascii.Error, ValueError):
            der = b""  # answered malformedRequest
        return answer(der)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_get("/healthz", health)
    app.router.add_post("/", post)
    app.router.add_get("/{request:.+}", get)
    return app
