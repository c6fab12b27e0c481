"""The gRPC options of the consumer endpoint, set from the documented limits.

gRPC has limits of its own, and what it refuses never reaches our code, so it is answered
without a `gateway-error`. Left at their defaults they sit below ours: gRPC cancels calls
that wait to be picked up once more than 1,000 are pending (`grpc.server.max_pending_requests`),
so a burst of 1,900 calls on one connection got about 10 % bare CANCELLED, well below the
documented `limits.max_concurrent_calls` (1,000, refused with `overloaded`) and its backstop
(twice that, or the limit plus 1,000). Here gRPC's limits are set from the backstop, so a
burst up to twice the backstop is answered by our code: served, or refused with a gateway
error (`overloaded` past the limit, at once and without a record past the backstop).

Deliberately not set: `grpc.max_concurrent_streams` (a client past it gets its streams reset,
UNAVAILABLE without a code, instead of `overloaded`) and the aio server's
`maximum_concurrent_rpcs` (RESOURCE_EXHAUSTED without a code): the consumer counts calls
itself and refuses those past the backstop at once, without a record.

Metadata: gRPC refuses a request whose metadata exceeds `METADATA_BYTES` in all (name and
value lengths plus 32 bytes per entry) with RESOURCE_EXHAUSTED before our code runs; below
it, each `gateway-*` value is checked by our code against its own, much smaller, limit.
"""

from __future__ import annotations

from security_server.settings import LimitsSection

# gRPC's hard limit on received metadata (the default, stated here so that it is a fact of
# ours: the soft limit is raised to it, so a request below it is never refused at random)
METADATA_BYTES = 16 * 1024


def backstop(limits: LimitsSection) -> int:
    """Calls at once beyond which the consumer refuses at once, without a record."""
    return max(2 * limits.max_concurrent_calls, limits.max_concurrent_calls + 1000)


def window_options(limits: LimitsSection) -> list[tuple[str, int]]:
    """The HTTP/2 flow-control window of every stream (`limits.stream_window_bytes`): fixed,
    since gRPC's bandwidth-delay probing would otherwise grow it as it sees fit."""
    return [
        ("grpc.http2.lookahead_bytes", limits.stream_window_bytes),
        ("grpc.http2.bdp_probe", 0),
    ]


def consumer_options(
    limits: LimitsSection, *, max_receive: int, max_send: int
) -> list[tuple[str, int]]:
    """The consumer endpoint's gRPC server options."""
    # calls received but not yet picked up by the event loop: a burst queues here, and
    # twice the backstop leaves room for the calls the consumer then refuses at once
    pending = 2 * backstop(limits)
    return [
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ("grpc.max_metadata_size", METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", METADATA_BYTES),
        *window_options(limits),
    ]
