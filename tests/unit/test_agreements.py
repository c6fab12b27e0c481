"""Unit tests of gateway.agreements: the decision whether an agreement covers a call, and
the rate limiter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.agreements import (
    Agreement,
    AgreementIndex,
    AgreementState,
    LegalBasis,
    LegalBasisKind,
    RateLimit,
    RateLimiter,
)
from gateway.errors import AuthorizationError, Code, Status
from gateway.identifiers import ServiceId, SubsystemId

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)

CLIENT = SubsystemId.parse("UY/GOV/BPS/benefits")
OTHER_CLIENT = SubsystemId.parse("UY/GOV/MSP/health")
SERVICE = ServiceId.parse("UY/GOV/DNIC/identity/person/v1")
OTHER_SERVICE = ServiceId.parse("UY/GOV/DNIC/identity/person/v2")


def agreement(**changes: Any) -> Agreement:
    fields: dict[str, Any] = {
        "id": "A-1",
        "client": CLIENT,
        "service": SERVICE,
        "purposes": frozenset({"benefit-eligibility", "fraud-check"}),
        "valid_from": NOW - 10 * DAY,
        "valid_until": NOW + 10 * DAY,
    }
    fields.update(changes)
    return Agreement(**fields)


def refused(
    index: AgreementIndex,
    code: Code,
    *,
    client: SubsystemId = CLIENT,
    service: ServiceId = SERVICE,
    purpose: str = "benefit-eligibility",
    at: datetime = NOW,
) -> AuthorizationError:
    with pytest.raises(AuthorizationError) as info:
        index.decide(client, service, purpose, at)
    assert info.value.code is code
    assert info.value.status is Status.PERMISSION_DENIED
    return info.value


def test_allowed() -> None:
    """A call within an agreement's pair, purpose and window is allowed and returns it."""
    a = agreement()
    index = AgreementIndex([a])
    assert index.decide(CLIENT, SERVICE, "benefit-eligibility", NOW) is a
    assert index.decide(CLIENT, SERVICE, "fraud-check", NOW) is a


def test_open_ended_agreement_is_allowed_far_in_the_future() -> None:
    """An agreement without valid_until stays in force."""
    a = agreement(valid_until=None)
    assert AgreementIndex([a]).decide(CLIENT, SERVICE, "fraud-check", NOW + 3650 * DAY) is a


def test_no_agreement_for_the_pair() -> None:
    """With no agreement between this client and this service the call is refused: NO_AGREEMENT."""
    index = AgreementIndex(
        [agreement(client=OTHER_CLIENT), agreement(id="A-2", service=OTHER_SERVICE)]
    )
    err = refused(index, Code.NO_AGREEMENT)
    assert str(CLIENT) in err.message
    assert str(SERVICE) in err.message


def test_no_agreement_in_an_empty_index() -> None:
    """An empty index refuses every call with NO_AGREEMENT."""
    refused(AgreementIndex([]), Code.NO_AGREEMENT)


def test_service_versions_are_distinct() -> None:
    """An agreement for v2 of a service does not cover v1 nor the unversioned service."""
    index = AgreementIndex([agreement(service=OTHER_SERVICE)])
    refused(index, Code.NO_AGREEMENT)
    refused(index, Code.NO_AGREEMENT, service=ServiceId.parse("UY/GOV/DNIC/identity/person"))


def test_purpose_not_covered() -> None:
    """A purpose outside the agreement is refused with PURPOSE_NOT_COVERED, listing those covered."""
    err = refused(AgreementIndex([agreement()]), Code.PURPOSE_NOT_COVERED, purpose="marketing")
    assert "'marketing'" in err.message
    assert "benefit-eligibility" in err.message
    assert "fraud-check" in err.message


def test_purpose_match_is_exact() -> None:
    """Purposes are compared exactly: case and prefixes do not match."""
    index = AgreementIndex([agreement()])
    refused(index, Code.PURPOSE_NOT_COVERED, purpose="Benefit-Eligibility")
    refused(index, Code.PURPOSE_NOT_COVERED, purpose="benefit")


