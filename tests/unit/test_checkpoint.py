"""Checkpoints of a log's chain heads, the comparison of a log with them, and a token's time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from certs.pki import issue
from gateway import canonical
from gateway.audit import ChainBrokenError
from gateway.checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    Received,
    SignedCheckpoint,
    compare_with_checkpoints,
    sign_checkpoint,
    verify_checkpoint,
)
from gateway.errors import TrustError
from gateway.identifiers import SecurityServerId
from gateway.signing import EcdsaSigner
from gateway_cli.main import DEFAULT_CLOCK_SKEW, DEFAULT_TOKEN_GRACE
from security_server.audit import StampTimes
from security_server.settings import LimitsSection, TimestampingSection

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
SERVER = SecurityServerId.parse("UY/GOV/MSP/ss1")


def signer(name: str) -> EcdsaSigner:
    ca = issue(common_name=f"{name} CA", issuer=None, now=NOW, days=1, kind="ca")
    auth = issue(common_name=name, issuer=ca, now=NOW, days=1, kind="auth")
    return EcdsaSigner(auth.key, auth.certificate)


def checkpoint(seq: int, head: bytes, chain: str = "main") -> Checkpoint:
    return Checkpoint(server=SERVER, chain=chain, seq=seq, head=head, at=NOW)


def received(seq: int, head: bytes, chain: str = "main") -> Received:
    return Received(checkpoint=checkpoint(seq, head, chain), received_at=NOW)


def test_signed_checkpoint_verifies_with_the_servers_certificate() -> None:
    """A checkpoint signed by a server's key verifies with its certificate and round-trips."""
    key = signer("ss1")
    signed = sign_checkpoint(checkpoint(7, b"\x01" * 32), key)
    assert verify_checkpoint(signed, key.certificate) == checkpoint(7, b"\x01" * 32)


def test_checkpoint_signed_by_another_key_is_refused() -> None:
    """A checkpoint signed by another key, or altered after signing, does not verify."""
    key, other = signer("ss1"), signer("evil")
    signed = sign_checkpoint(checkpoint(7, b"\x01" * 32), other)
    with pytest.raises(TrustError):
        verify_checkpoint(signed, key.certificate)
    good = sign_checkpoint(checkpoint(7, b"\x01" * 32), key)
    altered = SignedCheckpoint(
        content=good.content.replace(b'"seq":7', b'"seq":9'), signature=good.signature
    )
    with pytest.raises(TrustError):
        verify_checkpoint(altered, key.certificate)


def test_malformed_checkpoint_content_is_refused() -> None:
    """Content that is not a canonical checkpoint document (wrong type, seq 0) is refused."""
    for content in (
        b'{"type":"other"}',
        checkpoint(1, b"\x01" * 32).content().replace(b'"seq":1', b'"seq":0'),
        b"not json",
    ):
        with pytest.raises(ValueError, match=r"checkpoint|seq"):
            Checkpoint.parse(content)


@pytest.mark.parametrize("chain", ["main\x1b[2K\rOK", "x" * 65, "../main", ""])
def test_a_chain_that_is_not_a_chain_name_is_refused(chain: str) -> None:
    """A checkpoint (signed content, or a registry's or an export's JSON) naming a chain
    no log can have is refused: its name would reach the registry's table and the
    terminal of whoever runs `audit verify`."""
    good = checkpoint(1, b"\x01" * 32)
    with pytest.raises(ValueError, match="chain"):
        Checkpoint.parse(canonical.encode({**canonical.decode(good.content()), "chain": chain}))
    doc = received(1, b"\x01" * 32).to_json()
    with pytest.raises(ValueError, match="chain"):
        Received.from_json({**doc, "chain": chain})


def test_an_export_naming_a_malformed_server_is_a_value_error() -> None:
    """A malformed server id in checkpoint JSON is a ValueError, which the CLI reports
    (exit 2), not an identifier error escaping as a traceback."""
    doc = received(1, b"\x01" * 32).to_json()
    with pytest.raises(ValueError, match="malformed checkpoint"):
        Received.from_json({**doc, "server": "not a server"})


def test_log_matching_its_checkpoints_passes() -> None:
    """A log holding the checkpointed hashes and reaching their sequences matches them all."""
    hashes = {("main", 3): b"\x03" * 32, ("main", 8): b"\x08" * 32}
    found = compare_with_checkpoints(
        [received(3, b"\x03" * 32), received(8, b"\x08" * 32)], hashes, {"main": 10}
    )
    assert found == 2


def test_cut_tail_is_named_with_its_place() -> None:
    """A log ending before a checkpointed sequence is reported as a cut, with chain and seq."""
    with pytest.raises(CheckpointMismatchError) as caught:
        compare_with_checkpoints([received(8, b"\x08" * 32)], {}, {"main": 5})
    text = str(caught.value)
    assert text.startswith("chain main, record 8 (checkpointed at 2026-05-01T12:00:00")
    assert "the log ends at record 5" in text and "records 6..8" in text


