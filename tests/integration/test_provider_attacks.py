"""Attacks by a provider on a consumer security server, over real mutual TLS.

One topology runs for the whole module: the registry, the OCSP responder, the TSA and a
real ss-msp. ss-dnic's process is never started: in its place, on its registered address
and with its registered TLS certificate and key, listens a malicious provider
(`malicious_provider.py`) holding DNIC's (and MSP's) signing keys. Each test sets what it
answers, calls GetPerson through ss-msp's consumer endpoint as an agency backend does,
and checks the code the caller gets and ss-msp's message log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from certs.ocsp_responder import OcspResponder
from certs.pki import load_issued
from gateway.envelope import ResponseHeader, decode_request, decode_response, sha256_hex
from gateway.errors import Code, bound_message
from gateway.identifiers import SecurityServerId, ServiceId
from gateway.ocsp import build_request as ocsp_request
from gateway.signing import EcdsaSigner, load_certificate
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import Outcome
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner
from security_server.status import grpc_status
from tests.integration.malicious_provider import MaliciousProvider, Reply

from .clinics import get_person, signer_of
from .conftest import DNIC, MSP, query_log

# older than the consumer's ocsp.freshness_seconds (600 s by default), nextUpdate not passed
STALE_AGE = timedelta(seconds=900)
ANA = population_pb2.Person(given_name="Ana", family_name="Pereira").SerializeToString()
# limits.deadline_seconds of ss-msp in this module's topology
DEADLINE = 3.0


@dataclass(frozen=True, slots=True)
class Topology:
    runner: Runner
    provider: MaliciousProvider
    ca: x509.Certificate
    dnic_auth: x509.Certificate
    dnic_signer: EcdsaSigner
    msp_signer: EcdsaSigner
    responder: OcspResponder
    stale_responder: OcspResponder

    def staple(self, certificate: x509.Certificate, *, stale: bool = False) -> bytes:
        """A "good" OCSP answer about a certificate, signed by the instance's responder key."""
        responder = self.stale_responder if stale else self.responder
        return responder.respond(ocsp_request(certificate, self.ca))

    def revoked_staple(self, certificate: x509.Certificate) -> bytes:
        """An OCSP answer, signed by the instance's responder key, that `certificate` is revoked."""
        now = datetime.now(UTC)
        request = ocsp.load_der_ocsp_request(ocsp_request(certificate, self.ca))
        responder = load_issued(self.runner.pki, "ocsp")
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                request.issuer_name_hash,
                request.issuer_key_hash,
                request.serial_number,
                request.hash_algorithm,
                ocsp.OCSPCertStatus.REVOKED,
                this_update=now,
                next_update=now + timedelta(minutes=10),
                revocation_time=now - timedelta(minutes=1),
                revocation_reason=x509.ReasonFlags.key_compromise,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder.certificate)
            .certificates([responder.certificate])
        )
        signed = builder.sign(responder.key, hashes.SHA256())
        return signed.public_bytes(serialization.Encoding.DER)

    def header(self, frame: pb.Frame, **changes: object) -> ResponseHeader:
        """The response header the real ss-dnic would sign for `frame`, with `changes`."""
        request = decode_request(frame.request.header)
        header = ResponseHeader(
            message_id=request.message_id,
            request_sha256=sha256_hex(frame.request.header),
            service=request.service,
            sender=SecurityServerId.parse(DNIC),
            created_at=datetime.now(UTC),
            body_sha256=sha256_hex(ANA),
        )
        return dataclasses.replace(header, **changes)  # type: ignore[arg-type]

    def respond(
        self,
        frame: pb.Frame,
        *,
        header: ResponseHeader | None = None,
        body: bytes = ANA,
        signer: EcdsaSigner | None = None,
        key: EcdsaSigner | None = None,
        signer_ocsp: bytes | None = None,
        alter: Callable[[bytes], bytes] = bytes,
        staple: bytes | None = None,
    ) -> Reply:
        """A response frame as the real provider sends it, except for what is passed: the
        header is signed (with `key`'s key, by default `signer`'s), then `alter`ed; the
        staples default to fresh "good" answers."""
        signer = signer or self.dnic_signer
        header_bytes = (header or self.header(frame)).encode()
        signature = (key or signer).sign(header_bytes)
        envelope = pb.SignedEnvelope(
            header=alter(header_bytes),
            body=body,
            signature=signature,
            signer_certificate=signer.certificate_der,
            signer_ocsp=self.staple(signer.certificate) if signer_ocsp is None else signer_ocsp,
        )
        return Reply(
            frame=pb.Frame(correlation_id=frame.correlation_id, response=envelope),
            staple=self.staple(self.dnic_auth) if staple is None else staple,
        )

    def records(self, server_id: str, message_id: str) -> list[sqlite3.Row]:
        sql = "SELECT * FROM message_log WHERE message_id = ? ORDER BY seq"
        return query_log(self.runner.log_db(server_id), sql, message_id)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    # a call with no deadline of its caller's waits DEADLINE seconds for its answer
    runner = Runner(
        tmp_path_factory.mktemp("provider-attacks"), limits={"deadline_seconds": DEADLINE}
    )
    provider: MaliciousProvider | None = None
    try:
        runner.prepare()
        pki = runner.pki
        # ss-dnic stays stopped: the malicious provider takes its address and TLS identity
        provider = MaliciousProvider.posing_as(runner, DNIC)
        provider.start()
        for name in (*runner.trust_services, "registry", runner.server_names[MSP]):
            runner.start(name)
        yield Topology(
            runner=runner,
            provider=provider,
            ca=load_certificate((pki / "ca.crt").read_bytes()),
            dnic_auth=load_certificate((pki / "auth" / "UY_GOV_DNIC_ss1.crt").read_bytes()),
            dnic_signer=signer_of(pki, "UY_GOV_DNIC"),
            msp_signer=signer_of(pki, "UY_GOV_MSP"),
            responder=OcspResponder(pki_dir=pki, clock=lambda: datetime.now(UTC)),
            stale_responder=OcspResponder(
                pki_dir=pki,
                clock=lambda: datetime.now(UTC) - STALE_AGE,
                validity=timedelta(hours=1),
            ),
        )
    finally:
        runner.close()
        if provider is not None:
            provider.stop()


