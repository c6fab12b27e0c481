"""Unit tests of RFC 3161 time-stamps: gateway.tsp (request, response, offline verification)
and the development TSA of certs.tsa.

OpenSSL is the independent judge: it verifies our responses and tokens (`openssl ts
-verify`), parses them (`ts -reply -text`), sends us its own requests (`ts -query`), and
issues tokens of its own (`ts -reply`, ESS signing-certificate v1) that `verify_token`
must accept. The attacker's side: altered tokens, wrong certificates, wrong CAs, wrong
times, wrong nonces, refusals, and random bytes from hypothesis.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, tsp  # type: ignore[import-untyped]
from asn1crypto import core as asn1_core  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs.pki import Issued, issue
from certs.tsa import DEFAULT_POLICY, SigningKey, TimeStampAuthority
from gateway.errors import Code, TrustError
from gateway.tsp import (
    TimestampInfo,
    TimeStampResp,
    build_request,
    token_from_response,
    verify_token,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DIGEST = hashlib.sha256(b"a record of the message log").digest()
NONCE = 0x5EED_1234_ABCD_0001

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


# ---- a PKI, built once (hypothesis tests cannot take function-scoped fixtures) --------


def tsa_certificate(
    ca: Issued,
    key: SigningKey,
    *,
    critical: bool = True,
    purposes: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.TIME_STAMPING,),
) -> x509.Certificate:
    """A TSA certificate with the extended key usage chosen by the test (pki.issue is EC only)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a hand-made TSA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage(list(purposes)), critical=critical)
        .sign(ca.key, hashes.SHA256())
    )


@cache
def pki() -> dict[str, Any]:
    ca = issue(common_name="UY test CA", issuer=None, now=NOW, days=3650, kind="ca")
    other_ca = issue(common_name="UY test CA", issuer=None, now=NOW, days=3650, kind="ca")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    loose_key = ec.generate_private_key(ec.SECP256R1())
    wide_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "ca": ca,
        "tsa": issue(common_name="UY TSA", issuer=ca, now=NOW, days=365, kind="tsa"),
        "rogue": issue(common_name="UY TSA", issuer=other_ca, now=NOW, days=365, kind="tsa"),
        "sign": issue(common_name="UY/GOV/MSP", issuer=ca, now=NOW, days=365, kind="sign"),
        "expired": issue(
            common_name="UY TSA", issuer=ca, now=NOW - timedelta(days=400), days=30, kind="tsa"
        ),
        "rsa_key": rsa_key,
        "rsa_cert": tsa_certificate(ca, rsa_key),
        "loose": (loose_key, tsa_certificate(ca, loose_key, critical=False)),
        "wide": (
            wide_key,
            tsa_certificate(
                ca,
                wide_key,
                purposes=(ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CODE_SIGNING),
            ),
        ),
    }


def ca() -> x509.Certificate:
    return pki()["ca"].certificate  # type: ignore[no-any-return]


def authority(
    key: SigningKey | None = None,
    certificate: x509.Certificate | None = None,
    *,
    clock: Callable[[], datetime] = lambda: NOW,
    **kwargs: Any,
) -> TimeStampAuthority:
    tsa = pki()["tsa"]
    return TimeStampAuthority(
        key=key or tsa.key, certificate=certificate or tsa.certificate, clock=clock, **kwargs
    )


def stamp(tsa: TimeStampAuthority | None = None, digest: bytes = DIGEST) -> bytes:
    """A token for `digest` from `tsa` (the good TSA by default)."""
    response = (tsa or authority()).respond(build_request(digest, NONCE))
    return token_from_response(response, digest=digest, nonce=NONCE)


def request(**fields: Any) -> bytes:
    """A TimeStampReq with the fields given (defaults: SHA-256 of DIGEST, certReq)."""
    body = {
        "version": "v1",
        "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": DIGEST},
        "cert_req": True,
        **fields,
    }
    return bytes(tsp.TimeStampReq(body).dump())


def status_of(response: bytes) -> tuple[str, set[str]]:
    status = TimeStampResp.load(response, strict=True)["status"]
    return status["status"].native, status["fail_info"].native or set()


