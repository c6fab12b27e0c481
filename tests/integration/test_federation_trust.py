"""A malicious federated registry, and claims in refusal records, over real processes.

UY's instance runs as real processes (registry, ss-msp, ss-dnic, OCSP responder, TSA;
no backend: every call is refused before one) with local policies that allow exchanges with AR. AR's registry is the
attacker: a small gRPC server in the test (gateway.v1.Configuration Watch/Fetch) that
serves configurations signed with AR's real configuration-signing key, which UY's
registry administrator imported as AR's anchor. First it serves a proper configuration;
then one that lists a member of UY (`UY/GOV/MSP`) with an approved server
`UY/GOV/MSP/evil`, whose authentication certificate and signing certificate (naming
`UY/GOV/MSP`) AR's CA issued; then the same for a member of a third instance
(`BR/GOV/X`). The "evil" server then calls UY's DNIC provider with those certificates
and valid OCSP answers of AR's responder, as `UY/GOV/MSP/clinics` under UY's own
agreement AGR-2026-0001 (`attacker.py`). Every test is written from the attacker's side.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.ocsp_responder import OcspResponder
from certs.pki import Issued, issue, write_pair
from gateway.configuration import (
    Anchor,
    Federation,
    Member,
    SecurityServer,
    SignedConfiguration,
    build_content,
    sign_configuration,
)
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId
from gateway.ocsp import build_request as ocsp_request
from gateway.signing import EcdsaSigner
from gateway.v1 import configuration_pb2 as cpb
from gateway.v1 import exchange_pb2 as pb
from gateway_client.admin import AdminClient
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

from .attacker import StreamError, open_stream, request_frame
from .clinics import PURPOSE, signed_request
from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, wait_for

RENAPER = MemberId.parse("AR/GOB/RENAPER")


def _der(issued: Issued) -> bytes:
    return issued.certificate.public_bytes(serialization.Encoding.DER)


def _pem(issued: Issued) -> tuple[bytes, bytes]:
    return (
        issued.certificate.public_bytes(serialization.Encoding.PEM),
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class FakeRegistry:
    """AR's registry, turned malicious: serves the latest configuration it was given."""

    def __init__(self) -> None:
        self.latest: tuple[int, SignedConfiguration] | None = None
        self.changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "gateway.v1.Configuration",
                    {
                        "Fetch": grpc.unary_unary_rpc_method_handler(
                            self.fetch,
                            request_deserializer=cpb.FetchRequest.FromString,
                            response_serializer=cpb.SignedConfiguration.SerializeToString,
                        ),
                        "Watch": grpc.unary_stream_rpc_method_handler(
                            self.watch,
                            request_deserializer=cpb.WatchRequest.FromString,
                            response_serializer=cpb.SignedConfiguration.SerializeToString,
                        ),
                    },
                ),
            )
        )
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def publish(self, version: int, signed: SignedConfiguration) -> None:
        with self.changed:
            self.latest = (version, signed)
            self.changed.notify_all()

    @staticmethod
    def _pb(signed: SignedConfiguration) -> cpb.SignedConfiguration:
        return cpb.SignedConfiguration(
            content=signed.content,
            signature=signed.signature,
            signer_certificate=signed.signer_certificate,
        )

    def fetch(self, request: cpb.FetchRequest, context: Any) -> cpb.SignedConfiguration:
        assert self.latest is not None
        return self._pb(self.latest[1])

    def watch(self, request: cpb.WatchRequest, context: Any) -> Iterator[cpb.SignedConfiguration]:
        sent = request.known_version
        while context.is_active():
            with self.changed:
                latest = self.latest
                if latest is None or latest[0] <= sent:
                    self.changed.wait(0.5)
                    continue
            sent = latest[0]
            yield self._pb(latest[1])

    def close(self) -> None:
        self.server.stop(0)


