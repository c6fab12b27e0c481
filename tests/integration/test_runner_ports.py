"""The runner's port reservations, which keep parallel test workers from taking each other's
ports between the moment a topology picks them and the moment its servers bind them."""

from __future__ import annotations

import socket

import pytest

from gateway_demo.runner import reserve_port


def test_a_reserved_port_is_taken_by_no_one_else_but_its_server_can_listen_on_it() -> None:
    """While reserved, a plain bind to the port fails and a SO_REUSEADDR server (as gRPC and
    aiohttp bind) listens on it and is reached; once released, anyone may bind it."""
    reserved = reserve_port()
    port = reserved.getsockname()[1]
    with socket.socket() as intruder, pytest.raises(OSError, match="in use"):
        intruder.bind(("127.0.0.1", port))
    reserved.close()
    with socket.socket() as later:
        later.bind(("127.0.0.1", port))

    reserved = reserve_port()
    port = reserved.getsockname()[1]
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            client.sendall(b"hello")
            assert accepted.recv(5) == b"hello"
            accepted.close()
    reserved.close()
