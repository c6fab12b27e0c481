"""Streaming calls of every kind through both security servers, with real processes: what
only they can show. The calls themselves and both logs; the README's OpenSSL procedure;
misbehaving peers on either side (a consumer server sending a tampered, dropped, reordered
or replayed message, or a bad close, to the real provider; a provider doing the same to the
real consumer); a revocation ending an open stream; and `kill -9` of either server
mid-stream. The rules themselves (chains, closes) are unit-tested in
tests/unit/test_streams.py.

The tests run in file order on one topology: those that kill or replace a server come last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from gateway.envelope import decode_close, decode_request
from gateway.signing import EcdsaSigner
from gateway.streams import REQUEST, RESPONSE, Chain
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.bench_streams import peak_kib, reset_peak, transfer
from gateway_demo.client import routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.revocation import AdminApi, active_agreement
from gateway_demo.runner import Runner
from security_server import call_writes
from tests.integration.attacker import fetch_ocsp

from .clinics import signer_of
from .conftest import CLINICS, DNIC, MSP, POPULATION, audit_verify, log_rows, run_gateway
from .malicious_provider import MaliciousProvider
from .stream_peer import StreamingConsumer, data, open_chat, signed_close

EXPORT = "/demo.population.v1.PopulationRegistry/ExportPeople"
DOWNLOAD = "/demo.population.v1.PopulationRegistry/Download"
UPLOAD = "/demo.population.v1.PopulationRegistry/Upload"
CHAT = "/demo.population.v1.PopulationRegistry/Chat"
PURPOSE = "healthcare-identification"
# the end of a stream as grpc.aio reads it (untyped in its stubs)
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
README = Path(__file__).resolve().parents[2] / "README.md"


# small stream limits, so that each is reached in a test within a second or a few
LIMITS = {
    "max_message_bytes": 2 * 1024 * 1024,
    "max_stream_messages": 2000,
    "max_streams_per_client": 3,
    "max_stream_seconds": 6,
}


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    # the messages of streams are kept beside their closes (up to log.stream_body_bytes)
    return make_runner(limits=LIMITS, store_bodies=True)


@pytest.fixture
async def msp(runner: Runner) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        yield channel


def metadata(message_id: str | None = None, purpose: str = PURPOSE) -> list[tuple[str, str]]:
    return routing_metadata(
        client=CLINICS, service=POPULATION, purpose=purpose, message_id=message_id
    )


def trailing_of(metadata: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or ())}


async def recorded_not_closed(runner: Runner, message_id: str, servers: tuple[str, ...]) -> None:
    """Wait (10 s at most) until each server's last record of the stream says it was not
    closed (`stream_incomplete`)."""
    deadline = time.monotonic() + 10
    while any(
        kinds(runner, server, message_id)[-1:] != [("refusal", "stream_incomplete")]
        for server in servers
    ):
        assert time.monotonic() < deadline, [kinds(runner, s, message_id) for s in servers]
        await asyncio.sleep(0.1)


def new_id() -> str:
    return f"stream-{uuid.uuid4().hex}"


def kinds(runner: Runner, server: str, message_id: str) -> list[tuple[str, str | None]]:
    return [(r["kind"], r["error_code"]) for r in log_rows(runner.log_db(server), message_id)]


def download(channel: Any, count: int, size: int, message_id: str) -> Any:
    return channel.unary_stream(
        DOWNLOAD,
        request_serializer=population.DownloadRequest.SerializeToString,
        response_deserializer=population.EchoMessage.FromString,
    )(
        population.DownloadRequest(count=count, size=size),
        metadata=metadata(message_id),
        timeout=30,
    )


# ---- every kind passes, and both servers log it ------------------------------------------


async def test_server_streaming_export(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    call = msp.unary_stream(
        EXPORT,
        request_serializer=population.ExportRequest.SerializeToString,
        response_deserializer=population.Person.FromString,
    )(population.ExportRequest(), metadata=metadata(message_id), timeout=10)
    people = [p async for p in call]
    assert {p.given_name for p in people} == {"Ana", "Jorge", "Lucía"}
    assert await call.code() == grpc.StatusCode.OK
    assert dict(await call.trailing_metadata())["gateway-id"] == message_id
    for server in (MSP, DNIC):
        rows = log_rows(runner.log_db(server), message_id)
        assert [r["kind"] for r in rows] == ["request", "stream-close", "response"], server
        request = decode_request(rows[0]["header"])
        assert request.stream == "server"
        request_close, response_close = (
            decode_close(rows[1]["header"]),
            decode_close(rows[2]["header"]),
        )
        assert (request_close.direction, request_close.count) == (REQUEST, 1)
        assert (response_close.direction, response_close.count) == (RESPONSE, 3)
        assert response_close.request_digest == request_close.digest
        assert rows[2]["status"] == "ok"


async def test_a_backend_error_passes_through_after_both_closes(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    call = msp.unary_stream(
        EXPORT,
        request_serializer=population.ExportRequest.SerializeToString,
        response_deserializer=population.Person.FromString,
    )(population.ExportRequest(born_since="yesterday"), metadata=metadata(message_id), timeout=10)
    error = await _drain(call)
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "born_since must be YYYY-MM-DD",
    )
    assert "gateway-error" not in trailing_of(error.trailing_metadata())
    for server in (MSP, DNIC):
        rows = log_rows(runner.log_db(server), message_id)
        assert [(r["kind"], r["status"]) for r in rows] == [
            ("request", "ok"),
            ("stream-close", "ok"),
            ("response", "backend_error"),
        ], server
        assert decode_close(rows[2]["header"]).grpc_status == 3


async def test_client_streaming_upload(msp: Any) -> None:
    payloads = [bytes([i]) * (100 + i) for i in range(50)]

    async def messages() -> AsyncIterator[population.EchoMessage]:
        for p in payloads:
            yield population.EchoMessage(payload=p)

    summary = await msp.stream_unary(
        UPLOAD,
        request_serializer=population.EchoMessage.SerializeToString,
        response_deserializer=population.UploadSummary.FromString,
    )(messages(), metadata=metadata(), timeout=10)
    assert (summary.count, summary.bytes) == (50, sum(map(len, payloads)))
    assert summary.sha256 == hashlib.sha256(b"".join(payloads)).hexdigest()


async def test_bidirectional_chat_answers_each_message_as_it_comes(msp: Any) -> None:
    call = msp.stream_stream(
        CHAT,
        request_serializer=population.EchoMessage.SerializeToString,
        response_deserializer=population.EchoMessage.FromString,
    )(metadata=metadata(), timeout=10)
    for i in range(20):
        await call.write(population.EchoMessage(payload=str(i).encode()))
        assert (await call.read()).payload == str(i).encode()
    await call.done_writing()
    assert await call.read() is EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_streams_message_id_chosen_by_its_caller_is_not_used_again(
    runner: Runner, msp: Any
) -> None:
    """As for unary calls: a second stream under an id its caller chose is refused
    (replayed_message): the provider accepted that id once, and logs one request under it."""
    message_id = new_id()
    for attempt in range(2):
        call = msp.stream_stream(
            CHAT,
            request_serializer=population.EchoMessage.SerializeToString,
            response_deserializer=population.EchoMessage.FromString,
        )(metadata=metadata(message_id), timeout=10)
        # the second is refused at once: a write then may meet the refusal, which grpc.aio's
        # own write would turn into INTERNAL (grpc/grpc#36066)
        with contextlib.suppress(call_writes.PeerGone):
            await call_writes.write(call, population.EchoMessage(payload=b"hello"))
        await call.done_writing()
        if attempt == 0:
            assert (await call.read()).payload == b"hello"
            assert await call.code() == grpc.StatusCode.OK
        else:
            assert await call.code() == grpc.StatusCode.ALREADY_EXISTS
            assert refused_with_metadata(await call.trailing_metadata(), "replayed_message")
    assert kinds(runner, MSP, message_id)[-1] == ("refusal", "replayed_message")
    assert [k for k, _ in kinds(runner, DNIC, message_id)].count("request") == 1


async def test_a_stream_outside_any_agreement_is_refused_before_it_opens(
    runner: Runner, msp: Any
) -> None:
    message_id = new_id()
    call_metadata = metadata(message_id, purpose="marketing")
    call = msp.unary_stream(DOWNLOAD)(b"", metadata=call_metadata, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    trailing = trailing_of(caught.value.trailing_metadata())
    assert (caught.value.code(), trailing.get("gateway-error")) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "purpose_not_covered",
    )
    assert kinds(runner, MSP, message_id) == [("refusal", "purpose_not_covered")]
    assert kinds(runner, DNIC, message_id) == []


async def test_readme_openssl_procedure_verifies_a_stream(
    runner: Runner, msp: Any, tmp_path: Path
) -> None:
    """The README's procedure, run as written, verifies the chain and the close's signature
    with OpenSSL alone."""
    message_id = new_id()
    call = download(msp, 12, 1000, message_id)
    bodies = [m.SerializeToString() async for m in call]
    assert len(bodies) == 12
    rows = log_rows(runner.log_db(MSP), message_id)
    request, response = rows[0], rows[-1]
    (tmp_path / "request").mkdir()
    (tmp_path / "response").mkdir()
    (tmp_path / "request" / "header.json").write_bytes(request["header"])
    (tmp_path / "response" / "header.json").write_bytes(response["header"])
    (tmp_path / "response" / "signature.der").write_bytes(response["signature"])
    (tmp_path / "response" / "signer.pem").write_bytes(
        (runner.pki / "sign" / "UY_GOV_DNIC.crt").read_bytes()
    )
    for i, body in enumerate(bodies, 1):
        (tmp_path / f"msg-{i}.bin").write_bytes(body)
    text = README.read_text()
    start = text.index("**Verifying a stream.**")
    script = text[
        text.index("```sh\n", start) + 6 : text.index("```", text.index("```sh\n", start) + 6)
    ]
    done = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-e", "-c", script],
        cwd=tmp_path,
        env={"COUNT": "12", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    close = decode_close(response["header"])
    assert close.count == 12
    assert done.stdout.splitlines() == [close.digest, "Verified OK"]


async def test_a_streams_evidence_bundles_verify_and_its_trace_is_consistent(
    runner: Runner, msp: Any, tmp_path: Path
) -> None:
    """Each side's bundle holds the open and both closes and verifies offline; the trace
    over both auditor APIs compares the three signed messages of both sides."""
    message_id = new_id()
    assert len([m async for m in download(msp, 5, 100, message_id)]) == 5
    deadline = time.monotonic() + 20
    for server in (MSP, DNIC):
        out = tmp_path / f"{server.replace('/', '_')}.zip"
        while True:
            exported = await asyncio.to_thread(
                run_gateway,
                "audit", "export", "--db", runner.log_db(server),
                "--message-id", message_id, "--out", out,
            )  # fmt: skip
            if exported.returncode == 0:
                break
            assert "not time-stamped yet" in exported.stderr, exported.stderr
            assert time.monotonic() < deadline, exported.stderr
            await asyncio.sleep(0.2)
        with zipfile.ZipFile(out) as bundle:
            manifest = json.loads(bundle.read("manifest.json"))
            files = {name: bundle.read(name) for name in bundle.namelist()}
        assert manifest["records"] == ["1-request", "2-stream-close", "3-response"]
        # the kept messages: the one request, the five answers
        assert "2-stream-close/messages/msg-1.bin" in files
        answers = sorted(n for n in files if n.startswith("3-response/messages/"))
        assert len(answers) == 5
        verified = await asyncio.to_thread(run_gateway, "audit", "verify-bundle", out)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        # one altered message no longer leads to the signed close
        altered = tmp_path / "altered.zip"
        with zipfile.ZipFile(altered, "w") as bundle:
            for name, data in files.items():
                bundle.writestr(name, data + b"!" if name == answers[2] else data)
        refused = await asyncio.to_thread(run_gateway, "audit", "verify-bundle", altered)
        assert refused.returncode != 0
        assert "3-response/messages" in refused.stdout + refused.stderr
    token = runner.token("auditor", subject="auditor")
    traced = await asyncio.to_thread(
        run_gateway,
        "audit", "trace", message_id,
        "--url", runner.auditor_url(MSP), "--url", runner.auditor_url(DNIC), "--token", token,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stdout + traced.stderr
    assert "stream-close: consumer and provider logged the same signed header" in traced.stdout
    assert "consistent on both sides" in traced.stdout


JS_CLIENT = Path(__file__).resolve().parents[1] / "interop" / "js"
PROTO = Path(__file__).resolve().parents[2] / "gateway_demo" / "protos" / "population.proto"


@pytest.mark.skipif(
    shutil.which("node") is None or not (JS_CLIENT / "node_modules" / "@grpc").is_dir(),
    reason="Node.js or the grpc-js client's packages are missing (make js-client installs them)",
)
async def test_a_grpc_js_client_calls_every_kind_of_method(runner: Runner) -> None:
    """An agency's Node.js backend, with grpc-js and the provider's .proto, calls each kind
    of method through the gateway as it would call the provider directly."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["node", str(JS_CLIENT / "client.js"), runner.consumers[MSP], str(PROTO)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["unary"] == "Ana"
    assert result["server_streaming"] == ["Ana", "Jorge", "Lucía"]
    summary = result["client_streaming"]
    assert (summary["count"], summary["sha256"]) == (40, result["expected_upload_sha256"])
    assert result["bidirectional"] == [f"message {i}" for i in range(10)]
    assert result["refused"] == {"code": 7, "error": "purpose_not_covered"}


