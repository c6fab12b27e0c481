"""Trust services failing or saying no, with real processes: the TSA and the OCSP responder.

Time-stamping: an outage shorter than `timestamping.failure_period_seconds` is absorbed under
load (calls go on, the backlog is stamped by one token once the TSA is back); a longer one
makes the servers refuse with `timestamping_unavailable` until the TSA answers again, with
no restart of any security server.

Certificate status: stale and missing OCSP staples sent straight to a provider are refused
and logged; a revoked signing or authentication certificate is refused by the provider on
its own, and by the consumer's server for its own calls within seconds of the revocation.

Every test starts its own topology (a revocation is permanent for a topology's PKI) and
stops it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.queues
import queue
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.x509 import ocsp

from gateway.envelope import decode_request
from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner
from security_server.call_writes import PeerGone, write
from tests.integration.attacker import (
    StreamError,
    fetch_ocsp,
    open_stream,
    request_frame,
)

from .clinics import signed_request
from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION, audit_verify, run_gateway
from .stream_peer import CHAT, open_chat
from .stream_peer import data as stream_data

PURPOSE = "healthcare-identification"
PERSON = population_pb2.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
METADATA = routing_metadata(client=CLINICS, service=POPULATION, purpose=PURPOSE)

STAMPING = {"interval_seconds": 0.2}
# the outage lasts 2.5 s plus the TSA's restart, which takes seconds on a loaded machine
# (the test runs beside others): a period well above both
SHORT_FAILURE_PERIOD = 30.0
LONG_OUTAGE_FAILURE_PERIOD = 2.0
OCSP_REFRESH, OCSP_FRESHNESS = 1.0, 4.0


@pytest.fixture
def make_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Runner]]:
    """Start topologies for one test; each is stopped when the test ends."""
    runners: list[Runner] = []

    def make(**kwargs: Any) -> Runner:
        runner = Runner(tmp_path_factory.mktemp("trust") / "run", **kwargs)
        runners.append(runner)
        runner.prepare()
        runner.start_all()
        return runner

    yield make
    for runner in runners:
        runner.close()


@pytest.fixture(scope="module")
def short_ocsp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A topology with short OCSP periods, shared by the staple test and then the revocation
    of ss-msp's signing certificate, which ends what ss-msp can do (so it comes last)."""
    runner = Runner(
        tmp_path_factory.mktemp("trust") / "run",
        ocsp={"refresh_seconds": OCSP_REFRESH, "freshness_seconds": OCSP_FRESHNESS},
    )
    try:
        runner.prepare()
        runner.start_all()
        yield runner
    finally:
        runner.close()


def tails(runner: Runner, *names: str) -> str:
    return "".join(f"\n--- {name} ---\n{runner.tail(name)}" for name in names)


# ---- the message logs -----------------------------------------------------------------


