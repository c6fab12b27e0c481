"""Failpoints: internal errors the tests inject into a real server, to prove what its
backstops do with a bug (a clear refusal to the caller, a record in the message log, the
server going on), which no well-formed or malformed input can reach.

Off unless the environment variable `GATEWAY_FAILPOINTS` is `1` when the process starts
(any other value leaves them off); never set it in production: a caller could then choose
a message id that fails its call. Even then a failpoint fires only for a call whose
message id starts with `fail-<name>-`, so that a test topology serves every other call as
usual.
"""

from __future__ import annotations

import os

ARMED = os.environ.get("GATEWAY_FAILPOINTS") == "1"


class InjectedError(Exception):
    """The internal error a failpoint injects."""


def failpoint(name: str, message_id: str | None) -> None:
    """Raise `InjectedError` when failpoints are armed and the call's message id asks for
    this one."""
    if ARMED and message_id is not None and message_id.startswith(f"fail-{name}-"):
        raise InjectedError(f"failpoint {name} for {message_id}")