def new_id() -> str:
    return uuid.uuid4().hex


async def call(topo: Topology, message_id: str) -> Outcome:
    """GetPerson through ss-msp's consumer endpoint, as MSP's clinics backend calls it."""
    async with grpc.aio.insecure_channel(topo.runner.consumers[MSP]) as channel:
        return await get_person(channel, message_id=message_id)


async def attack(topo: Topology, answer: Callable[[pb.Frame], Reply]) -> tuple[str, Outcome]:
    """One call through ss-msp, answered by the malicious provider with `answer`."""
    topo.provider.behaviour = answer
    message_id = new_id()
    return message_id, await call(topo, message_id)


def assert_refused(topo: Topology, message_id: str, outcome: Outcome, code: str) -> None:
    """The caller got `code` and ss-msp logged the request it sent, then the refusal."""
    assert outcome.error == code, outcome
    assert outcome.code == grpc_status(Code(code)), outcome
    assert outcome.message_id == message_id
    rows = topo.records(MSP, message_id)
    assert [(r["kind"], r["role"], r["error_code"]) for r in rows] == [
        ("request", "consumer", None),
        ("refusal", "consumer", code),
    ], [dict(r) for r in rows]


async def new_stream(topo: Topology) -> None:
    """Make ss-msp open a new stream: the provider hangs up on a call (provider_unavailable)."""
    message_id, outcome = await attack(topo, lambda frame: Reply(frame=None))
    assert_refused(topo, message_id, outcome, "provider_unavailable")


async def test_honest_answer_is_passed_on(topology: Topology) -> None:
    """The malicious provider answering honestly: the caller gets the body, both logged."""
    message_id, outcome = await attack(topology, topology.respond)
    assert outcome.ok, outcome
    assert outcome.body == ANA
    rows = topology.records(MSP, message_id)
    assert [(r["kind"], r["role"], r["status"]) for r in rows] == [
        ("request", "consumer", "ok"),
        ("response", "consumer", "ok"),
    ]


async def test_body_altered_after_signing(topology: Topology) -> None:
    """A body that no longer matches the signed digest: body_digest_mismatch."""
    forged = population_pb2.Person(given_name="Eva", family_name="Pereira").SerializeToString()
    message_id, outcome = await attack(topology, lambda frame: topology.respond(frame, body=forged))
    assert_refused(topology, message_id, outcome, "body_digest_mismatch")


async def test_signed_by_another_members_key(topology: Topology) -> None:
    """A response to a DNIC service signed with MSP's valid signing key: untrusted_signer."""
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, signer=topology.msp_signer)
    )
    assert_refused(topology, message_id, outcome, "untrusted_signer")


async def test_signed_with_another_key_under_the_right_certificate(topology: Topology) -> None:
    """A response signed with MSP's key but carrying DNIC's signing certificate: bad_signature."""
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, key=topology.msp_signer)
    )
    assert_refused(topology, message_id, outcome, "bad_signature")


