"""Unit tests of gateway.signing: ECDSA P-256 signatures and the X.509 trust checks."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import Code, TrustError
from gateway.identifiers import MemberId
from gateway.signing import (
    EcdsaSigner,
    TrustStore,
    certificate_sha256,
    common_name,
    is_signing_certificate,
    load_certificate,
    load_private_key,
    verify_signature,
)

IssueCert = Callable[..., EcdsaSigner]
DATA = b'{"message_id":"m1","type":"request"}'


def der(signer: EcdsaSigner) -> bytes:
    return signer.certificate.public_bytes(serialization.Encoding.DER)


def expect_trust_error(code: Code, call: Callable[[], object]) -> TrustError:
    with pytest.raises(TrustError) as info:
        call()
    assert info.value.code is code
    return info.value


# ---- EcdsaSigner and verify_signature -------------------------------------------------


def test_sign_and_verify(member_signer: EcdsaSigner) -> None:
    """A signature made by EcdsaSigner verifies with its certificate."""
    signature = member_signer.sign(DATA)
    verify_signature(member_signer.certificate, DATA, signature)


def test_signer_exposes_certificate_der(member_signer: EcdsaSigner) -> None:
    """EcdsaSigner.certificate_der is the DER of its certificate."""
    assert member_signer.certificate_der == der(member_signer)
    assert certificate_sha256(member_signer.certificate_der) == (
        member_signer.certificate.fingerprint(hashes.SHA256()).hex()
    )


def test_signer_rejects_non_p256_key(member_signer: EcdsaSigner) -> None:
    """EcdsaSigner refuses a key that is not on P-256."""
    with pytest.raises(ValueError, match="P-256"):
        EcdsaSigner(ec.generate_private_key(ec.SECP384R1()), member_signer.certificate)


@pytest.mark.parametrize(
    "alter",
    [
        lambda d: d + b" ",
        lambda d: d[:-1],
        lambda d: bytes([d[0] ^ 1]) + d[1:],
        lambda d: b"",
    ],
)
def test_altered_data_is_rejected(
    member_signer: EcdsaSigner, alter: Callable[[bytes], bytes]
) -> None:
    """A signature does not verify over altered data: TrustError(BAD_SIGNATURE)."""
    signature = member_signer.sign(DATA)
    expect_trust_error(
        Code.BAD_SIGNATURE,
        lambda: verify_signature(member_signer.certificate, alter(DATA), signature),
    )


@pytest.mark.parametrize(
    "alter",
    [
        lambda s: s[:-1] + bytes([s[-1] ^ 1]),
        lambda s: s[:10] + bytes([s[10] ^ 0x80]) + s[11:],
        lambda s: bytes([s[0] ^ 1]) + s[1:],
        lambda s: s[:-1],
        lambda s: s + b"\x00",
        lambda s: b"",
        lambda s: b"\x00" * len(s),
    ],
    ids=["last-bit", "middle-bit", "der-tag", "truncated", "trailing", "empty", "zeros"],
)
def test_altered_signature_is_rejected(
    member_signer: EcdsaSigner, alter: Callable[[bytes], bytes]
) -> None:
    """An altered or malformed signature raises TrustError(BAD_SIGNATURE), never another error."""
    signature = member_signer.sign(DATA)
    expect_trust_error(
        Code.BAD_SIGNATURE,
        lambda: verify_signature(member_signer.certificate, DATA, alter(signature)),
    )


def test_signature_by_another_key_is_rejected(
    member_signer: EcdsaSigner, auth_signer: EcdsaSigner
) -> None:
    """A signature by another key does not verify with this certificate."""
    signature = auth_signer.sign(DATA)
    expect_trust_error(
        Code.BAD_SIGNATURE, lambda: verify_signature(member_signer.certificate, DATA, signature)
    )


def test_certificate_without_ec_key_is_untrusted(ca: EcdsaSigner, now: datetime) -> None:
    """verify_signature refuses a certificate whose key is not ECDSA (UNTRUSTED_SIGNER)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UY/GOV/RSA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    expect_trust_error(
        Code.UNTRUSTED_SIGNER, lambda: verify_signature(certificate, DATA, b"\x30\x00")
    )


def test_pem_loaders_round_trip(member_signer: EcdsaSigner) -> None:
    """load_private_key/load_certificate read back the PEM of a key and certificate."""
    key_pem = member_signer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = member_signer.certificate.public_bytes(serialization.Encoding.PEM)
    signer = EcdsaSigner(load_private_key(key_pem), load_certificate(cert_pem))
    assert signer.certificate_der == member_signer.certificate_der
    verify_signature(member_signer.certificate, DATA, signer.sign(DATA))


def test_load_private_key_rejects_non_ec_key() -> None:
    """load_private_key refuses a PEM key that is not an EC key."""
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="EC private key"):
        load_private_key(pem)


