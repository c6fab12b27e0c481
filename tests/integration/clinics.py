"""The clinics' call: UY/GOV/MSP/clinics asking DNIC's population registry for a person.

Most integration tests make this one exchange of the demo topology, either as an agency
backend does (through ss-msp's consumer endpoint) or as a forged or replayed envelope sent
straight to a provider (`attacker.py`). This module states it once; the tests say only
what they change. It never checks an answer: the tests decide what should have happened.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc

from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population

from .attacker import build_request
from .conftest import CLINICS, GET_PERSON, MSP, POPULATION

PURPOSE = "healthcare-identification"  # the purpose the demo's agreement AGR-2026-0001 allows


def person_query(national_id: str = "1.234.567-8") -> bytes:
    """The body of a GetPerson request about one person (by default the demo's Ana)."""
    return population.GetPersonRequest(national_id=national_id).SerializeToString()


async def get_person(
    channel: grpc.aio.Channel, *, purpose: str = PURPOSE, message_id: str | None = None
) -> Outcome:
    """The clinics' GetPerson call on a channel to a consumer endpoint, as their backend
    makes it."""
    return await call_raw(
        channel,
        GET_PERSON,
        person_query(),
        routing_metadata(
            client=CLINICS, service=POPULATION, purpose=purpose, message_id=message_id
        ),
    )


def signer_of(pki: Path, stem: str, folder: str = "sign") -> EcdsaSigner:
    """The signer of a key pair the runner issued, e.g. `signer_of(pki, "UY_GOV_MSP")`."""
    return EcdsaSigner(
        load_private_key((pki / folder / f"{stem}.key").read_bytes()),
        load_certificate((pki / folder / f"{stem}.crt").read_bytes()),
    )


def signed_request(
    signer: EcdsaSigner,
    *,
    signer_ocsp: bytes = b"",
    message_id: str | None = None,
    client: str = CLINICS,
    service: str = POPULATION,
    method: str = GET_PERSON,
    purpose: str = PURPOSE,
    sender: str = MSP,
    body: bytes | None = None,
    created_at: datetime | None = None,
) -> pb.SignedEnvelope:
    """The clinics' request envelope as ss-msp would sign it (now, with a new message id,
    unless they are given), with what the test changes; signed properly by `signer`, whatever key
    that is."""
    return build_request(
        signer,
        signer_ocsp=signer_ocsp,
        message_id=message_id or uuid.uuid4().hex,
        client=client,
        service=service,
        method=method,
        purpose=purpose,
        sender=sender,
        body=person_query() if body is None else body,
        created_at=created_at or datetime.now(UTC),
    )
