"""OCSP (RFC 6960): the request a security server sends and the check of the answer.

`build_request` makes the DER `OCSPRequest` for one certificate (RFC 6960 4.1), with the
conventional SHA-1 `CertID` and no nonce (optional, RFC 6960 4.4.1): responses are
short-lived and checked for freshness instead.

`check_response` accepts an `OCSPResponse` only if (RFC 6960 3.2):

1. it parses, its `responseStatus` is `successful` and it holds exactly one
   `SingleResponse` (4.2.1);
2. it is signed by the issuer itself, or by a delegated responder whose certificate is
   included in the response, was issued directly by the issuer, carries the
   id-kp-OCSPSigning extended key usage and is valid at the moment checked (4.2.2.2); the
   responder is found by its `ResponderID`, by name or by key hash (4.2.2.3), and the
   signature over `tbsResponseData` must verify (ECDSA or RSA PKCS#1 v1.5);
3. its `CertID` names this certificate: serial number, issuer name hash and issuer key
   hash, computed with the hash algorithm the response uses (4.1.1);
4. `thisUpdate` is at most five minutes in the future, no older than the caller's
   freshness bound, and `nextUpdate`, when present, has not passed (4.2.2.1).

Every failure is a `TrustError`: `CERTIFICATE_STATUS_STALE` for an answer that is too old,
`CERTIFICATE_STATUS_INVALID` for anything else, malformed DER included. A revoked or
unknown certificate is not an error here: the status is returned and the caller decides.
Parsing, hashing and building use `cryptography.x509.ocsp`; this module never reads the
clock or does I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import Code, TrustError
from gateway.signing import certificate_fingerprint

CLOCK_SKEW = timedelta(minutes=5)


class CertStatus(StrEnum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


_STATUS = {
    ocsp.OCSPCertStatus.GOOD: CertStatus.GOOD,
    ocsp.OCSPCertStatus.REVOKED: CertStatus.REVOKED,
    ocsp.OCSPCertStatus.UNKNOWN: CertStatus.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """What a verified response says about one certificate (datetimes are UTC-aware)."""

    status: CertStatus
    this_update: datetime
    next_update: datetime | None
    produced_at: datetime
    revoked_at: datetime | None
    reason: str | None  # RFC 5280 CRLReason name, e.g. "keyCompromise"


def build_request(certificate: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """The DER OCSP request for `certificate` (SHA-1 CertID, no nonce)."""
    # SHA-1 only names the certificate here (RFC 5019 2.1.1); it protects nothing
    sha1 = hashes.SHA1()  # noqa: S303
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, sha1).build()
    return request.public_bytes(serialization.Encoding.DER)


def _invalid(message: str) -> TrustError:
    return TrustError(f"OCSP response rejected: {message}", code=Code.CERTIFICATE_STATUS_INVALID)


def _key_hash(certificate: x509.Certificate) -> bytes:
    """SHA-1 of the subject public key bits: the ResponderID byKey (RFC 6960 4.2.2.3)."""
    return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def _signer(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, at: datetime
) -> x509.Certificate:
    """The certificate whose key signed the response: the issuer or a delegated responder."""

    def named(c: x509.Certificate) -> bool:
        if response.responder_name is not None:
            return response.responder_name == c.subject
        return response.responder_key_hash == _key_hash(c)

    if named(issuer):
        return issuer
    responder = next((c for c in response.certificates if named(c)), None)
    if responder is None:
        raise _invalid(
            "it is signed by a responder that is neither the issuer nor a certificate "
            "included in the response"
        )
    try:
        responder.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise _invalid(
            f"the responder certificate {responder.subject.rfc4514_string()!r} was not issued "
            "by the certificate's issuer"
        ) from None
    try:
        usages = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.OCSP_SIGNING not in usages:
        raise _invalid(
            f"the responder certificate {responder.subject.rfc4514_string()!r} lacks the "
            "OCSPSigning extended key usage"
        )
    if not responder.not_valid_before_utc <= at <= responder.not_valid_after_utc:
        raise _invalid(
            f"the responder certificate {responder.subject.rfc4514_string()!r} is not valid "
            f"at {at.isoformat()}"
        )
    return responder


def _verify_signature(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    if algorithm is None:
        raise _invalid("its signature algorithm is not supported")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm
            )
        else:
            raise _invalid("the responder's key type is not supported")
    except InvalidSignature:
        raise _invalid(
            "its signature does not verify: the response was altered or signed by someone else"
        ) from None


def _verify(
    response_der: bytes, certificate: x509.Certificate, issuer: x509.Certificate, at: datetime
) -> StatusInfo:
    """Steps 1 to 3 of the module docstring: everything but the timing of the answer."""
    try:
        response = ocsp.load_der_ocsp_response(response_der)
    except ValueError:
        raise _invalid("it is not a DER-encoded OCSPResponse") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise _invalid(f"the responder answered {response.response_status.name}")
    singles = list(response.responses)
    if len(singles) != 1:
        raise _invalid(f"it holds {len(singles)} responses instead of one")
    _verify_signature(response, _signer(response, issuer, at))
    single = singles[0]
    expected = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, single.hash_algorithm)
        .build()
    )
    if (single.serial_number, single.issuer_name_hash, single.issuer_key_hash) != (
        expected.serial_number,
        expected.issuer_name_hash,
        expected.issuer_key_hash,
    ):
        raise _invalid(
            f"it is about another certificate (serial {single.serial_number:x}, expected "
            f"{certificate.serial_number:x} from this issuer)"
        )
    reason = single.revocation_reason
    return StatusInfo(
        status=_STATUS[single.certificate_status],
        this_update=single.this_update_utc,
        next_update=single.next_update_utc,
        produced_at=response.produced_at_utc,
        revoked_at=single.revocation_time_utc,
        reason=None if reason is None else reason.value,
    )


def _check_time(info: StatusInfo, at: datetime, freshness: timedelta) -> StatusInfo:
    if info.this_update - at > CLOCK_SKEW:
        raise _invalid(f"its thisUpdate {info.this_update.isoformat()} is in the future")
    age = at - info.this_update
    if age > freshness:
        raise TrustError(
            f"OCSP response is stale: produced {age} ago, more than the {freshness} accepted",
            code=Code.CERTIFICATE_STATUS_STALE,
        )
    if info.next_update is not None and at > info.next_update:
        raise TrustError(
            f"OCSP response is stale: its nextUpdate {info.next_update.isoformat()} passed "
            f"{at - info.next_update} ago",
            code=Code.CERTIFICATE_STATUS_STALE,
        )
    return info


def _verified(
    response_der: bytes, certificate: x509.Certificate, issuer: x509.Certificate, at: datetime
) -> StatusInfo:
    try:
        return _verify(response_der, certificate, issuer, at)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # a malformed field only shows when it is read: never let it out as another type
        raise _invalid(f"it is malformed ({exc})") from None


def check_response(
    response_der: bytes,
    *,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    at: datetime,
    freshness: timedelta,
) -> StatusInfo:
    """Verify an OCSP response about `certificate` at `at`; raise `TrustError` if unusable."""
    return _check_time(_verified(response_der, certificate, issuer, at), at, freshness)


class StatusCache:
    """Responses already verified, so that a signature is checked once per response.

    Keyed by the SHA-256 of the response and of the certificate; freshness is checked on
    every call. The delegated responder's validity is checked when the response is first
    seen (the response's own freshness bound is far shorter than a certificate's life).
    """

    def __init__(self) -> None:
        self._verified: dict[tuple[bytes, bytes], StatusInfo] = {}

    def check(
        self,
        response_der: bytes,
        *,
        certificate: x509.Certificate,
        issuer: x509.Certificate,
        at: datetime,
        freshness: timedelta,
    ) -> StatusInfo:
        key = (
            hashlib.sha256(response_der).digest(),
            certificate_fingerprint(certificate),
        )
        info = self._verified.get(key)
        if info is None:
            info = _verified(response_der, certificate, issuer, at)
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = info
        return _check_time(info, at, freshness)
