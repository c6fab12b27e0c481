"""The message log's own operator attacks it, and `gateway audit verify` catches them.

One real topology for the module (registry, TSA, OCSP responder, two security servers
sending checkpoints every 0.2 s). After six real exchanges, stamped and checkpointed,
the consumer's server is stopped and its log copied; each test then edits a copy as
someone owning the database (triggers dropped, hashes recomputed, CAs and TSAs of their
own, or the instance's real TSA, which stamps any digest) and runs the auditor's command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import secrets
import shutil
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certs.pki import issue
from certs.tsa import TimeStampAuthority
from gateway import merkle, tsp
from gateway.audit import RECORD_FIELDS, ChainHead
from gateway.timeutil import format_time, parse_time
from gateway_cli.main import build_parser
from gateway_client.admin import AdminApiError, AdminClient
from gateway_demo.runner import Runner
from tests.tamper import drop_sqlite_rules

from .clinics import get_person
from .conftest import MSP, audit_verify, wait_for

EXCHANGES = 6
RECORDS = 2 * EXCHANGES  # the consumer logs a request and a response per exchange


@dataclass
class World:
    runner: Runner
    log: Path  # the consumer's log, copied once its server stopped
    checkpoints_file: Path  # its checkpoints, exported by `gateway audit checkpoints`
    token: str  # an instance-wide auditor token
    anchor: Path

    def checkpoint_args(self) -> list[str]:
        return ["--checkpoints", self.runner.api_url, "--server", MSP, "--token", self.token]


def checkpoints_of(runner: Runner, token: str) -> list[dict[str, Any]]:
    client = AdminClient(runner.api_url, token)
    found: list[dict[str, Any]] = client.get("/v1/checkpoints", {"server": MSP})["checkpoints"]
    return found


def verify(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`gateway audit verify --quiet --db DB ARGS`, run in this process (as fast as a
    function call; one test runs the real command line)."""
    return command("audit", "verify", "--quiet", "--db", str(db), *args)


