"""Unit tests of gateway.audit: the hash chains of the message log and the admin log."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.audit import (
    ADMIN_FIELDS,
    ADMIN_LOG,
    GENESIS,
    MESSAGE_LOG,
    RECORD_FIELDS,
    ChainBrokenError,
    ChainedRecord,
    ChainFormat,
    ChainHead,
    FieldValue,
    RecordKind,
    Role,
    record_hash,
    verify_chain,
)
from gateway.errors import AuditError, Code, Status

N = 20


def fields_for(i: int) -> dict[str, FieldValue]:
    """The fields of record i: every key of RECORD_FIELDS, a mix of str, int, bytes and None."""
    refused = i % 5 == 0
    kind = RecordKind.REFUSAL if refused else (RecordKind.REQUEST if i % 2 else RecordKind.RESPONSE)
    return {
        "logged_at": f"2025-06-01T12:00:{i:02d}.000000Z",
        "message_id": f"msg-{i:03d}",
        "kind": kind.value,
        "role": (Role.CONSUMER if i % 2 else Role.PROVIDER).value,
        "client": "UY/GOV/BPS/benefits",
        "service": "UY/GOV/DNIC/identity/person/v1",
        "method": "/identity.v1.PersonService/GetPerson",
        "purpose": "benefit-eligibility",
        "agreement_id": None if refused else "AGR-2025-0007",
        "user_id": None if i % 3 else f"user-{i}",
        "subject_ref": None,
        "peer": "UY/GOV/DNIC/ss1",
        "header": f'{{"message_id":"msg-{i:03d}"}}'.encode(),
        "signature": bytes([i]) * 70,
        "signer_certificate_sha256": hashlib.sha256(b"cert").hexdigest(),
        "signer_ocsp_sha256": None if refused else hashlib.sha256(b"ocsp").hexdigest(),
        "body_sha256": hashlib.sha256(bytes([i])).hexdigest(),
        "status": 7 if refused else 0,
        "error_code": "no_agreement" if refused else None,
        "error_message": "refused" if refused else None,
    }


def build_chain(n: int = N) -> list[ChainedRecord]:
    head = ChainHead()
    return [head.link(fields_for(i)) for i in range(1, n + 1)]


def broken_at(records: list[ChainedRecord], head: ChainHead | None = None) -> ChainBrokenError:
    with pytest.raises(ChainBrokenError) as info:
        verify_chain(records, head)
    return info.value


# ---- building and verifying -----------------------------------------------------------


def test_fields_cover_every_record_field() -> None:
    """The test records use exactly RECORD_FIELDS with str, int, bytes and None values."""
    f = fields_for(5)
    assert set(f) == set(RECORD_FIELDS)
    assert {type(v) for v in f.values()} == {str, int, bytes, type(None)}


def test_link_numbers_and_links_records() -> None:
    """ChainHead.link numbers records from 1 and links each to the previous hash."""
    records = build_chain()
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert records[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert len({r.hash for r in records}) == N
    assert all(r.hash == record_hash(r.seq, r.prev_hash, r.fields) for r in records)


def test_verify_chain_passes() -> None:
    """An intact chain of 20 records verifies and yields head (21, hash of record 20)."""
    records = build_chain()
    head = verify_chain(records)
    assert head.next_seq == N + 1
    assert head.last_hash == records[-1].hash


def test_verify_empty_chain_returns_genesis() -> None:
    """Verifying no records returns the genesis head."""
    head = verify_chain([])
    assert head == ChainHead(1, GENESIS)


def test_record_hash_depends_on_every_input() -> None:
    """The hash changes with the sequence number, the previous hash and any field."""
    f = fields_for(1)
    base = record_hash(1, GENESIS, f)
    assert record_hash(2, GENESIS, f) != base
    assert record_hash(1, b"\x01" * 32, f) != base
    for key in RECORD_FIELDS:
        changed = dict(f)
        changed[key] = "changed" if f[key] != "changed" else "other"
        assert record_hash(1, GENESIS, changed) != base, key


def test_record_hash_is_independent_of_field_order() -> None:
    """The hash of a record does not depend on the insertion order of its fields."""
    f = fields_for(3)
    reordered = dict(reversed(list(f.items())))
    assert record_hash(3, GENESIS, reordered) == record_hash(3, GENESIS, f)


@pytest.mark.parametrize(
    "fields",
    [
        {k: None for k in RECORD_FIELDS if k != "status"},
        {**{k: None for k in RECORD_FIELDS}, "extra": 1},
        {},
        {k: None for k in RECORD_FIELDS[:-1]} | {"error_msg": None},
    ],
    ids=["missing", "extra", "empty", "renamed"],
)
def test_record_hash_rejects_wrong_field_set(fields: dict[str, FieldValue]) -> None:
    """record_hash refuses a field set that is not exactly RECORD_FIELDS."""
    with pytest.raises(ValueError, match="exactly"):
        record_hash(1, GENESIS, fields)


def test_link_rejects_wrong_field_set() -> None:
    """ChainHead.link refuses a record without all fields, and does not advance."""
    head = ChainHead()
    f = fields_for(1)
    del f["peer"]
    with pytest.raises(ValueError):  # noqa: PT011
        head.link(f)
    assert head == ChainHead()


# ---- tampering ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("message_id", "msg-999"),
        ("status", 1),
        ("status", None),
        ("header", b'{"message_id":"msg-008"}'),
        ("signature", b""),
        ("user_id", "mallory"),
        ("error_code", ""),
        ("logged_at", "2025-06-01T12:00:07.000001Z"),
    ],
)
def test_edited_field_is_detected(key: str, value: FieldValue) -> None:
    """Editing any field of record 7 raises ChainBrokenError with seq 7."""
    records = build_chain()
    r7 = records[6]
    assert r7.fields[key] != value
    records[6] = dataclasses.replace(r7, fields={**r7.fields, key: value})
    err = broken_at(records)
    assert err.seq == 7
    assert "altered" in err.message
    assert err.message_id == ("msg-999" if key == "message_id" else "msg-007")


def test_edited_and_rehashed_record_breaks_the_next_link() -> None:
    """Editing record 7 and recomputing its hash is detected at record 8 (the link breaks)."""
    records = build_chain()
    r7 = records[6]
    fields = {**r7.fields, "status": 0, "error_code": None, "purpose": "marketing"}
    records[6] = dataclasses.replace(r7, fields=fields, hash=record_hash(7, r7.prev_hash, fields))
    err = broken_at(records)
    assert err.seq == 8
    assert "link" in err.message


def test_deleted_record_is_detected() -> None:
    """Deleting record 7 raises ChainBrokenError naming seq 7 as missing."""
    records = build_chain()
    del records[6]
    err = broken_at(records)
    assert err.seq == 7
    assert "missing" in err.message
    assert "8" in err.message


def test_swapped_records_keeping_their_seq_are_detected() -> None:
    """Swapping records 7 and 8 in order (each keeping its seq) is detected at seq 7."""
    records = build_chain()
    records[6], records[7] = records[7], records[6]
    assert broken_at(records).seq == 7


def test_swapped_records_with_swapped_seq_are_detected() -> None:
    """Swapping records 7 and 8 and renumbering them into place is detected at seq 7."""
    records = build_chain()
    r7, r8 = records[6], records[7]
    records[6] = dataclasses.replace(r8, seq=7)
    records[7] = dataclasses.replace(r7, seq=8)
    err = broken_at(records)
    assert err.seq == 7
    assert err.message_id == "msg-008"


def test_swapped_contents_are_detected() -> None:
    """Swapping only the fields of records 7 and 8 (keeping seq and hashes) is detected at 7."""
    records = build_chain()
    r7, r8 = records[6], records[7]
    records[6] = dataclasses.replace(r7, fields=r8.fields)
    records[7] = dataclasses.replace(r8, fields=r7.fields)
    err = broken_at(records)
    assert err.seq == 7
    assert "altered" in err.message


def test_wrong_prev_hash_is_detected() -> None:
    """A record whose prev_hash is not its predecessor's hash is rejected, even if self-consistent."""
    records = build_chain()
    r7 = records[6]
    bogus = hashlib.sha256(b"bogus").digest()
    records[6] = dataclasses.replace(r7, prev_hash=bogus, hash=record_hash(7, bogus, r7.fields))
    err = broken_at(records)
    assert err.seq == 7
    assert "does not link" in err.message


