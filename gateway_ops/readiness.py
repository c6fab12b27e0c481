"""Readiness: named conditions a process must meet to do its job now.

Each condition is a function that answers None when it holds, or a sentence saying what
is wrong. `/readyz`, `grpc.health.v1` and the `gateway_ready` metric all read the same
conditions, so a load balancer, Kubernetes and an operator see one answer with its reasons.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

log = structlog.get_logger("gateway.ops")

Condition = Callable[[], str | None]


def failure_reason(exc: BaseException) -> str:
    """An exception as one short line for `/readyz`: the driver's own error where a
    library wrapped it (SQLAlchemy's adds the statement and a link to its documentation),
    whitespace folded, at most 300 characters."""
    cause = getattr(exc, "orig", None)
    cause = cause if isinstance(cause, BaseException) else exc
    text = " ".join(str(cause).split())
    return (f"{type(cause).__name__}: {text}" if text else type(cause).__name__)[:300]


class Readiness:
    def __init__(self) -> None:
        self._conditions: dict[str, Condition] = {}
        self._stopping: str | None = None
        self._last: dict[str, str] = {}

    def add(self, name: str, condition: Condition) -> None:
        """Add the condition `name`; a second one of the same name replaces the first."""
        self._conditions[name] = condition

    def stopping(self, reason: str = "the process is stopping") -> None:
        """From now on not ready, whatever the conditions say (a drain or a shutdown)."""
        self._stopping = reason

    def failures(self) -> dict[str, str]:
        """Each condition that does not hold, with its reason (empty when ready). A condition
        that raises counts as failed, with the exception as its reason: never ready by
        accident. Changes are logged once, when they happen."""
        failed: dict[str, str] = {}
        if self._stopping is not None:
            failed["stopping"] = self._stopping
        for name, condition in self._conditions.items():
            try:
                reason = condition()
            except Exception as exc:  # a broken check must read as not ready
                reason = f"the check failed: {failure_reason(exc)}"
            if reason is not None:
                failed[name] = reason
        if failed != self._last:
            if failed:
                log.warning("not_ready", failed=failed)
            else:
                log.info("ready")
            self._last = failed
        return failed

    def ready(self) -> bool:
        return not self.failures()