def refused(call: Callable[[], object], *words: str) -> TrustError:
    """Assert that `call` raises TrustError(TIMESTAMP_INVALID) whose message has `words`."""
    with pytest.raises(TrustError) as info:
        call()
    assert info.value.code is Code.TIMESTAMP_INVALID
    for word in words:
        assert word in info.value.message
    return info.value


# ---- round trip ------------------------------------------------------------------------


def test_round_trip() -> None:
    """request -> respond -> token_from_response -> verify_token states the time and digest."""
    info = verify_token(stamp(), digest=DIGEST, cas=[ca()])
    assert info == TimestampInfo(
        gen_time=NOW,
        serial=info.serial,
        tsa_certificate=pki()["tsa"].certificate,
        policy=DEFAULT_POLICY,
        digest=DIGEST,
    )
    assert info.gen_time.tzinfo is not None
    assert info.serial > 0


def test_gen_time_is_truncated_to_the_second() -> None:
    tsa = authority(clock=lambda: NOW + timedelta(microseconds=999_999))
    assert verify_token(stamp(tsa), digest=DIGEST, cas=[ca()]).gen_time == NOW


def test_serial_numbers_are_unique() -> None:
    tsa = authority()
    serials = {verify_token(stamp(tsa), digest=DIGEST, cas=[ca()]).serial for _ in range(50)}
    other = verify_token(stamp(authority()), digest=DIGEST, cas=[ca()]).serial
    assert len(serials) == 50
    assert other not in serials


def test_rsa_tsa() -> None:
    """An RSA key signs sha256WithRSAEncryption (PKCS#1 v1.5), and that verifies too."""
    tsa = authority(pki()["rsa_key"], pki()["rsa_cert"])
    assert verify_token(stamp(tsa), digest=DIGEST, cas=[ca()]).tsa_certificate == pki()["rsa_cert"]


def test_without_cert_req_the_certificate_must_be_given() -> None:
    response = authority().respond(request(cert_req=False, nonce=NONCE))
    token = token_from_response(response, digest=DIGEST, nonce=NONCE)
    assert isinstance(cms.ContentInfo.load(token)["content"]["certificates"].native, type(None))
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "signer's certificate")
    tsa_cert = pki()["tsa"].certificate
    info = verify_token(token, digest=DIGEST, cas=[ca()], extra_certificates=[tsa_cert])
    assert info.tsa_certificate == tsa_cert


def test_chain_is_included() -> None:
    token = stamp(authority(chain=[ca()]))
    assert len(cms.ContentInfo.load(token)["content"]["certificates"]) == 2
    verify_token(token, digest=DIGEST, cas=[ca()])


def test_key_must_match_certificate() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        authority(pki()["sign"].key)


# ---- what the TSA grants and refuses ------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "size"), [("sha384", 48), ("sha512", 64)])
def test_other_hash_algorithms_are_granted(algorithm: str, size: int) -> None:
    imprint = {"hash_algorithm": {"algorithm": algorithm}, "hashed_message": b"\x07" * size}
    response = authority().respond(request(message_imprint=imprint))
    assert status_of(response) == ("granted", set())
    token = TimeStampResp.load(response)["time_stamp_token"]
    info = tsp.TSTInfo.load(bytes(token["content"]["encap_content_info"]["content"]))
    assert info["message_imprint"].native == tsp.MessageImprint(imprint).native


@pytest.mark.parametrize(
    ("fields", "fail_info"),
    [
        ({"message_imprint": {"hash_algorithm": {"algorithm": "sha1"}, "hashed_message": b"1" * 20}}, "bad_alg"),
        ({"message_imprint": {"hash_algorithm": {"algorithm": "md5"}, "hashed_message": b"1" * 16}}, "bad_alg"),
        ({"message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": b"1" * 31}}, "bad_data_format"),
        ({"version": 2}, "bad_data_format"),
        ({"req_policy": "1.2.3.4"}, "unaccepted_policy"),
        ({"extensions": [{"extn_id": "1.2.3.4", "extn_value": b"x"}]}, "unaccepted_extensions"),
    ],
)  # fmt: skip
def test_unacceptable_requests_are_rejected(fields: dict[str, Any], fail_info: str) -> None:
    assert status_of(authority().respond(request(**fields))) == ("rejection", {fail_info})