def query(runner: Runner, server_id: str, sql: str, *args: object) -> list[sqlite3.Row]:
    """Rows of a server's message log database, read-only (the server keeps writing)."""
    db = sqlite3.connect(f"file:{runner.log_db(server_id)}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        return list(db.execute(sql, args))
    finally:
        db.close()


def stamped_and_total(runner: Runner, server_id: str) -> tuple[int, int]:
    """The last record covered by a time-stamp and the last record of a server's log."""
    return runner.stamped(server_id)


def batches(runner: Runner, server_id: str) -> list[tuple[int, int]]:
    rows = query(
        runner, server_id, "SELECT first_seq, last_seq FROM timestamp_batches ORDER BY first_seq"
    )
    return [(int(r["first_seq"]), int(r["last_seq"])) for r in rows]


def wait_all_stamped(runner: Runner, seconds: float) -> None:
    """Wait until every record of both servers' logs is covered by a time-stamp."""
    deadline = time.monotonic() + seconds
    while True:
        state = {server: stamped_and_total(runner, server) for server in (MSP, DNIC)}
        if all(stamped == total for stamped, total in state.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"records still unstamped after {seconds} s (stamped, total): {state}"
                + tails(runner, "tsa", "ss-msp", "ss-dnic")
            )
        time.sleep(0.1)


def audit_verify_all_stamped(runner: Runner) -> None:
    """`gateway audit verify` accepts both logs and counts every record as time-stamped."""
    for server in (MSP, DNIC):
        result = audit_verify(
            runner.log_db(server), "--anchor", str(runner.pki / "anchor.json"), "--check-stamps"
        )
        assert result.returncode == 0, f"{server}: {result.stdout}{result.stderr}"
        _, total = stamped_and_total(runner, server)
        assert f"OK: {total} record(s) verified" in result.stdout, result.stdout
        assert f"time-stamps: {total} record(s) covered by verified tokens" in result.stdout, (
            result.stdout
        )
        assert "not stamped yet" not in result.stdout, result.stdout


# ---- calls through ss-msp's consumer endpoint ----------------------------------------


async def person(channel: grpc.aio.Channel) -> Outcome:
    return await call_raw(channel, GET_PERSON, PERSON, METADATA)


async def poll_until(
    runner: Runner,
    channel: grpc.aio.Channel,
    done: Callable[[Outcome], bool],
    seconds: float,
    what: str,
    *,
    every: float = 0.2,
    logs: tuple[str, ...] = ("ss-msp", "ss-dnic"),
) -> tuple[Outcome, float, list[Outcome]]:
    """Call until an outcome is `done`; return it, when it came and every earlier outcome."""
    deadline = time.monotonic() + seconds
    earlier: list[Outcome] = []
    while True:
        outcome = await person(channel)
        if done(outcome):
            return outcome, time.monotonic(), earlier
        earlier.append(outcome)
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what}: not within {seconds} s; last outcome {outcome}" + tails(runner, *logs)
            )
        await asyncio.sleep(every)


def refusal_records(runner: Runner, server_id: str, code: str) -> list[sqlite3.Row]:
    return query(
        runner,
        server_id,
        "SELECT * FROM message_log WHERE kind = 'refusal' AND error_code = ? ORDER BY seq",
        code,
    )


def assert_consumer_refusal_logged(runner: Runner, outcome: Outcome, code: str) -> None:
    """ss-msp logged the refusal of this call, with its message id and code."""
    assert outcome.message_id, outcome
    rows = [r for r in refusal_records(runner, MSP, code) if r["message_id"] == outcome.message_id]
    assert [(r["role"], r["status"]) for r in rows] == [("consumer", "refused")], [
        dict(r) for r in refusal_records(runner, MSP, code)
    ]
    assert rows[0]["error_message"] == outcome.details


# ---- time-stamping --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    started: float  # time.monotonic(): the same clock in every process of the machine
    ended: float
    code: str
    error: str
    details: str


def run_load(
    address: str,
    workers: int,
    stop: EventType,
    ready: EventType,
    results: multiprocessing.queues.Queue[list[Call]],
) -> None:
    """In a process of its own: `workers` callers through a consumer endpoint until `stop`.

    The load runs outside the test's process because `Runner.start` forks with a Python
    `preexec_fn`, which crashes the child (SIGSEGV) now and then while this process has
    gRPC calls in flight."""

    async def load() -> list[Call]:
        calls: list[Call] = []
        deadline = time.monotonic() + 60  # never outlive a test that died

        async def caller() -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                while not stop.is_set() and time.monotonic() < deadline:
                    started = time.monotonic()
                    o = await person(channel)
                    calls.append(
                        Call(started, time.monotonic(), o.code.name, o.error or "", o.details)
                    )
                    if o.ok:
                        ready.set()

        await asyncio.gather(*(caller() for _ in range(workers)))
        return calls

    results.put(asyncio.run(load()))