def test_duplicated_record_is_detected() -> None:
    """A record repeated (replayed into the log) is reported as out of order."""
    records = build_chain()
    records.insert(7, records[6])
    err = broken_at(records)
    assert err.seq == 7
    assert "out of order" in err.message


def test_chain_starting_after_genesis_is_detected() -> None:
    """Records 2.. without record 1 are reported as record 1 missing."""
    err = broken_at(build_chain()[1:])
    assert err.seq == 1
    assert "missing" in err.message


def test_chain_broken_error_is_an_audit_error() -> None:
    """ChainBrokenError is an AuditError with code AUDIT_CHAIN_BROKEN and names the message."""
    records = build_chain()
    records[2] = dataclasses.replace(records[2], hash=bytes(32))
    err = broken_at(records)
    assert isinstance(err, AuditError)
    assert err.code is Code.AUDIT_CHAIN_BROKEN
    assert err.status is Status.INTERNAL
    assert err.seq == 3
    assert "record 3 (message msg-003)" in err.message


# ---- continuation ---------------------------------------------------------------------


def test_verify_from_a_head_continues_the_chain() -> None:
    """Verifying records 11..20 from the head returned for 1..10 yields head 21."""
    records = build_chain()
    middle = verify_chain(records[:10])
    assert middle.next_seq == 11
    assert middle.last_hash == records[9].hash
    end = verify_chain(records[10:], middle)
    assert end.next_seq == N + 1
    assert end.last_hash == records[-1].hash
    assert middle.next_seq == 11, "verify_chain must not mutate the head it is given"


