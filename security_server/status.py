"""Where gateway errors become gRPC statuses: the one place the mapping is applied.

A refusal carries its stable code in trailing metadata `gateway-error` and the message
id in `gateway-id`; the details string is the error's message, which never holds
internal detail.
"""

from __future__ import annotations

from typing import Any

import grpc

from gateway.errors import STATUS_BY_CODE, Code

ERROR_KEY = "gateway-error"
ID_KEY = "gateway-id"


def grpc_status(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[STATUS_BY_CODE[code].value]


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: Code,
    message: str,
    message_id: str | None,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    trailing: tuple[tuple[str, str], ...] = ((ERROR_KEY, code.value), *extra)
    if message_id:
        trailing = (*trailing, (ID_KEY, message_id))
    await context.abort(grpc_status(code), message, trailing_metadata=trailing)
