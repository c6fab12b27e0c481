"""Fixtures for the unit tests of the sans-IO core: a small ECDSA P-256 PKI built in memory.

Every certificate is returned as an `EcdsaSigner` (its private key and certificate), so a
test can sign with it, show its DER, or issue further certificates with it. Times are
fixed: the core never reads the clock, and neither do these fixtures.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.signing import EcdsaSigner

# The moment "now" of every unit test (whole seconds: X.509 validity has second precision).
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)

CertKind = Literal["sign", "auth", "config"]
IssueCert = Callable[..., EcdsaSigner]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gateway unit tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca(
    common_name: str = "UY Test Root CA",
    *,
    not_before: datetime = NOW - timedelta(days=365),
    not_after: datetime = NOW + timedelta(days=3650),
) -> EcdsaSigner:
    """A self-signed P-256 root CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return EcdsaSigner(key, certificate)


def build_certificate(
    issuer: EcdsaSigner,
    common_name: str,
    *,
    kind: CertKind = "sign",
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=365),
) -> EcdsaSigner:
    """An end-entity P-256 certificate issued by `issuer`.

    'sign' and 'config': KeyUsage digital_signature + content_commitment (non-repudiation).
    'auth': KeyUsage digital_signature only, EKU serverAuth + clientAuth (a TLS certificate).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if kind == "auth":
        builder = builder.add_extension(
            _key_usage(digital_signature=True), critical=True
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            _key_usage(digital_signature=True, content_commitment=True), critical=True
        )
    return EcdsaSigner(key, builder.sign(issuer.key, hashes.SHA256()))


@pytest.fixture
def now() -> datetime:
    """The fixed moment at which the certificates below are valid."""
    return NOW


@pytest.fixture
def ca() -> EcdsaSigner:
    """The instance's trusted root CA."""
    return build_ca()


@pytest.fixture
def other_ca() -> EcdsaSigner:
    """A CA that the instance does not trust (different name, different key)."""
    return build_ca("Some Other CA")


@pytest.fixture
def member_signer(ca: EcdsaSigner) -> EcdsaSigner:
    """The signing certificate of member UY/GOV/DNIC, issued by `ca`."""
    return build_certificate(ca, "UY/GOV/DNIC", kind="sign")


@pytest.fixture
def auth_signer(ca: EcdsaSigner) -> EcdsaSigner:
    """The authentication (TLS) certificate of security server UY/GOV/DNIC/ss1, issued by `ca`."""
    return build_certificate(ca, "UY/GOV/DNIC/ss1", kind="auth")


@pytest.fixture
def issue(ca: EcdsaSigner) -> IssueCert:
    """A factory: issue(common_name, *, kind=..., issuer=ca, not_before=..., not_after=...)."""

    def _issue(
        common_name: str,
        *,
        kind: CertKind = "sign",
        issuer: EcdsaSigner | None = None,
        not_before: datetime = NOW - timedelta(days=30),
        not_after: datetime = NOW + timedelta(days=365),
    ) -> EcdsaSigner:
        return build_certificate(
            ca if issuer is None else issuer,
            common_name,
            kind=kind,
            not_before=not_before,
            not_after=not_after,
        )

    return _issue


@pytest.fixture
def make_ca() -> Callable[..., EcdsaSigner]:
    """A factory: make_ca(common_name="UY Test Root CA", *, not_before=..., not_after=...)."""
    return build_ca
