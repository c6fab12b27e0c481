"""An in-memory harness of the exchange (`gateway.exchange`): a consumer and a provider
security server wired together without sockets, processes or databases.

Both nodes hold a real configuration (built and parsed as a registry's would be), real
P-256 keys and certificates from one CA, real OCSP answers signed by the CA, and real
replay, rate and status state; the log is a list, the clock a value the test moves. A
call goes through exactly the functions the gRPC shells call, in their order, and a test
may tamper with the envelope on its way to the provider, or with the answer on its way
back, as a man in the middle or a misbehaving peer would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from gateway.agreements import Agreement, RateLimiter
from gateway.configuration import (
    GlobalConfiguration,
    Member,
    SecurityServer,
    Service,
    build_content,
    parse_content,
)
from gateway.errors import Code, ConfigurationError, GatewayError
from gateway.exchange import (
    Accepted,
    Call,
    Envelope,
    Evidence,
    Outgoing,
    Peer,
    Refusal,
    accept_request,
    accept_response,
    answer,
    check_provider_not_revoked,
    consumer_refusal,
    provider_refusal,
    start_call,
)
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.pseudonym import subject_pseudonym
from gateway.records import LogRecord
from gateway.replay import ReplayGuard
from gateway.signing import EcdsaSigner
from security_server.certificate_status import StatusChecker, der_sha256
from security_server.node import evidence_of
from tests.unit.conftest import NOW, build_ca, build_certificate

INSTANCE = "UY"
MSP, DNIC = MemberId.parse("UY/GOV/MSP"), MemberId.parse("UY/GOV/DNIC")
SS_MSP, SS_DNIC = (
    SecurityServerId.parse("UY/GOV/MSP/ss1"),
    SecurityServerId.parse("UY/GOV/DNIC/ss1"),
)
CLINICS = SubsystemId.parse("UY/GOV/MSP/clinics")
IDENTITY = SubsystemId.parse("UY/GOV/DNIC/identity")
POPULATION = ServiceId.parse("UY/GOV/DNIC/identity/population/v1")
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
PURPOSE = "healthcare-identification"
AGREEMENT = "AGR-2026-0001"


def agreement(**changes: object) -> Agreement:
    """The clinics' agreement with the population registry, with `changes`."""
    fields: dict[str, object] = {
        "id": AGREEMENT,
        "client": CLINICS,
        "service": POPULATION,
        "purposes": frozenset({PURPOSE}),
        "valid_from": NOW - timedelta(days=30),
        **changes,
    }
    return Agreement(**fields)  # type: ignore[arg-type]


def ocsp_answer(
    certificate: x509.Certificate,
    ca: EcdsaSigner,
    at: datetime,
    *,
    revoked: bool = False,
) -> bytes:
    """The CA's own OCSP answer about `certificate`, produced at `at`."""
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=certificate,
            issuer=ca.certificate,
            algorithm=hashes.SHA1(),
            cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
            this_update=at - timedelta(minutes=1),
            next_update=at + timedelta(minutes=9),
            revocation_time=at - timedelta(hours=1) if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.certificate)
    )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@dataclass
class Limits:
    max_concurrent_calls: int = 1000
    max_message_bytes: int = 64 * 1024


class Configurations:
    def __init__(self, config: GlobalConfiguration) -> None:
        self.current = config

    def require(self, now: datetime) -> GlobalConfiguration:
        self.current.check_current(now)
        return self.current


class OwnInstanceOnly:
    """Federation as a server with no federated instance sees it."""

    def __init__(self, own: Configurations) -> None:
        self.own = own

    def require(self, instance: str, now: datetime) -> GlobalConfiguration:
        raise ConfigurationError(
            f"instance {instance} is not federated", code=Code.INSTANCE_NOT_FEDERATED
        )

    def ended(self, instance: str, now: datetime) -> bool:
        return False

    def server_by_certificate(
        self, fingerprint: str, now: datetime, claimed: str | None = None
    ) -> tuple[GlobalConfiguration, SecurityServer] | None:
        config = self.own.require(now)
        server = config.servers_by_auth_sha256.get(fingerprint)
        return None if server is None else (config, server)


@dataclass
class Staples:
    answers: dict[str, bytes] = field(default_factory=dict)

    def staple(self, certificate_sha256: str) -> bytes:
        return self.answers.get(certificate_sha256, b"")