def test_our_policy_may_be_requested() -> None:
    assert status_of(authority().respond(request(req_policy=DEFAULT_POLICY)))[0] == "granted"


@pytest.mark.parametrize(
    "garbage", [b"", b"\x30\x00", b"not DER", request()[:-1], request() + b"\0"]
)
def test_malformed_requests_are_rejected(garbage: bytes) -> None:
    assert status_of(authority().respond(garbage)) == ("rejection", {"bad_data_format"})


# ---- token_from_response -------------------------------------------------------------------


def test_refusal_names_status_and_fail_info() -> None:
    sha1 = {"hash_algorithm": {"algorithm": "sha1"}, "hashed_message": b"1" * 20}
    response = authority().respond(request(message_imprint=sha1))
    refused(
        lambda: token_from_response(response, digest=DIGEST, nonce=NONCE),
        "refused",
        "status rejection",
        "failInfo bad_alg",
        "unsupported hash algorithm sha1",
    )


def test_wrong_nonce() -> None:
    response = authority().respond(build_request(DIGEST, NONCE))
    refused(lambda: token_from_response(response, digest=DIGEST, nonce=NONCE + 1), "nonce")


def test_response_for_other_data() -> None:
    response = authority().respond(build_request(DIGEST, NONCE))
    other = hashlib.sha256(b"other").digest()
    refused(lambda: token_from_response(response, digest=other, nonce=NONCE), "imprint")


def test_granted_without_token() -> None:
    response = bytes(TimeStampResp({"status": {"status": "granted"}}).dump())
    refused(lambda: token_from_response(response, digest=DIGEST, nonce=NONCE), "no token")


@pytest.mark.parametrize("garbage", [b"", b"\x30\x03\x02\x01\x00", b"\xff" * 40])
def test_garbage_response(garbage: bytes) -> None:
    refused(lambda: token_from_response(garbage, digest=DIGEST, nonce=NONCE), "not a valid DER")


# ---- verify_token: the attacker's side -----------------------------------------------------


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_wrong_digest() -> None:
    other = hashlib.sha256(b"another record").digest()
    refused(
        lambda: verify_token(stamp(), digest=other, cas=[ca()]),
        "the imprint does not match the stamped data",
    )


def test_tampered_signature() -> None:
    token = stamp()
    signature = cms.ContentInfo.load(token)["content"]["signer_infos"][0]["signature"].native
    at = token.index(signature) + 12  # inside r of the DER ECDSA signature
    refused(
        lambda: verify_token(flip(token, at), digest=DIGEST, cas=[ca()]),
        "signature does not verify",
    )


def test_tampered_content() -> None:
    """A changed serial number in the TSTInfo no longer matches the message-digest attribute."""
    token = stamp()
    serial = verify_token(token, digest=DIGEST, cas=[ca()]).serial
    # The serial is random: its DER form drops leading zero bytes, so look for that form.
    encoded = asn1_core.Integer(serial).dump()
    at = token.index(encoded) + len(encoded) // 2
    refused(lambda: verify_token(flip(token, at), digest=DIGEST, cas=[ca()]), "message-digest")


def test_tampered_signed_attribute() -> None:
    """A changed signing time, which no other rule reads: the signature covers the signed
    attributes exactly as received."""
    token = stamp()
    signer = cms.ContentInfo.load(token)["content"]["signer_infos"][0]
    signing_time = next(a for a in signer["signed_attrs"] if a["type"].native == "signing_time")
    encoded = signing_time["values"][0].chosen.contents  # e.g. b"261201163000Z"
    # the last occurrence: the TSTInfo's genTime, earlier in the token, may hold the same digits
    at = token.rindex(encoded) + len(encoded) - 2  # a digit of the seconds
    tampered = token[:at] + bytes([ord("0") + (token[at] - ord("0") + 1) % 10]) + token[at + 1 :]
    refused(lambda: verify_token(tampered, digest=DIGEST, cas=[ca()]), "signature does not verify")