def test_tsa_outage_shorter_than_failure_period_under_load(
    make_runner: Callable[..., Runner],
) -> None:
    """8 callers keep calling through a 2.5 s TSA outage: nothing fails, and the backlog of
    the outage is stamped by one token once the TSA is back, on both servers."""
    runner = make_runner(
        timestamping={**STAMPING, "failure_period_seconds": SHORT_FAILURE_PERIOD},
        separate_trust_services=True,  # the TSA stops, not the OCSP responder
    )
    spawn = multiprocessing.get_context("spawn")
    stop, ready = spawn.Event(), spawn.Event()
    results: multiprocessing.queues.Queue[list[Call]] = spawn.Queue()
    loader = spawn.Process(
        target=run_load,
        args=(runner.consumers[MSP], 8, stop, ready, results),
        name="load",
        daemon=True,
    )
    loader.start()
    try:
        assert ready.wait(30), "the load never got a call through" + tails(runner, "ss-msp")
        time.sleep(1.0)
        before = {server: batches(runner, server) for server in (MSP, DNIC)}
        runner.stop("tsa")
        tsa_down = time.monotonic()
        time.sleep(0.5)  # a stamping attempt in flight at the stop has ended
        at_outage = {server: stamped_and_total(runner, server)[0] for server in (MSP, DNIC)}
        time.sleep(2.0)
        at_restart = {server: stamped_and_total(runner, server) for server in (MSP, DNIC)}
        tsa_up = time.monotonic()
        runner.start("tsa")
        time.sleep(1.0)
    finally:
        stop.set()
    try:
        calls = results.get(timeout=30)
    except queue.Empty:
        pytest.fail(f"the load process gave no results (exit code {loader.exitcode})")
    loader.join(10)

    failed = [c for c in calls if c.code != "OK"]
    assert not failed, f"{len(failed)} of {len(calls)} calls failed, e.g. {failed[0]}" + tails(
        runner, "ss-msp", "ss-dnic"
    )
    during = [c for c in calls if c.started >= tsa_down and c.ended <= tsa_up]
    assert len(during) > 50, f"only {len(during)} calls were made during the outage"

    wait_all_stamped(runner, 10)
    for server in (MSP, DNIC):
        stamped, total = at_restart[server]
        # nothing was stamped while the TSA was down, though records kept coming
        assert stamped == at_outage[server], (server, at_outage[server], at_restart[server])
        backlog = total - stamped
        largest_before = max((last - first + 1 for first, last in before[server]), default=0)
        assert backlog > largest_before, (server, backlog, before[server])
        # the first batch after the outage covers all of its backlog with one token
        after = [b for b in batches(runner, server) if b[0] == stamped + 1]
        assert after, (server, stamped, batches(runner, server))
        assert after[0][1] >= total, (server, after, total)
        print(
            f"\n{server}: {backlog} records logged during the outage, stamped by one token "
            f"covering {after[0][0]}..{after[0][1]} (largest batch before: {largest_before})"
        )
    print(f"{len(calls)} calls, {len(during)} during the TSA outage, none failed")
    audit_verify_all_stamped(runner)


