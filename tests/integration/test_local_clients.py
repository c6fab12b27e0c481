"""The consumer endpoint with TLS client certificates: only the subsystem's own backend may call as it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.pki import Issued, issue, load_issued
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .conftest import CLINICS, GET_PERSON, MSP, POPULATION, log_rows

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
METADATA = routing_metadata(client=CLINICS, service=POPULATION, purpose="healthcare-identification")


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    return make_runner(consumer_tls=frozenset({MSP}))


def pem(issued: Issued) -> tuple[bytes, bytes]:
    return (
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        issued.certificate.public_bytes(serialization.Encoding.PEM),
    )


async def call_with(runner: Runner, key: bytes | None, cert: bytes | None) -> Outcome:
    folder = runner.local_tls(MSP)
    assert folder is not None
    credentials = grpc.ssl_channel_credentials((folder / "ca.crt").read_bytes(), key, cert)
    async with grpc.aio.secure_channel(runner.consumers[MSP], credentials) as channel:
        return await call_raw(channel, GET_PERSON, PERSON, METADATA)


async def test_the_subsystems_own_certificate_is_accepted(runner: Runner) -> None:
    """A backend presenting the client certificate of its subsystem gets the answer."""
    async with runner.consumer_channel(MSP, CLINICS) as channel:
        outcome = await call_raw(channel, GET_PERSON, PERSON, METADATA)
    assert outcome.ok, outcome


async def test_a_certificate_naming_another_subsystem_is_refused_and_logged(runner: Runner) -> None:
    """A local certificate for another subsystem cannot call as this one."""
    folder = runner.local_tls(MSP)
    assert folder is not None
    other = issue(
        common_name="UY/GOV/MSP/billing",
        issuer=load_issued(folder, "ca"),
        now=datetime.now(UTC),
        days=1,
        kind="local-client",
    )
    outcome = await call_with(runner, *pem(other))
    assert (outcome.code, outcome.error) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "client_not_authenticated",
    )
    rows = log_rows(runner.log_db(MSP), outcome.message_id or "")
    assert [(r["kind"], r["error_code"]) for r in rows] == [("refusal", "client_not_authenticated")]


def certificate_naming(names: list[str], ca: Issued) -> tuple[bytes, bytes]:
    """A client certificate of the local CA whose subject holds these common names."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return pem(Issued(key=key, certificate=certificate))


@pytest.mark.parametrize(
    "names",
    [
        # gRPC shows only the first common name: another after it went unseen
        ["UY/GOV/MSP/clinics", "UY/GOV/MSP/billing"],
        # and cuts a name at a NUL byte: what followed went unseen
        ["UY/GOV/MSP/clinics\x00.billing"],
        ["UY/GOV/MSP/billing", "UY/GOV/MSP/clinics"],
    ],
)
async def test_a_certificate_with_more_than_the_clients_name_is_refused(
    runner: Runner, names: list[str]
) -> None:
    """(Found by a red-team review.) Exactly one common name, the client's, whole."""
    folder = runner.local_tls(MSP)
    assert folder is not None
    outcome = await call_with(runner, *certificate_naming(names, load_issued(folder, "ca")))
    assert (outcome.code, outcome.error) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "client_not_authenticated",
    ), (names, outcome)


async def test_no_client_certificate_fails_the_handshake(runner: Runner) -> None:
    """Without a client certificate the TLS handshake fails: nothing reaches the gateway."""
    outcome = await call_with(runner, None, None)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert outcome.error is None


async def test_a_certificate_from_another_ca_fails_the_handshake(runner: Runner) -> None:
    """A certificate from the instance CA (not the agency's local CA) is not a local client."""
    pki: Path = runner.pki
    key = (pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes()
    cert = (pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    outcome = await call_with(runner, key, cert)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_is_refused(runner: Runner) -> None:
    """A plain gRPC client cannot talk to a TLS consumer endpoint."""
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        outcome = await call_raw(channel, GET_PERSON, PERSON, METADATA, timeout=5)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
