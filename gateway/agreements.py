"""Data-sharing agreements, the decision whether one covers a call, and its rate limit.

An agreement lets one client subsystem call one service for a set of purposes within a
validity window, under a legal basis, optionally at most so many requests per period.
The registry publishes the agreements that are active, suspended, revoked or expired;
`AgreementIndex.decide` is a dictionary look-up followed by a scan of the few agreements
between one client and one service. It returns the agreement that allows the call or
raises `AuthorizationError` with the most specific reason: no agreement at all, purpose
not covered, suspended, revoked, not yet valid, or expired. `RateLimiter` enforces the
optional limit with one token bucket per agreement; the caller passes the time in.

The workflow that moves an agreement between states lives in `gateway.workflow`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.errors import AuthorizationError, Code
from gateway.identifiers import ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time


class AgreementState(StrEnum):
    """Where an agreement stands in its workflow (see `gateway.workflow`)."""

    REQUESTED = "requested"
    APPROVED_BY_PROVIDER = "approved_by_provider"
    APPROVED_BY_REGISTRY = "approved_by_registry"
    ACTIVE = "active"
    REJECTED = "rejected"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"


# The states a security server needs to know about: it enforces the active ones and names
# the others in its refusals. Requested and rejected agreements never leave the registry.
PUBLISHED_STATES = frozenset(
    {
        AgreementState.ACTIVE,
        AgreementState.SUSPENDED,
        AgreementState.REVOKED,
        AgreementState.EXPIRED,
    }
)


class LegalBasisKind(StrEnum):
    LAW = "law"
    CONSENT = "consent"
    CONTRACT = "contract"


@dataclass(frozen=True, slots=True, kw_only=True)
class LegalBasis:
    kind: LegalBasisKind
    # the law and article, the consent form, or the contract it rests on
    reference: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    """At most `requests` calls in any `per_seconds` (a token bucket of that size)."""

    requests: int
    per_seconds: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Agreement:
    id: str
    client: SubsystemId
    service: ServiceId
    purposes: frozenset[str]
    valid_from: datetime
    valid_until: datetime | None = None
    state: AgreementState = AgreementState.ACTIVE
    legal_basis: LegalBasis | None = None
    data_categories: frozenset[str] = field(default_factory=frozenset)
    rate_limit: RateLimit | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": str(self.client),
            "service": str(self.service),
            "purposes": sorted(self.purposes),
            "valid_from": format_time(self.valid_from),
            "valid_until": None if self.valid_until is None else format_time(self.valid_until),
            "state": self.state.value,
            "legal_basis": None
            if self.legal_basis is None
            else {"kind": self.legal_basis.kind.value, "reference": self.legal_basis.reference},
            "data_categories": sorted(self.data_categories),
            "rate_limit": None
            if self.rate_limit is None
            else {
                "requests": self.rate_limit.requests,
                "per_seconds": self.rate_limit.per_seconds,
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Agreement:
        """Parse `to_json` output; keys added after the first release are optional."""
        until = d["valid_until"]
        basis = d.get("legal_basis")
        limit = d.get("rate_limit")
        return cls(
            id=str(d["id"]),
            client=SubsystemId.parse(d["client"]),
            service=ServiceId.parse(d["service"]),
            purposes=frozenset(str(p) for p in d["purposes"]),
            valid_from=parse_time(d["valid_from"]),
            valid_until=None if until is None else parse_time(until),
            state=AgreementState(d.get("state", "active")),
            legal_basis=None
            if basis is None
            else LegalBasis(kind=LegalBasisKind(basis["kind"]), reference=str(basis["reference"])),
            data_categories=frozenset(str(c) for c in d.get("data_categories", ())),
            rate_limit=None
            if limit is None
            else RateLimit(requests=int(limit["requests"]), per_seconds=int(limit["per_seconds"])),
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
        active = [a for a in covering if a.state is AgreementState.ACTIVE]
        for a in active:
            if a.in_force(at):
                return a
        if not active:
            raise _not_active(covering, client, service)
        upcoming = [a for a in active if at < a.valid_from]
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


def _not_active(
    covering: list[Agreement], client: SubsystemId, service: ServiceId
) -> AuthorizationError:
    """The refusal when every agreement covering the call is suspended, revoked or expired."""
    for state, code, what in (
        (AgreementState.SUSPENDED, Code.AGREEMENT_SUSPENDED, "is suspended"),
        (AgreementState.REVOKED, Code.AGREEMENT_REVOKED, "was revoked"),
    ):
        ids = [a.id for a in covering if a.state is state]
        if ids:
            return AuthorizationError(
                f"agreement {', '.join(ids)} for {client} to call {service} {what}; "
                "ask the provider or the registry administrator",
                code=code,
            )
    ids = [a.id for a in covering]
    return AuthorizationError(
        f"agreement {', '.join(ids)} for {client} to call {service} has expired; "
        "ask the provider to renew it",
        code=Code.AGREEMENT_EXPIRED,
    )


class RateLimiter:
    """One token bucket per agreement that has a rate limit.

    `check` takes a monotonic time in seconds. A bucket holds at most `requests` tokens
    and refills at `requests / per_seconds` tokens a second, so a burst of `requests`
    calls is allowed after a quiet period and the long-run rate never exceeds the limit.
    """

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        # agreement id -> (limit, tokens, last refill time)
        self._buckets: dict[str, tuple[RateLimit, float, float]] = {}

    def check(self, agreement: Agreement, now: float) -> None:
        """Take one token for this agreement, or raise `AuthorizationError(RATE_LIMITED)`."""
        limit = agreement.rate_limit
        if limit is None:
            return
        state = self._buckets.get(agreement.id)
        if state is None or state[0] != limit:
            tokens, last = float(limit.requests), now
        else:
            _, tokens, last = state
            rate = limit.requests / limit.per_seconds
            tokens = min(float(limit.requests), tokens + (now - last) * rate)
            last = now
        if tokens < 1.0:
            self._buckets[agreement.id] = (limit, tokens, last)
            wait = (1.0 - tokens) * limit.per_seconds / limit.requests
            raise AuthorizationError(
                f"agreement {agreement.id} allows {limit.requests} requests every "
                f"{limit.per_seconds} s and that many were made; retry in {wait:.1f} s",
                code=Code.RATE_LIMITED,
            )
        self._buckets[agreement.id] = (limit, tokens - 1.0, last)
