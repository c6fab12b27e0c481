"""Data-sharing agreements and the decision whether one covers a call.

An agreement lets one client subsystem call one service for a set of purposes within a
validity window. `AgreementIndex.decide` is a dictionary look-up followed by a scan of
the few agreements between one client and one service; it returns the agreement that
allows the call or raises `AuthorizationError` with the most specific reason: no
agreement at all, purpose not covered, not yet valid, or expired.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.errors import AuthorizationError, Code
from gateway.identifiers import ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time


@dataclass(frozen=True, slots=True, kw_only=True)
class Agreement:
    id: str
    client: SubsystemId
    service: ServiceId
    purposes: frozenset[str]
    valid_from: datetime
    valid_until: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": str(self.client),
            "service": str(self.service),
            "purposes": sorted(self.purposes),
            "valid_from": format_time(self.valid_from),
            "valid_until": None if self.valid_until is None else format_time(self.valid_until),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Agreement:
        until = d["valid_until"]
        return cls(
            id=str(d["id"]),
            client=SubsystemId.parse(d["client"]),
            service=ServiceId.parse(d["service"]),
            purposes=frozenset(str(p) for p in d["purposes"]),
            valid_from=parse_time(d["valid_from"]),
            valid_until=None if until is None else parse_time(until),
        )

    def in_force(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_until is None or at < self.valid_until)


class AgreementIndex:
    """Agreements indexed by (client, service)."""

    __slots__ = ("_all", "_by_pair")

    def __init__(self, agreements: Iterable[Agreement]) -> None:
        self._all = tuple(agreements)
        self._by_pair: dict[tuple[SubsystemId, ServiceId], list[Agreement]] = {}
        for a in self._all:
            self._by_pair.setdefault((a.client, a.service), []).append(a)

    def __iter__(self) -> Any:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def decide(
        self, client: SubsystemId, service: ServiceId, purpose: str, at: datetime
    ) -> Agreement:
        """The agreement that allows this call, or `AuthorizationError` saying why none does."""
        candidates = self._by_pair.get((client, service))
        if not candidates:
            raise AuthorizationError(
                f"no data-sharing agreement lets {client} call {service}; "
                "request one from the service's provider",
                code=Code.NO_AGREEMENT,
            )
        covering = [a for a in candidates if purpose in a.purposes]
        if not covering:
            allowed = sorted({p for a in candidates for p in a.purposes})
            raise AuthorizationError(
                f"the agreement between {client} and {service} does not cover the purpose "
                f"{purpose!r}; it covers {', '.join(allowed)}",
                code=Code.PURPOSE_NOT_COVERED,
            )
        for a in covering:
            if a.in_force(at):
                return a
        upcoming = [a for a in covering if at < a.valid_from]
        if upcoming:
            start = min(a.valid_from for a in upcoming)
            raise AuthorizationError(
                f"the agreement for {client} to call {service} for {purpose!r} is valid only "
                f"from {format_time(start)}",
                code=Code.AGREEMENT_NOT_YET_VALID,
            )
        raise AuthorizationError(
            f"the agreement for {client} to call {service} for {purpose!r} has expired; "
            "ask the provider to renew it",
            code=Code.AGREEMENT_EXPIRED,
        )
