"""Where a call comes from, for limits per source: the address of a gRPC peer or HTTP
remote, and the calls each source has open at once."""

from __future__ import annotations

import ipaddress
import urllib.parse


def peer_host(peer: str | None) -> str:
    """The address part of a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") or of an
    HTTP remote: one source whatever port each connection uses; at most 64 characters."""
    if not peer:
        return "unknown"
    scheme, sep, rest = peer.partition(":")
    if sep and scheme in ("ipv4", "ipv6", "unix", "unix-abstract"):
        # gRPC (1.85) writes an IPv6 peer's brackets percent-encoded: ipv6:%5B::1%5D:5000
        peer = urllib.parse.unquote(rest)
        if scheme.startswith("unix"):
            return "unix"
    if peer.startswith("["):
        return (peer[1 : peer.find("]")] if "]" in peer else peer)[:64]
    if peer.count(":") == 1:
        return peer.rsplit(":", 1)[0][:64]
    return peer[:64]


def source_of(peer: str | None) -> str:
    """The source a limit counts `peer` under: its IPv4 address, or its IPv6 /64 network
    (one holder of a /64 has 2**64 addresses to spread calls over)."""
    host = peer_host(peer)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


class OpenCalls:
    """Calls open at once per source, each source at most `per_source` (0: no limit)."""

    __slots__ = ("_open", "per_source")

    def __init__(self, per_source: int) -> None:
        if per_source < 0:
            raise ValueError(f"a limit of calls per source must be >= 0, not {per_source}")
        self.per_source = per_source
        self._open: dict[str, int] = {}

    def take(self, source: str) -> bool:
        """Count a call of `source` as open; False (nothing counted) when it has its limit."""
        held = self._open.get(source, 0)
        if self.per_source and held >= self.per_source:
            return False
        self._open[source] = held + 1
        return True

    def give(self, source: str) -> None:
        held = self._open.get(source, 0)
        if held > 1:
            self._open[source] = held - 1
        else:
            self._open.pop(source, None)

    def held(self, source: str) -> int:
        return self._open.get(source, 0)