async def test_tsa_outage_longer_than_failure_period_refuses_then_resumes(
    make_runner: Callable[..., Runner],
) -> None:
    """Past the failure period calls are refused with timestamping_unavailable (logged);
    they resume by themselves once the TSA is back, and both logs end up stamped."""
    period = LONG_OUTAGE_FAILURE_PERIOD
    runner = make_runner(
        timestamping={**STAMPING, "failure_period_seconds": period},
        separate_trust_services=True,  # the TSA stops, not the OCSP responder
    )
    async with runner.consumer_channel(MSP) as channel:
        assert (first := await person(channel)).ok, first
        wait_all_stamped(runner, 5)

        stopping = time.monotonic()
        runner.stop("tsa")
        refused, refused_at, earlier = await poll_until(
            runner,
            channel,
            lambda o: not o.ok,
            period + 3,
            "calls were not refused once the TSA failed past the failure period",
        )
        waited = refused_at - stopping
        assert earlier, "no call succeeded during the failure period"
        assert all(o.ok for o in earlier), [o for o in earlier if not o.ok]
        assert waited >= period, f"refused after {waited:.2f} s, within the failure period"
        assert (refused.code, refused.error) == (
            grpc.StatusCode.UNAVAILABLE,
            "timestamping_unavailable",
        ), refused
        assert "time-stamping" in refused.details, refused.details
        assert_consumer_refusal_logged(runner, refused, "timestamping_unavailable")
        print(f"\nfirst timestamping_unavailable {waited:.2f} s after the TSA stopped")

        restarting = time.monotonic()
        runner.start("tsa")  # forks: safe here, no gRPC call is in flight (see `run_load`)
        _, ok_at, between = await poll_until(
            runner,
            channel,
            lambda o: o.ok,
            5,
            "calls did not resume after the TSA came back",
            logs=("tsa", "ss-msp", "ss-dnic"),
        )
        assert all(o.error == "timestamping_unavailable" for o in between), between
        print(f"calls resumed {ok_at - restarting:.2f} s after the TSA was started again")
        for _ in range(5):
            assert (again := await person(channel)).ok, again
    wait_all_stamped(runner, 10)
    audit_verify_all_stamped(runner)