def test_not_yet_valid() -> None:
    """Before valid_from the call is refused with AGREEMENT_NOT_YET_VALID, naming the start."""
    a = agreement(valid_from=NOW + 2 * DAY)
    err = refused(AgreementIndex([a]), Code.AGREEMENT_NOT_YET_VALID)
    assert "2025-06-03T12:00:00.000000Z" in err.message


def test_valid_from_is_inclusive() -> None:
    """At exactly valid_from the agreement is in force."""
    a = agreement(valid_from=NOW)
    assert AgreementIndex([a]).decide(CLIENT, SERVICE, "fraud-check", NOW) is a
    refused(AgreementIndex([a]), Code.AGREEMENT_NOT_YET_VALID, at=NOW - timedelta(microseconds=1))


def test_expired() -> None:
    """After valid_until the call is refused with AGREEMENT_EXPIRED."""
    a = agreement(valid_from=NOW - 20 * DAY, valid_until=NOW - DAY)
    refused(AgreementIndex([a]), Code.AGREEMENT_EXPIRED)


def test_valid_until_is_exclusive() -> None:
    """At exactly valid_until the agreement has expired; a microsecond before it is in force."""
    a = agreement(valid_until=NOW)
    index = AgreementIndex([a])
    refused(index, Code.AGREEMENT_EXPIRED, at=NOW)
    assert index.decide(CLIENT, SERVICE, "fraud-check", NOW - timedelta(microseconds=1)) is a


def test_expired_and_in_force_for_the_same_pair_is_allowed() -> None:
    """With one expired and one in-force agreement for the same pair, the call is allowed."""
    old = agreement(id="A-old", valid_from=NOW - 400 * DAY, valid_until=NOW - 30 * DAY)
    new = agreement(id="A-new", valid_from=NOW - 30 * DAY, valid_until=NOW + 300 * DAY)
    assert AgreementIndex([old, new]).decide(CLIENT, SERVICE, "fraud-check", NOW) is new
    assert AgreementIndex([new, old]).decide(CLIENT, SERVICE, "fraud-check", NOW) is new


def test_in_force_agreement_must_cover_the_purpose() -> None:
    """An in-force agreement for another purpose does not rescue an expired one for this purpose."""
    old = agreement(
        id="A-old",
        purposes=frozenset({"fraud-check"}),
        valid_from=NOW - 400 * DAY,
        valid_until=NOW - DAY,
    )
    current = agreement(id="A-new", purposes=frozenset({"benefit-eligibility"}))
    index = AgreementIndex([old, current])
    refused(index, Code.AGREEMENT_EXPIRED, purpose="fraud-check")
    assert index.decide(CLIENT, SERVICE, "benefit-eligibility", NOW) is current


def test_expired_and_upcoming_reports_not_yet_valid() -> None:
    """Between an expired agreement and its renewal, the refusal says when the renewal starts."""
    old = agreement(id="A-old", valid_from=NOW - 400 * DAY, valid_until=NOW - DAY)
    renewal = agreement(id="A-new", valid_from=NOW + DAY, valid_until=None)
    err = refused(AgreementIndex([old, renewal]), Code.AGREEMENT_NOT_YET_VALID)
    assert "2025-06-02T12:00:00.000000Z" in err.message


def test_index_len_and_iter() -> None:
    """The index keeps every agreement, in order."""
    items = [agreement(id="A-1"), agreement(id="A-2", client=OTHER_CLIENT)]
    index = AgreementIndex(items)
    assert len(index) == 2
    assert list(index) == items


@pytest.mark.parametrize("until", [NOW + DAY, None])
def test_agreement_json_round_trip(until: datetime | None) -> None:
    """Agreement.from_json(a.to_json()) == a, with purposes sorted in the JSON."""
    a = agreement(valid_until=until)
    d = a.to_json()
    assert d["purposes"] == ["benefit-eligibility", "fraud-check"]
    assert Agreement.from_json(d) == a


# ---- agreement states -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (AgreementState.SUSPENDED, Code.AGREEMENT_SUSPENDED),
        (AgreementState.REVOKED, Code.AGREEMENT_REVOKED),
        (AgreementState.EXPIRED, Code.AGREEMENT_EXPIRED),
    ],
)
def test_agreement_not_active_is_refused_naming_it(state: AgreementState, code: Code) -> None:
    """A suspended, revoked or expired agreement refuses calls in its window, naming its id."""
    a = agreement(id="AGR-7", state=state)
    assert a.in_force(NOW)
    err = refused(AgreementIndex([a]), code)
    assert "AGR-7" in err.message
    assert str(CLIENT) in err.message
    assert str(SERVICE) in err.message