def test_certificate_kinds(member_signer: EcdsaSigner, auth_signer: EcdsaSigner) -> None:
    """A signing certificate has non-repudiation; an authentication certificate does not."""
    assert is_signing_certificate(member_signer.certificate)
    assert not is_signing_certificate(auth_signer.certificate)
    assert common_name(member_signer.certificate) == "UY/GOV/DNIC"
    assert common_name(auth_signer.certificate) == "UY/GOV/DNIC/ss1"


# ---- TrustStore -----------------------------------------------------------------------


def test_signing_member_returns_the_member(
    ca: EcdsaSigner, member_signer: EcdsaSigner, now: datetime
) -> None:
    """TrustStore.signing_member returns the certificate and the member named in its CN."""
    store = TrustStore((ca.certificate,))
    certificate, member = store.signing_member(der(member_signer), now)
    assert member == MemberId.parse("UY/GOV/DNIC")
    assert certificate == member_signer.certificate


def test_signing_member_with_several_cas(
    ca: EcdsaSigner, other_ca: EcdsaSigner, member_signer: EcdsaSigner, now: datetime
) -> None:
    """A certificate is accepted when any one of the trusted CAs issued it."""
    store = TrustStore((other_ca.certificate, ca.certificate))
    assert store.signing_member(der(member_signer), now)[1] == MemberId.parse("UY/GOV/DNIC")


def test_signing_member_rejects_auth_certificate(
    ca: EcdsaSigner, auth_signer: EcdsaSigner, now: datetime
) -> None:
    """An authentication certificate (no non-repudiation) is not a signer: UNTRUSTED_SIGNER."""
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(
        Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(auth_signer), now)
    )
    assert "signing certificate" in err.message


def test_signing_member_rejects_auth_certificate_naming_a_member(
    ca: EcdsaSigner, issue: IssueCert, now: datetime
) -> None:
    """A TLS certificate is refused as a signer even when its CN is a valid member id."""
    auth = issue("UY/GOV/DNIC", kind="auth")
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(auth), now))
    assert "non-repudiation" in err.message


def test_signing_member_refuses_a_malformed_key_usage(ca: EcdsaSigner, now: datetime) -> None:
    """A key-usage extension that is not DER, even under the trusted CA's signature (a peer
    sends whatever bytes it likes): cryptography parses it lazily and raises ValueError,
    which must come out as UNTRUSTED_SIGNER, a refusal, not an internal error."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UY/GOV/MSP")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.UnrecognizedExtension(x509.oid.ExtensionOID.KEY_USAGE, b"\x04\x02no"), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(
        Code.UNTRUSTED_SIGNER,
        lambda: store.signing_member(certificate.public_bytes(serialization.Encoding.DER), now),
    )
    assert "malformed extension" in err.message


def test_signing_member_rejects_certificate_of_another_ca(
    ca: EcdsaSigner, other_ca: EcdsaSigner, issue: IssueCert, now: datetime
) -> None:
    """A signing certificate issued by an untrusted CA is rejected: UNTRUSTED_SIGNER."""
    foreign = issue("UY/GOV/DNIC", issuer=other_ca)
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(foreign), now))
    assert "not issued by a CA" in err.message


def test_signing_member_rejects_impostor_ca_with_same_name(
    ca: EcdsaSigner,
    make_ca: Callable[..., EcdsaSigner],
    issue: IssueCert,
    now: datetime,
) -> None:
    """A CA with the trusted CA's name but another key cannot issue trusted certificates."""
    impostor = make_ca(common_name(ca.certificate))
    assert impostor.certificate.subject == ca.certificate.subject
    forged = issue("UY/GOV/DNIC", issuer=impostor)
    store = TrustStore((ca.certificate,))
    expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(forged), now))


def test_signing_member_rejects_ca_certificate(ca: EcdsaSigner, now: datetime) -> None:
    """A trusted CA's own certificate, not being a member signing certificate, is refused."""
    store = TrustStore((ca.certificate,))
    expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(ca), now))


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(days=-31),  # before not_valid_before (now - 30 days)
        timedelta(days=-30, seconds=-1),
        timedelta(days=365, seconds=1),  # after not_valid_after (now + 365 days)
        timedelta(days=4000),
    ],
)
def test_signing_member_rejects_outside_validity(
    ca: EcdsaSigner, member_signer: EcdsaSigner, now: datetime, offset: timedelta
) -> None:
    """A certificate used outside its validity window is rejected: UNTRUSTED_SIGNER."""
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(
        Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(member_signer), now + offset)
    )
    assert "not valid at" in err.message


@pytest.mark.parametrize("offset", [timedelta(days=-30), timedelta(days=365)])
def test_signing_member_validity_bounds_are_inclusive(
    ca: EcdsaSigner, member_signer: EcdsaSigner, now: datetime, offset: timedelta
) -> None:
    """A certificate is valid at exactly its not-before and not-after moments."""
    store = TrustStore((ca.certificate,))
    assert store.signing_member(der(member_signer), now + offset)[1].code == "DNIC"