def test_verify_from_a_head_needs_the_right_head() -> None:
    """A continuation is refused from genesis, from a wrong seq or from a wrong hash."""
    records = build_chain()
    tail = records[10:]
    assert broken_at(tail).seq == 1
    assert broken_at(tail, ChainHead(10, records[9].hash)).seq == 10
    assert broken_at(tail, ChainHead(11, records[8].hash)).seq == 11


def test_appending_after_a_verified_head_extends_the_chain() -> None:
    """ChainHead.link from a verified head continues a chain that verifies as a whole."""
    records = build_chain()
    head = verify_chain(records)
    more = [head.link(fields_for(i)) for i in range(N + 1, N + 4)]
    assert [r.seq for r in more] == [21, 22, 23]
    assert verify_chain(records + more).next_seq == 24


def test_binary_field_cannot_be_replaced_by_its_base64_text() -> None:
    """A bytes field and the base64 text of the same bytes hash differently."""
    import base64

    fields = fields_for(1)
    fields["header"] = b"\x00\x01"
    as_text = {**fields, "header": base64.b64encode(b"\x00\x01").decode()}
    assert record_hash(1, GENESIS, fields) != record_hash(1, GENESIS, as_text)


# ---- the admin log --------------------------------------------------------------------


def admin_fields_for(i: int) -> dict[str, FieldValue]:
    """The fields of admin entry i: an agreement moved from one state to the next."""
    return {
        "logged_at": f"2025-06-01T12:00:{i:02d}.000000Z",
        "actor": "admin@dnic.gub.uy",
        "role": "provider",
        "action": "approve",
        "target": f"AGR-{i:04d}",
        "from_state": "requested",
        "to_state": "approved_by_provider",
        "reason": None if i % 2 else f"reviewed in meeting {i}",
        "details": '{"purposes":["healthcare-identification"]}',
    }


def build_admin_chain(n: int = N) -> list[ChainedRecord]:
    head = ChainHead(fmt=ADMIN_LOG)
    return [head.link(admin_fields_for(i)) for i in range(1, n + 1)]