async def test_a_large_transfer_grows_neither_servers_memory_by_more_than_64_mib(
    runner: Runner,
) -> None:
    """256 MiB server-streamed in 1 MiB messages; each security server's peak resident
    memory, reset just before (/proc/PID/clear_refs), grows by at most 64 MiB: what a
    server holds of a stream does not grow with its length. (`gateway bench --streams`, in
    `make bench`, does the same with 1 GiB and fails past the bound; here the transfer must
    also fit the 6 s duration limit of this module's topology on a loaded machine.)"""
    pids = {name: int(runner.processes[name].ready["pid"]) for name in ("ss-msp", "ss-dnic")}
    before = {name: reset_peak(pid) for name, pid in pids.items()}
    seconds = await transfer(runner.consumers[MSP], 256, True)
    grown = {name: (peak_kib(pid) - before[name]) / 1024 for name, pid in pids.items()}
    print(f"\n256 MiB in {seconds:.1f} s; peak memory growth (MiB): {grown}")
    assert all(g <= 64 for g in grown.values()), grown


# ---- a misbehaving consumer server, against the real provider ----------------------------


@dataclass
class Peer:
    runner: Runner
    signer: EcdsaSigner
    ocsp: bytes
    consumer: StreamingConsumer
    header: bytes
    chain: Chain

    async def refused(self) -> str:
        return (await self.consumer.refusal()).code