async def test_genuine_response_to_an_earlier_call_replayed(topology: Topology) -> None:
    """A genuine signed response to an earlier call, replayed to answer a new one:
    response_mismatch."""
    earlier: list[pb.SignedEnvelope] = []

    def record_answer(frame: pb.Frame) -> Reply:
        reply = topology.respond(frame)
        assert reply.frame is not None
        earlier.append(reply.frame.response)
        return reply

    _, first = await attack(topology, record_answer)
    assert first.ok, first

    def replay(frame: pb.Frame) -> Reply:
        answer = pb.Frame(correlation_id=frame.correlation_id, response=earlier[0])
        return Reply(frame=answer, staple=topology.staple(topology.dnic_auth))

    message_id, outcome = await attack(topology, replay)
    assert_refused(topology, message_id, outcome, "response_mismatch")


async def test_signed_with_the_tls_key(topology: Topology) -> None:
    """A response signed with ss-dnic's TLS key and certificate: untrusted_signer."""
    pki = topology.runner.pki
    auth = signer_of(pki, "UY_GOV_DNIC_ss1", folder="auth")
    message_id, outcome = await attack(topology, lambda frame: topology.respond(frame, signer=auth))
    assert_refused(topology, message_id, outcome, "untrusted_signer")


def _altered(header: bytes) -> bytes:
    """The header re-encoded with another creation time, keeping its signature."""
    decoded = decode_response(header)
    return dataclasses.replace(decoded, created_at=decoded.created_at - timedelta(days=1)).encode()


async def test_header_altered_after_signing(topology: Topology) -> None:
    """A valid signature over a header altered after signing: bad_signature."""
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, alter=_altered)
    )
    assert_refused(topology, message_id, outcome, "bad_signature")


OTHER_REQUEST = sha256_hex(b"another request")

MISMATCHES: dict[str, dict[str, object]] = {
    "message_id": {"message_id": "another-call"},
    "request_sha256": {"request_sha256": OTHER_REQUEST},
    "service": {"service": ServiceId.parse("UY/GOV/DNIC/identity/other/v1")},
    "sender": {"sender": SecurityServerId.parse(MSP)},
}


@pytest.mark.parametrize("field", list(MISMATCHES))
async def test_response_bound_to_another_request(topology: Topology, field: str) -> None:
    """A signed response whose message id, request digest, service or sender is another
    call's: response_mismatch."""
    message_id, outcome = await attack(
        topology,
        lambda frame: topology.respond(frame, header=topology.header(frame, **MISMATCHES[field])),
    )
    assert_refused(topology, message_id, outcome, "response_mismatch")


@pytest.mark.parametrize("about", ["signer", "stream"])
async def test_stale_staple(topology: Topology, about: str) -> None:
    """An OCSP answer older than the freshness bound, about the signing certificate
    (`signer`) or about the provider's TLS certificate (`stream`): certificate_status_stale."""
    if about == "signer":
        stale = topology.staple(topology.dnic_signer.certificate, stale=True)
        answer = lambda frame: topology.respond(frame, signer_ocsp=stale)  # noqa: E731
    else:
        stale = topology.staple(topology.dnic_auth, stale=True)
        answer = lambda frame: topology.respond(frame, staple=stale)  # noqa: E731
    message_id, outcome = await attack(topology, answer)
    assert_refused(topology, message_id, outcome, "certificate_status_stale")


async def test_missing_signer_staple(topology: Topology) -> None:
    """A response without an OCSP answer about its signing certificate:
    certificate_status_invalid."""
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, signer_ocsp=b"")
    )
    assert_refused(topology, message_id, outcome, "certificate_status_invalid")


async def test_missing_stream_staple(topology: Topology) -> None:
    """A new stream on which the provider never staples its TLS certificate's status:
    certificate_status_invalid."""
    await new_stream(topology)
    message_id, outcome = await attack(topology, lambda frame: topology.respond(frame, staple=b""))
    assert_refused(topology, message_id, outcome, "certificate_status_invalid")


async def test_staple_about_another_certificate(topology: Topology) -> None:
    """A fresh "good" answer about MSP's signing certificate stapled to DNIC's signature:
    certificate_status_invalid."""
    message_id, outcome = await attack(
        topology,
        lambda frame: topology.respond(
            frame, signer_ocsp=topology.staple(topology.msp_signer.certificate)
        ),
    )
    assert_refused(topology, message_id, outcome, "certificate_status_invalid")


async def test_neither_response_nor_refusal(topology: Topology) -> None:
    """An answer frame that is neither a response nor a refusal: malformed_envelope."""
    message_id, outcome = await attack(
        topology,
        lambda frame: Reply(
            frame=pb.Frame(correlation_id=frame.correlation_id),
            staple=topology.staple(topology.dnic_auth),
        ),
    )
    assert_refused(topology, message_id, outcome, "malformed_envelope")
    assert "neither a response nor a refusal" in outcome.details


