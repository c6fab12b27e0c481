"""The registry's checkpoints, from a malicious server's side: what it refuses, and that
the rows it keeps cannot be changed, on SQLite and PostgreSQL (in process, one gRPC port)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs

from certs.pki import issue
from gateway.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from gateway.identifiers import SecurityServerId
from gateway.settings import database_url
from gateway.signing import EcdsaSigner
from gateway.timeutil import format_time
from gateway.v1 import configuration_pb2 as pb
from registry.checkpoints import CheckpointBook, CheckpointRefused
from registry.main import ConfigurationService
from registry.store import RegistryStore, ServerStatus, checkpoints, members, servers
from security_server.checkpoints import CheckpointSender
from security_server.message_log import MessageLog
from security_server.settings import CheckpointsSection

from .test_registry_store import fresh_postgres_database, needs_postgres

NOW = datetime.now(UTC).replace(microsecond=0)
MSP_SERVER = SecurityServerId.parse("UY/GOV/MSP/ss1")
DNIC_SERVER = SecurityServerId.parse("UY/GOV/DNIC/ss1")
PENDING_SERVER = SecurityServerId.parse("UY/GOV/DNIC/ss2")


def auth_signer(name: str) -> EcdsaSigner:
    ca = issue(common_name=f"{name} CA", issuer=None, now=NOW, days=1, kind="ca")
    auth = issue(common_name=name, issuer=ca, now=NOW, days=1, kind="auth")
    return EcdsaSigner(auth.key, auth.certificate)


@dataclass
class Registry:
    store: RegistryStore
    book: CheckpointBook
    keys: dict[SecurityServerId, EcdsaSigner]

    def signed(
        self, seq: int, head: bytes, server: SecurityServerId = MSP_SERVER, key: str = ""
    ) -> SignedCheckpoint:
        checkpoint = Checkpoint(server=server, chain="main", seq=seq, head=head, at=NOW)
        return sign_checkpoint(
            checkpoint, self.keys[SecurityServerId.parse(key)] if key else self.keys[server]
        )

    async def rows(self) -> list[tuple[str, int, bytes]]:
        async with self.store.read() as conn:
            found = await conn.execute(
                sa.select(checkpoints.c.server, checkpoints.c.seq, checkpoints.c.head).order_by(
                    checkpoints.c.id
                )
            )
            return [(r.server, int(r.seq), bytes(r.head)) for r in found]


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=[needs_postgres, pytest.mark.postgres])]
)
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry store with two approved servers (MSP, DNIC) and a pending one."""

    async def build(url: str) -> AsyncIterator[Registry]:
        store = await RegistryStore.open(url)
        keys = {s: auth_signer(str(s)) for s in (MSP_SERVER, DNIC_SERVER, PENDING_SERVER)}
        async with store.engine.begin() as conn:
            for member in ("UY/GOV/MSP", "UY/GOV/DNIC"):
                await conn.execute(
                    members.insert().values(id=member, name=member, created_at=format_time(NOW))
                )
            for server, key in keys.items():
                await conn.execute(
                    servers.insert().values(
                        id=str(server),
                        member=str(server.owner),
                        address="127.0.0.1:1",
                        auth_certificate=key.certificate.public_bytes(Encoding.DER),
                        subsystems=json.dumps([]),
                        status=ServerStatus.PENDING
                        if server == PENDING_SERVER
                        else ServerStatus.APPROVED,
                        submitted_at=format_time(NOW),
                    )
                )
        try:
            yield Registry(store, CheckpointBook(store, lambda: datetime.now(UTC)), keys)
        finally:
            await store.close()

    if request.param == "sqlite":
        async for built in build(database_url(str(tmp_path / "registry.db"), base=tmp_path)):
            yield built
        return
    async with fresh_postgres_database() as pg:
        async for built in build(pg):
            yield built


async def test_checkpoints_that_move_forward_are_kept(registry: Registry) -> None:
    """Checkpoints moving a chain forward, and a repeat of the last one, are stored in order."""
    for seq, head in ((4, b"\x04"), (9, b"\x09"), (9, b"\x09")):
        await registry.book.receive(registry.signed(seq, head * 32))
    assert [seq for _, seq, _ in await registry.rows()] == [4, 9, 9]


