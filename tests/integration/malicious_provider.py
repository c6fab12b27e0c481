"""A malicious provider security server for the tests: real mutual TLS, forged answers.

It listens on a registered provider's address with that server's own TLS certificate and
key (the real process stays stopped), so a real consumer security server connects to it
exactly as to the real provider. What it answers to each request frame is chosen by the
test: `behaviour` maps the request frame to a `Reply` (an answer frame and the stream
staple to send with it, or nothing and the end of the stream), and `stream_behaviour` maps
a streaming call's open to the messages it answers with (`Exchange.Stream`). It never checks anything
itself; the tests decide what the consumer should have done.

It runs on gRPC's thread-based server, so one instance serves a whole test module
whatever event loop each test runs on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gateway.v1 import exchange_pb2 as pb

if TYPE_CHECKING:
    from gateway_demo.runner import Runner


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What to send back for one request frame."""

    # the answer frame; None: end the stream without answering
    frame: pb.Frame | None
    # the OCSP staple sent with this stream message (empty: none)
    staple: bytes = b""


Behaviour = Callable[[pb.Frame], Reply]
StreamBehaviour = Callable[[pb.StreamOpen], Iterator[pb.StreamMessage]]


def _hang_up(_: pb.Frame) -> Reply:
    return Reply(frame=None)


class MaliciousProvider:
    """A provider endpoint that answers each request frame with `behaviour(frame)`."""

    def __init__(self, address: str, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._behaviour: Behaviour = _hang_up
        self._stream_behaviour: StreamBehaviour = lambda _: iter(())
        self.requests: list[pb.Frame] = []
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=4),
            options=[
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ],
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self._exchange,
            request_deserializer=pb.Frames.FromString,
            response_serializer=pb.Frames.SerializeToString,
        )
        stream = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=pb.StreamMessage.FromString,
            response_serializer=pb.StreamMessage.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "gateway.v1.Exchange", {"Exchange": handler, "Stream": stream}
                ),
            )
        )
        credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
        )
        if self._server.add_secure_port(address, credentials) == 0:
            raise RuntimeError(f"cannot listen on {address}")

    @property
    def behaviour(self) -> Behaviour:
        with self._lock:
            return self._behaviour

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._behaviour = behaviour

    @property
    def stream_behaviour(self) -> StreamBehaviour:
        with self._lock:
            return self._stream_behaviour

    @stream_behaviour.setter
    def stream_behaviour(self, behaviour: StreamBehaviour) -> None:
        with self._lock:
            self._stream_behaviour = behaviour

    def _stream(
        self, messages: Iterator[pb.StreamMessage], context: Any
    ) -> Iterator[pb.StreamMessage]:
        first = next(messages)
        yield from self.stream_behaviour(first.open)

    def _exchange(self, messages: Iterator[pb.Frames], context: Any) -> Iterator[pb.Frames]:
        for message in messages:
            for frame in message.frames:
                self.requests.append(frame)
                reply = self.behaviour(frame)
                if reply.frame is None:
                    return
                yield pb.Frames(frames=[reply.frame], ocsp_staple=reply.staple)

    @classmethod
    def posing_as(cls, runner: Runner, server: str) -> MaliciousProvider:
        """On `server`'s provider address, with its TLS certificate and key from `runner`'s
        PKI (the server itself must be stopped); not started."""
        stem = server.replace("/", "_")
        pki = runner.pki
        return cls(
            runner.providers[server],
            (pki / "auth" / f"{stem}.crt").read_bytes(),
            (pki / "auth" / f"{stem}.key").read_bytes(),
            (pki / "ca.crt").read_bytes(),
        )

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(None).wait()
