"""`gateway audit trace` and the console's trace page compare what the consumer's and the
provider's servers logged of one exchange (gateway_client.audit): a side that logged
another signed header, signature, body digest or signer, or none at all, is named."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_client.audit import SIGNED_FIELDS, compare_sides, trace_checks


def record(kind: str, role: str, **changed: Any) -> dict[str, Any]:
    fields = {
        "kind": kind,
        "role": role,
        "header": f"{kind} header",
        "signature": f"{kind} signature",
        "body_sha256": "ab" * 32,
        "signer_certificate_sha256": "cd" * 32,
        "verified": True,
        "problems": [],
        "chain": "main",
        "seq": 1,
    }
    return {**fields, **changed}


def both_sides(**provider_changes: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("ss-msp", record("request", "consumer")),
        ("ss-dnic", record("request", "provider", **provider_changes)),
        ("ss-dnic", record("response", "provider")),
        ("ss-msp", record("response", "consumer")),
    ]


def test_the_same_records_on_both_sides_are_consistent() -> None:
    checks = trace_checks(both_sides())
    assert [ok for ok, _ in checks] == [True, True]


@pytest.mark.parametrize("field", SIGNED_FIELDS)
def test_a_side_that_logged_another_signed_field_is_named(field: str) -> None:
    checks = trace_checks(both_sides(**{field: "something else"}))
    assert checks[0] == (False, f"request: consumer and provider logged different {field}")
    assert checks[1][0] is True
    (side,) = [c for c in compare_sides(both_sides(**{field: "x"})) if c.kind == "request"]
    assert side.differ == (field,)


def test_a_side_that_logged_nothing_is_named() -> None:
    found = [f for f in both_sides() if not (f[0] == "ss-dnic" and f[1]["kind"] == "request")]
    checks = trace_checks(found)
    assert checks[0] == (False, "request: the provider's signed request is not among the records")


def test_a_record_that_does_not_verify_is_named_even_when_both_sides_agree() -> None:
    found = both_sides()
    found[0] = ("ss-msp", record("request", "consumer", verified=False, problems=["hash"]))
    checks = trace_checks(found)
    assert (False, "ss-msp main#1: does not verify: hash") in checks
