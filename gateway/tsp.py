"""RFC 3161 time-stamps: the request, the response, and offline verification of a token.

A time-stamp token proves that a SHA-256 value existed at the time a time-stamping
authority (TSA) states. `build_request` makes the TimeStampReq (RFC 3161 2.4.1) for a
digest and a nonce; `token_from_response` checks that a TimeStampResp (2.4.2) grants that
very request (status, nonce, imprint) and returns the token; `verify_token` verifies a
token on its own, offline, as an auditor would years later:

* the token is CMS SignedData (RFC 5652 5) whose eContent is a TSTInfo (RFC 3161 2.4.2)
  stamping exactly the digest, with a SHA-256 message imprint;
* it has exactly one SignerInfo, whose signed attributes hold the content type
  id-ct-TSTInfo, the message digest of the TSTInfo (RFC 5652 5.4, 11.1, 11.2) and an ESS
  signing-certificate attribute naming the signer's certificate (v1, RFC 2634 5.4, or v2,
  RFC 5035 and RFC 5816);
* the signature (ECDSA or RSA PKCS#1 v1.5, with SHA-256, -384 or -512) over the DER SET OF
  the signed attributes verifies with that certificate (RFC 5652 5.4, 5.6);
* the certificate is a TSA's (its only extended key usage is timeStamping, marked critical:
  RFC 3161 2.3), issued directly by one of the trusted CAs, and it and the CA are valid at
  the time of the stamp.

Every failure, malformed DER included, is a `TrustError(code=TIMESTAMP_INVALID)` whose
message says what is wrong. This module never opens a socket or reads the clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asn1crypto import cms, core, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import Code, TrustError

# What asn1crypto and cryptography raise, lazily, on malformed input.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
)
_SIGNATURE_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_CERTIFICATE_HASHES = ("sha1", "sha256", "sha384", "sha512")


class TimeStampResp(core.Sequence):  # type: ignore[misc]
    """RFC 3161 2.4.2 TimeStampResp: asn1crypto 1.5 makes the token mandatory, it is OPTIONAL."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


@dataclass(frozen=True)
class TimestampInfo:
    """What a verified token states."""

    gen_time: datetime
    serial: int
    tsa_certificate: x509.Certificate
    policy: str
    digest: bytes


def _invalid(what: str) -> TrustError:
    return TrustError(f"time-stamp token: {what}", code=Code.TIMESTAMP_INVALID)


def build_request(digest: bytes, nonce: int) -> bytes:
    """The DER TimeStampReq for a SHA-256 `digest` (32 bytes), asking for the TSA certificate."""
    if len(digest) != 32:
        raise ValueError("the digest to stamp must be a SHA-256 value (32 bytes)")
    request = tsp.TimeStampReq(
        {
            "version": "v1",
            "message_imprint": {
                "hash_algorithm": {"algorithm": "sha256"},
                "hashed_message": digest,
            },
            "nonce": nonce,
            "cert_req": True,
        }
    )
    return bytes(request.dump())


def token_from_response(response_der: bytes, *, digest: bytes, nonce: int) -> bytes:
    """The DER TimeStampToken of a response that grants the request for `digest` and `nonce`.

    The token itself is not verified here: see `verify_token`.
    """
    try:
        response = TimeStampResp.load(response_der, strict=True)
        status = response["status"]
        granted = status["status"].native
        if granted not in ("granted", "granted_with_mods"):
            fail_info = status["fail_info"].native or ()
            text = "; ".join(status["status_string"].native or ())
            raise TrustError(
                f"time-stamp response: the TSA refused the request (status {granted}, "
                f"failInfo {', '.join(sorted(fail_info)) or 'none'}"
                f"{': ' + text if text else ''})",
                code=Code.TIMESTAMP_INVALID,
            )
        token = response["time_stamp_token"]
        if isinstance(token, core.Void):
            raise _invalid("the response grants the request but carries no token")
        info = _tst_info(_signed_data(token))[1]
        _check_imprint(info, digest)
        if info["nonce"].native != nonce:
            raise _invalid(
                "the nonce does not match the request (a replayed or misdirected answer)"
            )
        return bytes(token.dump())
    except _MALFORMED as e:
        raise TrustError(
            "time-stamp response: not a valid DER TimeStampResp", code=Code.TIMESTAMP_INVALID
        ) from e