async def open_peer(runner: Runner, message_id: str) -> Peer:
    """ss-msp's keys, speaking to ss-dnic's provider endpoint directly: a bidirectional
    Chat stream, correctly opened."""
    chat = await open_chat(runner, message_id)
    return Peer(runner, chat.signer, chat.signer_ocsp, chat.consumer, chat.header, chat.chain)


def _message(n: int) -> bytes:
    return population.EchoMessage(payload=f"message {n}".encode()).SerializeToString()


async def _tampered(peer: Peer) -> None:
    _, link = peer.chain.extend(_message(1))
    await peer.consumer.send(data(1, _message(666), link))


async def _dropped(peer: Peer) -> None:
    for n in (1, 2, 3):
        seq, link = peer.chain.extend(_message(n))
        if n != 2:
            await peer.consumer.send(data(seq, _message(n), link))


async def _reordered(peer: Peer) -> None:
    sent = [peer.chain.extend(_message(n)) for n in (1, 2)]
    for seq, link in reversed(sent):
        await peer.consumer.send(data(seq, _message(seq), link))


async def _replayed(peer: Peer) -> None:
    seq, link = peer.chain.extend(_message(1))
    await peer.consumer.send(data(seq, _message(1), link))
    assert (await peer.consumer.read()) is not None  # the backend's echo of message 1
    await peer.consumer.send(data(seq, _message(1), link))


