"""A development time-stamping authority (RFC 3161), and its HTTP endpoint.

`TimeStampAuthority.respond` answers a DER TimeStampReq (RFC 3161 2.4.1) with a DER
TimeStampResp (2.4.2). A granted response carries a token: CMS SignedData version 3
(RFC 5652 5) over a TSTInfo (the imprint copied from the request, a unique serial number,
genTime from the injected clock to the second with an accuracy of one second, the nonce
copied), with the signed attributes content-type, signing-time, message-digest and ESS
signing-certificate-v2 (RFC 5035; RFC 5816), signed ECDSA or RSA PKCS#1 v1.5 with SHA-256.
The TSA certificate and its chain are included only when the request sets certReq. A
request that cannot be granted is answered with status rejection and a failInfo
(badDataFormat, badAlg, unacceptedPolicy, unacceptedExtension): bad input never raises.

`tsa_app` serves it over HTTP as RFC 3161 3.4 describes: a POST of
`application/timestamp-query` answered with `application/timestamp-reply`.

For development and tests: the key lives in memory and the time is the host's clock.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from asn1crypto import cms, tsp  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import CollectorRegistry, Counter

from gateway.tsp import TimeStampResp

log = structlog.get_logger("certs.tsa")

DEFAULT_POLICY = "1.3.6.1.4.1.57264.1.1"
_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class _Rejected(Exception):
    def __init__(self, fail_info: str, text: str) -> None:
        super().__init__(text)
        self.fail_info = fail_info
        self.text = text


class TimeStampAuthority:
    """Answers time-stamp requests with tokens signed by `key` for `certificate`."""

    def __init__(
        self,
        *,
        key: SigningKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        clock: Callable[[], datetime],
        policy: str = DEFAULT_POLICY,
    ) -> None:
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
            raise ValueError("the TSA key does not belong to the TSA certificate")
        der = certificate.public_bytes(Encoding.DER)
        self._key = key
        self._certificate = asn1_x509.Certificate.load(der)
        self._certificate_sha256 = hashlib.sha256(der).digest()
        self._chain = [asn1_x509.Certificate.load(c.public_bytes(Encoding.DER)) for c in chain]
        self._clock = clock
        self._policy = policy
        # serial numbers: a random 62-bit prefix per instance, then a counter (RFC 3161 2.4.2)
        self._serial_prefix = secrets.randbits(62) << 64
        self._counter = itertools.count(1)

    def respond(self, request_der: bytes) -> bytes:
        """The DER TimeStampResp answering a DER TimeStampReq."""
        return self._answer(request_der)[0]

    def _answer(self, request_der: bytes) -> tuple[bytes, str, int | None]:
        """The response, the outcome (for the log) and the serial number of the token."""
        try:
            imprint, nonce, cert_req = self._check(request_der)
        except _Rejected as rejected:
            status = {
                "status": "rejection",
                "status_string": [rejected.text],
                "fail_info": {rejected.fail_info},
            }
            return bytes(TimeStampResp({"status": status}).dump()), rejected.fail_info, None
        serial = self._serial_prefix | next(self._counter)
        token = self._token(imprint, nonce, cert_req, serial)
        response = TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": token})
        return bytes(response.dump()), "granted", serial

    def _check(self, request_der: bytes) -> tuple[Any, int | None, bool]:
        """The imprint, nonce and certReq of an acceptable request, or `_Rejected`."""
        try:
            request = tsp.TimeStampReq.load(request_der, strict=True)
            _ = request.native  # asn1crypto parses lazily: parse every field now
            imprint = request["message_imprint"]
            algorithm = imprint["hash_algorithm"]["algorithm"].native
            size = len(imprint["hashed_message"].native)
            version = request["version"].native
            policy = request["req_policy"].dotted if request["req_policy"].native else None
            nonce = request["nonce"].native
            cert_req = bool(request["cert_req"].native)
            extensions = request["extensions"].native
        except _MALFORMED:
            raise _Rejected("bad_data_format", "the request is not a DER TimeStampReq") from None
        if version != "v1":
            raise _Rejected("bad_data_format", "the request version is not 1")
        if algorithm not in _DIGEST_SIZES:
            raise _Rejected("bad_alg", f"unsupported hash algorithm {algorithm}")
        if size != _DIGEST_SIZES[algorithm]:
            raise _Rejected("bad_data_format", f"the imprint is not a {algorithm} value")
        if policy is not None and policy != self._policy:
            raise _Rejected(
                "unaccepted_policy", f"this TSA only stamps under policy {self._policy}"
            )
        if extensions:
            raise _Rejected("unaccepted_extensions", "this TSA accepts no request extensions")
        return imprint, nonce, cert_req

    def _token(self, imprint: Any, nonce: int | None, cert_req: bool, serial: int) -> Any:
        now = self._clock().astimezone(UTC).replace(microsecond=0)
        fields: dict[str, Any] = {
            "version": "v1",
            "policy": self._policy,
            "message_imprint": imprint,
            "serial_number": serial,
            "gen_time": now,
            "accuracy": {"seconds": 1},
        }
        if nonce is not None:
            fields["nonce"] = nonce
        info = tsp.TSTInfo(fields)
        issuer_serial = {
            "issuer": [asn1_x509.GeneralName({"directory_name": self._certificate.issuer})],
            "serial_number": self._certificate.serial_number,
        }
        signing_time = cms.Time({"utc_time" if now.year < 2050 else "generalized_time": now})
        attributes = cms.CMSAttributes(
            [
                {"type": "content_type", "values": ["tst_info"]},
                {"type": "signing_time", "values": [signing_time]},
                {"type": "message_digest", "values": [hashlib.sha256(info.dump()).digest()]},
                {
                    "type": "signing_certificate_v2",
                    "values": [
                        {
                            "certs": [
                                {
                                    "cert_hash": self._certificate_sha256,
                                    "issuer_serial": issuer_serial,
                                }
                            ]
                        }
                    ],
                },
            ]
        )
        data = attributes.dump()  # the DER SET OF (tag 0x31) that RFC 5652 5.4 signs
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            signature = self._key.sign(data, ec.ECDSA(hashes.SHA256()))
            algorithm = "sha256_ecdsa"
        else:
            signature = self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            algorithm = "sha256_rsa"
        signer = {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": {
                        "issuer": self._certificate.issuer,
                        "serial_number": self._certificate.serial_number,
                    }
                }
            ),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": attributes,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": signature,
        }
        signed: dict[str, Any] = {
            "version": "v3",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "tst_info", "content": info},
            "signer_infos": [signer],
        }
        if cert_req:
            signed["certificates"] = [self._certificate, *self._chain]
        return cms.ContentInfo({"content_type": "signed_data", "content": cms.SignedData(signed)})


def tsa_app(
    authority: TimeStampAuthority,
    *,
    max_request_bytes: int = 64 * 1024,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The HTTP endpoint: POST / with a TimeStampReq; GET /healthz. Answers are counted in
    `gateway_tsa_requests_total{answer}` (granted, or the failure info of a rejection) when
    a metrics registry is given."""
    answers = (
        Counter(
            "gateway_tsa_requests_total",
            "Time-stamp requests answered: granted, or the failure info of a rejection",
            ["answer"],
            registry=registry,
        )
        if registry is not None
        else None
    )

    async def stamp(request: web.Request) -> web.Response:
        if request.content_type != "application/timestamp-query":
            log.warning("timestamp request refused", reason="content type", peer=request.remote)
            raise web.HTTPUnsupportedMediaType(text="expected application/timestamp-query\n")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            log.warning("timestamp request refused", reason="too large", peer=request.remote)
            raise
        response, outcome, serial = authority._answer(body)
        if answers is not None:
            answers.labels(outcome).inc()
        log.info(
            "timestamp request",
            outcome=outcome,
            serial=None if serial is None else f"{serial:#x}",
            peer=request.remote,
        )
        return web.Response(body=response, content_type="application/timestamp-reply")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_post("/", stamp)
    app.router.add_get("/healthz", healthz)
    return app