def test_signing_member_cache_does_not_skip_validity(
    ca: EcdsaSigner, member_signer: EcdsaSigner, now: datetime
) -> None:
    """A certificate accepted once is still refused later at a moment outside its validity."""
    store = TrustStore((ca.certificate,))
    store.signing_member(der(member_signer), now)
    expect_trust_error(
        Code.UNTRUSTED_SIGNER,
        lambda: store.signing_member(der(member_signer), now + timedelta(days=400)),
    )


def test_signing_member_rejects_when_ca_not_valid(
    make_ca: Callable[..., EcdsaSigner], issue: IssueCert, now: datetime
) -> None:
    """A certificate is refused at a moment when its issuing CA is not valid."""
    short_ca = make_ca(not_before=now - timedelta(days=60), not_after=now - timedelta(days=1))
    member = issue("UY/GOV/DNIC", issuer=short_ca)
    store = TrustStore((short_ca.certificate,))
    expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(member), now))
    assert store.signing_member(der(member), now - timedelta(days=2))[1].code == "DNIC"


@pytest.mark.parametrize(
    "cn", ["DNIC", "UY/GOV/DNIC/ss1", "uy/gov/dnic", "UY/GOV/DN IC", "Registry signing"]
)
def test_signing_member_rejects_cn_that_is_not_a_member(
    ca: EcdsaSigner, issue: IssueCert, now: datetime, cn: str
) -> None:
    """A signing certificate whose CN is not a member id is rejected: UNTRUSTED_SIGNER."""
    certificate = issue(cn, kind="sign")
    store = TrustStore((ca.certificate,))
    err = expect_trust_error(
        Code.UNTRUSTED_SIGNER, lambda: store.signing_member(der(certificate), now)
    )
    assert "does not name a member" in err.message


@pytest.mark.parametrize("data", [b"", b"not a certificate", b"\x30\x03\x02\x01\x00"])
def test_signing_member_rejects_garbage_der(ca: EcdsaSigner, now: datetime, data: bytes) -> None:
    """Bytes that are not a DER certificate are rejected: UNTRUSTED_SIGNER."""
    store = TrustStore((ca.certificate,))
    expect_trust_error(Code.UNTRUSTED_SIGNER, lambda: store.signing_member(data, now))


def test_empty_trust_store_trusts_nothing(member_signer: EcdsaSigner, now: datetime) -> None:
    """With no CA, no certificate is trusted."""
    expect_trust_error(
        Code.UNTRUSTED_SIGNER, lambda: TrustStore(()).signing_member(der(member_signer), now)
    )


# ---- interoperability with OpenSSL ----------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False, timeout=30
    )


def _write_public_key(signer: EcdsaSigner, path: Path) -> None:
    path.write_bytes(
        signer.certificate.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@needs_openssl
def test_openssl_verifies_our_signature(member_signer: EcdsaSigner, tmp_path: Path) -> None:
    """OpenSSL, an independent implementation, verifies an EcdsaSigner signature (DER, SHA-256)."""
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "sig.der").write_bytes(member_signer.sign(DATA))
    _write_public_key(member_signer, tmp_path / "pub.pem")
    result = _openssl(
        "dgst", "-sha256", "-verify", tmp_path / "pub.pem",
        "-signature", tmp_path / "sig.der", tmp_path / "data.bin",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Verified OK" in result.stdout


@needs_openssl
def test_openssl_refuses_our_signature_over_other_data(
    member_signer: EcdsaSigner, tmp_path: Path
) -> None:
    """OpenSSL refuses our signature over altered data (the positive check is not vacuous)."""
    (tmp_path / "data.bin").write_bytes(DATA + b"!")
    (tmp_path / "sig.der").write_bytes(member_signer.sign(DATA))
    _write_public_key(member_signer, tmp_path / "pub.pem")
    result = _openssl(
        "dgst", "-sha256", "-verify", tmp_path / "pub.pem",
        "-signature", tmp_path / "sig.der", tmp_path / "data.bin",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Verified OK" not in result.stdout


@needs_openssl
def test_we_verify_openssl_signature(member_signer: EcdsaSigner, tmp_path: Path) -> None:
    """verify_signature accepts a signature made by OpenSSL with the certificate's key."""
    (tmp_path / "data.bin").write_bytes(DATA)
    (tmp_path / "key.pem").write_bytes(
        member_signer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = _openssl(
        "dgst", "-sha256", "-sign", tmp_path / "key.pem",
        "-out", tmp_path / "sig.der", tmp_path / "data.bin",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    verify_signature(member_signer.certificate, DATA, (tmp_path / "sig.der").read_bytes())