async def _close_miscounted(peer: Peer) -> None:
    seq, link = peer.chain.extend(_message(1))
    await peer.consumer.send(data(seq, _message(1), link))
    await peer.consumer.send(
        signed_close(
            peer.signer, peer.ocsp, peer.header, peer.chain, MSP, datetime.now(UTC), count=5
        )
    )


async def _close_signed_by_another_member(peer: Peer) -> None:
    other = signer_of(peer.runner.pki, "UY_GOV_DNIC")
    await peer.consumer.send(
        signed_close(other, peer.ocsp, peer.header, peer.chain, MSP, datetime.now(UTC))
    )


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (_tampered, "stream_digest_mismatch"),
        (_dropped, "stream_out_of_order"),
        (_reordered, "stream_out_of_order"),
        (_replayed, "stream_out_of_order"),
        (_close_miscounted, "stream_digest_mismatch"),
        (_close_signed_by_another_member, "untrusted_signer"),
    ],
)
async def test_provider_refuses_a_misbehaving_consumer_stream(
    runner: Runner, attack: Callable[[Peer], Any], code: str
) -> None:
    message_id = new_id()
    peer = await open_peer(runner, message_id)
    try:
        await attack(peer)
        assert await peer.refused() == code
    finally:
        await peer.consumer.close()
    rows = kinds(runner, DNIC, message_id)
    assert rows[0] == ("request", None)
    assert rows[-1] == ("refusal", code), rows


