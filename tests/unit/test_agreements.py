"""Unit tests of gateway.agreements: the decision whether an agreement covers a call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.agreements import Agreement, AgreementIndex
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
