"""Unit tests of the message log's archive file format (`gateway.archive`).

An archive file is what an auditor receives instead of the database rows once records pass
the retention period, so reading it must be exact (a round trip keeps every byte of every
record, batch and evidence item), writing it must be deterministic (its SHA-256 is
registered in the database and named by the next archive), and reading anything that is
not an archive must fail with `ArchiveError` (which `verify` turns into a named failure),
never with another exception.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import archive as fmt
from gateway.audit import GENESIS, ChainedRecord, ChainHead, RecordKind, Role, verify_chain
from gateway.records import record
from gateway.timeutil import format_time
from security_server.message_log import CHAIN_PATTERN

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


def chained(count: int, chain: str = "main") -> list[ChainedRecord]:
    """`count` real records of one chain, linked from the start of the chain."""
    head = ChainHead()
    out = []
    for i in range(count):
        body = f"body {i}".encode()
        fields = record(
            kind=RecordKind.REQUEST if i % 2 == 0 else RecordKind.RESPONSE,
            role=Role.CONSUMER,
            logged_at=NOW + timedelta(seconds=i),
            message_id=f"m-{i}",
            client="UY/GOV/MSP/clinics",
            service="UY/GOV/DNIC/identity/population/v1",
            purpose="healthcare-identification",
            subject_ref=None if i % 3 else f"subject-{i}",
            header=b"{}\x00\xff" + bytes([i]),
            signature=bytes(range(70)),
            signer_certificate_sha256="c" * 64,
            body_sha256=hashlib.sha256(body).hexdigest(),
            status="ok" if i % 4 else "error",
            error_message=None if i % 4 else "refused: ünïcödé",
        )
        out.append(dataclasses.replace(head.link(fields), chain=chain))
    return out


def sample(records: int = 5, chain: str = "main") -> fmt.Archive:
    """An archive of `records` records with one batch and evidence of every kind."""
    items = chained(records, chain)
    return fmt.Archive(
        chain=chain,
        number=1,
        first_seq=1,
        last_seq=records,
        prev_sha256=fmt.NO_ARCHIVE,
        created_at=format_time(NOW),
        records=items,
        batches=[
            fmt.Batch(
                first_seq=1,
                last_seq=records,
                root=hashlib.sha256(b"root").digest(),
                token=b"\x30\x82 a DER token \x00\xff",
                tsa="http://tsa.example/",
                gen_time=format_time(NOW),
            )
        ],
        evidence={
            "c" * 64: ("certificate", b"certificate DER"),
            "a" * 64: ("ca", b"CA DER \x00"),
            "b" * 64: ("body", b"\x00\x01 a body"),
            "d" * 64: ("ocsp", b"an OCSP answer"),
        },
    )


def lines_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]


def file_of(lines: list[Any]) -> bytes:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    return gzip.compress(text.encode(), mtime=0)


# ---- round trip and determinism -------------------------------------------------------------


def test_round_trip_keeps_every_record_batch_and_evidence_item() -> None:
    """decode(encode(a)) == a: records (text, bytes, None fields), batches and evidence come
    back exactly, and the decoded records still verify as a chain."""
    archive = sample(7)
    back = fmt.decode(fmt.encode(archive))
    assert back == archive
    assert verify_chain(back.records, ChainHead()).next_seq == 8


def test_round_trip_of_a_later_archive_of_another_chain() -> None:
    """A later archive (number, first record, previous digest) of another chain round-trips,
    and its first record still links to the chain hash before it."""
    records = chained(9, "replica-2.pod_a")
    before = verify_chain(records[:4], ChainHead())
    previous = fmt.sha256_hex(b"the bytes of archive 4")
    archive = fmt.Archive(
        chain="replica-2.pod_a",
        number=5,
        first_seq=5,
        last_seq=9,
        prev_sha256=previous,
        created_at=format_time(NOW),
        records=records[4:],
    )
    back = fmt.decode(fmt.encode(archive))
    assert back == archive
    assert (back.number, back.first_seq, back.prev_sha256) == (5, 5, previous)
    assert verify_chain(back.records, before).next_seq == 10


def test_encode_is_deterministic() -> None:
    """The same archive gives the same bytes, whatever the order its evidence was gathered
    in, and the gzip header carries no time or file name (the file's SHA-256 is registered
    and named by the next archive, so it must not depend on when it was written)."""
    archive = sample()
    shuffled = dataclasses.replace(archive, evidence=dict(reversed(archive.evidence.items())))
    data = fmt.encode(archive)
    assert fmt.encode(archive) == data == fmt.encode(shuffled)
    assert fmt.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert data[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no FNAME
    assert data[4:8] == b"\x00\x00\x00\x00"  # mtime 0


def test_encode_writes_the_documented_lines() -> None:
    """One header line, then records, then batches, then evidence sorted by digest."""
    lines = lines_of(fmt.encode(sample(3)))
    assert lines[0] == {
        "format": fmt.FORMAT,
        "chain": "main",
        "number": 1,
        "first_seq": 1,
        "last_seq": 3,
        "prev_sha256": fmt.NO_ARCHIVE,
        "created_at": format_time(NOW),
    }
    assert [next(iter(line)) for line in lines[1:]] == ["record"] * 3 + ["batch"] + ["evidence"] * 4
    assert [line["evidence"]["sha256"] for line in lines[5:]] == sorted(
        ["a" * 64, "b" * 64, "c" * 64, "d" * 64]
    )
    assert lines[1]["record"]["prev_hash"] == GENESIS.hex()


def test_encode_refuses_an_empty_archive() -> None:
    """An archive holds at least one record: an empty one would break the hash links."""
    with pytest.raises(ValueError, match="at least one record"):
        fmt.encode(dataclasses.replace(sample(), records=[]))


# ---- decode refuses what is not an archive -------------------------------------------------


def _drop(key: str, index: int) -> Callable[[list[Any]], None]:
    def edit(lines: list[Any]) -> None:
        target = lines[index]
        if index:
            target = next(iter(target.values()))
        del target[key]

    return edit


def _set(index: int, key: str, value: Any) -> Callable[[list[Any]], None]:
    def edit(lines: list[Any]) -> None:
        target = lines[index]
        if index:
            target = next(iter(target.values()))
        target[key] = value

    return edit


def _set_field(name: str, value: Any) -> Callable[[list[Any]], None]:
    def edit(lines: list[Any]) -> None:
        lines[1]["record"]["fields"][name] = value

    return edit


def _replace_line(index: int, value: Any) -> Callable[[list[Any]], None]:
    def edit(lines: list[Any]) -> None:
        lines[index] = value

    return edit


# index 1: the first record line; 4: the batch line; 5: the first evidence line (sample(3))
MALFORMED: dict[str, Callable[[list[Any]], None]] = {
    "header without chain": _drop("chain", 0),
    "header without number": _drop("number", 0),
    "header without last_seq": _drop("last_seq", 0),
    "header without prev_sha256": _drop("prev_sha256", 0),
    "record without hash": _drop("hash", 1),
    "record without fields": _drop("fields", 1),
    "record without seq": _drop("seq", 1),
    "record missing a field": lambda lines: lines[1]["record"]["fields"].pop("purpose"),
    "record with a non-hex hash": _set(1, "hash", "not hex"),
    "record with a non-number seq": _set(1, "seq", "one"),
    "record with a list field": _set_field("purpose", ["a"]),
    "record with bad base64": _set_field("header", {"base64": "***"}),
    "record that is a list": _replace_line(1, {"record": [1, 2]}),
    "batch without token": _drop("token", 4),
    "batch with bad base64 token": _set(4, "token", "!!"),
    "batch with a non-hex root": _set(4, "root", "zz"),
    "evidence without data": _drop("data", 5),
    "evidence with bad base64": _set(5, "data", "a b"),
    "line that is no record, batch or evidence": _replace_line(2, {"comment": "hello"}),
    "line that is a number": _replace_line(2, 42),
    "line that is a string": _replace_line(2, "record"),
    "header that is a list": _replace_line(0, ["format"]),
    "header that is null": _replace_line(0, None),
}


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
def test_missing_keys_and_wrong_types_raise_archive_error(
    edit: Callable[[list[Any]], None],
) -> None:
    """A file whose lines miss a key, or hold a value of the wrong type, is refused with
    ArchiveError naming the file (never KeyError, TypeError... escaping to the verifier)."""
    lines = lines_of(fmt.encode(sample(3)))
    edit(lines)
    with pytest.raises(fmt.ArchiveError, match=re.escape("main.00000001.log-archive.gz")):
        fmt.decode(file_of(lines), where="main.00000001.log-archive.gz")


def test_wrong_format_is_refused() -> None:
    """A file of another format, or of a future version of this one, is refused by name."""
    lines = lines_of(fmt.encode(sample()))
    for other in ("gateway-log-archive/2", None, "", 1):
        lines[0]["format"] = other
        with pytest.raises(fmt.ArchiveError, match="is not in format gateway-log-archive/1"):
            fmt.decode(file_of(lines), where="archive X")
    del lines[0]["format"]
    with pytest.raises(fmt.ArchiveError, match="is not in format"):
        fmt.decode(file_of(lines))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "nothing"),
        (b"not gzip at all", "not gzip"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", "a gzip header alone"),
        (gzip.compress(b"", mtime=0), "gzip of nothing"),
        (gzip.compress(b"\xff\xfe\x00 not UTF-8", mtime=0), "gzip of bytes that are not UTF-8"),
        (gzip.compress(b"{not json}\n", mtime=0), "gzip of text that is not JSON"),
        (gzip.compress(b'{"format": "gateway-log-archive/1"', mtime=0), "gzip of cut JSON"),
        (b"PK\x03\x04" + bytes(30), "a zip file"),
    ],
)
def test_garbage_raises_archive_error(data: bytes, why: str) -> None:
    """Bytes that are not a gzip of JSON lines are refused with ArchiveError naming the file."""
    with pytest.raises(fmt.ArchiveError, match="archive 3 of chain main"):
        fmt.decode(data, where="archive 3 of chain main")


@pytest.mark.parametrize("keep", [0, 1, 10, 20, -8, -4, -1])
def test_truncated_file_raises_archive_error(keep: int) -> None:
    """A file cut short anywhere (a copy interrupted, a disk full) is refused."""
    data = fmt.encode(sample(20))
    with pytest.raises(
        fmt.ArchiveError, match=r"^archive is (not a readable archive file|malformed)"
    ):
        fmt.decode(data[:keep])


def test_flipped_byte_is_refused_or_changes_the_content() -> None:
    """Any one flipped byte is either refused (the gzip CRC, the JSON) or yields another
    archive: a flip never goes unnoticed by a reader comparing content."""
    data = fmt.encode(sample(2))
    archive = fmt.decode(data)
    for at in range(10, len(data)):
        bad = bytearray(data)
        bad[at] ^= 0x01
        try:
            other = fmt.decode(bytes(bad))
        except fmt.ArchiveError:
            continue
        assert other != archive, f"byte {at} flipped unnoticed"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_archive_error(data: bytes) -> None:
    """Random bytes (hypothesis) are refused with ArchiveError, never another exception."""
    with pytest.raises(fmt.ArchiveError):
        fmt.decode(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["format", "record", "batch", "evidence", "chain", "seq", "x"]),
            children,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON, max_size=4))
def test_random_json_lines_raise_archive_error(lines: list[Any]) -> None:
    """Well-formed gzip of random JSON lines (hypothesis) is refused with ArchiveError:
    the reader checks every line's shape, not only that the file parses."""
    with pytest.raises(fmt.ArchiveError):
        fmt.decode(file_of(lines))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_edits_of_a_real_archive_never_escape_as_other_errors(data: st.DataObject) -> None:
    """A real archive with one value replaced by a random JSON value (hypothesis) either
    decodes or raises ArchiveError: no KeyError, TypeError... reaches the verifier."""
    lines = lines_of(fmt.encode(sample(2)))
    index = data.draw(st.integers(0, len(lines) - 1))
    target = lines[index] if index == 0 else next(iter(lines[index].values()))
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(JSON)
    with contextlib.suppress(fmt.ArchiveError):
        fmt.decode(file_of(lines))


