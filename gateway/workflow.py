"""The agreement workflow: which party may move an agreement from which state to which.

Theory of operation. An agreement is *requested* by the consumer's member administrator
(or a registry administrator). It becomes *active* once both the provider's member
administrator and a registry administrator approved it, in either order; where the
instance's policy makes the registry's approval automatic, the provider's approval is
enough. A pending request can be *rejected* by the provider or the registry, or withdrawn
by the consumer. An active agreement can be *suspended* and *resumed* by the provider or
the registry, *revoked* by any of the three parties, and *expires* when its validity
window ends (the registry's own sweep, acting as `Party.SYSTEM`). Rejected, revoked and
expired are final.

Every transition is one entry of `TRANSITIONS`; `apply` looks it up and either returns
the new state or raises `TransitionError`, whose `conflict` flag separates "this party may
never do that" (the API answers 403) from "not in the agreement's current state" (409).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from gateway.agreements import AgreementState as S


class Action(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    SUSPEND = "suspend"
    RESUME = "resume"
    REVOKE = "revoke"
    EXPIRE = "expire"


class Party(StrEnum):
    """On whose behalf an administrator acts on one agreement."""

    CONSUMER = "consumer"
    PROVIDER = "provider"
    REGISTRY = "registry"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    # when False, the provider's approval activates an agreement on its own
    registry_approval_required: bool = True


_PENDING = (S.REQUESTED, S.APPROVED_BY_PROVIDER, S.APPROVED_BY_REGISTRY)
_LIVE = (S.ACTIVE, S.SUSPENDED)

# (state, action) -> {party: new state}
TRANSITIONS: dict[tuple[S, Action], dict[Party, S]] = {
    (S.REQUESTED, Action.APPROVE): {
        Party.PROVIDER: S.APPROVED_BY_PROVIDER,
        Party.REGISTRY: S.APPROVED_BY_REGISTRY,
    },
    (S.APPROVED_BY_PROVIDER, Action.APPROVE): {Party.REGISTRY: S.ACTIVE},
    (S.APPROVED_BY_REGISTRY, Action.APPROVE): {Party.PROVIDER: S.ACTIVE},
    **{
        (state, Action.REJECT): {
            Party.PROVIDER: S.REJECTED,
            Party.REGISTRY: S.REJECTED,
            Party.CONSUMER: S.REJECTED,
        }
        for state in _PENDING
    },
    (S.ACTIVE, Action.SUSPEND): {Party.PROVIDER: S.SUSPENDED, Party.REGISTRY: S.SUSPENDED},
    (S.SUSPENDED, Action.RESUME): {Party.PROVIDER: S.ACTIVE, Party.REGISTRY: S.ACTIVE},
    **{
        (state, Action.REVOKE): {
            Party.PROVIDER: S.REVOKED,
            Party.REGISTRY: S.REVOKED,
            Party.CONSUMER: S.REVOKED,
        }
        for state in _LIVE
    },
    **{(state, Action.EXPIRE): {Party.SYSTEM: S.EXPIRED} for state in (*_PENDING, *_LIVE)},
}

_WAITING_FOR = {
    S.APPROVED_BY_PROVIDER: "a registry administrator",
    S.APPROVED_BY_REGISTRY: "the provider's member administrator",
}


class TransitionError(Exception):
    """The transition is not allowed; the message says why and what would be."""

    def __init__(self, message: str, *, conflict: bool) -> None:
        super().__init__(message)
        self.message = message
        # True: not allowed in the current state (409); False: never allowed to this party (403)
        self.conflict = conflict


def _states_allowing(action: Action) -> list[str]:
    return [state.value for (state, a) in TRANSITIONS if a is action]


def apply(state: S, action: Action, parties: Iterable[Party], policy: Policy) -> S:
    """The state after `action` taken by someone acting for `parties`, or `TransitionError`.

    `parties` holds every capacity the actor has on this agreement (an administrator of a
    member that both consumes and provides a service acts for both sides).
    """
    parties = tuple(parties)
    able = {p for (_, a), moves in TRANSITIONS.items() if a is action for p in moves}
    if not able.intersection(parties):
        raise TransitionError(
            f"only the {' or the '.join(sorted(able))} may {action.value} an agreement",
            conflict=False,
        )
    moves = TRANSITIONS.get((state, action))
    if moves is None:
        raise TransitionError(
            f"the agreement is {state.value}; {action.value} applies only to agreements that "
            f"are {', '.join(_states_allowing(action))}",
            conflict=True,
        )
    for party in parties:
        new = moves.get(party)
        if new is None:
            continue
        if new is S.APPROVED_BY_PROVIDER and not policy.registry_approval_required:
            new = S.ACTIVE
        return new
    waiting = _WAITING_FOR.get(state)
    if action is Action.APPROVE and waiting is not None:
        raise TransitionError(
            f"the agreement is {state.value}; it is waiting for {waiting}, not for the "
            f"{' or '.join(p.value for p in parties)}",
            conflict=True,
        )
    raise TransitionError(
        f"the agreement is {state.value}; in that state only the "
        f"{' or the '.join(sorted(moves))} may {action.value} it",
        conflict=True,
    )