# ---- certificate status ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pki:
    """ss-msp's legitimate material, as an attacker holding it (or ss-msp itself) has it."""

    runner: Runner
    ca_pem: bytes
    auth_cert: bytes
    auth_key: bytes
    sign_cert: bytes
    signer: EcdsaSigner

    @classmethod
    def of(cls, runner: Runner) -> Pki:
        pki = runner.pki
        sign_cert = (pki / "sign" / "UY_GOV_MSP.crt").read_bytes()
        return cls(
            runner=runner,
            ca_pem=(pki / "ca.crt").read_bytes(),
            auth_cert=(pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes(),
            auth_key=(pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes(),
            sign_cert=sign_cert,
            signer=EcdsaSigner(
                load_private_key((pki / "sign" / "UY_GOV_MSP.key").read_bytes()),
                load_certificate(sign_cert),
            ),
        )

    def auth_status(self) -> bytes:
        return fetch_ocsp(self.runner.ocsp_url, self.auth_cert, self.ca_pem)

    def sign_status(self) -> bytes:
        return fetch_ocsp(self.runner.ocsp_url, self.sign_cert, self.ca_pem)

    async def send(
        self, *, auth_staple: bytes, signer_staple: bytes
    ) -> tuple[pb.SignedEnvelope, pb.Frame | StreamError]:
        """A correctly signed request for Ana's record, straight to ss-dnic's provider."""
        envelope = signed_request(self.signer, signer_ocsp=signer_staple)
        async with open_stream(
            self.runner.providers[DNIC],
            DNIC,
            self.ca_pem,
            self.auth_cert,
            self.auth_key,
            staple=auth_staple,
        ) as stream:
            return envelope, await stream.send(request_frame(envelope))


def produced_at(staple: bytes) -> datetime:
    """The thisUpdate of an OCSP answer: the moment its freshness is counted from."""
    return ocsp.load_der_ocsp_response(staple).this_update_utc


def revoke(runner: Runner, certificate: Path) -> tuple[float, float]:
    """`gateway pki revoke` (keyCompromise); the monotonic times it was started and returned."""
    started = time.monotonic()
    result = run_gateway(
        "pki", "revoke", "--dir", runner.pki, "--certificate", certificate,
        "--reason", "keyCompromise",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("revoked: "), result.stdout
    return started, time.monotonic()


def assert_provider_refusal(
    runner: Runner,
    envelope: pb.SignedEnvelope,
    answer: pb.Frame | StreamError,
    code: str,
    words: tuple[str, ...],
    *,
    header_read: bool,
) -> None:
    """ss-dnic refused the frame with `code`, saying `words`, and logged the refusal.

    A refusal about the stream's staple comes before the header is decoded (so it names no
    message id); one about the signer's staple comes after the signature check."""
    assert isinstance(answer, pb.Frame), f"the stream failed instead of refusing: {answer}"
    assert answer.WhichOneof("kind") == "refusal", f"expected a refusal, got {answer}"
    assert answer.refusal.code == code, answer.refusal
    assert answer.refusal.message, answer.refusal
    for word in words:
        assert word in answer.refusal.message, answer.refusal
    message_id = answer.refusal.message_id
    assert message_id == (decode_id(envelope) if header_read else ""), answer.refusal
    rows = query(
        runner, DNIC, "SELECT * FROM message_log WHERE header = ? ORDER BY seq", envelope.header
    )
    assert [(r["kind"], r["role"], r["status"], r["error_code"], r["peer"]) for r in rows] == [
        ("refusal", "provider", "refused", code, MSP)
    ], [dict(r) for r in rows]
    assert rows[0]["message_id"] == (message_id or None)
    assert rows[0]["error_message"] == answer.refusal.message


def decode_id(envelope: pb.SignedEnvelope) -> str:
    return decode_request(envelope.header).message_id


async def test_stale_and_missing_staples_are_refused_by_the_provider(short_ocsp: Runner) -> None:
    """Staples older than ocsp.freshness_seconds: certificate_status_stale, for the signer
    (envelope) and for the TLS peer (stream); no staple on the stream: certificate_status_invalid."""
    runner = short_ocsp
    keys = Pki.of(runner)
    old_sign, old_auth = keys.sign_status(), keys.auth_status()
    envelope, answer = await keys.send(auth_staple=old_auth, signer_staple=old_sign)
    assert isinstance(answer, pb.Frame) and answer.WhichOneof("kind") == "response", answer

    # bounded wait: until both answers are older than the freshness accepted
    oldest_fresh = datetime.now(UTC) - timedelta(seconds=OCSP_FRESHNESS + 0.3)
    newest = max(produced_at(old_sign), produced_at(old_auth))
    await asyncio.sleep(max(0.0, (newest - oldest_fresh).total_seconds()))

    envelope, answer = await keys.send(auth_staple=keys.auth_status(), signer_staple=old_sign)
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "certificate_status_stale",
        ("signing certificate", "stale"),
        header_read=True,
    )
    envelope, answer = await keys.send(auth_staple=old_auth, signer_staple=keys.sign_status())
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "certificate_status_stale",
        ("authentication certificate", "stale"),
        header_read=False,
    )
    envelope, answer = await keys.send(auth_staple=b"", signer_staple=keys.sign_status())
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "certificate_status_invalid",
        ("no OCSP status", "authentication certificate"),
        header_read=False,
    )
    envelope, answer = await keys.send(auth_staple=keys.auth_status(), signer_staple=b"")
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "certificate_status_invalid",
        ("no OCSP status", "signing certificate"),
        header_read=True,
    )
    # ss-msp itself keeps its staples fresh: its calls go through
    async with runner.consumer_channel(MSP) as channel:
        assert (outcome := await person(channel)).ok, outcome


def chat_message(n: int) -> bytes:
    return population_pb2.EchoMessage(payload=f"message {n}".encode()).SerializeToString()