# ---- limits and cancellation ------------------------------------------------------------


def chat(channel: Any, message_id: str | None = None) -> Any:
    return channel.stream_stream(
        CHAT,
        request_serializer=population.EchoMessage.SerializeToString,
        response_deserializer=population.EchoMessage.FromString,
    )(metadata=metadata(message_id), timeout=30)


async def upload(channel: Any, payloads: list[bytes], message_id: str) -> Any:
    async def messages() -> AsyncIterator[population.EchoMessage]:
        for p in payloads:
            yield population.EchoMessage(payload=p)

    return await channel.stream_unary(
        UPLOAD,
        request_serializer=population.EchoMessage.SerializeToString,
        response_deserializer=population.UploadSummary.FromString,
    )(messages(), metadata=metadata(message_id), timeout=30)


def refused_with_metadata(trailing: Any, code: str) -> bool:
    return trailing_of(trailing).get("gateway-error") == code


def refused_with(error: grpc.aio.AioRpcError, code: str) -> bool:
    return trailing_of(error.trailing_metadata()).get("gateway-error") == code


async def test_too_many_messages_are_refused_by_the_consumer(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    error = await _error_of(upload(msp, [b"x"] * 2001, message_id))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_with(error, "stream_too_many_messages"), error
    assert kinds(runner, MSP, message_id)[-1] == ("refusal", "stream_too_many_messages")


async def test_too_many_answers_are_refused_by_the_provider(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    error = await _drain(download(msp, 2001, 1, message_id))
    assert refused_with(error, "stream_too_many_messages"), error
    assert kinds(runner, DNIC, message_id)[-1] == ("refusal", "stream_too_many_messages")
    assert kinds(runner, MSP, message_id)[-1] == ("refusal", "stream_too_many_messages")


async def test_a_message_over_the_size_limit_is_refused(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    error = await _error_of(upload(msp, [b"x" * (2 * 1024 * 1024 + 1)], message_id))
    assert refused_with(error, "body_too_large"), error
    assert kinds(runner, MSP, message_id)[-1] == ("refusal", "body_too_large")


async def test_too_many_open_streams_per_client_are_refused(msp: Any) -> None:
    open_ = [chat(msp) for _ in range(3)]
    for call in open_:
        await call.write(population.EchoMessage(payload=b"hi"))
        assert (await call.read()).payload == b"hi"
    fourth = chat(msp)
    error = await _error_of(fourth.read())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused_with(error, "too_many_streams"), error
    for call in open_:
        await call.done_writing()
        assert await call.read() is EOF
        assert await call.code() == grpc.StatusCode.OK
    again = chat(msp)  # the slots came back
    await again.write(population.EchoMessage(payload=b"again"))
    assert (await again.read()).payload == b"again"
    await again.done_writing()


async def test_a_stream_past_its_longest_duration_is_ended(runner: Runner, msp: Any) -> None:
    message_id = new_id()
    call = chat(msp, message_id)
    await call.write(population.EchoMessage(payload=b"hi"))
    await call.read()
    started = time.monotonic()
    error = await _error_of(call.read())
    assert refused_with(error, "stream_too_long"), error
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < LIMITS["max_stream_seconds"] + 1.5


async def test_a_cancelled_caller_cancels_the_stream_on_both_servers(
    runner: Runner, msp: Any
) -> None:
    message_id = new_id()
    call = chat(msp, message_id)
    await call.write(population.EchoMessage(payload=b"hi"))
    await call.read()
    call.cancel()
    await recorded_not_closed(runner, message_id, (MSP, DNIC))


async def test_a_reader_that_stops_reading_stops_the_writer_through_both_servers(
    msp: Any,
) -> None:
    """A caller that writes to Chat and reads nothing is stopped after a bounded number of
    messages: the echoes back up through the backend and both servers to its own writes.
    Then it reads, and every message comes back in order."""
    call = chat(msp)
    payload = population.EchoMessage(payload=b"\x5a" * 60_000)
    total = 1200
    written = [0]

    async def write() -> None:
        # 72 MB, three times what the windows on the way hold: without flow control end to
        # end, all would be taken (fewer than 114 MB, so that reading them all back fits in
        # the topology's 6 s stream limit on a slow machine)
        for _ in range(total):
            await call.write(payload)
            written[0] += 1
        await call.done_writing()

    writer = asyncio.create_task(write())
    # the writes stop once the windows on the way are full: no progress for a second (a
    # loaded machine fills them more slowly, so the wait is bounded, not fixed)
    deadline = time.monotonic() + 30
    stalled = -1
    while written[0] != stalled and written[0] < total and time.monotonic() < deadline:
        stalled = written[0]
        await asyncio.sleep(1.0)
    assert written[0] == stalled < total, "the writer was never slowed down"
    assert stalled * 60_000 < 80 * 1024 * 1024, stalled
    echoed = 0
    while (message := await call.read()) is not EOF:
        assert message.payload == payload.payload
        echoed += 1
    await writer
    assert echoed == total
    assert await call.code() == grpc.StatusCode.OK


async def test_the_callers_deadline_ends_the_stream_on_both_servers(
    runner: Runner, msp: Any
) -> None:
    message_id = new_id()
    call = msp.stream_stream(
        CHAT,
        request_serializer=population.EchoMessage.SerializeToString,
        response_deserializer=population.EchoMessage.FromString,
        # long enough for the stream to open through both servers and echo once on a slow,
        # loaded machine (the deadline must end an open stream, not one still opening)
    )(None, metadata=metadata(message_id), timeout=4)
    await call.write(population.EchoMessage(payload=b"hi"))
    assert (await call.read()).payload == b"hi"
    assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await recorded_not_closed(runner, message_id, (MSP, DNIC))


# ---- an agreement revoked while a stream is open -----------------------------------------


async def test_revocation_ends_an_open_stream_within_two_seconds(runner: Runner, msp: Any) -> None:
    purpose = f"stream-revocation-{time.time_ns()}"
    async with aiohttp.ClientSession() as session:
        api = AdminApi(session, runner.api_url)
        agreement = await active_agreement(api, runner, purpose, "stream revocation test")
        call = msp.stream_stream(
            CHAT,
            request_serializer=population.EchoMessage.SerializeToString,
            response_deserializer=population.EchoMessage.FromString,
        )
        # the new agreement reaches both servers within seconds
        deadline = time.monotonic() + 20
        while True:
            chat = call(metadata=metadata(purpose=purpose), timeout=30)
            try:
                await chat.write(population.EchoMessage(payload=b"hello"))
                assert (await chat.read()).payload == b"hello"
                break
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, AttributeError):
                assert time.monotonic() < deadline, "the agreement never reached the servers"
                await asyncio.sleep(0.3)
        await chat.done_writing()
        # a stream opened just before the revocation (well within the duration limit)
        chat = call(metadata=metadata(purpose=purpose), timeout=30)
        await chat.write(population.EchoMessage(payload=b"hello again"))
        assert (await chat.read()).payload == b"hello again"
        admin = runner.token("registry-admin", subject="registry-admin")
        await api.post(f"/v1/agreements/{agreement}/revoke", admin, {"reason": "test"})
        revoked = time.monotonic()

        try:
            while True:
                # a write meeting the refusal must not hide it (grpc/grpc#36066)
                await call_writes.write(chat, population.EchoMessage(payload=b"still there?"))
                await chat.read()
                await asyncio.sleep(0.05)
        except (call_writes.PeerGone, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            ended_in = time.monotonic() - revoked
    code, trailing = await chat.code(), trailing_of(await chat.trailing_metadata())
    assert (code, trailing.get("gateway-error")) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "agreement_revoked",
    )
    assert ended_in < 2.0, f"the stream ended {ended_in:.2f} s after the revocation"


# ---- kill -9 of either server mid-stream -------------------------------------------------


async def _start_download(runner: Runner, message_id: str) -> tuple[Any, Any]:
    channel: Any = grpc.aio.insecure_channel(runner.consumers[MSP])
    # 114 MB, under every limit: the kill comes long before its end
    call = download(channel, 1900, 60_000, message_id)
    for _ in range(10):
        await call.read()
    return channel, call


async def _error_of(job: Any) -> grpc.aio.AioRpcError:
    """The gRPC error `job` ends with (failing if it ends without one)."""
    try:
        await job
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call ended without an error")


async def _drain(call: Any) -> grpc.aio.AioRpcError:
    async def read_all() -> None:
        while await call.read() is not EOF:
            pass
        await call  # an OK end would not raise

    return await _error_of(read_all())


def _verifies(runner: Runner, server: str) -> None:
    done = audit_verify(runner.log_db(server))
    assert done.returncode == 0, done.stdout + done.stderr


async def test_kill_the_consumer_server_mid_stream(runner: Runner) -> None:
    message_id = new_id()
    channel, call = await _start_download(runner, message_id)
    runner.stop("ss-msp", kill=True)
    error = await _drain(call)
    await channel.close(None)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    runner.start("ss-msp")
    # the provider ends the backend call and records the stream as not closed
    await recorded_not_closed(runner, message_id, (DNIC,))
    provider = kinds(runner, DNIC, message_id)
    assert ("response", None) not in provider
    consumer = kinds(runner, MSP, message_id)
    assert consumer[0] == ("request", None) and ("response", None) not in consumer
    for server in (MSP, DNIC):
        _verifies(runner, server)


async def test_kill_the_provider_server_mid_stream(runner: Runner) -> None:
    message_id = new_id()
    channel, call = await _start_download(runner, message_id)
    runner.stop("ss-dnic", kill=True)
    error = await _drain(call)
    await channel.close(None)
    trailing = trailing_of(error.trailing_metadata())
    assert (error.code(), trailing.get("gateway-error")) == (
        grpc.StatusCode.DATA_LOSS,
        "stream_incomplete",
    ), error
    consumer = kinds(runner, MSP, message_id)
    assert consumer[0] == ("request", None)
    assert consumer[-1] == ("refusal", "stream_incomplete")
    assert ("response", None) not in kinds(runner, DNIC, message_id)
    for server in (MSP, DNIC):
        _verifies(runner, server)


# ---- a misbehaving provider server, against the real consumer (ss-dnic stays down) -------


@pytest.fixture(scope="module")
def fake_dnic(runner: Runner) -> Iterator[MaliciousProvider]:
    runner.stop("ss-dnic", kill=True)
    provider = MaliciousProvider.posing_as(runner, DNIC)
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


def _answers(runner: Runner, how: str) -> Callable[[pb.StreamOpen], Iterator[pb.StreamMessage]]:
    pki = runner.pki
    signer = signer_of(pki, "UY_GOV_DNIC")
    ca = (pki / "ca.crt").read_bytes()
    ocsp = fetch_ocsp(runner.ocsp_url, (pki / "sign" / "UY_GOV_DNIC.crt").read_bytes(), ca)
    staple = fetch_ocsp(runner.ocsp_url, (pki / "auth" / "UY_GOV_DNIC_ss1.crt").read_bytes(), ca)

    def behaviour(opened: pb.StreamOpen) -> Iterator[pb.StreamMessage]:
        header = opened.request.header
        chain, received = Chain(RESPONSE, header), Chain(REQUEST, header)
        bodies = [_message(n) for n in (1, 2, 3)]
        links = [chain.extend(b) for b in bodies]
        order = {
            "tampered": [0, 1, 2],
            "dropped": [0, 2],
            "reordered": [1, 0, 2],
            "replayed": [0, 0],
        }
        first = True
        for i in order.get(how, [0, 1, 2]):
            seq, link = links[i]
            body = _message(999) if how == "tampered" and i == 1 else bodies[i]
            message = data(seq, body, link)
            if first:
                message.ocsp_staple, first = staple, False
            yield message
        if how == "no-close":
            return
        count = 7 if how == "miscounted" else None
        yield signed_close(
            signer, ocsp, header, chain, DNIC, datetime.now(UTC), received=received, count=count
        )

    return behaviour


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("tampered", "stream_digest_mismatch"),
        ("dropped", "stream_out_of_order"),
        ("reordered", "stream_out_of_order"),
        ("replayed", "stream_out_of_order"),
        ("miscounted", "stream_digest_mismatch"),
        ("no-close", "stream_incomplete"),
    ],
)
async def test_consumer_refuses_a_misbehaving_provider_stream(
    runner: Runner, fake_dnic: MaliciousProvider, how: str, code: str
) -> None:
    fake_dnic.stream_behaviour = _answers(runner, how)
    message_id = new_id()
    channel: Any
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        call = channel.unary_stream(DOWNLOAD)(b"", metadata=metadata(message_id), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    trailing = trailing_of(caught.value.trailing_metadata())
    assert trailing.get("gateway-error") == code, caught.value
    assert kinds(runner, MSP, message_id)[-1] == ("refusal", code)