@dataclass
class HarnessNode:
    """One security server's node: what `gateway.exchange.ExchangeNode` asks for."""

    server_id: SecurityServerId
    auth: EcdsaSigner
    signers: dict[MemberId, EcdsaSigner]
    config: Configurations
    own_status: Staples
    limits: Limits = field(default_factory=Limits)
    status: StatusChecker = field(default_factory=lambda: StatusChecker(600))
    replay: ReplayGuard = field(default_factory=lambda: ReplayGuard(window=timedelta(minutes=5)))
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    timestamping: GatewayError | None = None
    log: list[LogRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.federated = OwnInstanceOnly(self.config)

    @property
    def auth_certificate(self) -> x509.Certificate:
        return self.auth.certificate

    @property
    def auth_sha256(self) -> str:
        return der_sha256(self.auth.certificate)

    def signer_for(self, member: MemberId) -> EcdsaSigner:
        signer = self.signers.get(member)
        if signer is None:
            raise GatewayError(f"no signing key for {member}", code=Code.CLIENT_NOT_SERVED)
        return signer

    def check_timestamping(self) -> None:
        if self.timestamping is not None:
            raise self.timestamping

    def pseudonym(self, subject: str | None) -> str | None:
        return None if subject is None else subject_pseudonym(b"harness secret 0123", subject)

    def hosts(self, config: GlobalConfiguration, subsystem: SubsystemId) -> bool:
        return any(s.id == self.server_id for s in config.servers_hosting(subsystem))

    def evidence(
        self,
        certificate: x509.Certificate,
        certificate_der: bytes,
        certificate_sha256: str,
        staple: bytes,
        body: bytes,
        body_sha256: str,
        config: GlobalConfiguration,
    ) -> tuple[str | None, Evidence]:
        return evidence_of(
            self.status,
            False,
            certificate,
            certificate_der,
            certificate_sha256,
            staple,
            body,
            body_sha256,
            config,
        )

    def kinds(self) -> list[tuple[str, str | None]]:
        """(kind, error code) of each record logged, in order."""
        return [(r.kind.value, r.error_code) for r in self.log]


@dataclass
class Outcome:
    """How one call ended, as its caller sees it."""

    body: bytes | None = None
    error: GatewayError | None = None
    # where the call was refused: "consumer" (never sent), "provider", or "response"
    # (the provider answered, the consumer refused the answer)
    refused_by: str | None = None
    outgoing: Outgoing | None = None

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error.code.value


Tamper = Callable[[Envelope], Envelope]


class World:
    """The consumer (ss-msp, hosting the clinics) and the provider (ss-dnic, hosting the
    population registry), one agreement between them, and a clock."""

    def __init__(self, *, agreements: list[Agreement] | None = None) -> None:
        self.now = NOW
        self.ca = build_ca()
        self.msp_auth = build_certificate(self.ca, str(SS_MSP), kind="auth")
        self.dnic_auth = build_certificate(self.ca, str(SS_DNIC), kind="auth")
        self.msp_sign = build_certificate(self.ca, str(MSP), kind="sign")
        self.dnic_sign = build_certificate(self.ca, str(DNIC), kind="sign")
        self.agreements = agreements or [agreement()]
        config = self.configuration()
        self.consumer = HarnessNode(
            server_id=SS_MSP,
            auth=self.msp_auth,
            signers={MSP: self.msp_sign},
            config=Configurations(config),
            own_status=Staples(),
        )
        self.provider = HarnessNode(
            server_id=SS_DNIC,
            auth=self.dnic_auth,
            signers={DNIC: self.dnic_sign},
            config=Configurations(config),
            own_status=Staples(),
        )
        self.refresh_staples()
        # the provider's backend: its gRPC status, message and answer for a request body
        self.backend: Callable[[bytes], tuple[int, str, bytes]] = lambda body: (0, "", body)
        self.backends = {str(POPULATION)}
        self._ids = itertools.count(1)

    def configuration(self, **changes: object) -> GlobalConfiguration:
        return parse_content(self.content(**changes))

    def content(self, **changes: object) -> bytes:
        """The signed content of the configuration both servers hold, with `changes`."""
        args: dict[str, object] = {
            "instance": INSTANCE,
            "version": 1,
            "generated_at": self.now - timedelta(minutes=1),
            "expires_at": self.now + timedelta(hours=1),
            "ca_certificates": [self.ca.certificate_der],
            "members": [Member(id=MSP, name="MSP"), Member(id=DNIC, name="DNIC")],
            "servers": [
                SecurityServer(
                    id=SS_MSP,
                    address="127.0.0.1:1",
                    auth_certificate=self.msp_auth.certificate_der,
                    subsystems=(CLINICS,),
                ),
                SecurityServer(
                    id=SS_DNIC,
                    address="127.0.0.1:2",
                    auth_certificate=self.dnic_auth.certificate_der,
                    subsystems=(IDENTITY,),
                ),
            ],
            "services": [
                Service(id=POPULATION, description="Population registry", methods=(GET_PERSON,))
            ],
            "agreements": self.agreements,
            **changes,
        }
        return build_content(**args)  # type: ignore[arg-type]

    def publish(self, **changes: object) -> None:
        """A new configuration reaches both servers."""
        config = self.configuration(**changes)
        self.consumer.config.current = config
        self.provider.config.current = config

    def refresh_staples(self, *, revoked: tuple[EcdsaSigner, ...] = ()) -> None:
        """Both servers fetch fresh OCSP answers about their own certificates."""
        for node, certificates in (
            (self.consumer, (self.msp_auth, self.msp_sign)),
            (self.provider, (self.dnic_auth, self.dnic_sign)),
        ):
            node.own_status.answers = {
                der_sha256(c.certificate): ocsp_answer(
                    c.certificate, self.ca, self.now, revoked=c in revoked
                )
                for c in certificates
            }

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def peer(self, auth: EcdsaSigner | None = None) -> Peer:
        """What the provider's stream knows of the consumer: its TLS certificate and staple."""
        auth = auth or self.msp_auth
        return Peer(
            auth.certificate,
            der_sha256(auth.certificate),
            self.consumer.own_status.staple(der_sha256(auth.certificate)),
        )

    def call(
        self,
        body: bytes = b"person 1.234.567-8",
        *,
        client: str = str(CLINICS),
        service: str = str(POPULATION),
        purpose: str = PURPOSE,
        method: str = GET_PERSON,
        metadata: dict[str, str] | None = None,
        request: Tamper | None = None,
        response: Tamper | None = None,
        peer: Peer | None = None,
        resend: Envelope | None = None,
    ) -> Outcome:
        """One call through both servers, as the shells make it (each record logged where
        the shell would make it durable). `request` and `response` may alter the envelopes
        in transit; `resend` sends that envelope instead of the consumer's (a replay)."""
        consumer, provider = self.consumer, self.provider
        call = Call(
            method=method,
            metadata={
                "gateway-client": client,
                "gateway-service": service,
                "gateway-purpose": purpose,
                **(metadata or {}),
            },
            body=body,
            in_flight=1,
            generated_id=f"generated-{next(self._ids)}",
        )
        out = start_call(call, consumer, self.now)
        if isinstance(out, Refusal):
            consumer.log.append(out.record)
            return Outcome(error=out.error, refused_by="consumer")
        consumer.log.append(out.record)
        sent = resend or out.envelope
        if request is not None:
            sent = request(sent)
        accepted = accept_request(
            sent, peer or self.peer(), provider, self.backends, self.now, lambda: 0.0
        )
        if isinstance(accepted, Refusal):
            provider.log.append(accepted.record)
            error = provider_refusal(accepted.error.code.value, accepted.error.message)
            consumer.log.append(consumer_refusal(error, out, self.now).record)
            return Outcome(error=error, refused_by="provider", outgoing=out)
        assert isinstance(accepted, Accepted)
        provider.log.append(accepted.record)
        status, message, answered = self.backend(accepted.envelope.body)
        signed = answer(accepted, status, message, answered, provider, self.now)
        provider.log.append(signed.record)
        returned = signed.envelope if response is None else response(signed.envelope)
        provider_staple = provider.own_status.staple(provider.auth_sha256)
        try:
            check_provider_not_revoked(provider_staple, out, consumer, self.now)
            incoming = accept_response(returned, out, provider_staple, consumer, self.now)
        except GatewayError as err:
            consumer.log.append(consumer_refusal(err, out, self.now).record)
            return Outcome(error=err, refused_by="response", outgoing=out)
        consumer.log.append(incoming.record)
        return Outcome(body=incoming.envelope.body, outgoing=out)


def flip(data: bytes, at: int = -1) -> bytes:
    """`data` with one bit changed."""
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


def altered(envelope: Envelope, **changes: bytes) -> Envelope:
    return replace(envelope, **changes)


def resign(signer: EcdsaSigner, staple: bytes | None = None) -> Tamper:
    """Sign an envelope in transit again with `signer`'s key, showing its certificate, with
    `staple` as the OCSP answer about it (the envelope's own when None)."""

    def tamper(envelope: Envelope) -> Envelope:
        return replace(
            envelope,
            signature=signer.sign(envelope.header),
            signer_certificate=signer.certificate_der,
            signer_ocsp=envelope.signer_ocsp if staple is None else staple,
        )

    return tamper