async def test_a_stream_whose_consumer_stops_stapling_ends_when_its_answer_goes_stale(
    short_ocsp: Runner,
) -> None:
    """A consumer server (an attacker holding ss-msp's keys, say, whose certificate is then
    revoked) opens a Chat stream with a fresh staple, then goes on talking without ever
    sending a newer one: ss-dnic ends the stream with certificate_status_stale once that
    answer is older than ocsp.freshness_seconds, as it would refuse a new call, instead of
    serving it to limits.max_stream_seconds (an hour by default)."""
    runner = short_ocsp
    message_id = f"stale-stream-{uuid.uuid4().hex}"
    chat = await open_chat(runner, message_id, timeout=OCSP_FRESHNESS + 30)
    consumer, chain, staple = chat.consumer, chat.chain, chat.staple

    async def talk() -> None:
        for n in range(1, 1000):
            seq, link = chain.extend(chat_message(n))
            await consumer.send(stream_data(seq, chat_message(n), link))
            await asyncio.sleep(0.25)

    talker = asyncio.create_task(talk())
    try:
        refusal = await asyncio.wait_for(consumer.refusal(), OCSP_FRESHNESS + 20)
        ended_at = datetime.now(UTC)
    finally:
        talker.cancel()
        await consumer.close()
    assert refusal.code == "certificate_status_stale", refusal
    assert "authentication certificate" in refusal.message, refusal.message
    age = (ended_at - produced_at(staple)).total_seconds()
    assert OCSP_FRESHNESS <= age <= OCSP_FRESHNESS + 5, age
    assert chain.count > 4  # it was served meanwhile
    rows = query(
        runner, DNIC, "SELECT kind, error_code FROM message_log WHERE message_id = ?", message_id
    )
    assert [tuple(r) for r in rows] == [
        ("request", None),
        ("refusal", "certificate_status_stale"),
    ]


async def test_a_consumer_that_stops_reading_cannot_keep_its_stale_stream_open(
    short_ocsp: Runner,
) -> None:
    """The same consumer, with no deadline on its stream, fills every window on the way and
    then stops reading, so that ss-dnic's writes block: ss-dnic's watcher goes on checking
    regardless (its own newer answers wait in the background) and ends the stream with
    certificate_status_stale once the consumer's answer is older than the freshness."""
    runner = short_ocsp
    message_id = f"stalled-stream-{uuid.uuid4().hex}"
    # no deadline: only the server's own checks can end it
    chat = await open_chat(runner, message_id, timeout=60, deadline_ms=0)
    consumer, chain, staple = chat.consumer, chat.chain, chat.staple
    big = population_pb2.EchoMessage(payload=bytes(60_000)).SerializeToString()

    async def flood() -> None:  # until its writes block: nothing is read back
        for _ in range(10_000):
            seq, link = chain.extend(big)
            await consumer.send(stream_data(seq, big, link))

    flooding = asyncio.create_task(flood())
    try:
        deadline = time.monotonic() + OCSP_FRESHNESS + 20
        rows: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            rows = [
                tuple(r)
                for r in query(
                    runner,
                    DNIC,
                    "SELECT kind, error_code FROM message_log WHERE message_id = ?",
                    message_id,
                )
            ]
            if len(rows) > 1:
                break
            await asyncio.sleep(0.2)
        ended_at = datetime.now(UTC)
    finally:
        flooding.cancel()
        await consumer.close()
    assert rows == [("request", None), ("refusal", "certificate_status_stale")], rows
    age = (ended_at - produced_at(staple)).total_seconds()
    assert age <= OCSP_FRESHNESS + 6, age
    assert chain.count > 10  # it was flooding, and blocked, before the end


