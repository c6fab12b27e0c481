"""What administrators do to the registry: the catalogue, server approval, agreements,
federation with other instances and outbound approvals.

Every operation takes the acting `Principal`, checks that its role and scope allow the
operation, applies it inside one serialised store change (`RegistryStore.change`), and
writes who, when, what and why to the hash-chained admin log in the same transaction.
When the change alters what is published (members, approved servers, services, agreement
states) it then asks for a new signed configuration (`on_change`), which the registry
pushes to every watching security server. The admin REST API and the topology seed both
come through here, so a seeded registry and one built by hand through the API are alike.

Federation: a registry administrator imports another instance's anchor (`federate`) and
may end the federation (`end_federation`); both are published at once, ended federations
included, so that security servers refuse exchanges with that instance within seconds.
An agreement's client may be a subsystem of an actively federated instance (a cross-border
agreement, held and enforced by the provider's instance; requested by a registry
administrator or the provider's member administrator, since the foreign member has no
account here). Outbound approvals are the consumer instance's side: its own record, and
where `outbound_approval_required` says so its consent, of one of its subsystems calling
a federated instance's service; requested, approved by a registry administrator, revoked.

Errors are `AdminError`s that carry the HTTP status the API answers with: 400 invalid,
403 not allowed to this principal, 404 unknown, 409 not possible in the current state.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.agreements import Agreement, AgreementState, LegalBasis, LegalBasisKind, RateLimit
from gateway.audit import ADMIN_LOG as ADMIN_LOG_FORMAT
from gateway.audit import ChainBrokenError, ChainHead, verify_chain
from gateway.certificate_profile import Profile, check_certificate
from gateway.configuration import Anchor, check_streams
from gateway.envelope import check_method, check_purpose
from gateway.errors import ConfigurationError, GatewayError
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time
from gateway.workflow import Action, Party, Policy, TransitionError, apply
from gateway_ops.auth import Principal, Role
from registry.store import (
    Change,
    FederationState,
    OutboundState,
    RegistryStore,
    ServerStatus,
    admin_log,
    admin_record,
    agreement_from_row,
    agreement_values,
    agreements,
    federations,
    members,
    next_auth_certificates,
    outbound_approvals,
    servers,
    services,
    subsystems,
)
from registry.topology import Topology


class AdminError(Exception):
    """An administrator's request cannot be carried out; `status` is the HTTP answer."""

    status = 400
    kind = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(AdminError):
    status = 400
    kind = "invalid_request"


class Forbidden(AdminError):
    status = 403
    kind = "forbidden"


class NotFound(AdminError):
    status = 404
    kind = "not_found"


class Conflict(AdminError):
    status = 409
    kind = "conflict"


# The principal the topology seed and the expiry sweep act as.
SYSTEM = Principal(
    subject="registry", role=Role.REGISTRY_ADMIN, member=None, server=None, issuer="registry"
)

_NUMBER = re.compile(r"[0-9]{1,9}")
# a port: ASCII digits only (str.isdigit() also takes "²" and other scripts' digits)
_PORT = re.compile(r"[0-9]{1,5}")
# an instance code, as in `gateway.identifiers`: UY, UY-TEST
_INSTANCE = re.compile(r"[A-Z]{2}(?:-[A-Z0-9]{1,16})?")

# Actions that must say why.
_REASON_REQUIRED = {Action.REJECT, Action.SUSPEND, Action.REVOKE}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEntry:
    """A service as an administrator describes it in the catalogue."""

    id: ServiceId
    description: str
    methods: tuple[str, ...] = ()
    # the streaming methods among them: {method path: "server" | "client" | "bidi"}
    streams: Mapping[str, str] = field(default_factory=dict)
    interface: str = ""
    data_categories: tuple[str, ...] = ()
    legal_basis: str = ""
    contact: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgreementRequest:
    client: SubsystemId
    service: ServiceId
    purposes: tuple[str, ...]
    legal_basis: LegalBasis
    data_categories: tuple[str, ...] = ()
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    rate_limit: RateLimit | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundRequest:
    """A subsystem of this instance asks to call a service of a federated instance."""

    client: SubsystemId
    service: ServiceId
    purposes: tuple[str, ...]
    # the provider-side agreement, as the provider's registry names it
    agreement: str
    reason: str = ""


def _role(actor: Principal) -> str:
    scope = actor.server or actor.member
    return actor.role.value + (f":{scope}" if scope else "")


def _require_admin(actor: Principal, member: MemberId | None, what: str) -> None:
    """Registry administrators, or the member administrator of `member`."""
    if actor.role is Role.REGISTRY_ADMIN:
        return
    if actor.role is Role.MEMBER_ADMIN and member is not None and actor.member == member:
        return
    whose = f" of {member}" if member else ""
    raise Forbidden(f"only a registry administrator or the member administrator{whose} may {what}")


def _require_registry_admin(actor: Principal, what: str) -> None:
    if actor.role is not Role.REGISTRY_ADMIN:
        raise Forbidden(f"only a registry administrator may {what}")


def _sees_everything(actor: Principal) -> bool:
    return actor.role is Role.REGISTRY_ADMIN or (
        actor.role is Role.AUDITOR and actor.member is None
    )


def _scope(actor: Principal) -> MemberId | None:
    """The member whose agreements and admin log entries this principal may read.

    Security-server tokens read the catalogue only, never agreements or the admin log.
    """
    if actor.role is Role.SECURITY_SERVER:
        return None
    return actor.member


async def _row(conn: AsyncConnection, table: sa.Table, key: str) -> Any:
    """The row of `table` whose id is `key`, or None."""
    return (await conn.execute(sa.select(table).where(table.c.id == key))).first()


async def _federation_row(conn: AsyncConnection, instance: str) -> Any:
    return (
        await conn.execute(sa.select(federations).where(federations.c.instance == instance))
    ).first()


async def _next_id(conn: AsyncConnection, table: sa.Table, kind: str, year: int) -> str:
    """`KIND-YEAR-NNNN`, one more than the highest number of that form this year."""
    prefix = f"{kind}-{year}-"
    ids = await conn.scalars(sa.select(table.c.id).where(table.c.id.startswith(prefix)))
    numbers = [int(i[len(prefix) :]) for i in ids if _NUMBER.fullmatch(i[len(prefix) :])]
    return f"{prefix}{max(numbers, default=0) + 1:04d}"


async def _exists(conn: AsyncConnection, table: sa.Table, key: str) -> bool:
    return bool(await conn.scalar(sa.select(table.c.id).where(table.c.id == key)))


def agreement_json(row: Any) -> dict[str, Any]:
    a = agreement_from_row(row)
    doc = a.to_json()
    doc.update(revision=row.revision, created_at=row.created_at, updated_at=row.updated_at)
    return doc


def service_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "provider": row.subsystem,
        "description": row.description,
        "methods": json.loads(row.methods),
        "streams": json.loads(row.streams or "{}"),
        "interface": row.interface,
        "data_categories": json.loads(row.data_categories),
        "legal_basis": row.legal_basis,
        "contact": row.contact,
    }