@dataclass
class World:
    uy: Runner
    ar: FakeRegistry
    ar_pki: Path
    ar_ca: Issued
    ar_config: EcdsaSigner
    ar_anchor: Anchor
    ocsp: OcspResponder

    def state(self, server: str) -> Path:
        return self.uy.workdir / "state" / self.uy.server_names[server]

    def log_text(self, server: str) -> str:
        return self.uy.processes[self.uy.server_names[server]].log_path.read_text(errors="replace")

    def publish(
        self, version: int, *, members: list[Member], servers: list[SecurityServer]
    ) -> None:
        """Sign and serve AR's configuration with AR's real configuration-signing key."""
        now = datetime.now(UTC)
        uy_anchor = Anchor.from_json(json.loads((self.uy.pki / "anchor.json").read_text()))
        content = build_content(
            instance="AR",
            version=version,
            generated_at=now,
            expires_at=now + timedelta(minutes=10),
            ca_certificates=[_der(self.ar_ca)],
            members=members,
            servers=servers,
            services=[],
            agreements=[],
            federations=[Federation(anchor=uy_anchor, active=True, since=now)],
        )
        self.ar.publish(version, sign_configuration(content, self.ar_config))

    def staple(self, certificate: x509.Certificate) -> bytes:
        """AR's OCSP responder's current answer about a certificate of AR's CA."""
        return self.ocsp.respond(ocsp_request(certificate, self.ar_ca.certificate))

    def cached_ar_version(self, server: str) -> int:
        import base64

        doc = json.loads((self.state(server) / "configuration-AR.json").read_text())
        return int(json.loads(base64.b64decode(doc["content"]))["version"])

    def auditor(self, server: str, member: str | None, **params: str) -> list[dict[str, Any]]:
        token = self.uy.token("auditor", member=member, subject=f"auditor@{member or 'uy'}")
        url = self.uy.auditor_url(server) + "/audit/v1/records?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return list(json.loads(answer.read())["records"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("federation-trust")
    now = datetime.now(UTC)
    ar_pki = root / "ar-pki"
    ar_ca = issue(kind="ca", issuer=None, common_name="AR development CA", now=now, days=2)
    ar_config = issue(kind="config", issuer=ar_ca, common_name="AR configuration", now=now, days=2)
    write_pair(ar_pki, "ca", ar_ca)
    write_pair(
        ar_pki, "ocsp", issue(kind="ocsp", issuer=ar_ca, common_name="AR OCSP", now=now, days=2)
    )
    ar = FakeRegistry()
    uy = Runner(root / "uy", federation_allowed=("AR",))
    try:
        uy.prepare()
        # every call here is refused before a backend would be called: none is started
        for name in [
            *uy.trust_services,
            "registry",
            *(n for n in uy.processes if n.startswith("ss-")),
        ]:
            uy.start(name)
        anchor = Anchor(
            instance="AR",
            signing_certificates=(_der(ar_config),),
            addresses=(ar.address,),
        )
        world = World(
            uy=uy,
            ar=ar,
            ar_pki=ar_pki,
            ar_ca=ar_ca,
            ar_config=EcdsaSigner(ar_config.key, ar_config.certificate),
            ar_anchor=anchor,
            ocsp=OcspResponder(pki_dir=ar_pki, clock=lambda: datetime.now(UTC)),
        )
        # a proper configuration first: AR's own member, no server
        world.publish(1, members=[Member(id=RENAPER, name="RENAPER")], servers=[])
        admin = AdminClient(uy.api_url, uy.token("registry-admin", subject="admin@uy"))
        admin.federate(anchor.to_json(), reason="bilateral treaty")
        for server in (DNIC, MSP):
            wait_for(
                lambda s=server: (world.state(s) / "configuration-AR.json").exists(),  # type: ignore[misc]
                f"{server} holds AR's configuration",
                timeout=15,
            )
        yield world
    finally:
        uy.close()
        ar.close()


def _evil(world: World, member: str, server: str) -> tuple[Issued, Issued]:
    """An authentication certificate for `server` and a signing certificate naming `member`,
    both issued by AR's CA (and known to AR's OCSP responder, so their answers are good)."""
    now = datetime.now(UTC)
    auth = issue(
        kind="auth", issuer=world.ar_ca, common_name=server, now=now, days=1,
        hosts=("127.0.0.1", "localhost"),
    )  # fmt: skip
    sign = issue(kind="sign", issuer=world.ar_ca, common_name=member, now=now, days=1)
    stem = server.replace("/", "_")
    write_pair(world.ar_pki / "evil", f"{stem}-auth", auth)
    write_pair(world.ar_pki / "evil", f"{stem}-sign", sign)
    return auth, sign


def _poison(world: World, version: int, member: str, server: str, auth: Issued) -> None:
    """AR's registry publishes a member and an approved server of another instance."""
    owner = MemberId.parse(member)
    evil = SecurityServer(
        id=SecurityServerId.parse(server),
        address="127.0.0.1:9",
        auth_certificate=_der(auth),
        subsystems=(SubsystemId(member=owner, code="clinics"),),
    )
    world.publish(
        version,
        members=[Member(id=RENAPER, name="RENAPER"), Member(id=owner, name="impostor")],
        servers=[evil],
    )


