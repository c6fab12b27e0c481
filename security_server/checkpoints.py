"""Signed checkpoints of this server's chain head, sent to the registry, off the data path.

Every `checkpoints.interval_seconds` the head of the durable log (`MessageLog.durable`),
if it moved, is signed with the server's authentication key and sent to the registry's
`Checkpoint` RPC (the anchor's addresses, in order); an unchanged head is sent again every
`checkpoints.heartbeat_seconds`, and the final head once more at shutdown. The newest
head vouches for every record before it, so a failed send is simply retried with the
newest head at the next tick: nothing queues up, and the data path never waits for this.
A refusal by the registry (the chain went back or changed: the log was cut or rewritten)
is logged as an error every time it happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import grpc
import structlog

from gateway.checkpoint import Checkpoint, sign_checkpoint
from gateway.identifiers import SecurityServerId
from gateway.signing import Signer
from gateway.v1 import configuration_pb2 as pb
from security_server.background import every
from security_server.message_log import MessageLog
from security_server.settings import CheckpointsSection

log = structlog.get_logger("security_server.checkpoints")

_METHOD = "/gateway.v1.Configuration/Checkpoint"


class CheckpointSender:
    def __init__(
        self,
        *,
        message_log: MessageLog,
        server: SecurityServerId,
        signer: Signer,
        addresses: Sequence[str],
        settings: CheckpointsSection,
        clock: Callable[[], datetime],
    ) -> None:
        self.log = message_log
        self.server = server
        self.signer = signer
        self.addresses = tuple(addresses)
        self.settings = settings
        self.clock = clock
        # the last head the registry accepted, and when (monotonic)
        self.sent: tuple[int, bytes] | None = None
        self.sent_at = 0.0
        self.accepted = 0
        self.failures = 0
        self.accepted_event = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def run(self) -> None:
        """Send checkpoints until cancelled (a round that fails is logged, and retried)."""
        await every(self.settings.interval_seconds, self.send_once, name="checkpoints")

    async def send_once(self, *, force: bool = False) -> bool:
        """Send the durable head if it moved (or the heartbeat is due, or `force`); True when
        the registry accepted a checkpoint."""
        head = self.log.durable
        if head[0] < 1:
            return False
        due = time.monotonic() - self.sent_at >= self.settings.heartbeat_seconds
        if head == self.sent and not due and not force:
            return False
        checkpoint = Checkpoint(
            server=self.server, chain=self.log.chain, seq=head[0], head=head[1], at=self.clock()
        )
        signed = sign_checkpoint(checkpoint, self.signer)
        request = pb.SignedCheckpoint(content=signed.content, signature=signed.signature)
        problems = []
        for address in self.addresses:
            try:
                await self._call(address)(request, timeout=self.settings.timeout_seconds)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
                    self.failures += 1
                    log.error(
                        "checkpoint_refused",
                        registry=address,
                        chain=checkpoint.chain,
                        seq=checkpoint.seq,
                        reason=exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "",
                    )
                    return False
                problems.append(f"{address}: {code.name if code else type(exc).__name__}")
                continue
            self.sent, self.sent_at = head, time.monotonic()
            self.accepted += 1
            self.accepted_event.set()
            return True
        self.failures += 1
        log.warning(
            "checkpoint_not_sent",
            chain=checkpoint.chain,
            seq=checkpoint.seq,
            problems="; ".join(problems),
            retry_seconds=self.settings.interval_seconds,
        )
        return False

    def _call(self, address: str) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel.unary_unary(
            _METHOD,
            request_serializer=pb.SignedCheckpoint.SerializeToString,
            response_deserializer=pb.CheckpointReceipt.FromString,
        )

    async def close(self) -> None:
        """Send the final head (bounded by the timeout), then close the channels, whatever
        became of the send (the server is stopping: it says so, and goes on stopping)."""
        try:
            await asyncio.wait_for(self.send_once(), self.settings.timeout_seconds)
        except TimeoutError:
            log.warning("checkpoint_not_sent_at_shutdown", seq=self.log.durable[0])
        except Exception as exc:
            log.exception("checkpoint_not_sent_at_shutdown", kind=type(exc).__name__)
        finally:
            for channel in self._channels.values():
                await channel.close(None)
            self._channels.clear()