@pytest.mark.parametrize(
    ("states", "code"),
    [
        ((AgreementState.SUSPENDED, AgreementState.REVOKED), Code.AGREEMENT_SUSPENDED),
        ((AgreementState.SUSPENDED, AgreementState.EXPIRED), Code.AGREEMENT_SUSPENDED),
        ((AgreementState.REVOKED, AgreementState.EXPIRED), Code.AGREEMENT_REVOKED),
    ],
)
def test_most_specific_state_is_reported(
    states: tuple[AgreementState, AgreementState], code: Code
) -> None:
    """Of several inactive agreements, the refusal names the one that can be acted on first."""
    first = agreement(id="AGR-1", state=states[0])
    second = agreement(id="AGR-2", state=states[1])
    for order in ([first, second], [second, first]):
        err = refused(AgreementIndex(order), code)
        assert "AGR-1" in err.message
        assert "AGR-2" not in err.message


def test_active_agreement_wins_over_a_revoked_one() -> None:
    """With a revoked and an active agreement for the same pair, the active one allows the call."""
    revoked = agreement(id="AGR-old", state=AgreementState.REVOKED)
    active = agreement(id="AGR-new")
    assert AgreementIndex([revoked, active]).decide(CLIENT, SERVICE, "fraud-check", NOW) is active
    assert AgreementIndex([active, revoked]).decide(CLIENT, SERVICE, "fraud-check", NOW) is active


def test_inactive_agreement_for_another_purpose_is_purpose_not_covered() -> None:
    """A suspended agreement does not change the answer for a purpose it does not cover."""
    a = agreement(state=AgreementState.SUSPENDED)
    refused(AgreementIndex([a]), Code.PURPOSE_NOT_COVERED, purpose="marketing")


def test_agreement_json_round_trip_with_every_field() -> None:
    """Every field, state, legal basis, data categories and rate limit included, survives JSON."""
    a = agreement(
        state=AgreementState.SUSPENDED,
        legal_basis=LegalBasis(kind=LegalBasisKind.LAW, reference="Ley 18.331 art. 9"),
        data_categories=frozenset({"identity", "address"}),
        rate_limit=RateLimit(requests=3, per_seconds=60),
    )
    d = a.to_json()
    assert d["state"] == "suspended"
    assert d["legal_basis"] == {"kind": "law", "reference": "Ley 18.331 art. 9"}
    assert d["data_categories"] == ["address", "identity"]
    assert d["rate_limit"] == {"requests": 3, "per_seconds": 60}
    assert Agreement.from_json(d) == a


def test_agreement_from_json_without_the_new_keys() -> None:
    """A first-release agreement (no state, basis, categories or limit) reads as active and unlimited."""
    d = agreement().to_json()
    for key in ("state", "legal_basis", "data_categories", "rate_limit"):
        del d[key]
    a = Agreement.from_json(d)
    assert a == agreement()
    assert a.state is AgreementState.ACTIVE
    assert a.legal_basis is None
    assert a.data_categories == frozenset()
    assert a.rate_limit is None


# ---- rate limit -----------------------------------------------------------------------


def limited(requests: int, per_seconds: int, agreement_id: str = "A-1") -> Agreement:
    return agreement(
        id=agreement_id, rate_limit=RateLimit(requests=requests, per_seconds=per_seconds)
    )


def rate_limited(limiter: RateLimiter, a: Agreement, now: float) -> AuthorizationError:
    with pytest.raises(AuthorizationError) as info:
        limiter.check(a, now)
    assert info.value.code is Code.RATE_LIMITED
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    return info.value


def test_burst_of_requests_then_rate_limited() -> None:
    """`requests` calls at once are allowed; the next is RATE_LIMITED, saying the limit and when to retry."""
    limiter = RateLimiter()
    a = limited(3, 60, "AGR-9")
    for _ in range(3):
        limiter.check(a, 1000.0)
    err = rate_limited(limiter, a, 1000.0)
    assert "AGR-9" in err.message
    assert "3 requests every 60 s" in err.message
    assert "retry in 20.0 s" in err.message


