"""Federation end to end: two instances (UY and AR), each with its own registry, CA, OCSP
responder, TSA and security servers, as real processes on loopback.

The Uruguayan clinics (UY/GOV/MSP/clinics, on ss-msp) call the Argentine population
registry (AR/GOB/RENAPER/identidad/poblacion/v1, on ss-renaper). The tests run in order
over one pair of instances: refused while the instances are not federated; refused
without the cross-border agreement AR holds; refused without UY's own outbound approval
(UY's policy requires one); refused by a server whose local policy does not allow AR;
allowed once everything is in place, verified and traced on both sides; a UY server
impersonating an AR member refused; AR's configuration expiring while its registry is
down (and UY serving its own calls meanwhile); the federation ended by the provider's
instance, then by the consumer's, refused with federation_ended within seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from gateway.streams import REQUEST, Chain
from gateway.v1 import exchange_pb2 as pb
from gateway_client.admin import AdminClient
from gateway_demo.client import Outcome, routing_metadata
from gateway_demo.federation import (
    AR_POPULATION,
    PURPOSE,
    RENAPER,
    call_person,
    cross_border_call,
)
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import TEMPLATE_AR, Runner

from .attacker import fetch_ocsp, open_stream, request_frame
from .clinics import person_query, signed_request, signer_of
from .conftest import CLINICS, DNIC, IDENTITY, MSP, POPULATION, log_rows, run_gateway
from .stream_peer import StreamingConsumer, data, stream_open

CHAT = "/demo.population.v1.PopulationRegistry/Chat"

AR_IDENTITY = "AR/GOB/RENAPER/identidad"


@dataclass
class Instances:
    uy: Runner
    ar: Runner

    def admin(self, runner: Runner, role: str, member: str | None = None) -> AdminClient:
        return AdminClient(
            runner.api_url, runner.token(role, member=member, subject=f"{role}@{member or 'x'}")
        )


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instances]:
    root = tmp_path_factory.mktemp("federation")
    uy = Runner(
        root / "uy",
        federation_allowed=("AR",),
        outbound_approval_required=True,
    )
    # AR's configuration lives 4 s without its registry (the expiry test stops it)
    ar = Runner(
        root / "ar",
        template=TEMPLATE_AR,
        federation_allowed=("UY",),
        validity_seconds=4.0,
        refresh_seconds=1.0,
    )
    runners = [uy, ar]
    try:
        for runner in runners:
            runner.prepare()
        # DNIC's local policy allows no federation
        uy.set_settings(DNIC, "federation", allowed=[])
        for runner in runners:
            runner.start_all()
        yield Instances(uy=uy, ar=ar)
    finally:
        for runner in runners:
            runner.close()


def until(check: Callable[[], Outcome], done: Callable[[Outcome], bool], timeout: float) -> Outcome:
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if done(outcome) or time.monotonic() > deadline:
            return outcome
        time.sleep(0.2)


def clinics_call(instances: Instances) -> Outcome:
    return cross_border_call(instances.uy)


def test_not_federated_is_refused(instances: Instances) -> None:
    """Before the registries federate, a call to another instance's service is refused."""
    outcome = clinics_call(instances)
    assert outcome.error == "instance_not_federated", outcome
    assert outcome.code == grpc.StatusCode.PERMISSION_DENIED


def test_registries_federate_by_importing_anchors(instances: Instances) -> None:
    """Each registry administrator imports the other instance's anchor (as `gateway registry
    anchor` exports it); the configurations reach the servers, and the call now gets as far
    as AR's agreements."""
    for here, there in ((instances.uy, instances.ar), (instances.ar, instances.uy)):
        exported = run_gateway("registry", "anchor", "--config", there.workdir / "registry.toml")
        assert exported.returncode == 0, exported.stderr
        anchor = json.loads(exported.stdout)
        anchor["addresses"] = [there.registry_address]
        instances.admin(here, "registry-admin").federate(anchor, reason="bilateral treaty")
    outcome = until(
        lambda: clinics_call(instances),
        lambda o: o.error not in ("instance_not_federated", "federated_configuration_unavailable"),
        timeout=15,
    )
    assert outcome.error == "no_agreement", outcome