async def test_unknown_and_pending_servers_are_refused(registry: Registry) -> None:
    """A checkpoint naming an unregistered or not yet approved server is refused, not stored."""
    stranger = SecurityServerId.parse("UY/GOV/MSP/evil")
    registry.keys[stranger] = auth_signer("evil")
    for server in (stranger, PENDING_SERVER):
        with pytest.raises(CheckpointRefused) as caught:
            await registry.book.receive(registry.signed(1, b"\x01" * 32, server))
        assert caught.value.kind == "unknown_server"
    assert await registry.rows() == []


async def test_checkpoint_signed_by_another_servers_key_is_refused(registry: Registry) -> None:
    """A checkpoint for MSP's server signed with DNIC's registered key is refused."""
    with pytest.raises(CheckpointRefused) as caught:
        await registry.book.receive(registry.signed(1, b"\x01" * 32, MSP_SERVER, str(DNIC_SERVER)))
    assert caught.value.kind == "bad_signature"
    assert await registry.rows() == []


async def test_forged_checkpoints_are_logged_once_a_minute_per_server(registry: Registry) -> None:
    """Anyone may send checkpoints: 50 forged ones naming an approved server are each refused,
    and logged as one warning, not 50 (red-team review: one line per forgery)."""
    with capture_logs() as logs:
        for _ in range(50):
            with pytest.raises(CheckpointRefused):
                await registry.book.receive(
                    registry.signed(1, b"\x01" * 32, MSP_SERVER, str(DNIC_SERVER))
                )
    warned = [e for e in logs if e["event"] == "checkpoint_bad_signature"]
    assert len(warned) == 1 and warned[0]["server"] == str(MSP_SERVER), warned
    assert await registry.rows() == []


async def test_chain_going_back_or_changing_is_refused(registry: Registry) -> None:
    """After record 9 was checkpointed, record 7, or record 9 with another hash, is refused."""
    await registry.book.receive(registry.signed(9, b"\x09" * 32))
    for seq, head in ((7, b"\x07"), (9, b"\xee")):
        with pytest.raises(CheckpointRefused) as caught:
            await registry.book.receive(registry.signed(seq, head * 32))
        assert caught.value.kind == "conflict"
    assert registry.book.conflicts == 2
    assert await registry.rows() == [(str(MSP_SERVER), 9, b"\x09" * 32)]


async def test_checkpoint_rows_cannot_be_updated_or_deleted(registry: Registry) -> None:
    """The database refuses to UPDATE or DELETE a stored checkpoint (append-only triggers)."""
    await registry.book.receive(registry.signed(3, b"\x03" * 32))
    for statement in (
        checkpoints.update().values(seq=1),
        checkpoints.update().values(head=b"\x00" * 32),
        checkpoints.delete(),
    ):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            async with registry.store.engine.begin() as conn:
                await conn.execute(statement)
    assert await registry.rows() == [(str(MSP_SERVER), 3, b"\x03" * 32)]


async def test_member_scoped_listing_shows_only_that_members_servers(registry: Registry) -> None:
    """Listing for one member returns its servers' checkpoints only."""
    await registry.book.receive(registry.signed(2, b"\x02" * 32, MSP_SERVER))
    await registry.book.receive(registry.signed(5, b"\x05" * 32, DNIC_SERVER))
    scoped = await registry.book.list(member=DNIC_SERVER.owner, server=None, after=0, limit=10)
    assert [c["server"] for c in scoped["checkpoints"]] == [str(DNIC_SERVER)]
    everything = await registry.book.list(member=None, server=None, after=0, limit=1)
    assert everything["next"] is not None and len(everything["checkpoints"]) == 1