async def test_a_server_streaming_call_outlives_the_freshness_of_the_answers_it_began_with(
    short_ocsp: Runner,
) -> None:
    """A download through both servers that lasts twice ocsp.freshness_seconds: after its
    one request message and close, ss-msp's side still sends its newer answers (its side
    is not half-closed), so ss-dnic's checks of them pass; ss-dnic's close carries its
    newest answer about its signer, not the one the stream began with; and the call ends OK
    with every message (found by a review: it was ended certificate_status_stale)."""
    runner = short_ocsp
    # 48 MB: more than the flow-control windows on the way hold, so that ss-dnic's side
    # stays open while the caller reads slowly. A newer answer ss-dnic sends waits behind
    # the windows' data: at 24 MB in 8 s that wait came near freshness - refresh (3 s here)
    # and a loaded machine once ended the call stale; at 48 MB it is half as long (with
    # production settings, an hour's freshness, no window waits that long)
    count, size = 800, 60_000
    async with runner.consumer_channel(MSP) as channel:
        call = channel.unary_stream(
            "/demo.population.v1.PopulationRegistry/Download",
            request_serializer=population_pb2.DownloadRequest.SerializeToString,
            response_deserializer=population_pb2.EchoMessage.FromString,
        )(
            population_pb2.DownloadRequest(count=count, size=size),
            metadata=routing_metadata(client=CLINICS, service=POPULATION, purpose=PURPOSE),
            timeout=60,
        )
        started, received = time.monotonic(), 0
        async for _ in call:
            received += 1
            await asyncio.sleep(2 * OCSP_FRESHNESS / count)  # a slow reader
        assert received == count
        assert time.monotonic() - started >= 2 * OCSP_FRESHNESS
        assert await call.code() == grpc.StatusCode.OK, await call.details()


async def test_revoked_signing_certificate(short_ocsp: Runner) -> None:
    """After `gateway pki revoke` of ss-msp's signing certificate, ss-msp refuses its own
    calls with signer_certificate_revoked within freshness + refresh seconds, and ss-dnic
    refuses a request stapled with the revoked status on its own."""
    runner = short_ocsp
    keys = Pki.of(runner)
    async with runner.consumer_channel(MSP) as channel:
        assert (first := await person(channel)).ok, first
        started, revoked = revoke(runner, runner.pki / "sign" / "UY_GOV_MSP.crt")
        refused, refused_at, earlier = await poll_until(
            runner,
            channel,
            lambda o: not o.ok,
            OCSP_FRESHNESS + OCSP_REFRESH,
            "ss-msp's calls were not refused after its signing certificate was revoked",
            every=0.05,
        )
    assert all(o.ok for o in earlier), earlier
    assert (refused.code, refused.error) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "signer_certificate_revoked",
    ), refused
    assert "revoked" in refused.details and "keyCompromise" in refused.details, refused.details
    assert_consumer_refusal_logged(runner, refused, "signer_certificate_revoked")
    print(
        f"\nsigning certificate revoked -> first refusal: {refused_at - revoked:.2f} s after "
        f"`gateway pki revoke` returned ({refused_at - started:.2f} s after it was started; "
        f"{len(earlier)} calls answered meanwhile)"
    )

    envelope, answer = await keys.send(
        auth_staple=keys.auth_status(), signer_staple=keys.sign_status()
    )
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "signer_certificate_revoked",
        ("signing certificate", "revoked", "keyCompromise"),
        header_read=True,
    )


async def test_revoked_authentication_certificate(make_runner: Callable[..., Runner]) -> None:
    """After `gateway pki revoke` of ss-msp's TLS certificate, ss-msp refuses its own calls
    with peer_certificate_revoked within the freshness period, and ss-dnic refuses a stream
    stapled with the revoked status on its own."""
    runner = make_runner(
        ocsp={"refresh_seconds": OCSP_REFRESH, "freshness_seconds": OCSP_FRESHNESS}
    )
    keys = Pki.of(runner)
    async with runner.consumer_channel(MSP) as channel:
        assert (first := await person(channel)).ok, first
        started, revoked = revoke(runner, runner.pki / "auth" / "UY_GOV_MSP_ss1.crt")
        refused, refused_at, earlier = await poll_until(
            runner,
            channel,
            lambda o: not o.ok,
            OCSP_FRESHNESS,
            "ss-msp's calls were not refused after its TLS certificate was revoked",
            every=0.05,
        )
    assert all(o.ok for o in earlier), earlier
    assert (refused.code, refused.error) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "peer_certificate_revoked",
    ), refused
    assert "revoked" in refused.details and "keyCompromise" in refused.details, refused.details
    assert_consumer_refusal_logged(runner, refused, "peer_certificate_revoked")
    print(
        f"\nauthentication certificate revoked -> first refusal: {refused_at - revoked:.2f} s "
        f"after `gateway pki revoke` returned ({refused_at - started:.2f} s after it was "
        f"started; {len(earlier)} calls answered meanwhile)"
    )

    envelope, answer = await keys.send(
        auth_staple=keys.auth_status(), signer_staple=keys.sign_status()
    )
    assert_provider_refusal(
        runner,
        envelope,
        answer,
        "peer_certificate_revoked",
        ("authentication certificate", "revoked", "keyCompromise"),
        header_read=False,
    )


