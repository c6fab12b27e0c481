"""The baselines `make bench` measures the gateway against work from a clean checkout: the
bare two-hop Python forwarder and the two nginx hops carry calls to the backend over
mutual TLS, their CPU time is read, and they stop."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway_demo.baselines import Baseline, cpu_seconds, nginx_missing, start_bare, start_nginx
from gateway_demo.bench import ECHO
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """Only the PKI and the population backend of the demo topology."""
    runner = Runner(tmp_path_factory.mktemp("baselines") / "run", separate_backends=True)
    try:
        runner.prepare()
        runner.start("backend-population")
        yield runner
    finally:
        runner.close()


def echo(address: str) -> bytes:
    body = population.EchoMessage(payload=os.urandom(512)).SerializeToString()
    with grpc.insecure_channel(address) as channel:
        answer: bytes = channel.unary_unary(ECHO, None, None)(body, timeout=10)
    assert answer == body
    return answer


def through(baseline: Baseline) -> None:
    try:
        before = baseline.cpu_seconds()
        for _ in range(20):
            echo(baseline.address)
        assert baseline.cpu_seconds() >= before
    finally:
        baseline.close()
    assert all(p.poll() is not None for p in baseline.processes)


def test_the_bare_forwarder_carries_a_call_over_mutual_tls(runner: Runner) -> None:
    through(start_bare(runner.pki, runner.backends["population"], runner.reserve_address))


def test_the_nginx_hops_carry_a_call_over_mutual_tls(runner: Runner, tmp_path: Path) -> None:
    missing = nginx_missing()
    if missing is not None:
        pytest.skip(missing)
    through(
        start_nginx(runner.pki, runner.backends["population"], runner.reserve_address, tmp_path)
    )


def test_cpu_seconds_of_a_process_that_is_gone_are_zero() -> None:
    assert cpu_seconds(2**22 + 12345) == 0.0
    assert cpu_seconds(os.getpid()) > 0.0
