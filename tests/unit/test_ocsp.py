"""Unit tests of gateway.ocsp: the OCSP request, the check of a response, the status cache.

Responses are built here with `cryptography`'s OCSPResponseBuilder, so that each test can
make exactly the response it needs (signed by whom, about what, when).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from certs.pki import Issued, issue
from gateway.errors import Code, TrustError
from gateway.ocsp import CertStatus, StatusCache, build_request, check_response
from gateway.signing import EcdsaSigner
from tests.unit.conftest import NOW, build_ca, build_certificate

FRESH = timedelta(minutes=15)
CA = build_ca()
OTHER_CA = build_ca("Some Other CA")
SUBJECT = build_certificate(CA, "UY/GOV/DNIC").certificate
NEIGHBOUR = build_certificate(CA, "UY/GOV/MSP").certificate


def delegate(
    issuer: EcdsaSigner, *, kind: str = "ocsp", now: datetime = NOW, days: int = 30
) -> Issued:
    """A responder certificate issued by `issuer` (kind 'ocsp' has the OCSPSigning EKU)."""
    return issue(
        common_name=f"responder ({kind})",
        issuer=Issued(key=issuer.key, certificate=issuer.certificate),
        now=now,
        days=days,
        kind=kind,
    )


RESPONDER = delegate(CA)


def response(
    *,
    certificate: x509.Certificate = SUBJECT,
    issuer: x509.Certificate = CA.certificate,
    key: CertificateIssuerPrivateKeyTypes = RESPONDER.key,
    signer: x509.Certificate = RESPONDER.certificate,
    include: bool = True,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this_update: datetime = NOW - timedelta(minutes=1),
    next_update: datetime | None = NOW + timedelta(minutes=9),
    revoked: tuple[datetime, x509.ReasonFlags] | None = None,
    algorithm: hashes.HashAlgorithm = hashes.SHA1(),  # noqa: B008
    by: ocsp.OCSPResponderEncoding = ocsp.OCSPResponderEncoding.HASH,
) -> bytes:
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=certificate,
            issuer=issuer,
            algorithm=algorithm,
            cert_status=status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=None if revoked is None else revoked[0],
            revocation_reason=None if revoked is None else revoked[1],
        )
        .responder_id(by, signer)
    )
    if include:
        builder = builder.certificates([signer])
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


GOOD = response()


def check(der: bytes) -> CertStatus:
    """The status `der` gives SUBJECT at NOW."""
    return check_response(
        der, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH
    ).status


def rejected(code: Code, der: bytes) -> str:
    """The message of the TrustError (with `code`) that checking `der` raises."""
    with pytest.raises(TrustError) as info:
        check(der)
    assert info.value.code is code
    return info.value.message


# ---- build_request ----------------------------------------------------------------------


def test_request_names_the_certificate_with_sha1_certid() -> None:
    """The request is DER that cryptography reads back: SHA-1 CertID of this certificate."""
    request = ocsp.load_der_ocsp_request(build_request(SUBJECT, CA.certificate))
    assert request.serial_number == SUBJECT.serial_number
    assert isinstance(request.hash_algorithm, hashes.SHA1)
    assert (
        request.issuer_key_hash
        == x509.SubjectKeyIdentifier.from_public_key(CA.key.public_key()).digest
    )
    assert len(request.extensions) == 0


# ---- accepted responses -----------------------------------------------------------------


def test_good_from_a_delegated_responder() -> None:
    """A response signed by a responder certificate the issuer delegated is accepted."""
    info = check_response(GOOD, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH)
    assert info.status is CertStatus.GOOD
    assert info.this_update == NOW - timedelta(minutes=1)
    assert info.next_update == NOW + timedelta(minutes=9)
    assert info.produced_at.tzinfo is not None
    assert (info.revoked_at, info.reason) == (None, None)


def test_revoked_is_returned_with_time_and_reason() -> None:
    """REVOKED is returned, not raised: the caller decides; time and reason come with it."""
    when = NOW - timedelta(days=2)
    der = response(
        status=ocsp.OCSPCertStatus.REVOKED, revoked=(when, x509.ReasonFlags.key_compromise)
    )
    info = check_response(der, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH)
    assert info.status is CertStatus.REVOKED
    assert info.revoked_at == when
    assert info.reason == "keyCompromise"


def test_unknown_is_returned() -> None:
    assert check(response(status=ocsp.OCSPCertStatus.UNKNOWN)) is CertStatus.UNKNOWN


def test_signed_by_the_issuer_itself_is_accepted() -> None:
    """The CA may answer for its own certificates, named by key hash or by name."""
    for by in ocsp.OCSPResponderEncoding:
        der = response(key=CA.key, signer=CA.certificate, include=False, by=by)
        assert check(der) is CertStatus.GOOD


def test_certid_with_the_hash_algorithm_of_the_response() -> None:
    """A SHA-256 CertID is matched with SHA-256."""
    assert check(response(algorithm=hashes.SHA256())) is CertStatus.GOOD


def test_rsa_issuer_signature_verifies() -> None:
    """An RSA issuer's PKCS#1 v1.5 signature over the response verifies."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    subject = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UY/GOV/RSA")]))
        .issuer_name(name)
        .public_key(CA.key.public_key())
        .serial_number(2)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = response(certificate=subject, issuer=ca, key=key, signer=ca, include=False)
    info = check_response(der, certificate=subject, issuer=ca, at=NOW, freshness=FRESH)
    assert info.status is CertStatus.GOOD
    tampered = der[:-1] + bytes([der[-1] ^ 1])  # the last byte of the signature
    with pytest.raises(TrustError, match="signature does not verify"):
        check_response(tampered, certificate=subject, issuer=ca, at=NOW, freshness=FRESH)


