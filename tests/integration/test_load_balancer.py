"""Two replicas of the population registry's security server behind HAProxy (TCP mode:
mutual TLS end to end), sharing one PostgreSQL log, each with its own chain, and a second
DNIC server hosting the same subsystem (its own SQLite log). The registered address of
ss-dnic is HAProxy's. Under load, the second server is killed (`kill -9`), then the
replica carrying the calls: only the calls in flight on each may fail, the consumer fails
over to the balancer and HAProxy sends its new stream to the other replica, no request
reaches two backends (every message id in one log only), every answered call is in a
log, and every chain verifies."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Iterator

import pytest

from gateway_demo.runner import TEMPLATE, Runner

from .conftest import (
    DNIC,
    DNIC2,
    SECOND_DNIC_SERVER,
    audit_verify,
    postgres_database,
    postgres_rows,
    query_log,
    run_gateway,
    timed_calls,
)

POSTGRES = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
HAPROXY = shutil.which("haproxy")

pytestmark = [
    pytest.mark.skipif(
        not POSTGRES, reason="GATEWAY_TEST_POSTGRES_URL is not set: replicas need PostgreSQL"
    ),
    pytest.mark.skipif(
        HAPROXY is None, reason="haproxy is not installed (scripts/debian-packages installs it)"
    ),
]

HAPROXY_CONFIG = """\
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # a connection to a replica that is down goes to another one
    retries 3
    option redispatch
frontend dnic
    bind {frontend}
    default_backend replicas
backend replicas
    balance roundrobin
    server a {a} check inter 300ms fall 1 rise 2
    server b {b} check inter 300ms fall 1 rise 2
"""


async def _chains(url: str) -> dict[str, list[str]]:
    """The message ids of the provider requests in each chain of the shared log."""
    chains: dict[str, list[str]] = {}
    for chain, message_id in await postgres_rows(
        url,
        "SELECT chain, message_id FROM message_log WHERE role = 'provider' AND kind = 'request'",
    ):
        chains.setdefault(chain, []).append(message_id)
    return chains


def _wait_for_port(address: str, seconds: float = 10.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {address}")


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runner, str, str]]:
    """The demo topology with ss-dnic as two replicas (chains dnic-a, dnic-b) behind
    HAProxy; yields the runner, the second replica's process name and the log's URL."""
    assert POSTGRES is not None and HAPROXY is not None
    with postgres_database("balanced_test") as (_, url):
        folder = tmp_path_factory.mktemp("balanced")
        template = folder / "topology.toml"
        template.write_text(TEMPLATE.read_text() + SECOND_DNIC_SERVER)
        runner = Runner(folder / "run", template=template)
        haproxy: subprocess.Popen[bytes] | None = None
        try:
            runner.prepare()
            runner.set_log(DNIC, database=url, chain="dnic-a")
            second = runner.add_replica(DNIC, "dnic-b", database=url)
            first_address = runner.providers[DNIC]
            second_address = tomllib.loads((runner.workdir / f"{second}.toml").read_text())[
                "provider"
            ]["listen"]
            frontend = runner.reserve_address()
            # peers reach ss-dnic at the balancer's address
            for server in runner.topology["servers"]:
                if server["id"] == DNIC:
                    server["address"] = frontend
            runner.write_topology()
            config = folder / "haproxy.cfg"
            config.write_text(
                HAPROXY_CONFIG.format(frontend=frontend, a=first_address, b=second_address)
            )
            runner.start_all()
            haproxy = subprocess.Popen(
                [HAPROXY, "-f", str(config), "-db"],
                stdout=subprocess.DEVNULL,
                stderr=(folder / "haproxy.log").open("wb"),
            )
            _wait_for_port(frontend)
            yield runner, second, url
        finally:
            if haproxy is not None:
                haproxy.terminate()
                haproxy.wait(10)
            runner.close()


def second_server_requests(runner: Runner) -> list[str]:
    """The message ids of the requests the second DNIC server logged (after a kill too)."""
    rows = query_log(
        runner.log_db(DNIC2),
        "SELECT message_id FROM message_log WHERE role = 'provider' AND kind = 'request'",
    )
    return [r["message_id"] for r in rows]


def test_a_server_and_a_replica_killed_under_load_fail_only_calls_in_flight(
    balanced: tuple[Runner, str, str],
) -> None:
    runner, second, url = balanced
    processes = {"dnic-a": runner.server_names[DNIC], "dnic-b": second}
    first_kill, second_kill, seconds = 1.5, 3.5, 6.0
    killed: list[str] = []
    carried: dict[str, int] = {}

    async def killer() -> None:
        await asyncio.sleep(first_kill)
        carried[DNIC2] = len(second_server_requests(runner))
        killed.append(runner.server_names[DNIC2])
        await asyncio.to_thread(runner.stop, killed[-1], kill=True)
        await asyncio.sleep(second_kill - first_kill)
        chains = await _chains(url)
        busiest = max(processes, key=lambda c: len(chains.get(c, [])))
        carried[busiest] = len(chains.get(busiest, []))
        killed.append(processes[busiest])
        await asyncio.to_thread(runner.stop, processes[busiest], kill=True)

    timed = asyncio.run(timed_calls(runner, seconds, during=killer))
    results = [(start, outcome) for start, _, outcome in timed]
    failed = [(s, o) for s, o in results if not o.ok]
    answered = [o for _, o in results if o.ok]
    chains = asyncio.run(_chains(url))
    seen = Counter([m for ids in chains.values() for m in ids] + second_server_requests(runner))
    duplicated = sum(n - 1 for n in seen.values())
    print(
        f"\nkilled {killed[0]}, then replica {killed[1]} (requests carried before each kill: "
        f"{carried}); {len(results)} calls attempted, {len(failed)} failed, "
        f"{len(answered)} answered, {duplicated} delivered twice"
    )
    # only calls in flight at a kill fail: those begun just before one
    assert all(
        any(kill - 1.0 <= s <= kill + 1.0 for kill in (first_kill, second_kill)) for s, _ in failed
    ), failed[:3]
    assert len(failed) <= 16
    late = [o for s, o in results if s > second_kill + 1.5]
    assert late and all(o.ok for o in late)
    assert duplicated == 0  # no request reached two backends
    assert {o.message_id for o in answered} <= set(seen)  # every answer is in a log
    assert set(chains) == {"dnic-a", "dnic-b"}  # each replica served some
    done = run_gateway("audit", "verify", "--db", url, "--quiet", "--stamp-grace", "-1")
    assert done.returncode == 0, done.stdout + done.stderr
    done = audit_verify(runner.log_db(DNIC2), "--stamp-grace", "-1")
    assert done.returncode == 0, done.stdout + done.stderr