def verify_token(
    token_der: bytes,
    *,
    digest: bytes,
    cas: Sequence[x509.Certificate],
    extra_certificates: Sequence[x509.Certificate] = (),
) -> TimestampInfo:
    """Verify a DER TimeStampToken over `digest` offline; raise `TrustError` unless it holds.

    The TSA certificate is looked up in the token and in `extra_certificates` (for tokens
    requested without certReq); it must be issued directly by one of `cas`.
    """
    try:
        return _verify(token_der, digest, cas, extra_certificates)
    except _MALFORMED as e:
        raise _invalid("not a valid DER CMS SignedData time-stamp token") from e


def _verify(
    token_der: bytes,
    digest: bytes,
    cas: Sequence[x509.Certificate],
    extra_certificates: Sequence[x509.Certificate],
) -> TimestampInfo:
    signed = _signed_data(cms.ContentInfo.load(token_der, strict=True))
    econtent, info = _tst_info(signed)
    _check_imprint(info, digest)
    gen_time = info["gen_time"].native
    if not isinstance(gen_time, datetime) or gen_time.tzinfo is None:
        raise _invalid("the genTime is not a UTC time")
    gen_time = gen_time.astimezone(UTC)

    signer_infos = signed["signer_infos"]
    if len(signer_infos) != 1:
        raise _invalid(f"it has {len(signer_infos)} signer infos, expected exactly one")
    signer = signer_infos[0]
    digest_name = signer["digest_algorithm"]["algorithm"].native
    if digest_name not in _SIGNATURE_HASHES:
        raise _invalid(f"the digest algorithm {digest_name} is not supported")
    attributes = signer["signed_attrs"]
    if isinstance(attributes, core.Void) or len(attributes) == 0:
        raise _invalid("it has no signed attributes")
    # the signed attributes' DER as received, taken before any of their values is read
    # (asn1crypto re-encodes a value once its children were parsed, at a cost of
    # milliseconds)
    signed_der = attributes.dump()
    if _attribute(attributes, "content_type").native != "tst_info":
        raise _invalid("the content-type attribute is not id-ct-TSTInfo")
    if (
        _attribute(attributes, "message_digest").native
        != hashlib.new(digest_name, econtent).digest()
    ):
        raise _invalid("the message-digest attribute does not match the TSTInfo (altered content)")

    certificate = _signer_certificate(signed, signer["sid"], extra_certificates)
    _check_signing_certificate(attributes, certificate)
    _check_signature(signer, signed_der, certificate, _SIGNATURE_HASHES[digest_name])
    _check_tsa_certificate(certificate, cas, gen_time)
    return TimestampInfo(
        gen_time=gen_time,
        serial=info["serial_number"].native,
        tsa_certificate=certificate,
        policy=info["policy"].dotted,
        digest=digest,
    )


def _signed_data(token: Any) -> Any:
    if token["content_type"].native != "signed_data":
        raise _invalid("it is not CMS SignedData")
    signed = token["content"]
    if signed["encap_content_info"]["content_type"].native != "tst_info":
        raise _invalid("the signed content is not a TSTInfo")
    return signed


def _tst_info(signed: Any) -> tuple[bytes, Any]:
    """The eContent octets and the TSTInfo parsed from exactly those octets."""
    content = signed["encap_content_info"]["content"]
    if isinstance(content, core.Void):
        raise _invalid("the TSTInfo is missing")
    econtent = bytes(content)
    info = tsp.TSTInfo.load(econtent, strict=True)
    if info["version"].native != "v1":
        raise _invalid("the TSTInfo version is not 1")
    return econtent, info


def _check_imprint(info: Any, digest: bytes) -> None:
    imprint = info["message_imprint"]
    if imprint["hash_algorithm"]["algorithm"].native != "sha256":
        raise _invalid("the message imprint is not a SHA-256 hash")
    if imprint["hashed_message"].native != digest:
        raise _invalid("the imprint does not match the stamped data")


def _attribute(attributes: Any, name: str) -> Any:
    """The single value of the signed attribute `name`."""
    found = [a["values"] for a in attributes if a["type"].native == name]
    if len(found) != 1 or len(found[0]) != 1:
        raise _invalid(f"the signed attribute {name} is missing or not single-valued")
    return found[0][0]