async def checkpoint_service(registry: Registry) -> tuple[grpc.aio.Server, int]:
    """The registry's checkpoint endpoint, alone on a loopback port (started)."""
    server = grpc.aio.server()
    service = ConfigurationService(publisher=None, instance="UY", checkpoints=registry.book)  # type: ignore[arg-type]
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_grpc_refusals_carry_their_status(registry: Registry) -> None:
    """Over gRPC: accepted gets a receipt time; unknown server PERMISSION_DENIED; going back
    FAILED_PRECONDITION."""
    server, port = await checkpoint_service(registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/gateway.v1.Configuration/Checkpoint",
                request_serializer=pb.SignedCheckpoint.SerializeToString,
                response_deserializer=pb.CheckpointReceipt.FromString,
            )

            def request(signed: SignedCheckpoint) -> pb.SignedCheckpoint:
                return pb.SignedCheckpoint(content=signed.content, signature=signed.signature)

            receipt = await call(request(registry.signed(5, b"\x05" * 32)))
            assert receipt.received_at.startswith(str(datetime.now(UTC).year))
            registry.keys[SecurityServerId.parse("UY/GOV/MSP/evil")] = auth_signer("evil")
            refusals = (
                (registry.signed(1, b"\x01" * 32, SecurityServerId.parse("UY/GOV/MSP/evil")),
                 grpc.StatusCode.PERMISSION_DENIED),
                (registry.signed(4, b"\x04" * 32), grpc.StatusCode.FAILED_PRECONDITION),
            )  # fmt: skip
            for signed, status in refusals:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(request(signed))
                assert caught.value.code() is status
    finally:
        await server.stop(None)


@dataclass
class FakeLog:
    """What the sender reads of a message log: its chain and last durable record."""

    chain: str
    durable: tuple[int, bytes]


async def test_sender_delivers_moves_on_and_survives_an_absent_registry(
    registry: Registry,
) -> None:
    """The server's sender gets a moved head accepted, skips an unchanged one, reports a
    refused (rewound) head without raising, and returns promptly when no registry answers."""
    server, port = await checkpoint_service(registry)
    log = FakeLog("main", (6, b"\x06" * 32))
    settings = CheckpointsSection(interval_seconds=1, heartbeat_seconds=60, timeout_seconds=2)

    def sender(address: str) -> CheckpointSender:
        return CheckpointSender(
            message_log=cast(MessageLog, log),
            server=MSP_SERVER,
            signer=registry.keys[MSP_SERVER],
            addresses=[address],
            settings=settings,
            clock=lambda: datetime.now(UTC),
        )

    live = sender(f"127.0.0.1:{port}")
    try:
        assert await live.send_once() is True
        assert await live.send_once() is False  # unchanged, heartbeat not due
        log.durable = (4, b"\x04" * 32)  # the operator rewound the log
        assert await live.send_once() is False
        assert live.failures == 1
        assert [seq for _, seq, _ in await registry.rows()] == [6]
    finally:
        await live.close()
        await server.stop(None)
    started = asyncio.get_running_loop().time()
    absent = sender(f"127.0.0.1:{port}")  # the registry is gone
    assert await absent.send_once() is False
    await absent.close()
    assert asyncio.get_running_loop().time() - started < 3 * settings.timeout_seconds


async def test_an_unchanged_head_is_sent_again_at_each_heartbeat_and_the_last_at_shutdown(
    registry: Registry,
) -> None:
    """A server whose log does not move still checkpoints every heartbeat_seconds (so that
    a silent server shows as a gap at the registry), and a head that moved since the last
    round is sent when the server stops (`close`)."""
    server, port = await checkpoint_service(registry)
    log = FakeLog("main", (6, b"\x06" * 32))
    sender = CheckpointSender(
        message_log=cast(MessageLog, log),
        server=MSP_SERVER,
        signer=registry.keys[MSP_SERVER],
        addresses=[f"127.0.0.1:{port}"],
        settings=CheckpointsSection(interval_seconds=0.1, heartbeat_seconds=0.2, timeout_seconds=2),
        clock=lambda: datetime.now(UTC),
    )
    try:
        assert await sender.send_once() is True
        assert await sender.send_once() is False  # unchanged, heartbeat not due yet
        await asyncio.sleep(0.25)
        assert await sender.send_once() is True  # unchanged, heartbeat due: sent again
        log.durable = (7, b"\x07" * 32)
    finally:
        await sender.close()  # the head moved since the last round: sent as the server stops
        await server.stop(None)
    assert [seq for _, seq, _ in await registry.rows()] == [6, 6, 7]