async def test_provider_with_a_revoked_certificate_serves_nothing(
    make_runner: Callable[..., Runner],
) -> None:
    """Once the provider's own TLS certificate is revoked, it refuses every request itself
    (its backend is never called), and the consumer, having seen the revoked status on that
    stream, stops sending requests to it at all. A Chat stream open before the revocation
    is ended too: ss-dnic sends its newer answer on the stream, and ss-msp ends it with
    peer_certificate_revoked, as it refuses new calls."""
    runner = make_runner(
        ocsp={"refresh_seconds": OCSP_REFRESH, "freshness_seconds": OCSP_FRESHNESS}
    )
    async with runner.consumer_channel(MSP) as channel:
        assert (first := await person(channel)).ok, first
        stream = channel.stream_stream(
            CHAT,
            request_serializer=population_pb2.EchoMessage.SerializeToString,
            response_deserializer=population_pb2.EchoMessage.FromString,
        )(None, metadata=routing_metadata(client=CLINICS, service=POPULATION, purpose=PURPOSE))
        echoed = 0

        async def chat() -> None:
            nonlocal echoed
            with contextlib.suppress(PeerGone, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for n in range(1, 1000):
                    message = population_pb2.EchoMessage(payload=f"message {n}".encode())
                    await write(stream, message)  # keeps the refusal it meets (grpc#36066)
                    await stream.read()
                    echoed += 1
                    await asyncio.sleep(0.2)

        chatting = asyncio.create_task(chat())
        while echoed < 2:  # the stream is open and answered
            assert not chatting.done(), chatting
            await asyncio.sleep(0.05)
        revoke(runner, runner.pki / "auth" / "UY_GOV_DNIC_ss1.crt")
        await asyncio.wait_for(chatting, OCSP_FRESHNESS + 10)
        trailing = {str(k): str(v) for k, v in (await stream.trailing_metadata() or ())}
        assert trailing.get("gateway-error") == "peer_certificate_revoked", (
            await stream.code(),
            await stream.details(),
        )
        refused, _, _ = await poll_until(
            runner,
            channel,
            lambda o: not o.ok,
            OCSP_FRESHNESS,
            "calls to ss-dnic were not refused after its TLS certificate was revoked",
            every=0.05,
        )
        assert refused.error == "peer_certificate_revoked", refused
        later = [await person(channel) for _ in range(3)]
    for outcome in later:
        assert outcome.error == "peer_certificate_revoked", outcome
        provider_rows = query(
            runner,
            DNIC,
            "SELECT kind FROM message_log WHERE message_id = ?",
            outcome.message_id,
        )
        # refused by ss-msp before sending: ss-dnic never saw these requests
        assert provider_rows == [], [tuple(r) for r in provider_rows]
    # the first refused call may have been accepted by ss-dnic just before its own refresh
    # saw the revocation (the status travels in the stream, see the README's known limits):
    # then ss-msp refused the answer, and logged why
    consumer_rows = query(
        runner,
        MSP,
        "SELECT kind, error_code FROM message_log WHERE message_id = ? ORDER BY seq",
        refused.message_id,
    )
    assert [tuple(r) for r in consumer_rows][-1] == ("refusal", "peer_certificate_revoked")