def test_refused_call_takes_no_token() -> None:
    """Refused calls do not delay the refill: one token is back per_seconds/requests after the burst."""
    limiter = RateLimiter()
    a = limited(4, 2)  # one token every 0.5 s
    for _ in range(4):
        limiter.check(a, 10.0)
    for t in (10.0, 10.1, 10.25, 10.4):
        rate_limited(limiter, a, t)
    limiter.check(a, 10.5)
    rate_limited(limiter, a, 10.5)


def test_bucket_refills_one_token_every_per_seconds_over_requests() -> None:
    """After a burst, one call is allowed every per_seconds/requests seconds, and not sooner."""
    limiter = RateLimiter()
    a = limited(4, 2)  # one token every 0.5 s
    for _ in range(4):
        limiter.check(a, 0.0)
    err = rate_limited(limiter, a, 0.25)
    assert "retry in 0.2 s" in err.message
    limiter.check(a, 0.5)
    rate_limited(limiter, a, 0.75)
    limiter.check(a, 1.0)


def test_bucket_refills_to_at_most_requests() -> None:
    """A long quiet period refills the bucket to `requests` tokens, no more."""
    limiter = RateLimiter()
    a = limited(3, 60)
    limiter.check(a, 0.0)
    for _ in range(3):
        limiter.check(a, 10_000.0)
    rate_limited(limiter, a, 10_000.0)


def test_each_agreement_has_its_own_bucket() -> None:
    """Exhausting one agreement's limit does not refuse calls under another agreement."""
    limiter = RateLimiter()
    first, second = limited(2, 60, "AGR-1"), limited(2, 60, "AGR-2")
    limiter.check(first, 0.0)
    limiter.check(first, 0.0)
    rate_limited(limiter, first, 0.0)
    limiter.check(second, 0.0)
    limiter.check(second, 0.0)
    rate_limited(limiter, second, 0.0)


def test_changed_limit_starts_a_new_full_bucket() -> None:
    """When an agreement's limit changes (a new configuration), its bucket starts full at the new size."""
    limiter = RateLimiter()
    before, after = limited(2, 60), limited(5, 60)
    limiter.check(before, 0.0)
    limiter.check(before, 0.0)
    rate_limited(limiter, before, 0.0)
    for _ in range(5):
        limiter.check(after, 0.0)
    rate_limited(limiter, after, 0.0)


def test_agreement_without_limit_is_never_refused() -> None:
    """Without a rate limit, any number of calls at the same moment is allowed."""
    limiter = RateLimiter()
    a = agreement()
    for _ in range(10_000):
        limiter.check(a, 0.0)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.integers(min_value=1, max_value=10),
    per_seconds=st.integers(min_value=1, max_value=100),
    steps=st.lists(st.floats(min_value=0.0, max_value=1.5), min_size=1, max_size=200),
)
def test_calls_in_any_window_stay_within_two_buckets(
    requests: int, per_seconds: int, steps: list[float]
) -> None:
    """In any closed window of per_seconds at most 2*requests calls pass: a full bucket plus one refill.

    Over a window [t, t + W], W = per_seconds, the n calls allowed each take one token; the
    bucket holds at most `requests` tokens at t and gains at most rate*W = `requests` during
    the window, and never goes negative, so n <= 2*requests. The bound is reached (a full
    burst at t and another at t + W), so no smaller constant holds; more generally the calls
    in [a, b] are at most requests + rate*(b - a).
    """
    limiter = RateLimiter()
    a = limited(requests, per_seconds)
    rate = requests / per_seconds
    allowed: list[float] = []
    refusals: set[Code] = set()
    now = 0.0
    for step in steps:
        now += step * per_seconds / requests  # steps of up to 1.5 refill intervals
        try:
            limiter.check(a, now)
        except AuthorizationError as err:
            refusals.add(err.code)
        else:
            allowed.append(now)
    assert refusals <= {Code.RATE_LIMITED}
    for i, start in enumerate(allowed):
        in_window = [t for t in allowed[i:] if t <= start + per_seconds]
        assert len(in_window) <= 2 * requests
        for j, end in enumerate(allowed[i:], start=1):
            assert j <= requests + rate * (end - start) + 1e-9
