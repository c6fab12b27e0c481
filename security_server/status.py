"""Where gateway errors become gRPC statuses: the one place the mapping is applied.

A refusal carries its stable code in trailing metadata `gateway-error` and the message
id in `gateway-id`; the details string is the error's message, which never holds
internal detail.

Whatever a caller or a peer sent, the answer stays within the error contract: a message
id is echoed only when it has the form of one (a value gRPC cannot send, such as one with
a control byte, would turn the refusal into a bare INTERNAL), and the message is cut to
`MAX_MESSAGE_CHARS` of printable ASCII (a long one would exceed gRPC's metadata limits
and reach the caller as RESOURCE_EXHAUSTED without its code).
"""

from __future__ import annotations

from typing import Any

import grpc

from gateway.envelope import is_message_id
from gateway.errors import STATUS_BY_CODE, Code, bound_message

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
    if message_id and is_message_id(message_id):
        trailing = (*trailing, (ID_KEY, message_id))
    await context.abort(grpc_status(code), bound_message(message), trailing_metadata=trailing)
