"""Unit tests of gateway.workflow: who may move an agreement from which state to which."""

from __future__ import annotations

import itertools

import pytest

from gateway.agreements import AgreementState as S
from gateway.workflow import Action, Party, Policy, TransitionError, apply

REGISTRY_APPROVES = Policy()
AUTOMATIC = Policy(registry_approval_required=False)

# An outcome is the new state, or one of these two refusals.
NEVER = "never"  # this party may never take this action (conflict False, 403)
NOT_NOW = "not now"  # the party may take it, but not in this state (conflict True, 409)
Outcome = S | str

# The expected outcome of every state x action, for the parties in this order.
PARTIES = (Party.CONSUMER, Party.PROVIDER, Party.REGISTRY, Party.SYSTEM)
EXPECTED: dict[S, dict[Action, tuple[Outcome, Outcome, Outcome, Outcome]]] = {
    S.REQUESTED: {
        Action.APPROVE: (NEVER, S.APPROVED_BY_PROVIDER, S.APPROVED_BY_REGISTRY, NEVER),
        Action.REJECT: (S.REJECTED, S.REJECTED, S.REJECTED, NEVER),
        Action.SUSPEND: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.RESUME: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REVOKE: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
        Action.EXPIRE: (NEVER, NEVER, NEVER, S.EXPIRED),
    },
    S.APPROVED_BY_PROVIDER: {
        Action.APPROVE: (NEVER, NOT_NOW, S.ACTIVE, NEVER),
        Action.REJECT: (S.REJECTED, S.REJECTED, S.REJECTED, NEVER),
        Action.SUSPEND: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.RESUME: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REVOKE: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
        Action.EXPIRE: (NEVER, NEVER, NEVER, S.EXPIRED),
    },
    S.APPROVED_BY_REGISTRY: {
        Action.APPROVE: (NEVER, S.ACTIVE, NOT_NOW, NEVER),
        Action.REJECT: (S.REJECTED, S.REJECTED, S.REJECTED, NEVER),
        Action.SUSPEND: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.RESUME: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REVOKE: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
        Action.EXPIRE: (NEVER, NEVER, NEVER, S.EXPIRED),
    },
    S.ACTIVE: {
        Action.APPROVE: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REJECT: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
        Action.SUSPEND: (NEVER, S.SUSPENDED, S.SUSPENDED, NEVER),
        Action.RESUME: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REVOKE: (S.REVOKED, S.REVOKED, S.REVOKED, NEVER),
        Action.EXPIRE: (NEVER, NEVER, NEVER, S.EXPIRED),
    },
    S.SUSPENDED: {
        Action.APPROVE: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.REJECT: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
        Action.SUSPEND: (NEVER, NOT_NOW, NOT_NOW, NEVER),
        Action.RESUME: (NEVER, S.ACTIVE, S.ACTIVE, NEVER),
        Action.REVOKE: (S.REVOKED, S.REVOKED, S.REVOKED, NEVER),
        Action.EXPIRE: (NEVER, NEVER, NEVER, S.EXPIRED),
    },
    **{
        final: {
            Action.APPROVE: (NEVER, NOT_NOW, NOT_NOW, NEVER),
            Action.REJECT: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
            Action.SUSPEND: (NEVER, NOT_NOW, NOT_NOW, NEVER),
            Action.RESUME: (NEVER, NOT_NOW, NOT_NOW, NEVER),
            Action.REVOKE: (NOT_NOW, NOT_NOW, NOT_NOW, NEVER),
            Action.EXPIRE: (NEVER, NEVER, NEVER, NOT_NOW),
        }
        for final in (S.REJECTED, S.REVOKED, S.EXPIRED)
    },
}

FINAL = (S.REJECTED, S.REVOKED, S.EXPIRED)


def expected(state: S, action: Action, party: Party, policy: Policy) -> Outcome:
    outcome = EXPECTED[state][action][PARTIES.index(party)]
    if outcome is S.APPROVED_BY_PROVIDER and not policy.registry_approval_required:
        return S.ACTIVE
    return outcome


def test_table_covers_every_state_action_and_party() -> None:
    """The expected table has an entry for every state and every action."""
    assert set(EXPECTED) == set(S)
    assert all(set(row) == set(Action) for row in EXPECTED.values())
    assert set(PARTIES) == set(Party)


