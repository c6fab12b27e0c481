"""Signatures with ECDSA P-256 and the X.509 checks of signing and authentication certificates.

`verify_*` functions return nothing and raise on failure (as in pyca/cryptography), so
there is no boolean to forget. A signing certificate names its member in the subject's
common name and carries the non-repudiation key usage; an authentication (TLS)
certificate names its security server and does not. Certificates must be issued directly
by one of the CAs that the global configuration trusts, and be valid at the moment
passed in: this module never reads the clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import Code, IdentifierError, TrustError
from gateway.identifiers import MemberId

_ECDSA = ec.ECDSA(hashes.SHA256())


class Signer(Protocol):
    """Something that signs bytes for one member and shows the certificate to check it."""

    @property
    def certificate_der(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class EcdsaSigner:
    """Signs with an in-memory P-256 key (a hardware module would be another `Signer`)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    certificate_der: bytes = field(init=False)
    certificate_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key.curve, ec.SECP256R1):
            raise ValueError("signing keys must be ECDSA P-256")
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        object.__setattr__(self, "certificate_der", der)
        object.__setattr__(self, "certificate_sha256", certificate_sha256(der))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, _ECDSA)


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an EC private key")
    return key


def load_certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def pem_bundle(ders: tuple[bytes, ...] | list[bytes]) -> bytes:
    """Concatenated PEM of DER certificates (the form TLS libraries take as roots)."""
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


def certificate_sha256(der: bytes) -> str:
    """The fingerprint that identifies a certificate in the configuration and the log."""
    return hashlib.sha256(der).hexdigest()


# id(certificate) -> (that certificate, the SHA-256 of its DER). pyca's `fingerprint`
# encodes the whole certificate again on every call (about 8 us, several times per
# message); the certificates of the data path are long-lived objects (ours, the
# configuration's, `TrustStore`'s parsed signers), so their digest is taken once. The
# entry holds the object, so its id cannot be reused while the entry lives, and a hit is
# checked to be that very object.
_FINGERPRINTS: dict[int, tuple[x509.Certificate, bytes]] = {}
_MAX_FINGERPRINTS = 4096


def certificate_fingerprint(certificate: x509.Certificate) -> bytes:
    """The SHA-256 of a certificate's DER (raw bytes), computed once per certificate object."""
    hit = _FINGERPRINTS.get(id(certificate))
    if hit is not None and hit[0] is certificate:
        return hit[1]
    digest = certificate.fingerprint(hashes.SHA256())
    if len(_FINGERPRINTS) >= _MAX_FINGERPRINTS:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(certificate)] = (certificate, digest)
    return digest


def verify_signature(certificate: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Raise `TrustError(BAD_SIGNATURE)` unless `signature` is the certificate key's over data."""
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise TrustError("the signer's certificate has no ECDSA key", code=Code.UNTRUSTED_SIGNER)
    try:
        public_key.verify(signature, data, _ECDSA)
    except InvalidSignature:
        raise TrustError(
            "the signature does not verify with the signer's certificate: the message was "
            "altered or signed by someone else",
            code=Code.BAD_SIGNATURE,
        ) from None


def common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise TrustError(
            "certificate subject must have one common name", code=Code.UNTRUSTED_SIGNER
        )
    return str(names[0].value)


def is_signing_certificate(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(usage.content_commitment)


@dataclass(slots=True)
class TrustStore:
    """The CAs an instance trusts, with a cache of signing certificates already checked.

    The CA's signature on a certificate is verified once per certificate; the validity
    windows of the certificate and its CA are checked on every use.
    """

    cas: tuple[x509.Certificate, ...]
    _checked: dict[bytes, tuple[x509.Certificate, MemberId, x509.Certificate]] = field(
        default_factory=dict
    )

    def issuer_of(self, certificate: x509.Certificate) -> x509.Certificate:
        """The trusted CA that issued the certificate, or `TrustError(UNTRUSTED_SIGNER)`."""
        for ca in self.cas:
            if ca.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return ca
        raise TrustError(
            "certificate was not issued by a CA that the global configuration trusts",
            code=Code.UNTRUSTED_SIGNER,
        )

    @staticmethod
    def check_valid(certificate: x509.Certificate, ca: x509.Certificate, at: datetime) -> None:
        for c in (certificate, ca):
            if not c.not_valid_before_utc <= at <= c.not_valid_after_utc:
                raise TrustError(
                    f"certificate {common_name(c)!r} is not valid at {at.isoformat()}",
                    code=Code.UNTRUSTED_SIGNER,
                )

    def check_issued(self, certificate: x509.Certificate, at: datetime) -> None:
        """Raise `TrustError(UNTRUSTED_SIGNER)` unless a trusted CA issued it and both are valid at `at`."""
        self.check_valid(certificate, self.issuer_of(certificate), at)

    def signing_member(self, der: bytes, at: datetime) -> tuple[x509.Certificate, MemberId]:
        """Check a member's signing certificate (DER) and return it with the member it names."""
        cached = self._checked.get(der)
        if cached is None:
            try:
                certificate = x509.load_der_x509_certificate(der)
            except ValueError:
                raise TrustError(
                    "signer certificate is not valid DER", code=Code.UNTRUSTED_SIGNER
                ) from None
            try:
                # cryptography parses extensions and names lazily: a malformed one raises
                # here, from a sender's bytes, and is refused like any untrusted signer
                signing = is_signing_certificate(certificate)
                name = common_name(certificate) if signing else ""
            except (ValueError, TypeError, x509.DuplicateExtension):
                raise TrustError(
                    "signer certificate has a malformed extension or subject",
                    code=Code.UNTRUSTED_SIGNER,
                ) from None
            if not signing:
                raise TrustError(
                    "certificate is not a signing certificate (no non-repudiation key usage)",
                    code=Code.UNTRUSTED_SIGNER,
                )
            try:
                member = MemberId.parse(name)
            except IdentifierError:
                raise TrustError(
                    "signing certificate does not name a member", code=Code.UNTRUSTED_SIGNER
                ) from None
            cached = (certificate, member, self.issuer_of(certificate))
            if len(self._checked) > 10_000:
                self._checked.clear()
            self._checked[der] = cached
        certificate, member, ca = cached
        self.check_valid(certificate, ca, at)
        return certificate, member