def test_deeply_nested_json_raises_archive_error() -> None:
    """A line of deeply nested JSON (a crafted file) is refused with ArchiveError like any
    other unreadable file, not with RecursionError escaping the verifier."""
    with pytest.raises(fmt.ArchiveError):
        fmt.decode(gzip.compress(b"[" * 200_000 + b"\n"))


def test_base64_and_hex_are_the_documented_encodings() -> None:
    """Bytes are base64 and hashes hex, as the module documents for readers in other tools."""
    archive = sample(1)
    lines = lines_of(fmt.encode(archive))
    batch, evidence = lines[2]["batch"], lines[3]["evidence"]
    assert bytes.fromhex(batch["root"]) == archive.batches[0].root
    assert base64.b64decode(batch["token"]) == archive.batches[0].token
    assert base64.b64decode(evidence["data"]) == archive.evidence[evidence["sha256"]][1]
    assert bytes.fromhex(lines[1]["record"]["hash"]) == archive.records[0].hash


# ---- file names -------------------------------------------------------------------------------


@given(st.from_regex(CHAIN_PATTERN, fullmatch=True), st.integers(1, 99_999_999))
def test_file_name_round_trip(chain: str, number: int) -> None:
    """Every valid chain name and archive number gives a name that parses back to them."""
    name = fmt.file_name(chain, number)
    assert name.endswith(".log-archive.gz")
    assert fmt.parse_file_name(name) == (chain, number)