def command(*args: str) -> subprocess.CompletedProcess[str]:
    """A `gateway` command run in this process, its output captured."""
    ns = build_parser().parse_args(list(args))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = ns.func(ns)
    return subprocess.CompletedProcess(ns, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Six exchanges, stamped and checkpointed (after the third and the sixth at least);
    then the consumer's server stops."""
    # built by hand rather than with `make_runner`: the servers' [checkpoints] settings are
    # changed between `prepare` and `start_all`
    workdir = tmp_path_factory.mktemp("topology")
    runner = Runner(workdir / "run", timestamping={"interval_seconds": 0.2})
    try:
        runner.prepare()
        for server in runner.server_names:
            runner.set_settings(server, "checkpoints", interval_seconds=0.2, heartbeat_seconds=0.2)
        runner.start_all()

        async def calls(count: int) -> None:
            async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
                for _ in range(count):
                    outcome = await get_person(channel)
                    assert outcome.ok

        token = runner.token("auditor")
        # half the exchanges, checkpointed, then the rest: a checkpoint inside the log
        asyncio.run(calls(EXCHANGES // 2))
        wait_for(
            lambda: any(c["seq"] == RECORDS // 2 for c in checkpoints_of(runner, token)),
            "a checkpoint in the middle",
        )
        asyncio.run(calls(EXCHANGES - EXCHANGES // 2))
        wait_for(lambda: runner.stamped(MSP) == (RECORDS, RECORDS), "the stamps")
        wait_for(
            lambda: any(c["seq"] == RECORDS for c in checkpoints_of(runner, token)),
            "the last checkpoint",
        )
        runner.stop("ss-msp")
        folder = tmp_path_factory.mktemp("log")
        shutil.copy(runner.log_db(MSP), folder / "messagelog.db")
        exported = folder / "checkpoints.json"
        result = command(
            "audit", "checkpoints", "--url", runner.api_url, "--server", MSP,
            "--token", token, "--out", str(exported),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        yield World(runner, folder / "messagelog.db", exported, token, runner.pki / "anchor.json")
    finally:
        runner.close()


@pytest.fixture
def db(world: World, tmp_path: Path) -> Path:
    path = tmp_path / "messagelog.db"
    shutil.copy(world.log, path)
    return path


# ---- the attacker's tools -------------------------------------------------------------------


def rogue_stamper() -> tuple[Callable[[bytes], bytes], x509.Certificate]:
    """A TSA of the attacker's own, under a CA of their own."""
    now = datetime.now(UTC)
    ca = issue(common_name="rogue CA", issuer=None, now=now, days=1, kind="ca")
    tsa = issue(common_name="rogue TSA", issuer=ca, now=now, days=1, kind="tsa")
    authority = TimeStampAuthority(
        key=tsa.key, certificate=tsa.certificate, chain=[ca.certificate], clock=lambda: now
    )

    def stamp(root: bytes) -> bytes:
        nonce = secrets.randbits(63)
        answer = authority.respond(tsp.build_request(root, nonce))
        return tsp.token_from_response(answer, digest=root, nonce=nonce)

    return stamp, ca.certificate


def real_stamper(runner: Runner) -> Callable[[bytes], bytes]:
    """The instance's own TSA, which stamps whatever digest it is sent."""

    def stamp(root: bytes) -> bytes:
        nonce = secrets.randbits(63)
        request = urllib.request.Request(
            f"http://{runner.tsa_address}/",
            data=tsp.build_request(root, nonce),
            headers={"Content-Type": "application/timestamp-query"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return tsp.token_from_response(answer.read(), digest=root, nonce=nonce)

    return stamp


def gen_time(token: bytes) -> datetime:
    """A token's genTime, read without trusting it (the attacker knows their own token)."""
    from asn1crypto import cms  # type: ignore[import-untyped]

    signed = cms.ContentInfo.load(token)["content"]
    info = signed["encap_content_info"]["content"].parsed
    value: datetime = info["gen_time"].native
    return value


def assert_first_contradicted_checkpoint(out: str) -> None:
    """Verify names the first checkpoint after the deleted exchange (records 3 and 4): the
    one waited for at record RECORDS // 2, or one the server sent earlier, under load."""
    found = re.search(r"FAILED: chain main, record (\d+) \(checkpointed at", out)
    assert found is not None, out
    assert 3 <= int(found.group(1)) <= RECORDS // 2, out


def rewrite_without_exchange(
    db: Path, exchange: int, stamp: Callable[[bytes], bytes], rogue_ca: x509.Certificate | None
) -> None:
    """Delete one exchange's two records, renumber and re-hash every record after it, and
    stamp them anew two records per batch (batches wholly before the cut stay as they
    are); optionally keep a rogue CA as evidence."""
    drop = {2 * exchange - 1, 2 * exchange}
    cut = min(drop)
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        drop_sqlite_rules(conn)
        rows = [dict(r) for r in conn.execute("SELECT * FROM message_log ORDER BY seq")]
        conn.execute("DELETE FROM message_log")
        (stamped,) = conn.execute(
            "SELECT COALESCE(MAX(last_seq), 0) FROM timestamp_batches WHERE last_seq < ?", (cut,)
        ).fetchone()
        conn.execute("DELETE FROM timestamp_batches WHERE last_seq >= ?", (cut,))
        head = ChainHead()
        kept = []
        for row in (r for r in rows if r["seq"] not in drop):
            record = head.link({k: row[k] for k in RECORD_FIELDS})
            row.update(seq=record.seq, prev_hash=record.prev_hash, hash=record.hash)
            names = ", ".join(row)
            conn.execute(
                f"INSERT INTO message_log ({names}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            kept.append(row)
        restamped = [r for r in kept if r["seq"] > stamped]
        for at in range(0, len(restamped), 2):
            batch = restamped[at : at + 2]
            root = merkle.root([r["hash"] for r in batch])
            token = stamp(root)
            conn.execute(
                "INSERT INTO timestamp_batches (chain, first_seq, last_seq, root, token, tsa, "
                "gen_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ("main", batch[0]["seq"], batch[-1]["seq"], root, token, "http://tsa/",
                 format_time(gen_time(token))),
            )  # fmt: skip
        if rogue_ca is not None:
            der = rogue_ca.public_bytes(Encoding.DER)
            conn.execute(
                "INSERT INTO log_evidence (sha256, kind, data) VALUES (?, 'ca', ?)",
                (hashlib.sha256(der).hexdigest(), der),
            )
        conn.commit()
    finally:
        conn.close()


def lateness(db: Path) -> tuple[float, float]:
    """(largest lag of a stored batch's token behind its latest record, and the time since
    the newest record was logged, in seconds)."""
    conn = sqlite3.connect(db)
    try:
        lags = [
            (parse_time(gen) - parse_time(latest)).total_seconds()
            for gen, latest in conn.execute(
                "SELECT b.gen_time, MAX(m.logged_at) FROM timestamp_batches b JOIN message_log m "
                "ON m.seq BETWEEN b.first_seq AND b.last_seq GROUP BY b.first_seq"
            )
        ]
        (newest,) = conn.execute("SELECT MAX(logged_at) FROM message_log").fetchone()
    finally:
        conn.close()
    return max(lags), (datetime.now(UTC) - parse_time(newest)).total_seconds()


# ---- the tests ------------------------------------------------------------------------------


def test_intact_log_agrees_with_its_anchor_and_checkpoints(world: World, db: Path) -> None:
    """The untouched log verifies against the anchor and the registry's checkpoints (URL
    and exported file), exit 0."""
    for check, source in (
        (audit_verify, world.checkpoint_args()),  # the command line, as an auditor runs it
        (verify, ["--checkpoints", str(world.checkpoints_file)]),
    ):
        result = check(db, "--anchor", str(world.anchor), "--check-stamps", *source)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"OK: {RECORDS} record(s) verified" in result.stdout
        assert f"time-stamps: {RECORDS} record(s) covered by verified tokens" in result.stdout
        assert "checkpoints: the log agrees with all" in result.stdout
        assert f"last checkpoint at record {RECORDS}" in result.stdout
        assert "WARNING" not in result.stdout


def test_cut_tail_with_its_stamps_is_caught_by_the_checkpoints(world: World, db: Path) -> None:
    """Deleting the newest two exchanges and their batches passes the chain checks, but
    verify with checkpoints fails, naming the chain, the cut and the checkpoint."""
    keep = RECORDS - 4
    conn = sqlite3.connect(db)
    try:
        drop_sqlite_rules(conn)
        conn.execute(f"DELETE FROM timestamp_batches WHERE last_seq > {keep}")
        conn.execute(f"DELETE FROM message_log WHERE seq > {keep}")
        conn.commit()
    finally:
        conn.close()
    blind = verify(db, "--anchor", str(world.anchor))
    assert blind.returncode == 0, blind.stdout  # the hole this feature closes
    result = verify(db, "--anchor", str(world.anchor), *world.checkpoint_args())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: chain main, record " in result.stdout
    assert "checkpointed at" in result.stdout and "received by the registry at" in result.stdout
    assert f"the log ends at record {keep}" in result.stdout


def test_rewrite_with_a_rogue_ca_and_tsa_is_caught(world: World, db: Path) -> None:
    """An exchange deleted mid-log, the rest re-hashed and stamped by the attacker's TSA,
    its CA put into log_evidence: verify against the anchor fails on the token; without an
    anchor it warns that nothing was checked; the checkpoints name the rewrite."""
    stamp, rogue_ca = rogue_stamper()
    rewrite_without_exchange(db, 2, stamp, rogue_ca)
    anchored = verify(db, "--anchor", str(world.anchor))
    assert anchored.returncode == 1, anchored.stdout + anchored.stderr
    assert (
        "FAILED: chain main, record " in anchored.stdout and "time-stamp token" in anchored.stdout
    )
    assert "not issued by a trusted CA" in anchored.stdout
    unanchored = verify(db)
    assert unanchored.returncode == 0, unanchored.stdout
    assert "NOT checked against a trust anchor" in unanchored.stdout
    refused = verify(db, "--check-stamps")
    assert refused.returncode == 2 and "needs a trust anchor" in refused.stderr
    checked = verify(db, *world.checkpoint_args())
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert_first_contradicted_checkpoint(checked.stdout)
    assert "rewritten at or before this record" in checked.stdout


def test_rewrite_stamped_by_the_real_tsa_is_caught(world: World, db: Path) -> None:
    """The same rewrite stamped by the instance's own TSA passes the token's signature, but
    its late genTime and the checkpoints each catch it; the intact log passes both."""
    honest_lag, _ = lateness(db)
    grace = honest_lag + 1.0
    wait_for(lambda: lateness(db)[1] > grace + 1.0, "the attacker's delay")
    pristine = verify(db, "--anchor", str(world.anchor), "--token-grace", f"{grace:.3f}")
    assert pristine.returncode == 0, pristine.stdout + pristine.stderr

    rewrite_without_exchange(db, 2, real_stamper(world.runner), None)
    signatures_only = verify(db, "--anchor", str(world.anchor), "--token-grace", "1e9")
    assert signatures_only.returncode == 0, signatures_only.stdout  # a genuine token
    timed = verify(db, "--anchor", str(world.anchor), "--token-grace", f"{grace:.3f}")
    assert timed.returncode == 1, timed.stdout + timed.stderr
    assert "FAILED: chain main, record " in timed.stdout and "batch stamped at" in timed.stdout
    assert "later than its latest record" in timed.stdout
    checked = verify(db, "--anchor", str(world.anchor), *world.checkpoint_args())
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert_first_contradicted_checkpoint(checked.stdout)
    assert "rewritten at or before this record" in checked.stdout


def test_checkpoints_are_read_by_auditors_within_their_scope(world: World) -> None:
    """An instance-wide auditor sees MSP's checkpoints; another member's auditor sees none
    of them; a member administrator is refused."""
    assert checkpoints_of(world.runner, world.token)
    other = world.runner.token("auditor", member="UY/GOV/DNIC")
    assert all(c["server"] != MSP for c in checkpoints_of(world.runner, other))
    admin = world.runner.token("member-admin", member="UY/GOV/MSP")
    with pytest.raises(AdminApiError) as caught:
        checkpoints_of(world.runner, admin)
    assert caught.value.status == 403


def test_server_restarted_on_a_cut_log_is_refused_by_the_registry(world: World) -> None:
    """The operator cuts the tail and restarts the server on it: the registry refuses its
    checkpoint (the chain goes back), logs the conflict loudly and keeps what it had; the
    server goes on serving."""
    runner = world.runner
    live = runner.log_db(MSP)
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    shutil.copy(world.log, live)
    conn = sqlite3.connect(live)
    try:
        drop_sqlite_rules(conn)
        conn.execute("DELETE FROM timestamp_batches WHERE last_seq > 4")
        conn.execute("DELETE FROM message_log WHERE seq > 4")
        conn.commit()
    finally:
        conn.close()
    runner.start("ss-msp")
    wait_for(lambda: "checkpoint_refused" in runner.tail("ss-msp", 200), "the refusal")
    assert "checkpoint_conflict" in runner.tail("registry", 200)
    assert max(c["seq"] for c in checkpoints_of(runner, world.token)) == RECORDS

    async def one_call() -> bool:
        async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
            return (await get_person(channel)).ok

    assert asyncio.run(one_call())
