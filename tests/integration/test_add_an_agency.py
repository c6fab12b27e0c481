"""The README's "Add an agency" walkthrough, followed step by step with the documented
commands only: a third agency (the Ministry of Social Development) joins the running demo
instance, gets its certificates from the instance's CA through requests (the development
CA acting as an external one), registers its security server, which the registry approves,
obtains an agreement with the population registry, starts its server from the example
settings file, and its backend's first call is answered. Then the README's "Renew
certificates": under load, the agency renews its server's authentication certificate and
its member's signing certificate, switches to them with SIGHUP and retires the old
authentication certificate, with no failed call; the population registry's server then
refuses the old certificate."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner, reserve_port
from tests.integration.attacker import StreamError, open_stream

EXAMPLE = Path(__file__).parents[2] / "deploy" / "examples" / "agency-server.toml"
MEMBER, SERVER = "UY/GOV/MIDES", "UY/GOV/MIDES/ss1"
SUBSYSTEM = "UY/GOV/MIDES/benefits"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
# the agency's own service, and the subsystem of the demo that calls it
OWN_SERVICE = "UY/GOV/MIDES/benefits/eligibility/v1"
ECHO = "/demo.population.v1.PopulationRegistry/Echo"
MSP_CLINICS = "UY/GOV/MSP/clinics"


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


@dataclass
class Agency:
    folder: Path
    server: subprocess.Popen[bytes]
    consumer: str
    settings: Path
    api: list[str]
    registry_admin: str
    admin: str

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    runner = Runner(tmp_path_factory.mktemp("instance") / "run", refresh_seconds=1)
    try:
        runner.prepare()
        runner.start_all()
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="module")
def agency(instance: Runner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agency]:
    """The walkthrough up to step 8: the agency's server running from the example settings."""
    tmp_path = tmp_path_factory.mktemp("agency")
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
    certify_agency(instance, agency / "requests", agency / "received", agency / "pki")

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

    # 8. the agency publishes a service of its own, which the Ministry of Health may use
    backend = f"127.0.0.1:{reserve_port().getsockname()[1]}"
    gateway(
        "admin", *api, "services", "add", "--id", OWN_SERVICE,
        "--description", "Social benefits: eligibility (echoes the request)",
        "--method", ECHO, "--category", "social-benefits",
        "--legal-basis", "Ley 17.866", "--contact", "datos@mides.example",
        token=mides_admin,
    )  # fmt: skip
    requested = json.loads(
        gateway(
            "admin",
            *api,
            "--json",
            "agreements",
            "request",
            "--client",
            MSP_CLINICS,
            "--service",
            OWN_SERVICE,
            "--purpose",
            "healthcare-benefits",
            "--basis",
            "law",
            "--reference",
            "Ley 17.866",
            "--reason",
            "benefits of patients",
            token=token("member-admin", "admin@msp", "UY/GOV/MSP"),
        )
    )
    gateway("admin", *api, "agreements", "approve", requested["id"], token=mides_admin)
    gateway("admin", *api, "agreements", "approve", requested["id"], token=registry_admin)

    # 9. the server's settings, from the example file, and the server started
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
    settings += f'"{OWN_SERVICE}" = "{backend}"\n'
    (agency / "server.toml").write_text(settings)
    ready = agency / "ready.json"
    # the agency's own backend (here the demo's sample one, whose Echo the service offers)
    own_backend = subprocess.Popen(
        [
            sys.executable, "-m", "gateway_cli.main", "demo-backend", "population",
            "--listen", backend, "--ready-file", str(agency / "backend.json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(agency / "backend.log").open("wb"),
    )  # fmt: skip
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
        wait_ready(agency / "backend.json", own_backend)
        wait_ready(ready, server)
        yield Agency(
            folder=agency,
            server=server,
            consumer=consumer,
            settings=agency / "server.toml",
            api=api,
            registry_admin=registry_admin,
            admin=mides_admin,
        )
    finally:
        for process in (server, own_backend):
            process.terminate()
            process.wait(15)


def test_a_new_agency_makes_its_first_allowed_call(agency: Agency) -> None:
    # 10. the agency's backend calls through its own server
    outcome = asyncio.run(first_call(agency.consumer))
    assert outcome.ok, (outcome, agency.log()[-3000:])
    answer = population.Person.FromString(outcome.body or b"")
    assert answer.national_id == "1.234.567-8"


def test_another_agency_calls_the_service_the_new_agency_published(
    instance: Runner, agency: Agency
) -> None:
    # 11. the Ministry of Health's clinics call the agency's service through both servers
    async def call() -> Outcome:
        request = population.EchoMessage(payload=b"benefits of 1.234.567-8").SerializeToString()
        metadata = routing_metadata(
            client=MSP_CLINICS, service=OWN_SERVICE, purpose="healthcare-benefits"
        )
        async with instance.consumer_channel("UY/GOV/MSP/ss1", MSP_CLINICS) as channel:
            for _ in range(50):  # the agreement reaches both servers within a push
                outcome = await call_raw(channel, ECHO, request, metadata)
                if outcome.ok:
                    break
                await asyncio.sleep(0.2)
            return outcome

    outcome = asyncio.run(call())
    assert outcome.ok, (outcome, agency.log()[-3000:])
    assert (
        population.EchoMessage.FromString(outcome.body or b"").payload == b"benefits of 1.234.567-8"
    )


def test_renewal_under_load_fails_no_call_and_retires_the_old_certificate(
    instance: Runner, agency: Agency
) -> None:
    """The README's "Renew certificates", step by step, while the agency's backend calls."""
    folder = agency.folder
    old_cert = (folder / "pki" / "auth" / "UY_GOV_MIDES_ss1.crt").read_bytes()
    old_key = (folder / "pki" / "auth" / "UY_GOV_MIDES_ss1.key").read_bytes()
    old_sha = hashlib.sha256(
        x509.load_pem_x509_certificate(old_cert).public_bytes(serialization.Encoding.DER)
    ).hexdigest()
    with Load(agency.consumer) as load:
        # 1-3. new keys and requests, signed by the CA, checked and installed beside the old
        requests = folder / "requests-2027"
        certify_agency(instance, requests, requests, folder / "pki-2027")
        # 4. the agency registers the next authentication certificate; 5. it is approved
        renewed = json.loads(
            gateway(
                "admin",
                *agency.api,
                "--json",
                "servers",
                "renew",
                SERVER,
                "--certificate",
                str(folder / "pki-2027" / "auth" / "UY_GOV_MIDES_ss1.crt"),
                "--reason",
                "yearly renewal",
                token=agency.admin,
            )
        )
        assert renewed["state"] == "pending"
        gateway(
            "admin", *agency.api, "servers", "approve-certificate", SERVER, renewed["sha256"],
            "--reason", "fingerprint checked with the agency", token=agency.registry_admin,
        )  # fmt: skip
        # 6. the settings name the new files; SIGHUP switches to them once the approval
        # reached the server (until then it keeps its keys and says why)
        settings = agency.settings.read_text().replace("pki/", "pki-2027/")
        agency.settings.write_text(settings)
        reloaded = False
        for _ in range(40):
            agency.server.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            if "keys_reloaded" in agency.log():
                reloaded = True
                break
        assert reloaded, agency.log()[-3000:]
        time.sleep(0.5)  # calls signed and sent with the new keys
        # 7. the old authentication certificate leaves the configuration
        gateway(
            "admin", *agency.api, "servers", "retire-certificate", SERVER, old_sha,
            "--reason", "replaced by the 2027 certificate", token=agency.admin,
        )  # fmt: skip
        # peers refuse the old certificate once the configuration reaches them (the calls
        # go on meanwhile)
        for _ in range(50):
            refused = asyncio.run(call_with_old_certificate(instance, old_cert, old_key))
            if isinstance(refused, StreamError) and refused.error == "peer_not_registered":
                break
            time.sleep(0.2)
    assert load.calls > 50, load.calls
    assert load.failures == [], load.failures[:5]
    assert isinstance(refused, StreamError), refused
    assert refused.error == "peer_not_registered", refused
    # and the new signing certificate signs: the agency's log holds it as evidence
    signing = (folder / "pki-2027" / "sign" / "UY_GOV_MIDES.crt").read_bytes()
    new_der = x509.load_pem_x509_certificate(signing).public_bytes(serialization.Encoding.DER)
    with sqlite3.connect(folder / "state" / "messagelog.db") as db:
        kept = [bytes(r[0]) for r in db.execute("SELECT data FROM log_evidence")]
    assert new_der in kept


class Load:
    """Calls through the agency's consumer endpoint from 4 callers until closed."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.calls = 0
        self.failures: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        request = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
        metadata = routing_metadata(client=SUBSYSTEM, service=SERVICE, purpose="social-benefits")
        async with grpc.aio.insecure_channel(self.consumer) as channel:

            async def caller() -> None:
                while not self._stop.is_set():
                    outcome = await call_raw(channel, GET_PERSON, request, metadata)
                    self.calls += 1
                    if not outcome.ok:
                        self.failures.append(outcome)
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(caller() for _ in range(4)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


async def call_with_old_certificate(
    instance: Runner, certificate: bytes, key: bytes
) -> pb.Frame | StreamError:
    async with open_stream(
        instance.processes["ss-dnic"].ready["provider"],
        "UY/GOV/DNIC/ss1",
        (instance.pki / "ca.crt").read_bytes(),
        certificate,
        key,
    ) as stream:
        return await stream.send(pb.Frame(correlation_id=1))


def certify_agency(instance: Runner, requests: Path, received: Path, installed: Path) -> None:
    """The agency makes the keys and requests of its server and member (`pki csr`), the
    instance's CA signs them as an external CA would (`pki sign`), and the agency checks
    and installs what came back (`pki import`)."""
    gateway("pki", "csr", "--server", SERVER, "--out", str(requests))
    gateway("pki", "csr", "--member", MEMBER, "--out", str(requests))
    received.mkdir(parents=True, exist_ok=True)
    for flag, who, stem in (
        ("--server", SERVER, "UY_GOV_MIDES_ss1"),
        ("--member", MEMBER, "UY_GOV_MIDES"),
    ):
        certificate = received / f"{stem}.crt"
        gateway(
            "pki", "sign", "--dir", str(instance.pki), "--csr", str(requests / f"{stem}.csr"),
            "--out", str(certificate),
        )  # fmt: skip
        gateway(
            "pki", "import", flag, who, "--certificate", str(certificate),
            "--key", str(requests / f"{stem}.key"), "--ca", str(instance.pki / "ca.crt"),
            "--dir", str(installed),
        )  # fmt: skip


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
