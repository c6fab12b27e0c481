"""The README's "Add an agency" walkthrough, followed step by step with the documented
commands only: a third agency (the Ministry of Social Development) joins the running demo
instance, gets its certificates from the instance's CA through requests (the development
CA acting as an external one), registers its security server, which the registry approves,
obtains an agreement with the population registry, starts its server from the example
settings file, and its backend's first call is answered."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner, reserve_port

EXAMPLE = Path(__file__).parents[2] / "deploy" / "examples" / "agency-server.toml"
MEMBER, SERVER = "UY/GOV/MIDES", "UY/GOV/MIDES/ss1"
SUBSYSTEM = "UY/GOV/MIDES/benefits"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"


def gateway(*args: str, token: str | None = None) -> str:
    """Run one documented `gateway` command; its standard output (failing on exit != 0)."""
    env = {**os.environ, **({"GATEWAY_TOKEN": token} if token else {})}
    done = subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, f"gateway {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    runner = Runner(tmp_path_factory.mktemp("instance") / "run", refresh_seconds=1)
    try:
        runner.prepare()
        runner.start_all()
        yield runner
    finally:
        runner.close()


def test_a_new_agency_makes_its_first_allowed_call(instance: Runner, tmp_path: Path) -> None:
    registry_toml = str(instance.workdir / "registry.toml")
    api = ["--url", instance.api_url]

    def token(role: str, subject: str, member: str | None = None) -> str:
        extra = ["--member", member] if member else []
        return gateway(
            "registry",
            "token",
            "--config",
            registry_toml,
            "--role",
            role,
            "--subject",
            subject,
            *extra,
        ).strip()

    registry_admin = token("registry-admin", "admin@registry")
    mides_admin = token("member-admin", "admin@mides", MEMBER)
    dnic_admin = token("member-admin", "admin@dnic", "UY/GOV/DNIC")

    # 1. the registry's administrators add the member and its subsystem
    gateway("admin", *api, "members", "add", MEMBER, "--name", "MIDES", token=registry_admin)
    gateway("admin", *api, "subsystems", "add", SUBSYSTEM, token=registry_admin)

    # 2. the agency makes its keys and requests; 3. the CA signs them; 4. the agency imports
    agency = tmp_path / "mides"
    requests, received = agency / "requests", agency / "received"
    received.mkdir(parents=True)
    gateway("pki", "csr", "--server", SERVER, "--out", str(requests))
    gateway("pki", "csr", "--member", MEMBER, "--out", str(requests))
    for flag, who, stem in (
        ("--server", SERVER, "UY_GOV_MIDES_ss1"),
        ("--member", MEMBER, "UY_GOV_MIDES"),
    ):
        certificate = received / f"{stem}.crt"
        gateway(
            "pki",
            "sign",
            "--dir",
            str(instance.pki),
            "--csr",
            str(requests / f"{stem}.csr"),
            "--out",
            str(certificate),
        )
        gateway(
            "pki",
            "import",
            flag,
            who,
            "--certificate",
            str(certificate),
            "--key",
            str(requests / f"{stem}.key"),
            "--ca",
            str(instance.pki / "ca.crt"),
            "--dir",
            str(agency / "pki"),
        )

    # 5. the agency submits its server; 6. the registry approves it
    provider = f"127.0.0.1:{reserve_port().getsockname()[1]}"
    gateway(
        "admin",
        *api,
        "servers",
        "submit",
        "--id",
        SERVER,
        "--address",
        provider,
        "--certificate",
        str(agency / "pki" / "auth" / "UY_GOV_MIDES_ss1.crt"),
        "--subsystem",
        SUBSYSTEM,
        token=mides_admin,
    )
    gateway(
        "admin", *api, "servers", "approve", SERVER, "--reason", "checked", token=registry_admin
    )

    # 7. the agreement: requested by the agency, approved by the provider and the registry
    requested = json.loads(
        gateway(
            "admin",
            *api,
            "--json",
            "agreements",
            "request",
            "--client",
            SUBSYSTEM,
            "--service",
            SERVICE,
            "--purpose",
            "social-benefits",
            "--basis",
            "law",
            "--reference",
            "Ley 17.866",
            "--reason",
            "eligibility checks",
            token=mides_admin,
        )
    )
    agreement = requested["id"]
    gateway("admin", *api, "agreements", "approve", agreement, token=dnic_admin)
    gateway("admin", *api, "agreements", "approve", agreement, token=registry_admin)

    # 8. the server's settings, from the example file, and the server started
    consumer = f"127.0.0.1:{reserve_port().getsockname()[1]}"
    filled = {
        "<INSTANCE/CLASS/MEMBER/SERVER>": SERVER,
        "<INSTANCE/CLASS/MEMBER>": MEMBER,
        "<INSTANCE_CLASS_MEMBER_SERVER>": "UY_GOV_MIDES_ss1",
        "<INSTANCE_CLASS_MEMBER>": "UY_GOV_MIDES",
        "<anchor.json>": str(instance.pki / "anchor.json"),
        "<subject-pseudonym.key>": str(instance.subject_key()),
        "<HOST:PORT registered with `gateway admin servers submit --address`>": provider,
        "<http://ocsp.example:8888/>": f"http://{instance.ocsp_address}/",
        "<http://tsa.example:3161/>": f"http://{instance.tsa_address}/",
        "<http://registry.example:7080/.well-known/jwks.json>": (
            f"http://{instance.api_address}/.well-known/jwks.json"
        ),
        "127.0.0.1:8080": consumer,
        "127.0.0.1:8090": f"127.0.0.1:{reserve_port().getsockname()[1]}",
        "127.0.0.1:9100": "127.0.0.1:0",
    }
    settings = EXAMPLE.read_text()
    for placeholder, value in filled.items():
        settings = settings.replace(placeholder, value)
    left = [line for line in settings.splitlines() if "<" in line and not line.startswith("#")]
    assert not left, left
    (agency / "server.toml").write_text(settings)
    ready = agency / "ready.json"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway_cli.main",
            "server",
            "serve",
            "--config",
            str(agency / "server.toml"),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(agency / "server.log").open("wb"),
    )
    try:
        # 9. the agency's backend calls through its own server
        wait_ready(ready, server)
        outcome = asyncio.run(first_call(consumer))
        assert outcome.ok, (outcome, (agency / "server.log").read_text()[-3000:])
        answer = population.Person.FromString(outcome.body or b"")
        assert answer.national_id == "1.234.567-8"
    finally:
        server.terminate()
        server.wait(15)


def wait_ready(ready: Path, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if ready.exists() or server.poll() is not None:
            break
        time.sleep(0.1)
    assert server.poll() is None, "the agency's server exited"


async def first_call(consumer: str) -> Outcome:
    request = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    metadata = routing_metadata(client=SUBSYSTEM, service=SERVICE, purpose="social-benefits")
    async with grpc.aio.insecure_channel(consumer) as channel:
        for _ in range(50):  # the agreement reaches the provider within a configuration push
            outcome = await call_raw(channel, GET_PERSON, request, metadata)
            if outcome.ok:
                break
            await asyncio.sleep(0.2)
        return outcome