async def test_header_that_is_not_a_response_header(topology: Topology) -> None:
    """A signed response envelope whose header is the request's own: malformed_envelope."""
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, alter=lambda _: frame.request.header)
    )
    assert_refused(topology, message_id, outcome, "malformed_envelope")


def refusal(topo: Topology, code: str, message: str) -> Callable[[pb.Frame], Reply]:
    def answer(frame: pb.Frame) -> Reply:
        refused = pb.Refusal(code=code, message=message)
        return Reply(
            frame=pb.Frame(correlation_id=frame.correlation_id, refusal=refused),
            staple=topo.staple(topo.dnic_auth),
        )

    return answer


async def test_refusal_with_an_unknown_code(topology: Topology) -> None:
    """A refusal with an unknown 100 KB code: internal_error, the code only quoted, bounded."""
    code = "not-a-code\r\n" + "z" * 100_000
    message_id, outcome = await attack(topology, refusal(topology, code, "refused"))
    assert_refused(topology, message_id, outcome, "internal_error")
    assert outcome.details.startswith(
        "the provider refused with a code this server does not know ('not-a-code\\\\r\\\\nzzz"
    )
    assert outcome.details.endswith("): refused")
    assert len(outcome.details) < 200


async def test_refusal_with_a_huge_message(topology: Topology) -> None:
    """A refusal with a 1 MiB message: its code is passed on, its message bounded."""
    message_id, outcome = await attack(topology, refusal(topology, "no_agreement", "x" * (1 << 20)))
    assert_refused(topology, message_id, outcome, "no_agreement")
    assert outcome.details == bound_message("x" * (1 << 20))
    assert len(outcome.details) == 1024
    [_, refused] = topology.records(MSP, message_id)
    assert refused["error_message"].startswith("x" * 200)
    assert len(refused["error_message"]) <= 1024


async def test_backend_error_with_a_huge_message(topology: Topology) -> None:
    """A signed backend error with a 1 MiB message: its status passed on, its message bounded."""
    message_id, outcome = await attack(
        topology,
        lambda frame: topology.respond(
            frame, header=topology.header(frame, grpc_status=5, grpc_message="y" * (1 << 20))
        ),
    )
    assert outcome.code == grpc.StatusCode.NOT_FOUND, outcome
    assert outcome.details == bound_message("y" * (1 << 20))
    assert len(outcome.details) == 1024
    assert outcome.message_id == message_id
    rows = topology.records(MSP, message_id)
    assert [(r["kind"], r["status"]) for r in rows] == [
        ("request", "ok"),
        ("response", "backend_error"),
    ]
    assert 0 < len(rows[1]["error_message"]) <= 1024


async def test_revoked_signer_staple(topology: Topology) -> None:
    """A response whose signing certificate's stapled status is revoked:
    signer_certificate_revoked."""
    revoked = topology.revoked_staple(topology.dnic_signer.certificate)
    message_id, outcome = await attack(
        topology, lambda frame: topology.respond(frame, signer_ocsp=revoked)
    )
    assert_refused(topology, message_id, outcome, "signer_certificate_revoked")


async def test_a_provider_that_never_answers_is_given_up_at_the_deadline(
    topology: Topology,
) -> None:
    """A caller with no deadline of its own, and a provider that holds the request without
    answering: ss-msp gives up after limits.deadline_seconds with deadline_exceeded, logged
    after the request, rather than holding the caller (and a slot) for ever."""
    answered = threading.Event()

    def hold(frame: pb.Frame) -> Reply:
        time.sleep(DEADLINE + 2)  # then hang up: the next call opens a new stream
        answered.set()
        return Reply(frame=None)

    started = time.monotonic()
    message_id, outcome = await attack(topology, hold)
    waited = time.monotonic() - started
    assert_refused(topology, message_id, outcome, "deadline_exceeded")
    assert DEADLINE - 0.2 <= waited < DEADLINE + 1.5, waited
    await asyncio.to_thread(answered.wait, DEADLINE + 5)


# keep last: ss-msp sends nothing more to this provider until the stream is replaced
async def test_revoked_stream_staple_stops_sending(topology: Topology) -> None:
    """A provider stapling that its TLS certificate is revoked: peer_certificate_revoked, and
    ss-msp sends it no further request on that stream."""
    revoked = topology.revoked_staple(topology.dnic_auth)
    answer = lambda frame: topology.respond(frame, staple=revoked)  # noqa: E731
    message_id, outcome = await attack(topology, answer)
    assert_refused(topology, message_id, outcome, "peer_certificate_revoked")
    received = len(topology.provider.requests)
    message_id, outcome = await attack(topology, answer)
    assert_refused(topology, message_id, outcome, "peer_certificate_revoked")
    assert len(topology.provider.requests) == received