def test_agreement_and_outbound_approval_are_both_needed(instances: Instances) -> None:
    """AR holds and enforces the cross-border agreement; UY's policy requires its own
    outbound approval as well: without it the call is refused, with both it is allowed."""
    ar_admin = instances.admin(instances.ar, "registry-admin")
    requested = ar_admin.request_agreement(
        client=CLINICS,
        service=AR_POPULATION,
        purposes=[PURPOSE],
        legal_basis_kind="law",
        legal_basis_reference="Bilateral health agreement UY-AR, art. 4",
        reason="patients treated across the border",
    )
    agreement = requested["id"]
    instances.admin(instances.ar, "member-admin", "AR/GOB/RENAPER").act(
        agreement, "approve", "the register may be read for care"
    )
    ar_admin.act(agreement, "approve", "legal basis checked")
    outcome = until(
        lambda: clinics_call(instances), lambda o: o.error != "no_agreement", timeout=15
    )
    assert outcome.error == "outbound_approval_missing", outcome

    uy_admin = instances.admin(instances.uy, "registry-admin")
    approval = uy_admin.request_outbound(
        CLINICS, AR_POPULATION, [PURPOSE], agreement, reason="care of Argentine patients"
    )
    uy_admin.act_outbound(str(approval["id"]), "approve", "agreement AR checked")
    outcome = until(lambda: clinics_call(instances), lambda o: o.ok, timeout=15)
    assert outcome.ok, outcome
    person = population.Person.FromString(outcome.body or b"")
    assert person.national_id == "20.123.456"


def test_a_stream_crosses_the_border(instances: Instances) -> None:
    """The Uruguayan clinics stream the Argentine register's export: the consumer learns the
    method's kind from AR's catalogue; both countries' servers log the open and both
    closes."""
    message_id = f"stream-{uuid.uuid4().hex}"

    async def export() -> list[str]:
        async with instances.uy.consumer_channel(MSP, CLINICS) as channel:
            call = channel.unary_stream(
                "/demo.population.v1.PopulationRegistry/ExportPeople",
                request_serializer=population.ExportRequest.SerializeToString,
                response_deserializer=population.Person.FromString,
            )(
                population.ExportRequest(),
                metadata=routing_metadata(
                    client=CLINICS, service=AR_POPULATION, purpose=PURPOSE, message_id=message_id
                ),
                timeout=15,
            )
            return [person.given_name async for person in call]

    assert "Lucía" in asyncio.run(export())
    for runner, server in ((instances.uy, MSP), (instances.ar, RENAPER)):
        kinds = [r["kind"] for r in log_rows(runner.log_db(server), message_id)]
        assert kinds == ["request", "stream-close", "response"], (server, kinds)


def test_local_policy_not_allowing_the_instance_is_refused(instances: Instances) -> None:
    """ss-dnic's local policy (federation.allowed) does not allow AR: refused there, even
    though the instances are federated."""
    outcome = call_person(instances.uy, DNIC, IDENTITY)
    assert outcome.error == "federation_not_allowed", outcome