def _signer_certificate(
    signed: Any, sid: Any, extra_certificates: Sequence[x509.Certificate]
) -> x509.Certificate:
    embedded = signed["certificates"]
    candidates = [
        x509.load_der_x509_certificate(choice.chosen.dump())
        for choice in ([] if isinstance(embedded, core.Void) else embedded)
        if choice.name == "certificate"
    ]
    for certificate in [*candidates, *extra_certificates]:
        parsed = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))
        if sid.name == "issuer_and_serial_number":
            issuer = sid.chosen["issuer"]
            found = parsed.serial_number == sid.chosen["serial_number"].native and (
                # the same DER is the same name; asn1crypto's comparison (RFC 5280 string
                # preparation, about 2 ms) only for differently encoded ones
                parsed.issuer.dump() == issuer.dump() or parsed.issuer == issuer
            )
        else:
            found = parsed.key_identifier == sid.chosen.native
        if found:
            return certificate
    raise _invalid("the signer's certificate is neither in the token nor among those given")


def _check_signing_certificate(attributes: Any, certificate: x509.Certificate) -> None:
    """The ESS signing-certificate attribute (v2 or v1) must name the signer's certificate."""
    names = {a["type"].native for a in attributes}
    if "signing_certificate_v2" in names:
        cert_id = _attribute(attributes, "signing_certificate_v2")["certs"][0]
        hash_name = cert_id["hash_algorithm"]["algorithm"].native
    elif "signing_certificate" in names:
        cert_id = _attribute(attributes, "signing_certificate")["certs"][0]
        hash_name = "sha1"
    else:
        raise _invalid("it has no ESS signing-certificate attribute")
    if hash_name not in _CERTIFICATE_HASHES:
        raise _invalid(f"the ESS certificate hash algorithm {hash_name} is not supported")
    der = certificate.public_bytes(Encoding.DER)
    issuer_serial = cert_id["issuer_serial"]
    if cert_id["cert_hash"].native != hashlib.new(hash_name, der).digest() or (
        not isinstance(issuer_serial, core.Void)
        and issuer_serial["serial_number"].native != certificate.serial_number
    ):
        raise _invalid(
            "the ESS signing-certificate attribute does not name the signer's certificate"
        )


def _check_signature(
    signer: Any,
    tagged: bytes,
    certificate: x509.Certificate,
    hash_algorithm: hashes.HashAlgorithm,
) -> None:
    algorithm = signer["signature_algorithm"]
    kind = algorithm.signature_algo
    try:
        embedded_hash = algorithm.hash_algo
    except ValueError:  # rsaEncryption, bare ecdsa: the digest algorithm says which hash
        embedded_hash = hash_algorithm.name
    if embedded_hash != hash_algorithm.name:
        raise _invalid("the signature algorithm's hash is not the digest algorithm")
    # RFC 5652 5.4: the signature covers the DER of the SET OF attributes, not the [0] tag
    if tagged[:1] != b"\xa0":
        raise _invalid("the signed attributes are not tagged [0]")
    data = b"\x31" + tagged[1:]
    signature = signer["signature"].native
    key = certificate.public_key()
    try:
        if kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif kind == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
        else:
            raise _invalid(f"the signature algorithm {kind} is not supported for the TSA's key")
    except InvalidSignature:
        raise _invalid("the signature does not verify with the TSA certificate") from None


def _check_tsa_certificate(
    certificate: x509.Certificate, cas: Sequence[x509.Certificate], gen_time: datetime
) -> None:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        raise _invalid("the TSA certificate lacks the timeStamping extended key usage") from None
    if list(usage.value) != [ExtendedKeyUsageOID.TIME_STAMPING]:
        raise _invalid("the TSA certificate's extended key usage is not timeStamping alone")
    if not usage.critical:
        raise _invalid("the TSA certificate's timeStamping extended key usage is not critical")
    issuer = next((ca for ca in cas if _issued_by(certificate, ca)), None)
    if issuer is None:
        raise _invalid("the TSA certificate is not issued by a trusted CA")
    for c, role in ((certificate, "TSA certificate"), (issuer, "TSA's CA certificate")):
        if not c.not_valid_before_utc <= gen_time <= c.not_valid_after_utc:
            raise _invalid(
                f"the {role} is not valid at the time of the stamp {gen_time.isoformat()}"
            )


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    if ca.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