def test_signed_by_a_certificate_without_time_stamping_usage() -> None:
    sign = pki()["sign"]
    token = stamp(authority(sign.key, sign.certificate))
    refused(
        lambda: verify_token(token, digest=DIGEST, cas=[ca()]),
        "lacks the timeStamping extended key usage",
    )


def test_time_stamping_usage_not_critical() -> None:
    token = stamp(authority(*pki()["loose"]))
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "not critical")


def test_time_stamping_usage_with_other_purposes() -> None:
    token = stamp(authority(*pki()["wide"]))
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "not timeStamping alone")


def test_tsa_from_an_untrusted_ca() -> None:
    """Same CA name, other key: the signature on the TSA certificate decides."""
    rogue = pki()["rogue"]
    token = stamp(authority(rogue.key, rogue.certificate))
    refused(
        lambda: verify_token(token, digest=DIGEST, cas=[ca()]),
        "TSA certificate is not issued by a trusted CA",
    )


def test_tsa_certificate_expired_at_gen_time() -> None:
    expired = pki()["expired"]
    token = stamp(authority(expired.key, expired.certificate))
    refused(
        lambda: verify_token(token, digest=DIGEST, cas=[ca()]),
        "TSA certificate is not valid at the time of the stamp",
    )


def test_tsa_certificate_not_yet_valid_at_gen_time() -> None:
    token = stamp(authority(clock=lambda: NOW - timedelta(days=2)))  # valid from NOW - 5 min
    refused(
        lambda: verify_token(token, digest=DIGEST, cas=[ca()]),
        "TSA certificate is not valid at the time of the stamp",
    )


def test_ca_expired_at_gen_time() -> None:
    old_ca = issue(
        common_name="old CA", issuer=None, now=NOW - timedelta(days=400), days=30, kind="ca"
    )
    tsa = issue(common_name="UY TSA", issuer=old_ca, now=NOW, days=365, kind="tsa")
    token = stamp(authority(tsa.key, tsa.certificate))
    refused(
        lambda: verify_token(token, digest=DIGEST, cas=[old_ca.certificate]),
        "TSA's CA certificate is not valid at the time of the stamp",
    )


def resign(token: bytes, edit: Callable[[list[Any]], list[Any]]) -> bytes:
    """The token with its signed attributes edited and signed again by the good TSA's key."""
    content_info = cms.ContentInfo.load(token)
    signer = content_info["content"]["signer_infos"][0]
    attributes = cms.CMSAttributes(edit(list(signer["signed_attrs"])))
    signer["signed_attrs"] = attributes
    signer["signature"] = pki()["tsa"].key.sign(attributes.dump(), ec.ECDSA(hashes.SHA256()))
    return bytes(content_info.dump(force=True))


def without(name: str) -> Callable[[list[Any]], list[Any]]:
    return lambda attributes: [a for a in attributes if a["type"].native != name]


def test_resigned_token_still_verifies() -> None:
    """The control for the tests below: re-signing by itself changes nothing."""
    verify_token(resign(stamp(), list), digest=DIGEST, cas=[ca()])


def test_no_ess_signing_certificate() -> None:
    token = resign(stamp(), without("signing_certificate_v2"))
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "no ESS signing-certificate")


def test_ess_signing_certificate_names_another_certificate() -> None:
    def other_hash(attributes: list[Any]) -> list[Any]:
        other = hashlib.sha256(pki()["sign"].certificate.public_bytes(serialization.Encoding.DER))
        value = {"certs": [{"cert_hash": other.digest()}]}
        return [
            *without("signing_certificate_v2")(attributes),
            {"type": "signing_certificate_v2", "values": [value]},
        ]

    token = resign(stamp(), other_hash)
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "does not name the signer")


def test_content_type_attribute_is_not_tst_info() -> None:
    def data(attributes: list[Any]) -> list[Any]:
        return [*without("content_type")(attributes), {"type": "content_type", "values": ["data"]}]

    token = resign(stamp(), data)
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "content-type")


def test_missing_message_digest_attribute() -> None:
    token = resign(stamp(), without("message_digest"))
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "message_digest is missing")