def test_rewrite_is_named_at_the_first_contradicted_checkpoint() -> None:
    """A different hash at a checkpointed record names the earliest checkpoint contradicted."""
    hashes = {("main", 3): b"\x03" * 32, ("main", 8): b"\xee" * 32, ("main", 9): b"\xee" * 32}
    with pytest.raises(CheckpointMismatchError) as caught:
        compare_with_checkpoints(
            [received(9, b"\x09" * 32), received(3, b"\x03" * 32), received(8, b"\x08" * 32)],
            hashes,
            {"main": 12},
        )
    assert str(caught.value).startswith("chain main, record 8 ")
    assert "rewritten at or before this record" in str(caught.value)


def test_missing_chain_is_reported() -> None:
    """A checkpointed chain the log no longer has at all is reported."""
    with pytest.raises(CheckpointMismatchError, match="no chain replica-2"):
        compare_with_checkpoints([received(1, b"\x01" * 32, "replica-2")], {}, {"main": 4})


def test_token_time_within_skew_and_grace_passes() -> None:
    """A token stamped a second after its records, or slightly before (skew), passes."""
    times = StampTimes(skew=timedelta(seconds=5), grace=timedelta(seconds=60))
    records = [NOW, NOW + timedelta(seconds=2)]
    times.check("main", 1, NOW + timedelta(seconds=3), records)
    times.check("main", 1, NOW - timedelta(seconds=4), records)


def test_token_stamped_long_after_its_records_is_refused() -> None:
    """A token later than the batch's latest record by more than the grace names the batch."""
    times = StampTimes(skew=timedelta(seconds=5), grace=timedelta(seconds=60))
    with pytest.raises(ChainBrokenError) as caught:
        times.check("main", 4, NOW + timedelta(hours=2), [NOW, NOW + timedelta(seconds=1)])
    assert str(caught.value).startswith("chain main, record 4: batch stamped at")
    assert "later than its latest record" in str(caught.value)


def test_token_stamped_before_its_records_is_refused() -> None:
    """A token older than the batch's earliest record beyond the skew is refused."""
    times = StampTimes(skew=timedelta(seconds=5), grace=timedelta(seconds=60))
    with pytest.raises(ChainBrokenError, match="before its earliest record"):
        times.check("main", 1, NOW - timedelta(minutes=1), [NOW])


def test_cli_defaults_follow_the_servers_settings() -> None:
    """verify's default grace is the server's TSA failure period, interval, timeout and skew."""
    stamping, limits = TimestampingSection(), LimitsSection()
    assert limits.clock_skew_seconds == DEFAULT_CLOCK_SKEW
    assert (
        stamping.failure_period_seconds
        + stamping.interval_seconds
        + stamping.timeout_seconds
        + limits.clock_skew_seconds
    ) == DEFAULT_TOKEN_GRACE


def test_verify_warns_of_a_chain_no_checkpoint_vouches_for() -> None:
    """`audit verify --checkpoints` given none for a chain holding records (a wrong
    --server, a server cut off from the registry) warns, instead of reporting agreement."""
    from gateway.audit import ChainHead
    from gateway_cli.verify import checkpoint_lines
    from security_server.audit import VerifyReport

    report = VerifyReport(
        heads={"main": ChainHead(next_seq=41, last_hash=b"\x01" * 32), "empty": ChainHead()},
        checkpoints=0,
    )
    lines = checkpoint_lines(report, str(SERVER))
    assert [line for line in lines if line.startswith("WARNING")] == [
        f"WARNING: chain main has 40 record(s) but the registry holds no checkpoint of it from "
        f"{SERVER}: none of its records is vouched for (is --server the log's own server? was "
        "it cut off from the registry?)"
    ]
    report.checkpoints, report.last_checkpoint = 1, {"main": received(40, b"\x01" * 32)}
    assert not any(line.startswith("WARNING") for line in checkpoint_lines(report, str(SERVER)))
    assert checkpoint_lines(VerifyReport(), None)[0].startswith("WARNING: no checkpoints given")


@pytest.mark.parametrize(
    "page",
    [
        {"checkpoints": [], "next": 1},  # a next page that never moves on
        {"entries": []},  # not a page of checkpoints
        {"checkpoints": [], "next": "x" * 5000},
    ],
)
def test_a_registry_answer_that_is_no_page_is_a_usage_error(
    page: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit verify --checkpoints URL` stops with a bounded error (exit 2) on an answer
    that is not a page, or on pages that do not move forward, instead of a traceback or
    asking for the same page forever."""
    from gateway_cli import verify

    class Registry:
        calls = 0

        def get(self, path: str, params: dict[str, object]) -> dict[str, object]:
            self.calls += 1
            assert self.calls < 5, "asked for the same page again and again"
            return page

    monkeypatch.setattr(verify, "_client", lambda url, token: Registry())
    with pytest.raises(verify.TrustInputError) as info:
        verify.fetch_checkpoints("http://registry", "token", str(SERVER))
    assert len(str(info.value)) < 200