def test_the_cross_border_call_verifies_and_traces_on_both_sides(instances: Instances) -> None:
    """Both countries' logs hold the exchange under one message id; each auditor, with its
    own registry's token, sees its side, and the trace over both auditor APIs is consistent;
    both logs verify."""
    outcome = clinics_call(instances)
    assert outcome.ok and outcome.message_id, outcome
    uy_token = instances.uy.token("auditor", subject="auditor@uy")
    ar_token = instances.ar.token("auditor", subject="auditor@ar")
    deadline = time.monotonic() + 15
    while True:
        result = run_gateway(
            "audit", "trace", outcome.message_id,
            "--url", instances.uy.auditor_url(MSP), "--token", uy_token,
            "--url", instances.ar.auditor_url(RENAPER), "--token", ar_token,
        )  # fmt: skip
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "consistent on both sides" in result.stdout
    for runner, server in ((instances.uy, MSP), (instances.ar, RENAPER)):
        check = run_gateway("audit", "verify", "--quiet", "--db", runner.log_db(server))
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_server_of_one_instance_cannot_pass_for_a_member_of_another(
    instances: Instances,
) -> None:
    """ss-msp, whose certificate is valid in UY, presents itself to the AR provider as AR's
    own server and client: refused (its TLS certificate is registered in UY for a UY member)."""
    uy, ar = instances.uy, instances.ar
    auth_cert = (uy.pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    auth_key = (uy.pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes()
    uy_ca = (uy.pki / "ca.crt").read_bytes()
    ar_ca = (ar.pki / "ca.crt").read_bytes()
    signer = signer_of(uy.pki, "UY_GOV_MSP")
    signer_pem = (uy.pki / "sign" / "UY_GOV_MSP.crt").read_bytes()

    async def attack() -> object:
        envelope = signed_request(
            signer,
            signer_ocsp=fetch_ocsp(uy.ocsp_url, signer_pem, uy_ca),
            client=AR_IDENTITY,
            service=AR_POPULATION,
            sender=RENAPER,
            body=person_query("20.123.456"),
        )
        async with open_stream(
            ar.providers[RENAPER],
            RENAPER,
            ar_ca,
            auth_cert,
            auth_key,
            staple=fetch_ocsp(uy.ocsp_url, auth_cert, uy_ca),
        ) as stream:
            return await stream.send(request_frame(envelope))

    answer = asyncio.run(attack())
    refusal = getattr(answer, "refusal", None)
    code = refusal.code if refusal is not None else getattr(answer, "error", None)
    assert code == "peer_member_mismatch", answer


def test_expired_federated_configuration_is_refused_while_own_calls_go_on(
    instances: Instances,
) -> None:
    """AR's registry goes down: UY keeps serving its own calls, and once its copy of AR's
    configuration expires (4 s), cross-border calls are refused with their own code; they
    resume by themselves when AR's registry returns."""
    instances.ar.stop("registry")
    try:
        outcome = until(
            lambda: clinics_call(instances),
            lambda o: o.error == "federated_configuration_expired",
            timeout=15,
        )
        assert outcome.error == "federated_configuration_expired", outcome
        own = call_person(instances.uy, MSP, CLINICS, service=POPULATION)
        assert own.ok, own
    finally:
        instances.ar.start("registry")
    outcome = until(lambda: clinics_call(instances), lambda o: o.ok, timeout=20)
    assert outcome.ok, outcome


def test_a_federation_ended_by_the_providers_instance_is_refused_as_ended(
    instances: Instances,
) -> None:
    """AR's registry administrator ends the federation: on a stream ss-msp's keys opened to
    AR's provider before, the next requests are refused federation_ended (not
    peer_not_registered) and AR records the client they name as a claim; a streaming call
    opened before, by a consumer server that goes on regardless, is ended federation_ended
    by AR's provider within seconds; the clinics' calls get federation_ended too.
    Federating again restores them."""
    uy, ar = instances.uy, instances.ar
    uy_ca = (uy.pki / "ca.crt").read_bytes()
    auth_cert = (uy.pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    signer_pem = (uy.pki / "sign" / "UY_GOV_MSP.crt").read_bytes()
    signer = signer_of(uy.pki, "UY_GOV_MSP")

    def request() -> pb.Frame:
        return request_frame(
            signed_request(
                signer,
                signer_ocsp=fetch_ocsp(uy.ocsp_url, signer_pem, uy_ca),
                service=AR_POPULATION,
                body=person_query("20.123.456"),
            )
        )

    async def refused_after_the_end(peer: StreamingConsumer) -> tuple[str, float]:
        """Keep a stream talking, as a consumer server that ignores the end would, until
        the provider refuses it: (code, seconds after the federation's end)."""
        chain = Chain(REQUEST, opened.request.header)
        ended_at = time.monotonic()
        refused: pb.Refusal | None = None
        while refused is None and time.monotonic() - ended_at < 30:
            body = population.EchoMessage(payload=b"still there?").SerializeToString()
            seq, link = chain.extend(body)
            await peer.send(data(seq, body, link))
            try:
                message = await peer.read()
            except grpc.aio.AioRpcError as exc:  # ended otherwise than by a refusal message
                trailing: Any = exc.trailing_metadata() or ()
                error = next((v for k, v in trailing if k == "gateway-error"), "")
                return (
                    f"{error!s} ({exc.code().name}: {exc.details()})",
                    time.monotonic() - ended_at,
                )
            if message is None or message.WhichOneof("kind") == "refusal":
                refused = None if message is None else message.refusal
                break
        return ("" if refused is None else refused.code), time.monotonic() - ended_at

    # a streaming call opened before the end by ss-msp's keys, straight to AR's provider: a
    # consumer server that goes on as if nothing ended (UY's own configuration still
    # federates with AR), so only AR's provider can end it
    opened = stream_open(
        signer,
        message_id=f"stream-{uuid.uuid4().hex}",
        client=CLINICS,
        service=AR_POPULATION,
        method=CHAT,
        purpose=PURPOSE,
        sender=MSP,
        kind="bidi",
        created_at=datetime.now(UTC),
        signer_ocsp=fetch_ocsp(uy.ocsp_url, signer_pem, uy_ca),
    )

    async def end_on_an_open_stream() -> tuple[object, tuple[str, float]]:
        peer = StreamingConsumer(
            ar.providers[RENAPER],
            RENAPER,
            (ar.pki / "ca.crt").read_bytes(),
            auth_cert,
            (uy.pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
            timeout=120,  # the federation's end reaches AR's provider in seconds, on a slow day
        )
        try:
            await peer.send(
                pb.StreamMessage(open=opened, ocsp_staple=fetch_ocsp(uy.ocsp_url, auth_cert, uy_ca))
            )
            return await end_on_open_streams(peer)
        finally:
            await peer.close()

    async def end_on_open_streams(peer: StreamingConsumer) -> tuple[object, tuple[str, float]]:
        async with open_stream(
            ar.providers[RENAPER],
            RENAPER,
            (ar.pki / "ca.crt").read_bytes(),
            auth_cert,
            (uy.pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
            staple=fetch_ocsp(uy.ocsp_url, auth_cert, uy_ca),
        ) as stream:
            first = await stream.send(request())
            assert getattr(first, "WhichOneof", lambda _: None)("kind") == "response", first
            instances.admin(ar, "registry-admin").end_federation("UY", "treaty suspended")
            streamed = await refused_after_the_end(peer)
            deadline = time.monotonic() + 10
            while True:
                answer = await stream.send(request())
                refused = getattr(answer, "refusal", None)
                if (refused is not None and refused.code) or time.monotonic() > deadline:
                    return answer, streamed
                await asyncio.sleep(0.2)

    answer, (stream_code, stream_seconds) = asyncio.run(end_on_an_open_stream())
    assert stream_code == "federation_ended", stream_code
    assert stream_seconds < 20, stream_seconds
    refusal = getattr(answer, "refusal", None)
    assert refusal is not None and refusal.code == "federation_ended", answer
    records = run_gateway(
        "audit", "search", "--url", ar.auditor_url(RENAPER),
        "--token", ar.token("auditor", subject="auditor@ar"),
        "--client", f"claimed:{CLINICS}", "--status", "refused", "--json",
    )  # fmt: skip
    assert records.stdout.strip(), records.stderr
    rows = json.loads(records.stdout)
    assert ("federation_ended", f"claimed:{AR_POPULATION}") in [
        (r["error_code"], r["service"]) for r in rows
    ], rows

    outcome = until(
        lambda: clinics_call(instances), lambda o: o.error == "federation_ended", timeout=10
    )
    assert outcome.error == "federation_ended", outcome

    exported = run_gateway("registry", "anchor", "--config", uy.workdir / "registry.toml")
    anchor = json.loads(exported.stdout)
    anchor["addresses"] = [uy.registry_address]
    instances.admin(ar, "registry-admin").federate(anchor, reason="treaty restored")
    outcome = until(lambda: clinics_call(instances), lambda o: o.ok, timeout=20)
    assert outcome.ok, outcome


def test_ending_the_federation_is_enforced_within_seconds(instances: Instances) -> None:
    """UY's registry administrator ends the federation: the next calls are refused with
    federation_ended within seconds (the configuration is pushed)."""
    instances.admin(instances.uy, "registry-admin").end_federation("AR", "treaty suspended")
    started = time.monotonic()
    outcome = until(
        lambda: clinics_call(instances), lambda o: o.error == "federation_ended", timeout=10
    )
    assert outcome.error == "federation_ended", outcome
    assert time.monotonic() - started < 5
