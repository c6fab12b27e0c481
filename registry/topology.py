"""The TOML topology file: the registry's seed content at this stage.

    [[members]]      id, name
    [[servers]]      id, address, auth_certificate (PEM path), subsystems
    [[services]]     id, description, methods, streams = {method = kind} (optional: the
                     streaming methods, kind server, client or bidi), data_categories,
                     legal_basis, contact
    [[agreements]]   id, client, service, purposes, valid_from, valid_until (optional),
                     legal_basis = {kind, reference}, data_categories,
                     rate_limit = {requests, per_seconds} (optional)

Relative certificate paths resolve against the topology file's folder. Times are TOML
datetimes with a timezone (or RFC 3339 strings). Every error names the entry and key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.agreements import Agreement, LegalBasis, LegalBasisKind, RateLimit
from gateway.configuration import Member, SecurityServer, Service, check_streams
from gateway.envelope import check_method, check_purpose
from gateway.errors import ConfigFileError, GatewayError
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    members: tuple[Member, ...]
    servers: tuple[SecurityServer, ...]
    services: tuple[Service, ...]
    agreements: tuple[Agreement, ...]
    # catalogue details of services that the configuration does not carry
    service_details: dict[ServiceId, dict[str, Any]] = field(default_factory=dict)


_KEYS = {
    "members": {"id", "name"},
    "servers": {"id", "address", "auth_certificate", "subsystems"},
    "services": {
        "id",
        "description",
        "methods",
        "streams",
        "data_categories",
        "legal_basis",
        "contact",
    },
    "agreements": {
        "id",
        "client",
        "service",
        "purposes",
        "valid_from",
        "valid_until",
        "legal_basis",
        "data_categories",
        "rate_limit",
    },
}


def _time(value: Any, where: str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigFileError(f"{where}: expected a date-time with a time zone")
    return value.astimezone(UTC)


def load_topology(path: Path) -> Topology:
    """Parse and check a topology file."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    unknown = set(doc) - set(_KEYS)
    if unknown:
        raise ConfigFileError(f"{path}: unknown section(s) {sorted(unknown)}")
    for section, keys in _KEYS.items():
        for i, entry in enumerate(doc.get(section, [])):
            extra = set(entry) - keys
            if extra:
                raise ConfigFileError(f"{path}: {section}[{i}]: unknown key(s) {sorted(extra)}")
    base = path.parent
    where = ""
    try:
        members = []
        for i, m in enumerate(doc.get("members", [])):
            where = f"members[{i}]"
            members.append(Member(id=MemberId.parse(m["id"]), name=str(m["name"])))
        servers = []
        for i, s in enumerate(doc.get("servers", [])):
            where = f"servers[{i}]"
            cert_path = Path(s["auth_certificate"])
            cert_path = cert_path if cert_path.is_absolute() else base / cert_path
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            servers.append(
                SecurityServer(
                    id=SecurityServerId.parse(s["id"]),
                    address=str(s["address"]),
                    auth_certificate=cert.public_bytes(serialization.Encoding.DER),
                    subsystems=tuple(SubsystemId.parse(x) for x in s["subsystems"]),
                )
            )
        services = []
        service_details: dict[ServiceId, dict[str, Any]] = {}
        for i, s in enumerate(doc.get("services", [])):
            where = f"services[{i}]"
            service = Service(
                id=ServiceId.parse(s["id"]),
                description=str(s.get("description", "")),
                methods=tuple(check_method(m) for m in s.get("methods", [])),
            )
            streams = s.get("streams", {})
            if not isinstance(streams, dict):
                raise ValueError("streams must be a table {method path = kind}")
            service = replace(
                service,
                streams=check_streams(
                    {check_method(m): str(k) for m, k in streams.items()}, service.methods
                ),
            )
            services.append(service)
            service_details[service.id] = {
                "data_categories": [str(c) for c in s.get("data_categories", [])],
                "legal_basis": str(s.get("legal_basis", "")),
                "contact": str(s.get("contact", "")),
            }
        agreements = []
        for i, a in enumerate(doc.get("agreements", [])):
            where = f"agreements[{i}]"
            until = a.get("valid_until")
            basis = a.get("legal_basis")
            limit = a.get("rate_limit")
            agreements.append(
                Agreement(
                    id=str(a["id"]),
                    client=SubsystemId.parse(a["client"]),
                    service=ServiceId.parse(a["service"]),
                    purposes=frozenset(check_purpose(p) for p in a["purposes"]),
                    valid_from=_time(a["valid_from"], f"{where}.valid_from"),
                    valid_until=None if until is None else _time(until, f"{where}.valid_until"),
                    legal_basis=None
                    if basis is None
                    else LegalBasis(
                        kind=LegalBasisKind(basis["kind"]), reference=str(basis["reference"])
                    ),
                    data_categories=frozenset(str(c) for c in a.get("data_categories", ())),
                    rate_limit=None
                    if limit is None
                    else RateLimit(
                        requests=int(limit["requests"]), per_seconds=int(limit["per_seconds"])
                    ),
                )
            )
    except KeyError as exc:
        raise ConfigFileError(f"{path}: {where}: missing key {exc}") from None
    except (GatewayError, OSError, ValueError, TypeError) as exc:
        raise ConfigFileError(f"{path}: {where}: {exc}") from None
    known_members = {m.id for m in members}
    for s in servers:
        if s.id.owner not in known_members:
            raise ConfigFileError(f"{path}: server {s.id} belongs to an unknown member")
    return Topology(
        members=tuple(members),
        servers=tuple(servers),
        services=tuple(services),
        agreements=tuple(agreements),
        service_details=service_details,
    )


def load_topology_ids(
    path: Path,
) -> tuple[str, list[MemberId], dict[SecurityServerId, list[SubsystemId]]]:
    """(instance, members, servers with their subsystems) of a topology, without reading certificates."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        members = [MemberId.parse(m["id"]) for m in doc.get("members", [])]
        servers = {
            SecurityServerId.parse(s["id"]): [SubsystemId.parse(x) for x in s.get("subsystems", [])]
            for s in doc.get("servers", [])
        }
    except (OSError, tomllib.TOMLDecodeError, KeyError, GatewayError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    if not members:
        raise ConfigFileError(f"{path}: names no member")
    return members[0].instance, members, servers