async def _attack(world: World, auth: Issued, sign: Issued, client: str, sender: str) -> Any:
    """The evil server's call to UY's DNIC provider, with valid OCSP answers of AR."""
    cert_pem, key_pem = _pem(auth)
    envelope = signed_request(
        EcdsaSigner(sign.key, sign.certificate),
        signer_ocsp=world.staple(sign.certificate),
        client=client,
        sender=sender,
    )
    async with open_stream(
        world.uy.providers[DNIC],
        DNIC,
        (world.uy.pki / "ca.crt").read_bytes(),
        cert_pem,
        key_pem,
        staple=world.staple(auth.certificate),
    ) as stream:
        return await stream.send(request_frame(envelope))


def _rejected(log_text: str, member: str) -> bool:
    """Whether the server's log says it refused a configuration for listing `member`."""
    return any(
        "configuration_rejected" in line and f"lists member {member} " in line
        for line in log_text.splitlines()
    )


def _code(answer: Any) -> str | None:
    if isinstance(answer, StreamError):
        return answer.error
    assert isinstance(answer, pb.Frame)
    return answer.refusal.code if answer.HasField("refusal") else "answered"


@pytest.mark.parametrize(
    ("version", "member", "server", "client"),
    [
        pytest.param(2, "UY/GOV/MSP", "UY/GOV/MSP/evil", CLINICS, id="member-of-our-instance"),
        pytest.param(3, "BR/GOV/X", "BR/GOV/X/evil", "BR/GOV/X/clinics", id="third-instance"),
    ],
)
def test_a_federated_registry_cannot_make_a_server_pass_for_another_instances_member(
    world: World, version: int, member: str, server: str, client: str
) -> None:
    """AR's registry lists a member and server of another instance with AR-issued
    certificates: UY's servers refuse that configuration (keeping the last good copy,
    logging why), and the evil server's call to DNIC is refused and recorded as a claim."""
    auth, sign = _evil(world, member, server)
    _poison(world, version, member, server, auth)
    for uy_server in (DNIC, MSP):
        wait_for(
            lambda s=uy_server: _rejected(world.log_text(s), member),  # type: ignore[misc]
            f"{uy_server} logs why it refused AR's configuration {version}",
            timeout=15,
        )
        assert world.cached_ar_version(uy_server) == 1, "the poisoned copy replaced the good one"

    answer = asyncio.run(_attack(world, auth, sign, client, server))
    assert _code(answer) == "peer_not_registered", answer

    # DNIC's record of the refusal keeps who the peer claimed to call as, marked a claim:
    # MSP's (or BR's) member-scoped auditor does not see it as its own
    claim = f"claimed:{client}"
    everything = world.auditor(DNIC, None, client=claim)
    assert everything and everything[-1]["error_code"] == "peer_not_registered", everything
    assert everything[-1]["service"] == f"claimed:{POPULATION}"
    assert not [
        r for r in world.auditor(DNIC, member, kind="refusal") if r["client"] in (client, claim)
    ]


def test_the_consumers_refusal_of_a_local_caller_keeps_its_claims_marked(world: World) -> None:
    """A local caller at ss-msp naming DNIC's subsystem as its client is refused
    (client_not_served); ss-msp records the named client and service as claims, which
    DNIC's member-scoped auditor does not see and an instance-wide auditor does."""
    claimed_client = "UY/GOV/DNIC/identity"
    marker = uuid.uuid4().hex

    async def call() -> Outcome:
        async with world.uy.consumer_channel(MSP) as channel:
            return await call_raw(
                channel,
                GET_PERSON,
                population.GetPersonRequest(national_id="1.234.567-8").SerializeToString(),
                routing_metadata(
                    client=claimed_client, service=POPULATION, purpose=PURPOSE, message_id=marker
                ),
            )

    outcome = asyncio.run(call())
    assert outcome.error == "client_not_served", outcome
    seen = world.auditor(MSP, None, message_id=marker)
    assert [(r["client"], r["service"]) for r in seen] == [
        (f"claimed:{claimed_client}", f"claimed:{POPULATION}")
    ], seen
    assert world.auditor(MSP, "UY/GOV/DNIC", message_id=marker) == []