def server_json(row: Any, renewals: list[Any] | None = None) -> dict[str, Any]:
    der = bytes(row.auth_certificate)
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    return {
        "id": row.id,
        "address": row.address,
        "subsystems": json.loads(row.subsystems),
        "status": row.status,
        "submitted_at": row.submitted_at,
        "auth_certificate": pem.decode("ascii"),
        # the same fingerprint the configuration and the security servers use
        "auth_certificate_sha256": hashlib.sha256(der).hexdigest(),
        # the certificates registered after the first (renewal), oldest first
        "next_auth_certificates": [
            {
                "sha256": r.sha256,
                "state": r.state,
                "submitted_at": r.submitted_at,
                "not_after": format_time(
                    x509.load_der_x509_certificate(bytes(r.certificate)).not_valid_after_utc
                ),
            }
            for r in renewals or ()
        ],
    }


def _check_auth_certificate(
    pem: str, now: datetime, server: SecurityServerId, cas: tuple[x509.Certificate, ...]
) -> bytes:
    """The DER of a submitted authentication certificate of `server`, or `InvalidRequest`
    saying why not: a usable key, valid now, the profile of a server's TLS certificate
    naming that server (the first certificate of a server as much as a renewal's), and,
    when `cas` are given, issued by one of them (peers would refuse any other)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        cert.signature_hash_algorithm  # noqa: B018 - raises for an unknown signature algorithm
        key = cert.public_key()
        not_after = cert.not_valid_after_utc
        not_before = cert.not_valid_before_utc
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidRequest(f"auth_certificate is not a usable X.509 certificate: {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise InvalidRequest("auth_certificate: an EC key must have at least 256 bits")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidRequest("auth_certificate: an RSA key must have at least 2048 bits")
    else:
        raise InvalidRequest("auth_certificate: the key must be EC (P-256 or larger) or RSA")
    if not not_before <= now < not_after:
        raise InvalidRequest(
            f"auth_certificate is not valid now: it is valid from {format_time(not_before)} "
            f"until {format_time(not_after)}"
        )
    problems = check_certificate(Profile.server(server), cert, None, now=now)
    if cas and not any(_issued_by(cert, ca) for ca in cas):
        problems.append("it was not issued by any of the instance's CAs")
    if problems:
        raise InvalidRequest(f"auth_certificate for {server}: {'; '.join(problems)}")
    return cert.public_bytes(serialization.Encoding.DER)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _signing_keys(certificates: Iterable[bytes]) -> set[bytes]:
    """The public keys (SubjectPublicKeyInfo, DER) of configuration-signing certificates."""
    return {
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for der in certificates
    }


def federation_json(row: Any) -> dict[str, Any]:
    anchor = json.loads(row.anchor)
    ders = Anchor.from_json(anchor).signing_certificates
    return {
        "instance": row.instance,
        "state": row.state,
        "since": row.since,
        "ended_at": row.ended_at,
        "reason": row.reason,
        "updated_by": row.updated_by,
        "revision": row.revision,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "addresses": anchor["addresses"],
        # fingerprints to compare with what the other instance's administrators publish
        "signing_certificates_sha256": [hashlib.sha256(d).hexdigest() for d in ders],
        "anchor": anchor,
    }


def outbound_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "client": row.client,
        "service": row.service,
        "purposes": json.loads(row.purposes),
        "agreement": row.agreement,
        "state": row.state,
        "reason": row.reason,
        "requested_by": row.requested_by,
        "updated_by": row.updated_by,
        "approved_at": row.approved_at,
        "revision": row.revision,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _check_anchor(doc: Any, now: datetime) -> Anchor:
    """Another instance's anchor, parsed and checked, or `InvalidRequest` saying why not."""
    try:
        anchor = Anchor.from_json(doc)
    except ConfigurationError as exc:
        raise InvalidRequest(exc.message) from None
    if not _INSTANCE.fullmatch(anchor.instance):
        raise InvalidRequest(
            f"anchor: the instance {anchor.instance!r} is not an instance code "
            "(an ISO 3166 country code in capitals, optionally with a suffix: AR, AR-TEST)"
        )
    if not anchor.addresses:
        raise InvalidRequest(
            f"anchor of {anchor.instance} lists no configuration address: security servers "
            "could not fetch its configuration"
        )
    for address in anchor.addresses:
        host, _, port = address.rpartition(":")
        if not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise InvalidRequest(
                f"anchor of {anchor.instance}: address {address!r} is not HOST:PORT"
            )
    for der in anchor.signing_certificates:
        cert = x509.load_der_x509_certificate(der)
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
            raise InvalidRequest(
                f"anchor of {anchor.instance}: a configuration-signing certificate must hold "
                "an EC key of at least 256 bits (configurations are signed with ECDSA)"
            )
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise InvalidRequest(
                f"anchor of {anchor.instance}: the signing certificate "
                f"{hashlib.sha256(der).hexdigest()[:16]}… is not valid now: it is valid from "
                f"{format_time(cert.not_valid_before_utc)} until "
                f"{format_time(cert.not_valid_after_utc)}"
            )
    return anchor


def entry_json(row: Any) -> dict[str, Any]:
    return {
        "seq": int(row.seq),
        "logged_at": row.logged_at,
        "actor": row.actor,
        "role": row.role,
        "action": row.action,
        "target": row.target,
        "from_state": row.from_state,
        "to_state": row.to_state,
        "reason": row.reason,
        "details": json.loads(row.details or "{}"),
        "hash": bytes(row.hash).hex(),
    }


@dataclass(frozen=True, slots=True)
class _PartiesOf:
    """The two members of an agreement, as `Governance._parties` reads them from a row."""

    client_member: str
    provider_member: str


