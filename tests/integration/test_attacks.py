"""Attacks on a provider security server, over real processes and real mutual TLS.

One topology (registry, ss-msp, ss-dnic, sample backends) runs for the whole module,
with a message limit of 64 KiB. The tests act as an attacker who speaks the exchange
protocol directly to ss-dnic's provider endpoint (`attacker.py`), mostly with ss-msp's
own legitimate keys, and check both the answer and ss-dnic's message log.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.pki import Issued, issue, load_issued
from gateway.envelope import decode_response, sha256_hex
from gateway.signing import EcdsaSigner, load_certificate, load_private_key, verify_signature
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner
from tests.integration.attacker import (
    AttackStream,
    StreamError,
    build_request,
    fetch_ocsp,
    open_stream,
    request_frame,
    request_header,
)

from .clinics import person_query, signed_request
from .conftest import query_log

MSP_SERVER = "UY/GOV/MSP/ss1"
DNIC_SERVER = "UY/GOV/DNIC/ss1"
CLIENT = "UY/GOV/MSP/clinics"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
METHOD = "/demo.population.v1.PopulationRegistry/GetPerson"
PURPOSE = "healthcare-identification"
LIMIT = 65536
TOO_LARGE = 70000


@dataclass(frozen=True, slots=True)
class Topology:
    runner: Runner
    ca_pem: bytes
    ca: x509.Certificate
    msp_auth_cert: bytes
    msp_auth_key: bytes
    msp_signer: EcdsaSigner
    dnic_signer: EcdsaSigner

    @property
    def provider(self) -> str:
        return self.runner.providers[DNIC_SERVER]

    def stream(
        self,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        staple: bytes | None = None,
    ) -> AttackStream:
        """A stream to ss-dnic's provider endpoint, by default with ss-msp's TLS keys and the
        current OCSP answer about the certificate presented."""
        cert_pem = cert_pem if cert_pem is not None else self.msp_auth_cert
        return open_stream(
            self.provider,
            DNIC_SERVER,
            self.ca_pem,
            cert_pem,
            key_pem if key_pem is not None else self.msp_auth_key,
            staple=self.status(cert_pem) if staple is None else staple,
        )

    def status(self, cert_pem: bytes) -> bytes:
        """The development responder's current answer about a certificate of its CA."""
        return fetch_ocsp(self.runner.ocsp_url, cert_pem, self.ca_pem)

    def log_rows(self, server_id: str, sql: str, *args: object) -> list[sqlite3.Row]:
        return query_log(self.runner.log_db(server_id), sql, *args)

    def records(self, server_id: str, message_id: str) -> list[sqlite3.Row]:
        return self.log_rows(
            server_id,
            "SELECT * FROM message_log WHERE message_id = ? ORDER BY seq",
            message_id,
        )


def _signer(folder: Path, stem: str) -> EcdsaSigner:
    return EcdsaSigner(
        load_private_key((folder / f"{stem}.key").read_bytes()),
        load_certificate((folder / f"{stem}.crt").read_bytes()),
    )