def test_file_names_sort_in_archive_order() -> None:
    """Numbers are zero-padded, so a folder listing shows a chain's archives in order."""
    names = [fmt.file_name("main", n) for n in (1, 2, 9, 10, 11, 100, 12345)]
    assert sorted(names) == names
    assert fmt.file_name("main", 1) == "main.00000001.log-archive.gz"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "main",
        "main.log-archive.gz",
        "main.1.log-archive.gz",
        "main.0000001.log-archive.gz",
        "main.000000001.log-archive.gz",
        "main.0000000a.log-archive.gz",
        "main.00000001.log-archive.gz.tmp",
        "main.00000001.log-archive",
        "main.00000001.log-archive.GZ",
        "main.00000001.log-archive.gzip",
        "main.00000001-log-archive.gz",
        ".00000001.log-archive.gz",
        ".main.00000001.log-archive.gz",
        "-main.00000001.log-archive.gz",
        "ma in.00000001.log-archive.gz",
        "main/x.00000001.log-archive.gz",
        "dir/main.00000001.log-archive.gz",
        "mäin.00000001.log-archive.gz",
        "a" * 65 + ".00000001.log-archive.gz",
        " main.00000001.log-archive.gz",
        "main.00000001.log-archive.gz\n",
        "messagelog.db",
    ],
)
def test_other_names_are_not_archive_files(name: str) -> None:
    """Anything else in the archive folder (temporary files, other files, names of invalid
    chains) is not taken for an archive."""
    assert fmt.parse_file_name(name) is None


def test_chain_names_with_dots_parse_unambiguously() -> None:
    """A chain name may itself look like a numbered name: the number is the last part."""
    name = fmt.file_name("pod.00000007", 3)
    assert fmt.parse_file_name(name) == ("pod.00000007", 3)
    assert fmt.parse_file_name("a" * 64 + ".00000001.log-archive.gz") == ("a" * 64, 1)


def test_no_archive_is_a_sha256_shaped_zero() -> None:
    """What archive 1 names as the archive before it cannot be any file's digest by chance
    and has the shape of one."""
    assert fmt.NO_ARCHIVE == "0" * 64
    assert len(fmt.sha256_hex(b"")) == len(fmt.NO_ARCHIVE)
    assert fmt.sha256_hex(b"") != fmt.NO_ARCHIVE