# ---- freshness --------------------------------------------------------------------------


def test_old_this_update_is_stale() -> None:
    message = rejected(
        Code.CERTIFICATE_STATUS_STALE, response(this_update=NOW - timedelta(hours=1))
    )
    assert "1:00:00 ago" in message


def test_passed_next_update_is_stale() -> None:
    der = response(this_update=NOW - timedelta(minutes=5), next_update=NOW - timedelta(minutes=1))
    assert "nextUpdate" in rejected(Code.CERTIFICATE_STATUS_STALE, der)


def test_this_update_in_the_future() -> None:
    """Up to five minutes ahead is clock skew; beyond that the response is invalid."""
    assert check(response(this_update=NOW + timedelta(minutes=4))) is CertStatus.GOOD
    der = response(this_update=NOW + timedelta(minutes=6), next_update=None)
    assert "future" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


# ---- rejected responses -----------------------------------------------------------------


def test_response_about_another_certificate() -> None:
    der = response(certificate=NEIGHBOUR)
    assert "another certificate" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_responder_of_another_ca() -> None:
    other = delegate(OTHER_CA)
    der = response(key=other.key, signer=other.certificate)
    assert "not issued by the certificate's issuer" in rejected(
        Code.CERTIFICATE_STATUS_INVALID, der
    )


def test_another_ca_signing_for_itself() -> None:
    """Another CA's own signature is not the issuer's."""
    der = response(key=OTHER_CA.key, signer=OTHER_CA.certificate, include=False)
    assert "neither the issuer" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_responder_without_ocsp_signing_usage() -> None:
    """A certificate of the right CA without id-kp-OCSPSigning may not answer for it."""
    member = delegate(CA, kind="sign")
    der = response(key=member.key, signer=member.certificate)
    assert "OCSPSigning" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_responder_certificate_not_included() -> None:
    der = response(include=False)
    assert "neither the issuer" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_expired_responder_certificate() -> None:
    old = delegate(CA, now=NOW - timedelta(days=60), days=30)
    der = response(key=old.key, signer=old.certificate)
    assert "not valid at" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_tampered_byte() -> None:
    """One changed byte in the signed data (the serial number) breaks the signature."""
    serial = SUBJECT.serial_number.to_bytes((SUBJECT.serial_number.bit_length() + 7) // 8, "big")
    at = GOOD.index(serial) + len(serial) - 1
    tampered = GOOD[:at] + bytes([GOOD[at] ^ 0x01]) + GOOD[at + 1 :]
    assert "signature does not verify" in rejected(Code.CERTIFICATE_STATUS_INVALID, tampered)


def test_unsuccessful_response() -> None:
    der = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.TRY_LATER
    ).public_bytes(serialization.Encoding.DER)
    assert "TRY_LATER" in rejected(Code.CERTIFICATE_STATUS_INVALID, der)


def test_garbage() -> None:
    assert "not a DER-encoded OCSPResponse" in rejected(Code.CERTIFICATE_STATUS_INVALID, b"\x30")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_trust_error(data: bytes) -> None:
    with pytest.raises(TrustError) as info:
        check(data)
    assert info.value.code is Code.CERTIFICATE_STATUS_INVALID


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(1, 255))
def test_any_changed_byte_is_rejected(index: int, xor: int) -> None:
    """A changed byte gives TrustError, or for the few bytes that nothing signs (such as the
    unused-bits count of the signature's BIT STRING) the very same answer: never another one."""
    tampered = GOOD[:index] + bytes([GOOD[index] ^ xor]) + GOOD[index + 1 :]
    outcome: object
    try:
        outcome = check(tampered)
    except TrustError as exc:
        outcome = exc.code
    assert outcome in (Code.CERTIFICATE_STATUS_INVALID, CertStatus.GOOD)
    if outcome is CertStatus.GOOD:
        assert check_response(
            tampered, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH
        ) == check_response(
            GOOD, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH
        )


# ---- StatusCache ------------------------------------------------------------------------


def test_cache_checks_freshness_on_every_call() -> None:
    """A cached response is still refused once it is stale."""
    cache = StatusCache()

    def cached(at: datetime) -> CertStatus:
        return cache.check(
            GOOD, certificate=SUBJECT, issuer=CA.certificate, at=at, freshness=FRESH
        ).status

    assert cached(NOW) is CertStatus.GOOD
    assert cached(NOW + timedelta(minutes=5)) is CertStatus.GOOD
    with pytest.raises(TrustError) as info:
        cached(NOW + timedelta(minutes=20))
    assert info.value.code is Code.CERTIFICATE_STATUS_STALE


def test_cache_does_not_keep_failures_or_mix_certificates() -> None:
    cache = StatusCache()
    for _ in range(2):
        with pytest.raises(TrustError):
            cache.check(GOOD, certificate=NEIGHBOUR, issuer=CA.certificate, at=NOW, freshness=FRESH)
    info = cache.check(GOOD, certificate=SUBJECT, issuer=CA.certificate, at=NOW, freshness=FRESH)
    assert info.status is CertStatus.GOOD