@pytest.mark.parametrize("policy", [REGISTRY_APPROVES, AUTOMATIC], ids=["registry", "automatic"])
@pytest.mark.parametrize(
    ("state", "action", "party"),
    list(itertools.product(S, Action, Party)),
    ids=lambda v: str(v),
)
def test_every_transition(state: S, action: Action, party: Party, policy: Policy) -> None:
    """Each (state, action, party) gives the tabled new state, a 403 refusal or a 409 naming the state."""
    outcome = expected(state, action, party, policy)
    if isinstance(outcome, S):
        assert apply(state, action, [party], policy) is outcome
        return
    with pytest.raises(TransitionError) as info:
        apply(state, action, [party], policy)
    err = info.value
    assert err.conflict is (outcome == NOT_NOW)
    assert str(err) == err.message
    assert action.value in err.message
    if err.conflict:
        assert f"the agreement is {state.value}" in err.message


@pytest.mark.parametrize("state", FINAL)
def test_final_states_accept_nothing(state: S) -> None:
    """Rejected, revoked and expired agreements refuse every action by any party, even all at once."""
    for action, party in itertools.product(Action, Party):
        with pytest.raises(TransitionError):
            apply(state, action, [party], REGISTRY_APPROVES)
    for action in Action:
        with pytest.raises(TransitionError) as info:
            apply(state, action, PARTIES, AUTOMATIC)
        assert info.value.conflict


def test_provider_then_registry_activates() -> None:
    """Requested, approved by the provider, then by the registry: active."""
    state = apply(S.REQUESTED, Action.APPROVE, [Party.PROVIDER], REGISTRY_APPROVES)
    assert state is S.APPROVED_BY_PROVIDER
    assert apply(state, Action.APPROVE, [Party.REGISTRY], REGISTRY_APPROVES) is S.ACTIVE


def test_registry_then_provider_activates() -> None:
    """Requested, approved by the registry, then by the provider: active."""
    state = apply(S.REQUESTED, Action.APPROVE, [Party.REGISTRY], REGISTRY_APPROVES)
    assert state is S.APPROVED_BY_REGISTRY
    assert apply(state, Action.APPROVE, [Party.PROVIDER], REGISTRY_APPROVES) is S.ACTIVE


def test_automatic_policy_provider_approval_activates() -> None:
    """Where the registry's approval is automatic, the provider's approval alone activates."""
    assert apply(S.REQUESTED, Action.APPROVE, [Party.PROVIDER], AUTOMATIC) is S.ACTIVE


def test_full_life_of_an_agreement() -> None:
    """Requested -> active -> suspended -> active -> revoked, then nothing more."""
    state = S.REQUESTED
    for action, party, after in [
        (Action.APPROVE, Party.REGISTRY, S.APPROVED_BY_REGISTRY),
        (Action.APPROVE, Party.PROVIDER, S.ACTIVE),
        (Action.SUSPEND, Party.PROVIDER, S.SUSPENDED),
        (Action.RESUME, Party.REGISTRY, S.ACTIVE),
        (Action.REVOKE, Party.CONSUMER, S.REVOKED),
    ]:
        state = apply(state, action, [party], REGISTRY_APPROVES)
        assert state is after
    with pytest.raises(TransitionError):
        apply(state, Action.RESUME, [Party.PROVIDER], REGISTRY_APPROVES)


def test_second_approval_by_the_same_side_says_who_is_awaited() -> None:
    """A provider approving twice is a conflict that says the registry's approval is awaited."""
    with pytest.raises(TransitionError) as info:
        apply(S.APPROVED_BY_PROVIDER, Action.APPROVE, [Party.PROVIDER], REGISTRY_APPROVES)
    assert info.value.conflict
    assert "approved_by_provider" in info.value.message
    assert "registry administrator" in info.value.message


def test_actor_with_several_capacities_uses_the_one_that_may() -> None:
    """An administrator acting for consumer and provider may approve as the provider."""
    parties = [Party.CONSUMER, Party.PROVIDER]
    assert apply(S.REQUESTED, Action.APPROVE, parties, REGISTRY_APPROVES) is (
        S.APPROVED_BY_PROVIDER
    )
    assert apply(S.APPROVED_BY_REGISTRY, Action.APPROVE, parties, REGISTRY_APPROVES) is S.ACTIVE


def test_forbidden_party_is_not_a_conflict() -> None:
    """A consumer approving is refused as never allowed (403), naming who may."""
    with pytest.raises(TransitionError) as info:
        apply(S.REQUESTED, Action.APPROVE, [Party.CONSUMER], REGISTRY_APPROVES)
    assert not info.value.conflict
    assert "provider" in info.value.message
    assert "registry" in info.value.message