def test_admin_chain_links_and_verifies() -> None:
    """An admin log chain numbers and links its entries and verifies from an admin-log head."""
    records = build_admin_chain()
    assert [r.seq for r in records] == list(range(1, N + 1))
    assert records[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert all(r.hash == record_hash(r.seq, r.prev_hash, r.fields, ADMIN_LOG) for r in records)
    head = verify_chain(records, ChainHead(fmt=ADMIN_LOG))
    assert (head.next_seq, head.last_hash, head.fmt) == (N + 1, records[-1].hash, ADMIN_LOG)


def test_admin_record_hash_matches_an_independent_computation() -> None:
    """The admin hash is SHA-256 of its tag, seq, previous hash and each field tagged and length-prefixed."""
    fields = admin_fields_for(1)
    prev = hashlib.sha256(b"previous").digest()
    encoded = b""
    for name in ADMIN_FIELDS:
        value = fields[name]
        if value is None:
            encoded += b"N"
        else:
            assert isinstance(value, str)
            data = value.encode()
            encoded += b"S" + len(data).to_bytes(4, "big") + data
    expected = hashlib.sha256(b"gateway-admin-log/1\n" + (5).to_bytes(8, "big") + prev + encoded)
    assert record_hash(5, prev, fields, ADMIN_LOG) == expected.digest()


def test_message_and_admin_hashes_are_domain_separated() -> None:
    """The same seq, previous hash and encoded fields hash differently as a message and as an admin record."""
    assert MESSAGE_LOG.tag != ADMIN_LOG.tag
    admin = admin_fields_for(3)
    message = fields_for(3)
    # the same field list under each tag, so that only the domain tag differs
    admin_as_message = ChainFormat(tag=MESSAGE_LOG.tag, fields=ADMIN_FIELDS, label="target")
    message_as_admin = ChainFormat(tag=ADMIN_LOG.tag, fields=RECORD_FIELDS, label="message_id")
    assert record_hash(3, GENESIS, admin, ADMIN_LOG) != record_hash(
        3, GENESIS, admin, admin_as_message
    )
    assert record_hash(3, GENESIS, message, MESSAGE_LOG) != record_hash(
        3, GENESIS, message, message_as_admin
    )


def test_record_of_one_log_does_not_fit_the_other() -> None:
    """An admin entry cannot be hashed as a message record, nor the reverse."""
    with pytest.raises(ValueError, match="exactly"):
        record_hash(1, GENESIS, admin_fields_for(1), MESSAGE_LOG)
    with pytest.raises(ValueError, match="exactly"):
        record_hash(1, GENESIS, fields_for(1), ADMIN_LOG)


@pytest.mark.parametrize("key", ["to_state", "actor", "reason", "target"])
def test_edited_admin_entry_is_named_by_seq_and_target(key: str) -> None:
    """Editing admin entry 4 raises ChainBrokenError naming record 4 and its target."""
    records = build_admin_chain()
    r4 = records[3]
    records[3] = dataclasses.replace(r4, fields={**r4.fields, key: "edited"})
    err = broken_at(records, ChainHead(fmt=ADMIN_LOG))
    target = "edited" if key == "target" else "AGR-0004"
    assert err.seq == 4
    assert err.message_id == target
    assert f"record 4 (target {target})" in err.message
    assert "altered" in err.message


def test_deleted_admin_entry_is_detected() -> None:
    """Deleting admin entry 4 is reported as record 4 missing."""
    records = build_admin_chain()
    del records[3]
    err = broken_at(records, ChainHead(fmt=ADMIN_LOG))
    assert err.seq == 4
    assert "missing" in err.message


@given(st.integers(1, 10**6), st.binary(min_size=32, max_size=32), st.integers(0, 40))
def test_preimage_round_trips_and_hashes_to_the_record_hash(seq: int, prev: bytes, i: int) -> None:
    from gateway.audit import parse_preimage, record_preimage

    fields = fields_for(i)
    data = record_preimage(seq, prev, fields)
    assert hashlib.sha256(data).digest() == record_hash(seq, prev, fields)
    assert parse_preimage(data) == (seq, prev, fields)
    with pytest.raises(ValueError, match="follow"):
        parse_preimage(data + b"x")
    with pytest.raises(ValueError, match=r"truncated|malformed"):
        parse_preimage(data[:-1])
