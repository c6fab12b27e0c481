"""A bare gRPC forwarder, one hop of the baseline `gateway bench` compares the gateway with.

What an agency might write instead of the gateway: two processes, the first taking plain
gRPC from the caller and forwarding each unary call over mutual TLS to the second, which
forwards it in plain gRPC to the backend. Bytes in, bytes out (generic handlers, no
(de)serialisation), one channel per hop, no signature, check or log: the cost of moving
a call through two Python processes and one TLS link, and nothing else.

    python -m gateway_demo.forwarder --listen HOST:PORT --target HOST:PORT
        [--tls-certificate CRT --tls-key KEY --client-ca CA]        # serve mTLS
        [--target-ca CA --target-name DNS --certificate CRT --key KEY]  # call over mTLS

It prints `{"listen": "HOST:PORT"}` once it serves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class Forward(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Every method, unary, forwarded as bytes over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.calls: dict[str, Any] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method = details.method
        call = self.calls.get(method)
        if call is None:
            call = self.calls[method] = self.channel.unary_unary(method, None, None)

        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            try:
                answer: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)


async def serve(ns: argparse.Namespace) -> None:
    if ns.target_ca:
        to_target = grpc.ssl_channel_credentials(
            _read(ns.target_ca), _read(ns.key), _read(ns.certificate)
        )
        options = [("grpc.ssl_target_name_override", ns.target_name)] if ns.target_name else []
        channel = grpc.aio.secure_channel(ns.target, to_target, options=options)
    else:
        channel = grpc.aio.insecure_channel(ns.target)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forward(channel),))
    if ns.tls_certificate:
        key, certificate = _read(ns.tls_key), _read(ns.tls_certificate)
        assert key is not None
        assert certificate is not None
        credentials = grpc.ssl_server_credentials(
            [(key, certificate)],
            root_certificates=_read(ns.client_ca),
            require_client_auth=bool(ns.client_ca),
        )
        port = server.add_secure_port(ns.listen, credentials)
    else:
        port = server.add_insecure_port(ns.listen)
    await server.start()
    host = ns.listen.rsplit(":", 1)[0]
    print(json.dumps({"listen": f"{host}:{port}"}), flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway_demo.forwarder")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--tls-certificate")
    parser.add_argument("--tls-key")
    parser.add_argument("--client-ca")
    parser.add_argument("--target-ca")
    parser.add_argument("--target-name")
    parser.add_argument("--certificate")
    parser.add_argument("--key")
    ns = parser.parse_args(argv)
    from gateway_ops.runtime import die_with_parent, run

    die_with_parent()
    run(lambda: serve(ns))  # on uvloop, as the security servers
    return 0


if __name__ == "__main__":
    sys.exit(main())
