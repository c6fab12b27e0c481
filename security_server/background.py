"""Background work of a security server, off the data path: a job repeated at an interval
(checkpoints, refusal aggregates, archiving, health), and stopping a task.

A round that fails is logged and the next one runs as usual: a background job must never
die silently on one error (a checkpoint sender that stopped would widen, unseen, the window
in which an operator can rewrite the log). Nothing here may hold up the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("security_server.background")


async def every(
    interval: float,
    work: Callable[[], Awaitable[object]],
    *,
    name: str,
    first_at_once: bool = False,
) -> None:
    """Run `work` every `interval` seconds until cancelled (the first time at once when
    `first_at_once`, else after one interval); a round that raises is logged as
    `background_round_failed` with `name`, and the next round runs all the same."""
    if not first_at_once:
        await asyncio.sleep(interval)
    while True:
        try:
            await work()
        except Exception as exc:
            log.exception("background_round_failed", task=name, kind=type(exc).__name__)
        await asyncio.sleep(interval)


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