class Governance:
    def __init__(
        self,
        store: RegistryStore,
        *,
        instance: str,
        policy: Policy,
        clock: Callable[[], datetime],
        on_change: Callable[[], Awaitable[object]],
        ca_certificates: tuple[bytes, ...] = (),
    ) -> None:
        """`ca_certificates`: the DER of the instance's CAs (its settings' `ca_certificates`,
        what the configuration publishes); a server's TLS certificate must be issued by
        one of them (none given: not checked, as in tests of the workflow alone)."""
        self.store = store
        self.instance = instance
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        self.cas = tuple(x509.load_der_x509_certificate(der) for der in ca_certificates)

    def _check_instance(self, instance: str, what: str) -> None:
        if instance != self.instance:
            raise InvalidRequest(
                f"{what} belongs to instance {instance}; this registry serves {self.instance}"
            )

    # ---- members and subsystems --------------------------------------------------------

    async def add_member(self, actor: Principal, member: MemberId, name: str) -> dict[str, Any]:
        _require_registry_admin(actor, "add members")
        self._check_instance(member.instance, f"member {member}")
        async with self.store.change() as ch:
            await self._add_member(ch, actor, member, name, "")
        await self.on_change()
        return {"id": str(member), "name": name}

    async def _add_member(
        self, ch: Change, actor: Principal, member: MemberId, name: str, reason: str
    ) -> None:
        if not name.strip():
            raise InvalidRequest("a member needs a name")
        if await _exists(ch.conn, members, str(member)):
            raise Conflict(f"member {member} is already registered")
        now = self.clock()
        await ch.conn.execute(
            members.insert().values(id=str(member), name=name, created_at=format_time(now))
        )
        await ch.log(
            at=now,
            actor=actor.subject,
            role=_role(actor),
            action="add_member",
            target=str(member),
            reason=reason,
            concerns=[member],
            details={"name": name},
        )

    async def list_members(self, actor: Principal) -> list[dict[str, Any]]:
        async with self.store.read() as conn:
            rows = (await conn.execute(sa.select(members).order_by(members.c.id))).all()
            subs = (await conn.execute(sa.select(subsystems).order_by(subsystems.c.id))).all()
        by_member: dict[str, list[str]] = {}
        for s in subs:
            by_member.setdefault(s.member, []).append(s.id)
        return [{"id": r.id, "name": r.name, "subsystems": by_member.get(r.id, [])} for r in rows]

    async def add_subsystem(self, actor: Principal, subsystem: SubsystemId) -> dict[str, Any]:
        _require_admin(actor, subsystem.member, f"add subsystems to {subsystem.member}")
        async with self.store.change() as ch:
            await self._add_subsystem(ch, actor, subsystem, "")
        return {"id": str(subsystem), "member": str(subsystem.member)}

    async def _add_subsystem(
        self, ch: Change, actor: Principal, subsystem: SubsystemId, reason: str
    ) -> None:
        await self._require_member(ch, subsystem.member)
        if await _exists(ch.conn, subsystems, str(subsystem)):
            raise Conflict(f"subsystem {subsystem} is already registered")
        now = self.clock()
        await ch.conn.execute(
            subsystems.insert().values(
                id=str(subsystem), member=str(subsystem.member), created_at=format_time(now)
            )
        )
        await ch.log(
            at=now,
            actor=actor.subject,
            role=_role(actor),
            action="add_subsystem",
            target=str(subsystem),
            reason=reason,
            concerns=[subsystem.member],
        )

    async def _require_member(self, ch: Change, member: MemberId) -> None:
        self._check_instance(member.instance, f"member {member}")
        if not await _exists(ch.conn, members, str(member)):
            raise NotFound(f"member {member} is not registered")

    async def _require_subsystem(self, ch: Change, subsystem: SubsystemId) -> None:
        self._check_instance(subsystem.instance, f"subsystem {subsystem}")
        if not await _exists(ch.conn, subsystems, str(subsystem)):
            raise NotFound(f"subsystem {subsystem} is not registered")

    # ---- security servers --------------------------------------------------------------

    async def submit_server(
        self,
        actor: Principal,
        *,
        server: SecurityServerId,
        address: str,
        auth_certificate_pem: str,
        subsystems_hosted: tuple[SubsystemId, ...],
    ) -> dict[str, Any]:
        """A server (or its member's administrator) asks to be registered; pending until approved."""
        if actor.role is Role.SECURITY_SERVER:
            if actor.server != server:
                raise Forbidden(f"a token of {actor.server} cannot register {server}")
        else:
            _require_admin(actor, server.owner, f"register security servers of {server.owner}")
        der = _check_auth_certificate(auth_certificate_pem, self.clock(), server, self.cas)
        return await self._register_server(
            actor, server, address, der, subsystems_hosted, approved=False, reason=""
        )

    async def _register_server(
        self,
        actor: Principal,
        server: SecurityServerId,
        address: str,
        der: bytes,
        hosted: tuple[SubsystemId, ...],
        *,
        approved: bool,
        reason: str,
        ch: Change | None = None,
    ) -> dict[str, Any]:
        if ch is None:
            async with self.store.change() as new:
                result = await self._register_server(
                    actor, server, address, der, hosted, approved=approved, reason=reason, ch=new
                )
            if approved:
                await self.on_change()
            return result
        await self._require_member(ch, server.owner)
        for sub in hosted:
            if sub.member != server.owner:
                raise InvalidRequest(f"server {server} cannot host {sub} of another member")
            await self._require_subsystem(ch, sub)
        row = await _row(ch.conn, servers, str(server))
        if row is not None:
            raise Conflict(f"security server {server} is already registered ({row.status})")
        holder = await ch.conn.scalar(
            sa.select(servers.c.id).where(servers.c.auth_certificate == der)
        ) or await ch.conn.scalar(
            sa.select(next_auth_certificates.c.server).where(
                next_auth_certificates.c.sha256 == hashlib.sha256(der).hexdigest()
            )
        )
        if holder is not None:
            raise Conflict(
                f"that authentication certificate is already registered for {holder}; "
                "each security server needs its own"
            )
        now = self.clock()
        status = ServerStatus.APPROVED if approved else ServerStatus.PENDING
        await ch.conn.execute(
            servers.insert().values(
                id=str(server),
                member=str(server.owner),
                address=address,
                auth_certificate=der,
                subsystems=json.dumps(sorted(str(s) for s in hosted)),
                status=status,
                submitted_at=format_time(now),
            )
        )
        await ch.log(
            at=now,
            actor=actor.subject,
            role=_role(actor),
            action="register_server",
            target=str(server),
            reason=reason,
            to_state=status,
            concerns=[server.owner],
            details={"address": address, "subsystems": sorted(str(s) for s in hosted)},
        )
        return {"id": str(server), "status": status}

    async def approve_server(
        self, actor: Principal, server: SecurityServerId, reason: str
    ) -> dict[str, Any]:
        _require_registry_admin(actor, "approve security servers")
        async with self.store.change() as ch:
            row = await _row(ch.conn, servers, str(server))
            if row is None:
                raise NotFound(f"security server {server} is not registered")
            if row.status != ServerStatus.PENDING:
                raise Conflict(f"security server {server} is {row.status}, not pending")
            await ch.conn.execute(
                servers.update()
                .where(servers.c.id == str(server))
                .values(status=ServerStatus.APPROVED)
            )
            await ch.log(
                at=self.clock(),
                actor=actor.subject,
                role=_role(actor),
                action="approve_server",
                target=str(server),
                reason=reason,
                from_state=ServerStatus.PENDING,
                to_state=ServerStatus.APPROVED,
                concerns=[server.owner],
            )
        await self.on_change()
        return {"id": str(server), "status": ServerStatus.APPROVED}

    async def list_servers(self, actor: Principal) -> list[dict[str, Any]]:
        async with self.store.read() as conn:
            rows = (await conn.execute(sa.select(servers).order_by(servers.c.id))).all()
            renewals = (
                await conn.execute(
                    sa.select(next_auth_certificates).order_by(
                        next_auth_certificates.c.submitted_at, next_auth_certificates.c.sha256
                    )
                )
            ).all()
        by_server: dict[str, list[Any]] = {}
        for r in renewals:
            by_server.setdefault(r.server, []).append(r)
        return [server_json(r, by_server.get(r.id, [])) for r in rows]

    # ---- renewal of authentication certificates ------------------------------------------

    async def submit_auth_certificate(
        self, actor: Principal, server: SecurityServerId, pem: str, reason: str
    ) -> dict[str, Any]:
        """Register a server's next authentication certificate: pending until a registry
        administrator approves it (at once when one submits it); then published beside
        the current one, so that peers accept either during the overlap."""
        if actor.role is Role.SECURITY_SERVER:
            if actor.server != server:
                raise Forbidden(f"a token of {actor.server} cannot renew {server}")
        else:
            _require_admin(actor, server.owner, f"renew security servers of {server.owner}")
        now = self.clock()
        der = _check_auth_certificate(pem, now, server, self.cas)
        sha = hashlib.sha256(der).hexdigest()
        state = ServerStatus.APPROVED if actor.role is Role.REGISTRY_ADMIN else ServerStatus.PENDING
        async with self.store.change() as ch:
            row = await _row(ch.conn, servers, str(server))
            if row is None:
                raise NotFound(f"security server {server} is not registered")
            if row.status != ServerStatus.APPROVED:
                raise Conflict(
                    f"security server {server} is {row.status}: its first certificate is "
                    "approved with the server, renewal comes after"
                )
            holder = await ch.conn.scalar(
                sa.select(servers.c.id).where(servers.c.auth_certificate == der)
            ) or await ch.conn.scalar(
                sa.select(next_auth_certificates.c.server).where(
                    next_auth_certificates.c.sha256 == sha
                )
            )
            if holder is not None:
                raise Conflict(
                    f"that authentication certificate is already registered for {holder}"
                )
            await ch.conn.execute(
                next_auth_certificates.insert().values(
                    sha256=sha,
                    server=str(server),
                    certificate=der,
                    state=state,
                    submitted_at=format_time(now),
                )
            )
            await ch.log(
                at=now,
                actor=actor.subject,
                role=_role(actor),
                action="register_auth_certificate",
                target=str(server),
                reason=reason,
                to_state=state,
                concerns=[server.owner],
                details={"sha256": sha},
            )
        if state == ServerStatus.APPROVED:
            await self.on_change()
        return {"server": str(server), "sha256": sha, "state": state}

    async def approve_auth_certificate(
        self, actor: Principal, server: SecurityServerId, sha256: str, reason: str
    ) -> dict[str, Any]:
        _require_registry_admin(actor, "approve authentication certificates")
        async with self.store.change() as ch:
            row = await self._next_certificate(ch.conn, server, sha256)
            if row.state != ServerStatus.PENDING:
                raise Conflict(f"authentication certificate {sha256} is {row.state}, not pending")
            await ch.conn.execute(
                next_auth_certificates.update()
                .where(next_auth_certificates.c.sha256 == sha256)
                .values(state=ServerStatus.APPROVED)
            )
            await ch.log(
                at=self.clock(),
                actor=actor.subject,
                role=_role(actor),
                action="approve_auth_certificate",
                target=str(server),
                reason=reason,
                from_state=ServerStatus.PENDING,
                to_state=ServerStatus.APPROVED,
                concerns=[server.owner],
                details={"sha256": sha256},
            )
        await self.on_change()
        return {"server": str(server), "sha256": sha256, "state": ServerStatus.APPROVED}

    async def retire_auth_certificate(
        self, actor: Principal, server: SecurityServerId, sha256: str, reason: str
    ) -> dict[str, Any]:
        """Take one of a server's authentication certificates out of the configuration (its
        first one, once an approved next one replaces it, or a next one)."""
        if actor.role is Role.SECURITY_SERVER:
            if actor.server != server:
                raise Forbidden(f"a token of {actor.server} cannot retire {server}'s certificates")
        else:
            _require_admin(actor, server.owner, f"retire certificates of {server.owner}")
        async with self.store.change() as ch:
            row = await _row(ch.conn, servers, str(server))
            if row is None:
                raise NotFound(f"security server {server} is not registered")
            if hashlib.sha256(bytes(row.auth_certificate)).hexdigest() == sha256:
                successor = (
                    await ch.conn.execute(
                        sa.select(next_auth_certificates)
                        .where(
                            next_auth_certificates.c.server == str(server),
                            next_auth_certificates.c.state == ServerStatus.APPROVED,
                        )
                        .order_by(
                            next_auth_certificates.c.submitted_at, next_auth_certificates.c.sha256
                        )
                        .limit(1)
                    )
                ).first()
                if successor is None:
                    raise Conflict(
                        f"{sha256} is the only approved authentication certificate of {server}: "
                        "register and approve its successor first"
                    )
                await ch.conn.execute(
                    servers.update()
                    .where(servers.c.id == str(server))
                    .values(auth_certificate=bytes(successor.certificate))
                )
                gone = successor.sha256
            else:
                await self._next_certificate(ch.conn, server, sha256)
                gone = sha256
            await ch.conn.execute(
                next_auth_certificates.delete().where(next_auth_certificates.c.sha256 == gone)
            )
            await ch.log(
                at=self.clock(),
                actor=actor.subject,
                role=_role(actor),
                action="retire_auth_certificate",
                target=str(server),
                reason=reason,
                to_state="retired",
                concerns=[server.owner],
                details={"sha256": sha256},
            )
        await self.on_change()
        return {"server": str(server), "sha256": sha256, "state": "retired"}

    async def _next_certificate(
        self, conn: AsyncConnection, server: SecurityServerId, sha256: str
    ) -> Any:
        row = (
            await conn.execute(
                sa.select(next_auth_certificates).where(
                    next_auth_certificates.c.sha256 == sha256,
                    next_auth_certificates.c.server == str(server),
                )
            )
        ).first()
        if row is None:
            raise NotFound(f"{server} has no authentication certificate {sha256}")
        return row

    # ---- services ----------------------------------------------------------------------

    async def add_service(self, actor: Principal, entry: ServiceEntry) -> dict[str, Any]:
        _require_admin(actor, entry.id.member, f"describe services of {entry.id.member}")
        async with self.store.change() as ch:
            await self._add_service(ch, actor, entry, "")
        await self.on_change()
        async with self.store.read() as conn:
            row = await _row(conn, services, str(entry.id))
        return service_json(row)

    async def _add_service(
        self, ch: Change, actor: Principal, entry: ServiceEntry, reason: str
    ) -> None:
        await self._require_subsystem(ch, entry.id.subsystem)
        try:
            methods = tuple(check_method(m) for m in entry.methods)
            streams = check_streams(entry.streams, methods)
            for method, _ in streams:
                check_method(method)
        except GatewayError as exc:
            raise InvalidRequest(exc.message) from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if await _exists(ch.conn, services, str(entry.id)):
            raise Conflict(f"service {entry.id} is already in the catalogue")
        await ch.conn.execute(
            services.insert().values(
                id=str(entry.id),
                subsystem=str(entry.id.subsystem),
                member=str(entry.id.member),
                description=entry.description,
                methods=json.dumps(sorted(methods)),
                streams=json.dumps(dict(streams)),
                interface=entry.interface,
                data_categories=json.dumps(sorted(set(entry.data_categories))),
                legal_basis=entry.legal_basis,
                contact=entry.contact,
            )
        )
        await ch.log(
            at=self.clock(),
            actor=actor.subject,
            role=_role(actor),
            action="add_service",
            target=str(entry.id),
            reason=reason,
            concerns=[entry.id.member],
            details={
                "methods": sorted(methods),
                **({"streams": dict(streams)} if streams else {}),
                "data_categories": sorted(entry.data_categories),
            },
        )

    async def search_services(
        self,
        actor: Principal,
        *,
        text: str | None = None,
        member: MemberId | None = None,
        category: str | None = None,
    ) -> list[dict[str, Any]]:
        query = sa.select(services).order_by(services.c.id)
        if member is not None:
            query = query.where(services.c.member == str(member))
        if text:
            needle = text.lower()
            query = query.where(
                sa.or_(
                    sa.func.lower(services.c.id).contains(needle, autoescape=True),
                    sa.func.lower(services.c.description).contains(needle, autoescape=True),
                    sa.func.lower(services.c.legal_basis).contains(needle, autoescape=True),
                )
            )
        async with self.store.read() as conn:
            rows = (await conn.execute(query)).all()
        result = [service_json(r) for r in rows]
        if category:
            result = [s for s in result if category in s["data_categories"]]
        return result

    # ---- agreements --------------------------------------------------------------------

    async def request_agreement(
        self, actor: Principal, req: AgreementRequest, *, agreement_id: str | None = None
    ) -> dict[str, Any]:
        """The consumer's administrator asks for an agreement; it starts as requested.

        A cross-border agreement (a client of a federated instance) is requested by a
        registry administrator or the provider's member administrator: the foreign
        member's administrators have no account here.
        """
        if req.client.instance != self.instance:
            _require_admin(
                actor,
                req.service.member,
                f"request cross-border agreements for {req.service} (for {req.client})",
            )
        else:
            _require_admin(actor, req.client.member, f"request agreements for {req.client}")
        async with self.store.change() as ch:
            row = await self._create_agreement(
                ch, actor, req, AgreementState.REQUESTED, agreement_id, "request"
            )
        return agreement_json(row)

    async def _create_agreement(
        self,
        ch: Change,
        actor: Principal,
        req: AgreementRequest,
        state: AgreementState,
        agreement_id: str | None,
        action: str,
    ) -> Any:
        if req.client.instance == self.instance:
            await self._require_subsystem(ch, req.client)
        else:
            await self._require_federated(ch.conn, req.client.instance, f"client {req.client}")
        service_row = await _row(ch.conn, services, str(req.service))
        if service_row is None:
            raise NotFound(f"service {req.service} is not in the catalogue")
        if not req.purposes:
            raise InvalidRequest("an agreement needs at least one purpose")
        try:
            purposes = frozenset(check_purpose(p) for p in req.purposes)
        except GatewayError as exc:
            raise InvalidRequest(exc.message) from None
        offered = set(json.loads(service_row.data_categories))
        extra = set(req.data_categories) - offered
        if extra and offered:
            raise InvalidRequest(
                f"service {req.service} does not provide the data categories "
                f"{', '.join(sorted(extra))}; it provides {', '.join(sorted(offered))}"
            )
        now = self.clock()
        valid_from = req.valid_from or now
        if req.valid_until is not None and req.valid_until <= valid_from:
            raise InvalidRequest("valid_until must be later than valid_from")
        if req.rate_limit is not None and (
            req.rate_limit.requests < 1 or req.rate_limit.per_seconds < 1
        ):
            raise InvalidRequest("a rate limit needs at least 1 request per at least 1 second")
        if agreement_id is None:
            agreement_id = await self._next_agreement_id(ch, now.year)
        if await _exists(ch.conn, agreements, agreement_id):
            raise Conflict(f"agreement {agreement_id} already exists")
        agreement = Agreement(
            id=agreement_id,
            client=req.client,
            service=req.service,
            purposes=purposes,
            valid_from=valid_from,
            valid_until=req.valid_until,
            state=state,
            legal_basis=req.legal_basis,
            data_categories=frozenset(req.data_categories),
            rate_limit=req.rate_limit,
        )
        stamp = format_time(now)
        await ch.conn.execute(
            agreements.insert().values(
                **agreement_values(agreement), revision=1, created_at=stamp, updated_at=stamp
            )
        )
        await ch.log(
            at=now,
            actor=actor.subject,
            role=_role(actor),
            action=action,
            target=agreement_id,
            reason=req.reason,
            to_state=state.value,
            concerns=[req.client.member, req.service.member],
            details=agreement.to_json(),
        )
        return await _row(ch.conn, agreements, agreement_id)

    async def _next_agreement_id(self, ch: Change, year: int) -> str:
        """`AGR-YEAR-NNNN`, one more than the highest number of that form this year."""
        return await _next_id(ch.conn, agreements, "AGR", year)

    def _parties(self, actor: Principal, row: Any) -> list[Party]:
        if actor.role is Role.REGISTRY_ADMIN:
            return [Party.REGISTRY]
        if actor.role is not Role.MEMBER_ADMIN or actor.member is None:
            raise Forbidden(f"a {actor.role.value} token cannot change agreements")
        member = str(actor.member)
        parties = []
        if row.provider_member == member:
            parties.append(Party.PROVIDER)
        if row.client_member == member:
            parties.append(Party.CONSUMER)
        if not parties:
            raise Forbidden(f"{actor.member} is neither the consumer nor the provider of {row.id}")
        return parties

    async def act(
        self, actor: Principal, agreement_id: str, action: Action, reason: str
    ) -> dict[str, Any]:
        """Move an agreement through its workflow; see `gateway.workflow`."""
        if action is Action.EXPIRE:
            raise Forbidden("agreements expire by themselves at the end of their validity")
        if actor.role not in (Role.REGISTRY_ADMIN, Role.MEMBER_ADMIN):
            raise Forbidden(f"a {actor.role.value} token cannot change agreements")
        if action in _REASON_REQUIRED and not reason.strip():
            raise InvalidRequest(f"say why: {action.value} needs a reason")
        async with self.store.change() as ch:
            row = await self._transition(ch, actor, agreement_id, action, reason, None)
        await self.on_change()
        return agreement_json(row)

    async def _transition(
        self,
        ch: Change,
        actor: Principal,
        agreement_id: str,
        action: Action,
        reason: str,
        parties: list[Party] | None,
    ) -> Any:
        row = await _row(ch.conn, agreements, agreement_id)
        if row is None or (
            parties is None and not _sees_everything(actor) and not self._is_party(actor, row)
        ):
            raise NotFound(f"agreement {agreement_id} does not exist")
        if parties is None:
            parties = self._parties(actor, row)
        before = AgreementState(row.state)
        try:
            after = apply(before, action, parties, self.policy)
        except TransitionError as exc:
            raise (Conflict if exc.conflict else Forbidden)(
                f"cannot {action.value} agreement {agreement_id}: {exc.message}"
            ) from None
        client_instance = MemberId.parse(row.client_member).instance
        if action in (Action.APPROVE, Action.RESUME) and client_instance != self.instance:
            # a client of another instance: only while the federation with it is active (an
            # agreement approved while it had ended would go live unseen if it came back)
            await self._require_federated(ch.conn, client_instance, f"client {row.client}")
        if action is Action.APPROVE:
            # four eyes: each approval of one agreement by another person, whatever roles one
            # person holds (the admin log says who approved it before)
            approved_by = await ch.conn.execute(
                sa.select(admin_log.c.actor).where(
                    admin_log.c.target == agreement_id,
                    admin_log.c.action == Action.APPROVE.value,
                    admin_log.c.actor == actor.subject,
                )
            )
            if approved_by.first() is not None:
                raise Conflict(
                    f"cannot approve agreement {agreement_id}: {actor.subject} approved it "
                    "already, and each approval must come from another person"
                )
        now = self.clock()
        done = await ch.conn.execute(
            agreements.update()
            .where(agreements.c.id == agreement_id, agreements.c.revision == row.revision)
            .values(state=after.value, revision=row.revision + 1, updated_at=format_time(now))
        )
        if done.rowcount != 1:  # pragma: no cover - the change lock makes this unreachable
            raise Conflict(f"agreement {agreement_id} changed meanwhile; try again")
        await ch.log(
            at=now,
            actor=actor.subject,
            role=_role(actor),
            action=action.value,
            target=agreement_id,
            reason=reason,
            from_state=before.value,
            to_state=after.value,
            concerns=[MemberId.parse(row.client_member), MemberId.parse(row.provider_member)],
            details={"as": sorted(p.value for p in parties), "revision": row.revision + 1},
        )
        return await _row(ch.conn, agreements, agreement_id)

    def _is_party(self, actor: Principal, row: Any) -> bool:
        scope = _scope(actor)
        return scope is not None and str(scope) in (row.client_member, row.provider_member)

    async def get_agreement(self, actor: Principal, agreement_id: str) -> dict[str, Any]:
        async with self.store.read() as conn:
            row = await _row(conn, agreements, agreement_id)
        if row is None or not (_sees_everything(actor) or self._is_party(actor, row)):
            raise NotFound(f"agreement {agreement_id} does not exist")
        return agreement_json(row)

    def actions_for(self, actor: Principal, agreement: dict[str, Any]) -> list[Action]:
        """What `actor` may do now to an agreement it can see (`agreement_json` form): the
        same rule `act` applies, asked without changing anything."""
        if actor.role not in (Role.REGISTRY_ADMIN, Role.MEMBER_ADMIN):
            return []
        service = ServiceId.parse(agreement["service"])
        row = _PartiesOf(
            client_member=str(SubsystemId.parse(agreement["client"]).member),
            provider_member=str(service.subsystem.member),
        )
        try:
            parties = self._parties(actor, row)
        except Forbidden:
            return []
        state = AgreementState(agreement["state"])
        possible: list[Action] = []
        for action in Action:
            if action is Action.EXPIRE:
                continue
            try:
                apply(state, action, parties, self.policy)
            except TransitionError:
                continue
            possible.append(action)
        return possible

    async def agreement_history(self, actor: Principal, agreement_id: str) -> list[dict[str, Any]]:
        """The admin log entries about one agreement, oldest first (NotFound when `actor`
        may not see the agreement)."""
        await self.get_agreement(actor, agreement_id)
        rows = await self.store.admin_entries(target=agreement_id)
        return [entry_json(r) for r in rows]

    async def list_agreements(
        self,
        actor: Principal,
        *,
        state: AgreementState | None = None,
        member: MemberId | None = None,
    ) -> list[dict[str, Any]]:
        query = sa.select(agreements).order_by(agreements.c.id)
        if state is not None:
            query = query.where(agreements.c.state == state.value)
        scopes = [member] if member else []
        if not _sees_everything(actor):
            own = _scope(actor)
            if own is None:  # no member's agreements (a security-server token): none, even
                return []  # when it names a member
            scopes.append(own)
        for scope in scopes:
            query = query.where(
                sa.or_(
                    agreements.c.client_member == str(scope),
                    agreements.c.provider_member == str(scope),
                )
            )
        async with self.store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [agreement_json(r) for r in rows]

    async def expire_due(self) -> int:
        """Mark agreements whose validity ended as expired; return how many."""
        now = self.clock()
        changed = 0
        async with self.store.change() as ch:
            rows = (
                await ch.conn.execute(
                    sa.select(agreements.c.id).where(
                        agreements.c.valid_until.is_not(None),
                        agreements.c.valid_until <= format_time(now),
                        agreements.c.state.in_(
                            [
                                s.value
                                for s in (
                                    AgreementState.REQUESTED,
                                    AgreementState.APPROVED_BY_PROVIDER,
                                    AgreementState.APPROVED_BY_REGISTRY,
                                    AgreementState.ACTIVE,
                                    AgreementState.SUSPENDED,
                                )
                            ]
                        ),
                    )
                )
            ).all()
            for r in rows:
                await self._transition(
                    ch, SYSTEM, r.id, Action.EXPIRE, "its validity ended", [Party.SYSTEM]
                )
                changed += 1
        if changed:
            await self.on_change()
        return changed

    # ---- federation --------------------------------------------------------------------

    async def _require_federated(self, conn: AsyncConnection, instance: str, what: str) -> None:
        """Conflict unless this instance actively federates with `instance`."""
        row = (
            await conn.execute(sa.select(federations).where(federations.c.instance == instance))
        ).first()
        if row is None:
            raise Conflict(
                f"{what} belongs to instance {instance}, which {self.instance} does not "
                f"federate with: a registry administrator must import {instance}'s anchor first"
            )
        if row.state != FederationState.ACTIVE:
            raise Conflict(
                f"{what} belongs to instance {instance}, whose federation with {self.instance} "
                f"ended at {row.ended_at}"
            )

    async def list_federations(self, actor: Principal) -> list[dict[str, Any]]:
        """Every federation, active and ended (they are published; any token may read them)."""
        async with self.store.read() as conn:
            rows = (
                await conn.execute(sa.select(federations).order_by(federations.c.instance))
            ).all()
        return [federation_json(r) for r in rows]

    async def federate(self, actor: Principal, anchor_doc: Any, reason: str) -> dict[str, Any]:
        """Import another instance's anchor: this instance federates with it from now on.

        Refused for this registry's own instance or a malformed anchor (400), and for an
        instance already actively federated (409: end that federation first to replace its
        anchor). After an end, federating again makes it active with a new `since`.
        """
        _require_registry_admin(actor, "federate with other instances")
        if not reason.strip():
            raise InvalidRequest("say why: federate needs a reason")
        now = self.clock()
        anchor = _check_anchor(anchor_doc, now)
        if anchor.instance == self.instance:
            raise InvalidRequest(
                f"the anchor is this registry's own instance {self.instance}: an instance "
                "cannot federate with itself"
            )
        stored = json.dumps(anchor.to_json(), sort_keys=True)
        stamp = format_time(now)
        async with self.store.change() as ch:
            row = (
                await ch.conn.execute(
                    sa.select(federations).where(federations.c.instance == anchor.instance)
                )
            ).first()
            if row is not None and row.state == FederationState.ACTIVE:
                raise Conflict(
                    f"instance {anchor.instance} is already federated (since {row.since}); "
                    "end that federation first to import a new anchor"
                )
            # one instance's signing key in another's anchor would let the first sign
            # configurations as the second: refused, whatever the anchor's instance says
            others = await ch.conn.execute(
                sa.select(federations.c.instance, federations.c.anchor).where(
                    federations.c.instance != anchor.instance,
                    federations.c.state == FederationState.ACTIVE,
                )
            )
            for other in others:
                # by key, not by certificate: another certificate of the same key signs alike
                theirs = Anchor.from_json(json.loads(other.anchor)).signing_certificates
                if _signing_keys(anchor.signing_certificates) & _signing_keys(theirs):
                    raise Conflict(
                        f"the anchor's configuration-signing certificate is instance "
                        f"{other.instance}'s too: each instance signs with its own key (check "
                        "the anchor's fingerprints with its registry's operators)"
                    )
            values = {
                "anchor": stored,
                "state": FederationState.ACTIVE,
                "since": stamp,
                "ended_at": None,
                "reason": reason,
                "updated_by": actor.subject,
                "updated_at": stamp,
            }
            if row is None:
                await ch.conn.execute(
                    federations.insert().values(
                        instance=anchor.instance, revision=1, created_at=stamp, **values
                    )
                )
            else:
                await ch.conn.execute(
                    federations.update()
                    .where(federations.c.instance == anchor.instance)
                    .values(revision=row.revision + 1, **values)
                )
            await ch.log(
                at=now,
                actor=actor.subject,
                role=_role(actor),
                action="federate",
                target=anchor.instance,
                reason=reason,
                from_state=None if row is None else row.state,
                to_state=FederationState.ACTIVE,
                concerns=[],
                details={
                    "addresses": list(anchor.addresses),
                    "signing_certificates_sha256": [
                        hashlib.sha256(d).hexdigest() for d in anchor.signing_certificates
                    ],
                },
            )
            done = await _federation_row(ch.conn, anchor.instance)
        await self.on_change()
        return federation_json(done)

    async def end_federation(self, actor: Principal, instance: str, reason: str) -> dict[str, Any]:
        """End the federation with `instance`; it stays published as ended."""
        _require_registry_admin(actor, "end federations")
        if not reason.strip():
            raise InvalidRequest("say why: ending a federation needs a reason")
        now = self.clock()
        async with self.store.change() as ch:
            row = await _federation_row(ch.conn, instance)
            if row is None:
                raise NotFound(f"{self.instance} does not federate with instance {instance}")
            if row.state != FederationState.ACTIVE:
                raise Conflict(f"the federation with {instance} already ended at {row.ended_at}")
            stamp = format_time(now)
            await ch.conn.execute(
                federations.update()
                .where(federations.c.instance == instance)
                .values(
                    state=FederationState.ENDED,
                    ended_at=stamp,
                    reason=reason,
                    updated_by=actor.subject,
                    updated_at=stamp,
                    revision=row.revision + 1,
                )
            )
            await ch.log(
                at=now,
                actor=actor.subject,
                role=_role(actor),
                action="end_federation",
                target=instance,
                reason=reason,
                from_state=FederationState.ACTIVE,
                to_state=FederationState.ENDED,
                concerns=[],
                details={"since": row.since},
            )
            done = await _federation_row(ch.conn, instance)
        await self.on_change()
        return federation_json(done)

    # ---- outbound approvals ------------------------------------------------------------

    def _sees_outbound(self, actor: Principal, row: Any) -> bool:
        scope = _scope(actor)
        return _sees_everything(actor) or (scope is not None and str(scope) == row.client_member)

    async def list_outbound(self, actor: Principal) -> list[dict[str, Any]]:
        """The outbound approvals this principal may see (its member's, or all)."""
        query = sa.select(outbound_approvals).order_by(outbound_approvals.c.id)
        if not _sees_everything(actor):
            scope = _scope(actor)
            if scope is None:
                return []
            query = query.where(outbound_approvals.c.client_member == str(scope))
        async with self.store.read() as conn:
            rows = (await conn.execute(query)).all()
        return [outbound_json(r) for r in rows]

    async def request_outbound(self, actor: Principal, req: OutboundRequest) -> dict[str, Any]:
        """Record that a subsystem of this instance will call a federated instance's service;
        it starts as requested (nothing is published until a registry administrator
        approves it)."""
        _require_admin(actor, req.client.member, f"request outbound approvals for {req.client}")
        if req.service.member.instance == self.instance:
            raise InvalidRequest(
                f"service {req.service} belongs to this instance: outbound approvals are for "
                "services of other instances (agreements cover this instance's own)"
            )
        if not req.purposes:
            raise InvalidRequest("an outbound approval needs at least one purpose")
        try:
            purposes = sorted({check_purpose(p) for p in req.purposes})
        except GatewayError as exc:
            raise InvalidRequest(exc.message) from None
        if not req.agreement.strip():
            raise InvalidRequest(
                "name the provider-side agreement (its id at the provider's registry)"
            )
        now = self.clock()
        stamp = format_time(now)
        async with self.store.change() as ch:
            await self._require_subsystem(ch, req.client)
            await self._require_federated(
                ch.conn, req.service.member.instance, f"service {req.service}"
            )
            live = (
                await ch.conn.execute(
                    sa.select(outbound_approvals).where(
                        outbound_approvals.c.client == str(req.client),
                        outbound_approvals.c.service == str(req.service),
                        outbound_approvals.c.state != OutboundState.REVOKED,
                    )
                )
            ).first()
            if live is not None:
                raise Conflict(
                    f"outbound approval {live.id} for {req.client} -> {req.service} is already "
                    f"{live.state}; revoke it first to ask for other purposes"
                )
            approval_id = await _next_id(ch.conn, outbound_approvals, "OUT", now.year)
            await ch.conn.execute(
                outbound_approvals.insert().values(
                    id=approval_id,
                    client=str(req.client),
                    client_member=str(req.client.member),
                    service=str(req.service),
                    purposes=json.dumps(purposes),
                    agreement=req.agreement,
                    state=OutboundState.REQUESTED,
                    reason=req.reason,
                    requested_by=actor.subject,
                    updated_by=actor.subject,
                    approved_at=None,
                    revision=1,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
            await ch.log(
                at=now,
                actor=actor.subject,
                role=_role(actor),
                action="request_outbound",
                target=approval_id,
                reason=req.reason,
                to_state=OutboundState.REQUESTED,
                concerns=[req.client.member],
                details={
                    "client": str(req.client),
                    "service": str(req.service),
                    "purposes": purposes,
                    "agreement": req.agreement,
                },
            )
            row = await _row(ch.conn, outbound_approvals, approval_id)
        return outbound_json(row)

    async def approve_outbound(
        self, actor: Principal, approval_id: str, reason: str
    ) -> dict[str, Any]:
        """A registry administrator approves a requested outbound approval; it is published."""
        return await self._move_outbound(actor, approval_id, "approve", reason)

    async def revoke_outbound(
        self, actor: Principal, approval_id: str, reason: str
    ) -> dict[str, Any]:
        """A registry administrator, or the client member's administrator, revokes one."""
        if not reason.strip():
            raise InvalidRequest("say why: revoke needs a reason")
        return await self._move_outbound(actor, approval_id, "revoke", reason)

    async def _move_outbound(
        self, actor: Principal, approval_id: str, action: str, reason: str
    ) -> dict[str, Any]:
        if actor.role not in (Role.REGISTRY_ADMIN, Role.MEMBER_ADMIN):
            raise Forbidden(f"a {actor.role.value} token cannot change outbound approvals")
        now = self.clock()
        stamp = format_time(now)
        async with self.store.change() as ch:
            row = await _row(ch.conn, outbound_approvals, approval_id)
            if row is None or not self._sees_outbound(actor, row):
                raise NotFound(f"outbound approval {approval_id} does not exist")
            before = row.state
            values: dict[str, Any] = {}
            if action == "approve":
                _require_registry_admin(actor, "approve outbound approvals")
                if before != OutboundState.REQUESTED:
                    raise Conflict(
                        f"cannot approve outbound approval {approval_id}: it is {before}; only "
                        "a requested one can be approved"
                    )
                service = ServiceId.parse(row.service)
                await self._require_federated(
                    ch.conn, service.member.instance, f"service {service}"
                )
                after = OutboundState.APPROVED
                values["approved_at"] = stamp
            else:
                _require_admin(actor, MemberId.parse(row.client_member), f"revoke {approval_id}")
                if before == OutboundState.REVOKED:
                    raise Conflict(f"outbound approval {approval_id} is already revoked")
                after = OutboundState.REVOKED
            await ch.conn.execute(
                outbound_approvals.update()
                .where(outbound_approvals.c.id == approval_id)
                .values(
                    state=after,
                    reason=reason,
                    updated_by=actor.subject,
                    updated_at=stamp,
                    revision=row.revision + 1,
                    **values,
                )
            )
            await ch.log(
                at=now,
                actor=actor.subject,
                role=_role(actor),
                action=f"{action}_outbound",
                target=approval_id,
                reason=reason,
                from_state=before,
                to_state=after,
                concerns=[MemberId.parse(row.client_member)],
                details={"revision": row.revision + 1},
            )
            done = await _row(ch.conn, outbound_approvals, approval_id)
        # only approved ones are published: publish when one becomes or stops being approved
        if OutboundState.APPROVED in (before, after):
            await self.on_change()
        return outbound_json(done)

    # ---- the admin log -----------------------------------------------------------------

    async def admin_log(
        self, actor: Principal, *, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        if actor.role is Role.SECURITY_SERVER:
            raise Forbidden("a security-server token cannot read the admin log")
        member = None if _sees_everything(actor) else _scope(actor)
        rows = await self.store.admin_entries(member=member, after=after, limit=limit)
        return [entry_json(r) for r in rows]

    async def verify_admin_log(self, actor: Principal) -> dict[str, Any]:
        """Verify the admin log chain up to its recorded head, and that nothing is missing."""
        if not _sees_everything(actor):
            raise Forbidden(
                "only registry administrators and instance-wide auditors may verify the "
                "admin log: the answer covers every member's entries"
            )
        # read the head first: entries appended meanwhile lie beyond it and are not judged
        recorded = await self.store.admin_head()
        head = ChainHead(fmt=ADMIN_LOG_FORMAT)
        after = 0
        try:
            while after < recorded.next_seq - 1:
                rows = [
                    r
                    for r in await self.store.admin_entries(after=after, limit=1000)
                    if int(r.seq) < recorded.next_seq
                ]
                if not rows:
                    break
                head = verify_chain([admin_record(r) for r in rows], head)
                after = int(rows[-1].seq)
        except ChainBrokenError as exc:
            return {"verified": False, "entries": exc.seq - 1, "error": str(exc)}
        if (recorded.next_seq, recorded.last_hash) != (head.next_seq, head.last_hash):
            return {
                "verified": False,
                "entries": head.next_seq - 1,
                "error": f"the log ends at entry {head.next_seq - 1}, but its head records "
                f"{recorded.next_seq - 1} entries: the newest entries were removed or replaced",
            }
        return {
            "verified": True,
            "entries": head.next_seq - 1,
            "last_hash": head.last_hash.hex(),
        }

    # ---- the topology seed -------------------------------------------------------------

    async def seed(self, topology: Topology, source: str) -> int:
        """Import what the topology holds and the registry does not; return how many items.

        The seed acts as the registry itself: servers are registered as approved and
        agreements as active, each with an admin log entry naming the source file.
        Items already in the registry are left as they are: after the first start, the
        API owns them.
        """
        reason = f"imported from {source}"
        added = 0
        async with self.store.change() as ch:

            async def missing(table: sa.Table, key: str) -> bool:
                return not await _exists(ch.conn, table, key)

            for m in topology.members:
                if await missing(members, str(m.id)):
                    await self._add_member(ch, SYSTEM, m.id, m.name, reason)
                    added += 1
            wanted: set[SubsystemId] = {x for s in topology.servers for x in s.subsystems}
            wanted |= {s.id.subsystem for s in topology.services}
            wanted |= {a.client for a in topology.agreements}
            for sub in sorted(wanted):
                if await missing(subsystems, str(sub)):
                    await self._add_subsystem(ch, SYSTEM, sub, reason)
                    added += 1
            for s in topology.servers:
                if await missing(servers, str(s.id)):
                    await self._register_server(
                        SYSTEM,
                        s.id,
                        s.address,
                        s.auth_certificate,
                        s.subsystems,
                        approved=True,
                        reason=reason,
                        ch=ch,
                    )
                    added += 1
            for svc in topology.services:
                if await missing(services, str(svc.id)):
                    details = topology.service_details.get(svc.id, {})
                    await self._add_service(
                        ch,
                        SYSTEM,
                        ServiceEntry(
                            id=svc.id,
                            description=svc.description,
                            methods=svc.methods,
                            streams=dict(svc.streams),
                            data_categories=tuple(details.get("data_categories", ())),
                            legal_basis=str(details.get("legal_basis", "")),
                            contact=str(details.get("contact", "")),
                        ),
                        reason,
                    )
                    added += 1
            for a in topology.agreements:
                if await missing(agreements, a.id):
                    await self._create_agreement(
                        ch,
                        SYSTEM,
                        AgreementRequest(
                            client=a.client,
                            service=a.service,
                            purposes=tuple(sorted(a.purposes)),
                            legal_basis=a.legal_basis
                            or LegalBasis(kind=LegalBasisKind.LAW, reference=source),
                            data_categories=tuple(sorted(a.data_categories)),
                            valid_from=a.valid_from,
                            valid_until=a.valid_until,
                            rate_limit=a.rate_limit,
                            reason=reason,
                        ),
                        AgreementState.ACTIVE,
                        a.id,
                        "import",
                    )
                    added += 1
        if added:
            await self.on_change()
        return added
