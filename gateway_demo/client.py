"""How an agency backend calls a peer service through its security server.

It uses the provider's own generated message classes and points a plain gRPC channel
at its local security server's consumer endpoint, adding the routing metadata. The
outcome keeps the answer, the status, the trailing metadata and the gateway error code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    body: bytes | None
    trailing: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def error(self) -> str | None:
        return self.trailing.get("gateway-error")

    @property
    def message_id(self) -> str | None:
        return self.trailing.get("gateway-id")


def routing_metadata(
    *,
    client: str | None,
    service: str | None,
    purpose: str | None,
    user_id: str | None = None,
    subject: str | None = None,
    message_id: str | None = None,
) -> list[tuple[str, str]]:
    pairs = {
        "gateway-client": client,
        "gateway-service": service,
        "gateway-purpose": purpose,
        "gateway-user-id": user_id,
        "gateway-subject": subject,
        "gateway-id": message_id,
    }
    return [(k, v) for k, v in pairs.items() if v is not None]


async def call_raw(
    channel: grpc.aio.Channel,
    method: str,
    body: bytes,
    metadata: list[tuple[str, str]],
    timeout: float = 10.0,
) -> Outcome:
    """Call `method` with opaque request bytes; never raises for a gRPC error status."""
    multicallable: Any = channel.unary_unary(method, None, None)
    call = multicallable(body, metadata=metadata, timeout=timeout)
    try:
        answer = await call
    except grpc.aio.AioRpcError as exc:
        pairs: Any = exc.trailing_metadata() or ()
        trailing = {k: str(v) for k, v in pairs}
        return Outcome(code=exc.code(), details=str(exc.details()), body=None, trailing=trailing)
    pairs = await call.trailing_metadata() or ()
    trailing = {k: str(v) for k, v in pairs}
    return Outcome(code=grpc.StatusCode.OK, details="", body=bytes(answer), trailing=trailing)