@pytest.mark.parametrize("garbage", [b"", b"\x30\x00", b"\x04\x03abc", b"\x30" * 64])
def test_garbage_token(garbage: bytes) -> None:
    refused(lambda: verify_token(garbage, digest=DIGEST, cas=[ca()]), "not a valid DER")


def test_response_is_not_a_token() -> None:
    response = authority().respond(build_request(DIGEST, NONCE))
    refused(lambda: verify_token(response, digest=DIGEST, cas=[ca()]))


# ---- hypothesis ----------------------------------------------------------------------------

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=400))
def test_respond_never_raises_on_random_bytes(data: bytes) -> None:
    assert status_of(authority().respond(data))[0] in ("granted", "rejection")


@fuzz
@given(st.data())
def test_respond_never_raises_on_a_mutated_request(data: st.DataObject) -> None:
    good = build_request(DIGEST, NONCE)
    at = data.draw(st.integers(0, len(good) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = good[:at] + bytes([value]) + good[at + 1 :]
    assert status_of(authority().respond(mutated))[0] in ("granted", "rejection")


@fuzz
@given(st.binary(max_size=400))
def test_verify_token_only_raises_trust_error_on_random_bytes(data: bytes) -> None:
    refused(lambda: verify_token(data, digest=DIGEST, cas=[ca()]))


@cache
def good_token() -> bytes:
    return stamp(authority(chain=[ca()]))


@fuzz
@given(st.data())
@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_verify_token_on_a_mutated_token(data: st.DataObject) -> None:
    """A changed byte is either caught as TrustError or lies outside what is signed."""
    token = good_token()
    at = data.draw(st.integers(0, len(token) - 1))
    mask = data.draw(st.integers(1, 255))
    mutated = token[:at] + bytes([token[at] ^ mask]) + token[at + 1 :]
    outcome: TimestampInfo | TrustError
    try:
        outcome = verify_token(mutated, digest=DIGEST, cas=[ca()])
    except TrustError as e:
        outcome = e
    if isinstance(outcome, TrustError):
        assert outcome.code is Code.TIMESTAMP_INVALID
    else:
        assert (outcome.digest, outcome.gen_time) == (DIGEST, NOW)


# ---- OpenSSL as the judge ------------------------------------------------------------------


def openssl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        cwd=cwd,
    )


def write_pki(folder: Path, tsa_cert: x509.Certificate) -> None:
    (folder / "ca.pem").write_bytes(ca().public_bytes(serialization.Encoding.PEM))
    (folder / "tsa.pem").write_bytes(tsa_cert.public_bytes(serialization.Encoding.PEM))


AT_NOW = ("-attime", str(int(NOW.timestamp())))


def assert_verified(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert "Verification: OK" in result.stdout


@needs_openssl
@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_openssl_verifies_response_and_token(kind: str, tmp_path: Path) -> None:
    key, cert = (
        (pki()["tsa"].key, pki()["tsa"].certificate)
        if kind == "ecdsa"
        else (pki()["rsa_key"], pki()["rsa_cert"])
    )
    response = authority(key, cert).respond(build_request(DIGEST, NONCE))
    (tmp_path / "resp.der").write_bytes(response)
    (tmp_path / "token.der").write_bytes(token_from_response(response, digest=DIGEST, nonce=NONCE))
    write_pki(tmp_path, cert)
    trust = ("-CAfile", "ca.pem", "-untrusted", "tsa.pem", *AT_NOW)
    assert_verified(
        openssl("ts", "-verify", "-digest", DIGEST.hex(), "-in", "resp.der", *trust, cwd=tmp_path)
    )
    assert_verified(
        openssl(
            "ts",
            "-verify",
            "-digest",
            DIGEST.hex(),
            "-token_in",
            "-in",
            "token.der",
            *trust,
            cwd=tmp_path,
        )
    )
    other = hashlib.sha256(b"other").hexdigest()
    result = openssl("ts", "-verify", "-digest", other, "-in", "resp.der", *trust, cwd=tmp_path)
    assert result.returncode != 0
    assert "Verification: OK" not in result.stdout


@needs_openssl
def test_openssl_parses_the_reply(tmp_path: Path) -> None:
    (tmp_path / "resp.der").write_bytes(authority().respond(build_request(DIGEST, NONCE)))
    result = openssl("ts", "-reply", "-in", "resp.der", "-text", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Status: Granted." in result.stdout
    assert f"Policy OID: {DEFAULT_POLICY}" in result.stdout
    assert f"Nonce: 0x{NONCE:X}" in result.stdout
    assert "Time stamp: Jun  1 12:00:00 2025 GMT" in result.stdout
    assert "Accuracy: 0x01 seconds" in result.stdout


@needs_openssl
def test_openssl_parses_a_rejection(tmp_path: Path) -> None:
    (tmp_path / "resp.der").write_bytes(authority().respond(b"garbage"))
    result = openssl("ts", "-reply", "-in", "resp.der", "-text", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Status: Rejected." in result.stdout
    assert "Failure info: the data submitted has the wrong format" in result.stdout


@needs_openssl
def test_openssl_request_is_answered(tmp_path: Path) -> None:
    query = openssl(
        "ts", "-query", "-digest", DIGEST.hex(), "-sha256", "-cert", "-out", "req.tsq", cwd=tmp_path
    )
    assert query.returncode == 0, query.stderr
    request_der = (tmp_path / "req.tsq").read_bytes()
    (tmp_path / "resp.der").write_bytes(authority().respond(request_der))
    write_pki(tmp_path, pki()["tsa"].certificate)
    trust = ("-CAfile", "ca.pem", "-untrusted", "tsa.pem", *AT_NOW)
    assert_verified(
        openssl("ts", "-verify", "-digest", DIGEST.hex(), "-in", "resp.der", *trust, cwd=tmp_path)
    )
    # -queryfile also checks the nonce and that the certificate was included as asked
    assert_verified(
        openssl("ts", "-verify", "-queryfile", "req.tsq", "-in", "resp.der", *trust, cwd=tmp_path)
    )
    nonce = tsp.TimeStampReq.load(request_der)["nonce"].native
    token = token_from_response((tmp_path / "resp.der").read_bytes(), digest=DIGEST, nonce=nonce)
    assert verify_token(token, digest=DIGEST, cas=[ca()]).gen_time == NOW


TSA_CONFIG = """\
[ tsa ]
default_tsa = tsa_config
[ tsa_config ]
serial = serial
crypto_device = builtin
signer_cert = tsa.pem
certs = ca.pem
signer_key = tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
other_policies = 1.2.3.4.5
digests = sha256
accuracy = secs:1
ordering = no
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha1
"""


@needs_openssl
def test_token_issued_by_openssl_verifies(tmp_path: Path) -> None:
    """OpenSSL as the TSA (ESS signing-certificate v1, its own attribute order, the real clock)."""
    # OpenSSL stamps with the real clock: a PKI valid for a century from NOW covers it
    long_ca = issue(common_name="long CA", issuer=None, now=NOW, days=36500, kind="ca")
    long_tsa = issue(common_name="long TSA", issuer=long_ca, now=NOW, days=36500, kind="tsa")
    (tmp_path / "ca.pem").write_bytes(long_ca.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tsa.pem").write_bytes(
        long_tsa.certificate.public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "tsa.key").write_bytes(
        long_tsa.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "serial").write_text("01\n")
    (tmp_path / "tsa.cnf").write_text(TSA_CONFIG)
    (tmp_path / "req.tsq").write_bytes(build_request(DIGEST, NONCE))
    result = openssl(
        "ts",
        "-reply",
        "-config",
        "tsa.cnf",
        "-queryfile",
        "req.tsq",
        "-out",
        "resp.der",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    token = token_from_response((tmp_path / "resp.der").read_bytes(), digest=DIGEST, nonce=NONCE)
    attributes = cms.ContentInfo.load(token)["content"]["signer_infos"][0]["signed_attrs"]
    assert "signing_certificate" in {a["type"].native for a in attributes}  # ESS v1
    info = verify_token(token, digest=DIGEST, cas=[long_ca.certificate])
    assert info.policy == "1.2.3.4.1"
    assert info.tsa_certificate == long_tsa.certificate
    refused(lambda: verify_token(token, digest=DIGEST, cas=[ca()]), "not issued by a trusted CA")