def _pem_pair(issued: Issued) -> tuple[bytes, bytes]:
    cert = issued.certificate.public_bytes(serialization.Encoding.PEM)
    key = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    runner = Runner(tmp_path_factory.mktemp("attacks"), limits={"max_message_bytes": LIMIT})
    try:
        runner.prepare()
        runner.start_all()
        pki = runner.pki
        yield Topology(
            runner=runner,
            ca_pem=(pki / "ca.crt").read_bytes(),
            ca=load_certificate((pki / "ca.crt").read_bytes()),
            msp_auth_cert=(pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes(),
            msp_auth_key=(pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
            msp_signer=_signer(pki / "sign", "UY_GOV_MSP"),
            dnic_signer=_signer(pki / "sign", "UY_GOV_DNIC"),
        )
    finally:
        runner.close()


def new_id() -> str:
    return uuid.uuid4().hex


def valid_request(
    topo: Topology,
    message_id: str,
    *,
    signer: EcdsaSigner | None = None,
    client: str = CLIENT,
    purpose: str = PURPOSE,
    body: bytes | None = None,
    created_at: datetime | None = None,
    signer_ocsp: bytes | None = None,
) -> pb.SignedEnvelope:
    signer = signer or topo.msp_signer
    if signer_ocsp is None:
        pem = signer.certificate.public_bytes(serialization.Encoding.PEM)
        signer_ocsp = topo.status(pem) if signer.certificate.issuer == topo.ca.subject else b""
    return signed_request(
        signer,
        signer_ocsp=signer_ocsp,
        message_id=message_id,
        client=client,
        purpose=purpose,
        body=body,
        created_at=created_at,
    )


async def send_one(topo: Topology, envelope: pb.SignedEnvelope) -> pb.Frame | StreamError:
    async with topo.stream() as stream:
        return await stream.send(request_frame(envelope))


def assert_refused(answer: pb.Frame | StreamError, code: str, message_id: str | None) -> None:
    assert isinstance(answer, pb.Frame), f"the stream failed instead of refusing: {answer}"
    assert answer.WhichOneof("kind") == "refusal", f"expected a refusal, got {answer}"
    assert answer.correlation_id == 1
    assert answer.refusal.code == code, answer.refusal
    if message_id is not None:
        assert answer.refusal.message_id == message_id


def assert_logged_refusal(topo: Topology, message_id: str, code: str) -> None:
    rows = topo.records(DNIC_SERVER, message_id)
    assert [(r["kind"], r["role"], r["status"], r["error_code"]) for r in rows] == [
        ("refusal", "provider", "refused", code)
    ], [dict(r) for r in rows]


def assert_person_response(topo: Topology, answer: pb.Frame | StreamError, message_id: str) -> None:
    """A response frame signed by DNIC for `message_id` whose body is Ana's record."""
    assert isinstance(answer, pb.Frame), f"the stream failed: {answer}"
    assert answer.WhichOneof("kind") == "response", f"expected a response, got {answer}"
    env = answer.response
    assert env.signer_certificate == topo.dnic_signer.certificate_der
    verify_signature(topo.dnic_signer.certificate, env.header, env.signature)
    header = decode_response(env.header)
    assert header.message_id == message_id
    assert header.grpc_status == 0
    assert header.body_sha256 == sha256_hex(env.body)
    person = population_pb2.Person.FromString(env.body)
    assert (person.given_name, person.family_name) == ("Ana", "Pereira")


async def test_baseline_legitimate_keys_get_signed_response(topology: Topology) -> None:
    """With ss-msp's legitimate keys the provider answers with a signed response."""
    message_id = new_id()
    envelope = valid_request(topology, message_id)
    answer = await send_one(topology, envelope)
    assert_person_response(topology, answer, message_id)
    assert isinstance(answer, pb.Frame)
    assert decode_response(answer.response.header).request_sha256 == sha256_hex(envelope.header)
    kinds = [(r["kind"], r["role"]) for r in topology.records(DNIC_SERVER, message_id)]
    assert kinds == [("request", "provider"), ("response", "provider")]


async def test_unregistered_tls_certificate_from_trusted_ca_is_refused(topology: Topology) -> None:
    """A TLS certificate from the trusted CA that is not registered: peer_not_registered."""
    rogue = issue(
        kind="auth",
        issuer=load_issued(topology.runner.pki, "ca"),
        common_name=MSP_SERVER,
        now=datetime.now(UTC),
        days=1,
        hosts=("127.0.0.1", "localhost"),
    )
    cert_pem, key_pem = _pem_pair(rogue)
    async with topology.stream(cert_pem, key_pem) as stream:
        answer = await stream.send(request_frame(valid_request(topology, new_id())))
    assert isinstance(answer, StreamError), f"an unregistered peer got an answer: {answer}"
    assert answer.code == grpc.StatusCode.UNAUTHENTICATED
    assert answer.error == "peer_not_registered"
    fingerprint = sha256_hex(rogue.certificate.public_bytes(serialization.Encoding.DER))
    rows = topology.log_rows(
        DNIC_SERVER,
        "SELECT kind, role, error_code FROM message_log WHERE peer = ?",
        f"certificate:{fingerprint}",
    )
    assert [tuple(r) for r in rows] == [("refusal", "provider", "peer_not_registered")]


async def test_certificate_from_untrusted_ca_fails_the_handshake(topology: Topology) -> None:
    """A client certificate from a self-made CA is refused at the TLS handshake."""
    now = datetime.now(UTC)
    fake_ca = issue(kind="ca", issuer=None, common_name="UY development CA", now=now, days=1)
    fake = issue(kind="auth", issuer=fake_ca, common_name=MSP_SERVER, now=now, days=1)
    cert_pem, key_pem = _pem_pair(fake)
    message_id = new_id()
    async with topology.stream(cert_pem, key_pem) as stream:
        answer = await stream.send(request_frame(valid_request(topology, message_id)))
    assert isinstance(answer, StreamError), f"an untrusted peer got an answer: {answer}"
    assert answer.code == grpc.StatusCode.UNAVAILABLE
    assert answer.error is None
    assert topology.records(DNIC_SERVER, message_id) == []


async def test_body_altered_after_signing(topology: Topology) -> None:
    """A body changed after signing is refused with body_digest_mismatch and logged."""
    message_id = new_id()
    envelope = valid_request(topology, message_id)
    envelope.body = person_query("4.321.765-2")
    answer = await send_one(topology, envelope)
    assert_refused(answer, "body_digest_mismatch", message_id)
    assert_logged_refusal(topology, message_id, "body_digest_mismatch")


async def test_signature_altered(topology: Topology) -> None:
    """A signature with one flipped byte is refused with bad_signature and logged."""
    message_id = new_id()
    envelope = valid_request(topology, message_id)
    signature = bytearray(envelope.signature)
    signature[len(signature) // 2] ^= 0x01
    envelope.signature = bytes(signature)
    answer = await send_one(topology, envelope)
    assert_refused(answer, "bad_signature", message_id)
    assert_logged_refusal(topology, message_id, "bad_signature")


async def test_header_altered_after_signing(topology: Topology) -> None:
    """A header re-encoded with another purpose after signing is refused with bad_signature."""
    message_id = new_id()
    created_at = datetime.now(UTC)
    envelope = valid_request(topology, message_id, created_at=created_at)
    envelope.header = request_header(
        message_id=message_id,
        client=CLIENT,
        service=SERVICE,
        method=METHOD,
        purpose="benchmark",
        sender=MSP_SERVER,
        body=envelope.body,
        created_at=created_at,
    ).encode()
    answer = await send_one(topology, envelope)
    assert_refused(answer, "bad_signature", message_id)
    assert_logged_refusal(topology, message_id, "bad_signature")


async def test_replayed_envelope_is_refused(topology: Topology) -> None:
    """The same valid envelope sent twice: answered once, then refused as replayed_message."""
    message_id = new_id()
    envelope = valid_request(topology, message_id)
    async with topology.stream() as stream:
        first = await stream.send(request_frame(envelope, correlation_id=1))
        second = await stream.send(request_frame(envelope, correlation_id=2))
    assert_person_response(topology, first, message_id)
    assert isinstance(second, pb.Frame)
    assert second.correlation_id == 2
    assert second.WhichOneof("kind") == "refusal", second
    assert second.refusal.code == "replayed_message"
    assert second.refusal.message_id == message_id
    rows = topology.records(DNIC_SERVER, message_id)
    assert [(r["kind"], r["error_code"]) for r in rows] == [
        ("request", None),
        ("response", None),
        ("refusal", "replayed_message"),
    ]


async def test_signed_by_another_members_key(topology: Topology) -> None:
    """A request of an MSP client signed with DNIC's signing key: untrusted_signer."""
    message_id = new_id()
    envelope = valid_request(topology, message_id, signer=topology.dnic_signer)
    answer = await send_one(topology, envelope)
    assert_refused(answer, "untrusted_signer", message_id)
    assert_logged_refusal(topology, message_id, "untrusted_signer")


async def test_peer_claims_client_of_another_member(topology: Topology) -> None:
    """ss-msp claiming a DNIC client is refused with peer_member_mismatch."""
    message_id = new_id()
    envelope = valid_request(topology, message_id, client="UY/GOV/DNIC/identity")
    answer = await send_one(topology, envelope)
    assert_refused(answer, "peer_member_mismatch", message_id)
    assert_logged_refusal(topology, message_id, "peer_member_mismatch")


@pytest.mark.parametrize(
    "offset", [timedelta(hours=-1), timedelta(hours=1)], ids=["past", "future"]
)
async def test_stale_message(topology: Topology, offset: timedelta) -> None:
    """A message created an hour ago (or an hour ahead) is refused with stale_message."""
    message_id = new_id()
    envelope = valid_request(topology, message_id, created_at=datetime.now(UTC) + offset)
    answer = await send_one(topology, envelope)
    assert_refused(answer, "stale_message", message_id)
    assert_logged_refusal(topology, message_id, "stale_message")


async def test_replayed_message_id_with_new_content_is_refused(topology: Topology) -> None:
    """A used message id re-signed over another body is still refused as replayed_message."""
    message_id = new_id()
    first = await send_one(topology, valid_request(topology, message_id))
    assert_person_response(topology, first, message_id)
    again = valid_request(topology, message_id, body=person_query("4.321.765-2"))
    answer = await send_one(topology, again)
    assert_refused(answer, "replayed_message", message_id)


async def test_peer_claims_another_sender(topology: Topology) -> None:
    """ss-msp claiming to be ss-dnic in the signed sender field: peer_member_mismatch."""
    message_id = new_id()
    envelope = build_request(
        topology.msp_signer,
        message_id=message_id,
        client=CLIENT,
        service=SERVICE,
        method=METHOD,
        purpose=PURPOSE,
        sender=DNIC_SERVER,
        body=person_query(),
        created_at=datetime.now(UTC),
    )
    answer = await send_one(topology, envelope)
    assert_refused(answer, "peer_member_mismatch", message_id)
    assert_logged_refusal(topology, message_id, "peer_member_mismatch")


async def test_signed_with_the_tls_key_instead_of_the_signing_key(topology: Topology) -> None:
    """A request signed with ss-msp's TLS key and certificate: untrusted_signer."""
    auth = EcdsaSigner(
        load_private_key(topology.msp_auth_key), load_certificate(topology.msp_auth_cert)
    )
    message_id = new_id()
    answer = await send_one(topology, valid_request(topology, message_id, signer=auth))
    assert_refused(answer, "untrusted_signer", message_id)
    assert_logged_refusal(topology, message_id, "untrusted_signer")


async def test_frame_that_is_not_a_request(topology: Topology) -> None:
    """A response frame sent to a provider is refused with malformed_envelope."""
    envelope = valid_request(topology, new_id())
    async with topology.stream() as stream:
        answer = await stream.send(pb.Frame(correlation_id=1, response=envelope))
    assert_refused(answer, "malformed_envelope", None)


async def test_body_over_the_limit_is_refused_without_calling_the_backend(
    topology: Topology,
) -> None:
    """A body over the provider's limit is refused with body_too_large, never forwarded."""
    message_id = new_id()
    body = random.Random(11).randbytes(TOO_LARGE)
    envelope = valid_request(topology, message_id, body=body)
    answer = await send_one(topology, envelope)
    assert_refused(answer, "body_too_large", None)
    assert "request" not in [r["kind"] for r in topology.records(DNIC_SERVER, message_id)]
    rows = topology.log_rows(
        DNIC_SERVER,
        "SELECT kind, role, error_code FROM message_log WHERE body_sha256 = ?",
        sha256_hex(body),
    )
    assert [tuple(r) for r in rows] == [("refusal", "provider", "body_too_large")]


async def test_malformed_header_bytes(topology: Topology) -> None:
    """Header bytes that are not JSON are refused with malformed_envelope."""
    envelope = valid_request(topology, new_id())
    envelope.header = b"{not json"
    answer = await send_one(topology, envelope)
    assert_refused(answer, "malformed_envelope", None)


async def test_garbage_frame_is_refused_and_the_server_keeps_serving(topology: Topology) -> None:
    """Random header and signature bytes with no signer certificate get a refusal, no crash."""
    rng = random.Random(13)
    garbage = pb.SignedEnvelope(
        header=rng.randbytes(300),
        body=rng.randbytes(50),
        signature=rng.randbytes(72),
        signer_certificate=b"",
    )
    async with topology.stream() as stream:
        answer = await stream.send(request_frame(garbage))
        assert isinstance(answer, pb.Frame), f"the stream failed: {answer}"
        assert answer.WhichOneof("kind") == "refusal", answer
        assert answer.refusal.code == "malformed_envelope"
        message_id = new_id()
        same_stream = await stream.send(
            request_frame(valid_request(topology, message_id), correlation_id=2)
        )
        assert_person_response(topology, same_stream, message_id)
    message_id = new_id()
    new_stream = await send_one(topology, valid_request(topology, message_id))
    assert_person_response(topology, new_stream, message_id)


async def test_consumer_refuses_body_over_the_limit_before_forwarding(
    topology: Topology,
) -> None:
    """ss-msp's consumer endpoint refuses a body over the limit and never forwards it."""
    message_id = new_id()
    metadata = routing_metadata(
        client=CLIENT, service=SERVICE, purpose=PURPOSE, message_id=message_id
    )
    async with grpc.aio.insecure_channel(topology.runner.consumers[MSP_SERVER]) as channel:
        outcome = await call_raw(channel, METHOD, b"\x00" * TOO_LARGE, metadata)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    assert outcome.error == "body_too_large"
    rows = topology.records(MSP_SERVER, message_id)
    assert [(r["kind"], r["role"], r["error_code"]) for r in rows] == [
        ("refusal", "consumer", "body_too_large")
    ]
    assert topology.records(DNIC_SERVER, message_id) == []
