"""The signed global configuration of an instance, and the anchor that verifies it.

The registry publishes the configuration as canonical JSON (`content`) signed with its
configuration-signing key. A security server is installed with the instance's *anchor*
(instance code, configuration-signing certificates, registry addresses) and accepts a
configuration only when it is signed by one of the anchor's certificates, names the
anchor's instance and parses completely, and lists members, servers, hosted subsystems and
services of that instance only (`check_own_instance`: a federated registry never vouches
for another instance's parties). Expiry is checked separately
(`GlobalConfiguration.check_current`) so that a server can keep the last good copy and
say clearly that it expired.

Building blocks only: this module never reads the clock, files or the network.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import canonical
from gateway.agreements import Agreement, AgreementIndex
from gateway.envelope import STREAM_KINDS
from gateway.errors import Code, ConfigurationError, GatewayError, TrustError
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.signing import Signer, TrustStore, pem_bundle, verify_signature
from gateway.timeutil import format_time, parse_time

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    id: MemberId
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityServer:
    id: SecurityServerId
    # host:port of the provider endpoint (mutual TLS)
    address: str
    # DER of the registered authentication (TLS) certificate
    auth_certificate: bytes
    # subsystems whose services and clients this server hosts
    subsystems: tuple[SubsystemId, ...]
    # the authentication certificates registered since (a renewal): during an overlap the
    # server may present any of them, and peers accept each
    next_auth_certificates: tuple[bytes, ...] = ()
    # the parsed authentication certificates, the first one first (to check the OCSP
    # answers stapled for them)
    auth_x509s: tuple[x509.Certificate, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            parsed = tuple(x509.load_der_x509_certificate(d) for d in self.auth_certificates)
        except ValueError:
            raise ConfigurationError(
                f"security server {self.id}: an authentication certificate is not valid DER",
                code=Code.CONFIGURATION_INVALID,
            ) from None
        object.__setattr__(self, "auth_x509s", parsed)

    @property
    def auth_certificates(self) -> tuple[bytes, ...]:
        """Every registered authentication certificate (DER), the first one first."""
        return (self.auth_certificate, *self.next_auth_certificates)

    @property
    def auth_x509(self) -> x509.Certificate:
        return self.auth_x509s[0]

    @property
    def auth_certificate_sha256(self) -> str:
        return hashlib.sha256(self.auth_certificate).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    id: ServiceId
    description: str
    # full gRPC method paths this service consists of; empty means any method
    methods: tuple[str, ...]
    # the streaming methods among them, with their kind (`STREAM_KINDS`): the consumer
    # server learns here how to take a call; a method not listed is unary
    streams: tuple[tuple[str, str], ...] = ()

    def stream_kind(self, method: str) -> str | None:
        """The method's streaming kind, or None for a unary method."""
        for path, kind in self.streams:
            if path == method:
                return kind
        return None

    def check_method(self, method: str) -> None:
        """Raise `GatewayError(UNKNOWN_METHOD)` unless the gRPC method belongs to this service."""
        if self.methods and method not in self.methods:
            raise GatewayError(
                f"method {method} is not part of service {self.id}; it offers "
                f"{', '.join(self.methods)}",
                code=Code.UNKNOWN_METHOD,
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Federation:
    """Another instance this one federates with: its anchor, and whether the federation is
    in force (an ended federation stays listed, so that refusals can say it ended)."""

    anchor: Anchor
    active: bool
    since: datetime
    ended_at: datetime | None = None

    @property
    def instance(self) -> str:
        return self.anchor.instance

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "anchor": self.anchor.to_json(),
            "state": "active" if self.active else "ended",
            "since": format_time(self.since),
            "ended_at": None if self.ended_at is None else format_time(self.ended_at),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Federation:
        state = doc["state"]
        if state not in ("active", "ended"):
            raise ValueError(f"federation state {state!r} is neither active nor ended")
        anchor = Anchor.from_json(doc["anchor"])
        if anchor.instance != doc["instance"]:
            raise ValueError(f"the anchor listed for {doc['instance']} is {anchor.instance}'s")
        ended = doc["ended_at"]
        return cls(
            anchor=anchor,
            active=state == "active",
            since=parse_time(doc["since"]),
            ended_at=None if ended is None else parse_time(ended),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundApproval:
    """The consumer instance's own approval of exchanges of one of its subsystems with a
    service of another instance, for some purposes (needed when the instance's policy
    `outbound_approval_required` says so; the agreement itself lives with the provider)."""

    client: SubsystemId
    service: ServiceId
    purposes: frozenset[str]
    approved_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "client": str(self.client),
            "service": str(self.service),
            "purposes": sorted(self.purposes),
            "approved_at": format_time(self.approved_at),
        }

    @classmethod
    def from_json(cls, doc: Any) -> OutboundApproval:
        return cls(
            client=SubsystemId.parse(doc["client"]),
            service=ServiceId.parse(doc["service"]),
            purposes=frozenset(str(p) for p in doc["purposes"]),
            approved_at=parse_time(doc["approved_at"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GlobalConfiguration:
    """One verified version of an instance's configuration, indexed for look-ups."""

    instance: str
    version: int
    generated_at: datetime
    expires_at: datetime
    ca_certificates: tuple[bytes, ...]
    # the same CAs as one PEM bundle, the form TLS libraries take as roots
    ca_pem: bytes = field(compare=False)
    members: Mapping[MemberId, Member]
    servers: Mapping[SecurityServerId, SecurityServer]
    services: Mapping[ServiceId, Service]
    agreements: AgreementIndex
    trust: TrustStore = field(compare=False)
    servers_by_auth_sha256: Mapping[str, SecurityServer] = field(compare=False)
    servers_by_subsystem: Mapping[SubsystemId, tuple[SecurityServer, ...]] = field(compare=False)
    # the instances this one federates with (active or ended), by instance code
    federations: Mapping[str, Federation] = field(default_factory=dict)
    # must this instance approve each exchange of its subsystems with another instance?
    outbound_approval_required: bool = False
    # those approvals, by (client, service)
    outbound_approvals: Mapping[tuple[SubsystemId, ServiceId], OutboundApproval] = field(
        default_factory=dict
    )

    def check_current(self, now: datetime) -> None:
        """Raise `ConfigurationError(CONFIGURATION_EXPIRED)` once the configuration expired."""
        if now >= self.expires_at:
            raise ConfigurationError(
                f"the global configuration of {self.instance} (version {self.version}) expired "
                f"at {format_time(self.expires_at)} and the registry could not be reached since; "
                "calls resume as soon as a fresh configuration arrives",
                code=Code.CONFIGURATION_EXPIRED,
            )

    def servers_hosting(self, subsystem: SubsystemId) -> tuple[SecurityServer, ...]:
        return self.servers_by_subsystem.get(subsystem, ())

    def subsystem_known(self, subsystem: SubsystemId) -> bool:
        return subsystem in self.servers_by_subsystem


# ---- encoding -------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def catalogue_json(
    *,
    ca_certificates: Iterable[bytes],
    members: Iterable[Member],
    servers: Iterable[SecurityServer],
    services: Iterable[Service],
    federations: Iterable[Federation] = (),
    outbound_approval_required: bool = False,
    outbound_approvals: Iterable[OutboundApproval] = (),
) -> dict[str, Any]:
    """Everything of a configuration but its header and agreements, as canonical JSON data."""
    listed = sorted((f.to_json() for f in federations), key=lambda d: str(d["instance"]))
    approvals = sorted(
        (a.to_json() for a in outbound_approvals),
        key=lambda d: (str(d["client"]), str(d["service"])),
    )
    return {
        # federation keys only when federated, so that an unfederated instance's
        # content is unchanged
        **({"federations": listed} if listed else {}),
        **({"outbound_approval_required": True} if outbound_approval_required else {}),
        **({"outbound_approvals": approvals} if approvals else {}),
        "ca_certificates": sorted(_b64(c) for c in ca_certificates),
        "members": sorted(
            ({"id": str(m.id), "name": m.name} for m in members), key=lambda d: d["id"]
        ),
        "security_servers": sorted(
            (
                {
                    "id": str(s.id),
                    "address": s.address,
                    "auth_certificate": _b64(s.auth_certificate),
                    "subsystems": sorted(str(x) for x in s.subsystems),
                    # only during a renewal, so that other servers' entries are unchanged
                    **(
                        {"next_auth_certificates": [_b64(c) for c in s.next_auth_certificates]}
                        if s.next_auth_certificates
                        else {}
                    ),
                }
                for s in servers
            ),
            key=lambda d: str(d["id"]),
        ),
        "services": sorted(
            (
                {
                    "id": str(s.id),
                    "description": s.description,
                    "methods": sorted(s.methods),
                    # only when it has streaming methods, so that other services' entries
                    # (and configurations without any) are unchanged
                    **({"streams": dict(s.streams)} if s.streams else {}),
                }
                for s in services
            ),
            key=lambda d: str(d["id"]),
        ),
    }


def build_content(
    *,
    instance: str,
    version: int,
    generated_at: datetime,
    expires_at: datetime,
    ca_certificates: Iterable[bytes],
    members: Iterable[Member],
    servers: Iterable[SecurityServer],
    services: Iterable[Service],
    agreements: Iterable[Agreement],
    federations: Iterable[Federation] = (),
    outbound_approval_required: bool = False,
    outbound_approvals: Iterable[OutboundApproval] = (),
) -> bytes:
    """The canonical content bytes of a whole configuration in one document (format 1)."""
    return canonical.encode(
        {
            **catalogue_json(
                ca_certificates=ca_certificates,
                members=members,
                servers=servers,
                services=services,
                federations=federations,
                outbound_approval_required=outbound_approval_required,
                outbound_approvals=outbound_approvals,
            ),
            "format": FORMAT_VERSION,
            "instance": instance,
            "version": version,
            "generated_at": format_time(generated_at),
            "expires_at": format_time(expires_at),
            "agreements": sorted((a.to_json() for a in agreements), key=lambda d: str(d["id"])),
        }
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedConfiguration:
    content: bytes
    signature: bytes
    signer_certificate: bytes


# the default largest configuration a security server takes in and a registry sends, in
# bytes (on the wire, and inflated): well above a national instance's (issue 13), well
# below what would exhaust a server's memory
MAX_CONFIGURATION_BYTES = 64 * 1024 * 1024


def compress_content(content: bytes) -> bytes:
    """`content` as gzip, the same bytes for the same content (no time stamp)."""
    return gzip.compress(content, compresslevel=6, mtime=0)


def inflate_content(compressed: bytes, max_bytes: int, *, in_all: int | None = None) -> bytes:
    """The content a registry sent compressed, or `ConfigurationError(CONFIGURATION_INVALID)`
    when it is not gzip or would inflate past `max_bytes` (nothing beyond that is ever
    inflated, so a small message cannot make a large allocation). `in_all`: `max_bytes` is
    what is left of this bound for all the parts of one update (the refusal names it)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        content = inflater.decompress(compressed, max_bytes)
        if inflater.unconsumed_tail:
            raise _invalid(
                f"its content inflates to more than {max_bytes} bytes "
                "(limits.max_configuration_bytes)"
                if in_all is None
                else f"the update's parts inflate to more than {in_all} bytes in all "
                "(limits.max_configuration_bytes)"
            )
        if not inflater.eof or inflater.unused_data:
            raise _invalid("its compressed content is truncated or followed by other bytes")
    except zlib.error as exc:
        raise _invalid(f"its compressed content is not gzip ({exc})") from None
    return content


def sign_configuration(content: bytes, signer: Signer) -> SignedConfiguration:
    return SignedConfiguration(
        content=content, signature=signer.sign(content), signer_certificate=signer.certificate_der
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Anchor:
    """What a security server is installed with to trust one instance's configuration."""

    instance: str
    signing_certificates: tuple[bytes, ...]
    addresses: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "configuration_signing_certificates": [
                x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
                for c in self.signing_certificates
            ],
            "addresses": list(self.addresses),
        }

    @classmethod
    def from_json(cls, value: Any) -> Anchor:
        try:
            certs = tuple(
                x509.load_pem_x509_certificate(p.encode()).public_bytes(serialization.Encoding.DER)
                for p in value["configuration_signing_certificates"]
            )
            anchor = cls(
                instance=str(value["instance"]),
                signing_certificates=certs,
                addresses=tuple(str(a) for a in value["addresses"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(
                f"anchor is malformed: {exc}", code=Code.CONFIGURATION_INVALID
            ) from None
        if not anchor.signing_certificates:
            raise ConfigurationError(
                "anchor lists no signing certificate", code=Code.CONFIGURATION_INVALID
            )
        return anchor


def check_streams(
    streams: Mapping[str, str], methods: Iterable[str]
) -> tuple[tuple[str, str], ...]:
    """A service's streaming methods, sorted, each with a known kind and (when the service
    lists its methods) among them; `ValueError` otherwise."""
    listed = set(methods)
    for method, kind in streams.items():
        if kind not in STREAM_KINDS:
            raise ValueError(
                f"method {method} has streaming kind {kind!r}; use one of {', '.join(STREAM_KINDS)}"
            )
        if listed and method not in listed:
            raise ValueError(f"streaming method {method} is not one of the service's methods")
    return tuple(sorted((str(m), str(k)) for m, k in streams.items()))


def _streams(doc: Any, service: Any, methods: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(doc, dict):
        raise _invalid(f"service {service}: streams must be an object")
    try:
        return check_streams(doc, methods)
    except ValueError as exc:
        raise _invalid(f"service {service}: {exc}") from None


def _invalid(why: str) -> ConfigurationError:
    return ConfigurationError(
        f"global configuration rejected: {why}", code=Code.CONFIGURATION_INVALID
    )


def check_signed(signed: SignedConfiguration, anchor: Anchor) -> None:
    """`ConfigurationError(CONFIGURATION_INVALID)` unless one of the anchor's certificates
    signed the content (a whole configuration, or a directory of its parts)."""
    if signed.signer_certificate not in anchor.signing_certificates:
        raise _invalid("signed by a certificate that is not in the instance anchor")
    try:
        verify_signature(
            x509.load_der_x509_certificate(signed.signer_certificate),
            signed.content,
            signed.signature,
        )
    except (TrustError, ValueError):
        raise _invalid("the signature does not verify with the anchor's certificate") from None


def verify_configuration(signed: SignedConfiguration, anchor: Anchor) -> GlobalConfiguration:
    """Verify a signed configuration against the anchor and parse it completely."""
    check_signed(signed, anchor)
    config = parse_content(signed.content)
    if config.instance != anchor.instance:
        raise _invalid(
            f"it is for instance {config.instance!r}, the anchor for {anchor.instance!r}"
        )
    return config


def check_own_instance(
    instance: str,
    members: Iterable[MemberId],
    servers: Iterable[SecurityServer],
    services: Iterable[ServiceId],
    agreements: Iterable[Agreement],
    approvals: Iterable[OutboundApproval],
) -> None:
    """Raise `ConfigurationError(CONFIGURATION_INVALID)` unless the configuration speaks only
    for its own instance: its members, the servers and the subsystems they host, its
    services and the services its agreements cover are all of `instance` (an agreement's
    client may be foreign); an outbound approval is for one of its own clients calling a
    service of another instance. A federated registry can so never vouch for a member,
    server or signing certificate of another instance."""

    def foreign(what: str, identifier: object, its_instance: str) -> ConfigurationError:
        return _invalid(
            f"the configuration of instance {instance} lists {what} {identifier} of instance "
            f"{its_instance}; an instance may list only its own members, servers and services"
        )

    for member in members:
        if member.instance != instance:
            raise foreign("member", member, member.instance)
    for server in servers:
        if server.id.owner.instance != instance:
            raise foreign("security server", server.id, server.id.owner.instance)
        for sub in server.subsystems:
            if sub.instance != instance:
                raise foreign(f"(hosted by {server.id}) subsystem", sub, sub.instance)
    for service in services:
        if service.member.instance != instance:
            raise foreign("service", service, service.member.instance)
    for agreement in agreements:
        if agreement.service.member.instance != instance:
            raise foreign(
                f"(in agreement {agreement.id}) service",
                agreement.service,
                agreement.service.member.instance,
            )
    for approval in approvals:
        if approval.client.instance != instance:
            raise foreign(
                "(in an outbound approval) client", approval.client, approval.client.instance
            )
        if approval.service.member.instance == instance:
            raise _invalid(
                f"the outbound approval of {approval.client} for {approval.service} is for a "
                f"service of instance {instance} itself; outbound approvals are for services "
                "of other instances"
            )


def parse_content(content: bytes) -> GlobalConfiguration:
    """Parse canonical configuration content (already verified) into its indexed model."""
    try:
        doc = canonical.decode(content)
        if doc["format"] != FORMAT_VERSION:
            raise _invalid(f"format {doc['format']!r} is not supported")
        return assemble(doc, doc, [Agreement.from_json(d) for d in doc["agreements"]])
    except ConfigurationError:
        raise
    except (GatewayError, canonical.NotCanonicalError, KeyError, TypeError, ValueError) as exc:
        raise _invalid(f"content is malformed ({type(exc).__name__}: {exc})") from None


def assemble(
    header: Mapping[str, Any], catalogue: Mapping[str, Any], agreements: Iterable[Agreement]
) -> GlobalConfiguration:
    """The indexed configuration of a header (instance, version, generated_at, expires_at),
    a catalogue (`catalogue_json`'s keys, decoded) and agreements, each checked; raises
    `ConfigurationError(CONFIGURATION_INVALID)` or what parsing a malformed value raises
    (KeyError, TypeError, ValueError, GatewayError), which callers turn into one."""
    doc = catalogue
    agreements = list(agreements)
    cas = tuple(base64.b64decode(c, validate=True) for c in doc["ca_certificates"])
    members = {
        m.id: m
        for m in (Member(id=MemberId.parse(d["id"]), name=str(d["name"])) for d in doc["members"])
    }
    servers: dict[SecurityServerId, SecurityServer] = {}
    for d in doc["security_servers"]:
        server = SecurityServer(
            id=SecurityServerId.parse(d["id"]),
            address=str(d["address"]),
            auth_certificate=base64.b64decode(d["auth_certificate"], validate=True),
            subsystems=tuple(SubsystemId.parse(x) for x in d["subsystems"]),
            next_auth_certificates=tuple(
                base64.b64decode(c, validate=True) for c in d.get("next_auth_certificates", [])
            ),
        )
        if server.id.owner not in members:
            raise _invalid(f"server {server.id} belongs to an unknown member")
        servers[server.id] = server
    services = {
        s.id: s
        for s in (
            Service(
                id=ServiceId.parse(d["id"]),
                description=str(d["description"]),
                methods=tuple(str(x) for x in d["methods"]),
                streams=_streams(d.get("streams", {}), d["id"], d["methods"]),
            )
            for d in doc["services"]
        )
    }
    instance = str(header["instance"])
    federations = {
        f.instance: f for f in (Federation.from_json(d) for d in doc.get("federations", []))
    }
    if instance in federations:
        raise _invalid("an instance cannot federate with itself")
    required = doc.get("outbound_approval_required", False)
    if not isinstance(required, bool):
        raise _invalid("outbound_approval_required is not true or false")
    approvals = {
        (a.client, a.service): a
        for a in (OutboundApproval.from_json(d) for d in doc.get("outbound_approvals", []))
    }
    check_own_instance(
        instance, members, servers.values(), services, agreements, approvals.values()
    )
    trust = TrustStore(tuple(x509.load_der_x509_certificate(c) for c in cas))
    by_auth: dict[str, SecurityServer] = {}
    for server in servers.values():
        for der in server.auth_certificates:
            holder = by_auth.setdefault(hashlib.sha256(der).hexdigest(), server)
            if holder is not server:
                raise _invalid(
                    f"servers {holder.id} and {server.id} list the same authentication certificate"
                )
    by_subsystem: dict[SubsystemId, list[SecurityServer]] = {}
    for server in servers.values():
        for sub in server.subsystems:
            by_subsystem.setdefault(sub, []).append(server)
    return GlobalConfiguration(
        instance=instance,
        version=int(header["version"]),
        generated_at=parse_time(header["generated_at"]),
        expires_at=parse_time(header["expires_at"]),
        ca_certificates=cas,
        ca_pem=pem_bundle(cas),
        members=members,
        servers=servers,
        services=services,
        agreements=AgreementIndex(agreements),
        trust=trust,
        servers_by_auth_sha256=by_auth,
        servers_by_subsystem={k: tuple(v) for k, v in by_subsystem.items()},
        federations=federations,
        outbound_approval_required=required,
        outbound_approvals=approvals,
    )
