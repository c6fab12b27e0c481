"""Onboarding with an external CA: requests that ask for exactly what the gateway requires,
the development CA signing them through the same profile, and every way a returned
certificate can be wrong refused with its own message (gateway/certificate_profile.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.pki import Issued, certify, init_pki, issue, sign_request
from gateway.certificate_profile import (
    Profile,
    check_certificate,
    check_request,
    make_request,
    subject,
)
from gateway.identifiers import MemberId, SecurityServerId, server_dns_name

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SERVER = SecurityServerId.parse("UY/GOV/NEW/ss1")
MEMBER = MemberId.parse("UY/GOV/NEW")


@pytest.fixture(scope="module")
def ca() -> Issued:
    return issue(common_name="external CA", issuer=None, now=NOW, days=3650, kind="ca")


def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    "profile", [Profile.server(SERVER, ["ss1.new.gub.uy"]), Profile.member(MEMBER)]
)
def test_a_request_signed_by_the_ca_gives_a_certificate_that_imports(
    ca: Issued, profile: Profile
) -> None:
    own = key()
    request = make_request(profile, own, "Agencia Nueva")
    assert check_request(profile, request) == []
    certificate = sign_request(ca, request, now=NOW, days=365)
    assert check_certificate(profile, certificate, own, now=NOW, ca=ca.certificate) == []
    if profile.kind == "auth":
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert names.value.get_values_for_type(x509.DNSName) == [
            server_dns_name(SERVER),
            "ss1.new.gub.uy",
        ]


def test_the_ca_refuses_a_request_that_is_not_for_a_server_or_member(ca: Issued) -> None:
    request = make_request(Profile("auth", "just a name"), key(), "")
    with pytest.raises(ValueError, match="neither a security server id"):
        sign_request(ca, request, now=NOW, days=365)


def test_the_ca_refuses_a_server_request_without_client_authentication(ca: Issued) -> None:
    """A request whose extensions would give a server a certificate that cannot call."""
    own = key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(SERVER))]))
        .add_extension(Profile.server(SERVER).key_usage(), critical=True)
        .sign(own, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="lacks serverAuth") as refused:
        sign_request(ca, request, now=NOW, days=365)
    assert "lacks clientAuth" in str(refused.value)
    assert f"lack the DNS name {server_dns_name(SERVER)}" in str(refused.value)


def issued(
    ca: Issued, profile: Profile, own: ec.EllipticCurvePrivateKey, **kw: object
) -> x509.Certificate:
    return certify(
        own.public_key(),
        subject(profile, ""),
        profile,
        ca,
        now=kw.get("now", NOW),  # type: ignore[arg-type]
        days=kw.get("days", 365),  # type: ignore[arg-type]
    )


def problems(profile: Profile, certificate: x509.Certificate, own: object, ca: Issued) -> str:
    return "; ".join(
        check_certificate(profile, certificate, own, now=NOW, ca=ca.certificate)  # type: ignore[arg-type]
    )


def test_a_certificate_for_another_server_is_refused(ca: Issued) -> None:
    own = key()
    other = Profile.server(SecurityServerId.parse("UY/GOV/NEW/ss2"))
    found = problems(Profile.server(SERVER), issued(ca, other, own), own, ca)
    assert "its common name is 'UY/GOV/NEW/ss2', not 'UY/GOV/NEW/ss1'" in found
    assert f"lack the DNS name {server_dns_name(SERVER)}" in found


def test_a_tls_certificate_offered_as_a_signing_certificate_is_refused(ca: Issued) -> None:
    own = key()
    tls = Profile("auth", str(MEMBER))
    found = problems(Profile.member(MEMBER), issued(ca, tls, own), own, ca)
    assert "lacks nonRepudiation" in found


def test_a_certificate_of_another_key_is_refused(ca: Issued) -> None:
    profile = Profile.member(MEMBER)
    found = problems(profile, issued(ca, profile, key()), key(), ca)
    assert "not the certificate of this key" in found


def test_an_expired_certificate_is_refused(ca: Issued) -> None:
    own = key()
    profile = Profile.member(MEMBER)
    old = issued(ca, profile, own, now=NOW - timedelta(days=30), days=10)
    assert "it expired on 2026-11-11" in problems(profile, old, own, ca)


def test_a_certificate_from_another_ca_is_refused(ca: Issued) -> None:
    own = key()
    profile = Profile.member(MEMBER)
    other = issue(common_name="another CA", issuer=None, now=NOW, days=365, kind="ca")
    assert "not issued by the CA external CA" in problems(
        profile, issued(other, profile, own), own, ca
    )


def test_a_certificate_on_another_curve_is_refused(ca: Issued) -> None:
    own = ec.generate_private_key(ec.SECP384R1())
    profile = Profile.member(MEMBER)
    assert "not P-256" in problems(profile, issued(ca, profile, own), own, ca)


def test_init_never_rewrites_an_existing_anchor(tmp_path: Path) -> None:
    """Re-running init for more certificates keeps the running instance's anchor."""
    first = init_pki(
        tmp_path,
        instance="UY",
        members=[MEMBER],
        servers=[SERVER],
        registry_addresses=["registry.gub.uy:7000"],
        now=NOW,
    )
    written = (tmp_path / "anchor.json").read_bytes()
    again = init_pki(
        tmp_path,
        instance="UY",
        members=[MEMBER, MemberId.parse("UY/GOV/OTHER")],
        servers=[SERVER],
        registry_addresses=[],
        now=NOW,
    )
    assert (tmp_path / "anchor.json").read_bytes() == written
    assert again == first and json.loads(written)["addresses"] == ["registry.gub.uy:7000"]
    assert (tmp_path / "sign" / "UY_GOV_OTHER.crt").exists()
