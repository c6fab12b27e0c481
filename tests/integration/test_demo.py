"""`gateway demo` as a user runs it: the script, and the topology it leaves running."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population

GATEWAY = [sys.executable, "-m", "gateway_cli.main"]


def credentials_for(endpoint: dict[str, Any], client: str) -> grpc.ChannelCredentials | None:
    """The TLS credentials topology.json says a local client needs, or None for plain gRPC."""
    tls = endpoint["tls"]
    if tls is None:
        return None
    paths = tls["clients"][client]
    return grpc.ssl_channel_credentials(
        Path(tls["ca"]).read_bytes(),
        Path(paths["key"]).read_bytes(),
        Path(paths["certificate"]).read_bytes(),
    )


async def call_once(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    method: str,
    body: bytes,
    metadata: list[tuple[str, str]],
) -> Outcome:
    channel = (
        grpc.aio.insecure_channel(address)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials)
    )
    async with channel:
        return await call_raw(channel, method, body, metadata)


def check_every_step(out: str) -> None:
    """The demo made the allowed call, both refusals, the live subscription, printed both logs
    and verified them, then federated with a second instance for a cross-border call."""
    assert "answer: Ana Pereira" in out
    assert "3 people, stream closed OK, message id " in out
    assert "[no_agreement]" in out
    assert "[purpose_not_covered]" in out
    # the live subscription: refused, requested, approved twice, allowed, revoked, refused
    assert out.count("[no_agreement]") == 3  # steps 2, 4 (before the subscription) and 10
    assert "state requested" in out
    assert "approves: state approved_by_provider" in out
    assert "approves: state active" in out
    assert "[agreement_revoked]" in out
    assert out.count("request  -> requested") + out.count("request  - -> requested") == 1
    assert "approve  requested -> approved_by_provider" in out
    assert "approve  approved_by_provider -> active" in out
    assert "revoke   active -> revoked" in out
    assert "admin log verified: True" in out
    assert out.count("request  consumer") == 1
    assert out.count("request  provider") == 1
    # federation: two instances, a cross-border call refused then allowed, traced on both sides
    assert "UY federates with AR: active" in out and "AR federates with UY: active" in out
    assert "[no_agreement] no data-sharing agreement lets UY/GOV/MSP/clinics call AR/" in out
    assert "answer from Argentina: Lucía Fernández" in out
    assert out.count("consistent on both sides") == 2
    assert out.count("OK: ") == 3  # two logs, one evidence bundle
    assert out.count("record(s) covered by verified tokens") == 2
    assert "are not stamped yet" not in out
    assert "OK: the evidence of message" in out
    assert out.count("OCSP good") == 2
    assert out.count("body matches") == 2
    assert "waits for their approval on the home page" in out
    assert out.count("/console/sign-in#token=") == 4  # one link for each kind of user
    assert "demo succeeded" in out


def check_console(topology: dict[str, Any]) -> None:
    """topology.json names the console and a sign-in link for each kind of user; the
    console's sign-in page answers while the topology keeps running."""
    console = topology["console"]
    assert len(console["sign_in"]) == 4
    assert all(
        link.startswith(console["url"] + "sign-in#token=") for link in console["sign_in"].values()
    )
    with urllib.request.urlopen(console["url"] + "sign-in", timeout=5) as answer:
        assert answer.status == 200 and "sign-in.js" in answer.read().decode()


def check_operations_ports(topology: dict[str, Any], targets_file: Path) -> None:
    """topology.json names every process's operations port, each answers /healthz, and the
    Prometheus targets file lists each (with the other instance's processes)."""
    ops = topology["ops"]
    assert {"registry", "ocsp", "tsa", "ss-msp", "ss-dnic"} <= set(ops), ops
    for name, url in ops.items():
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            assert json.load(answer)["alive"] is True, name
    targets = {
        (t, group["labels"]["gateway_instance"], group["labels"]["process"])
        for group in json.loads(targets_file.read_text())
        for t in group["targets"]
    }
    assert {(urlsplit(url).netloc, "UY", name) for name, url in ops.items()} <= targets
    assert {name for _, instance, name in targets if instance == "AR"} >= {"registry", "ss-renaper"}


def test_demo_runs_every_step_then_keeps_a_usable_topology(tmp_path: Path) -> None:
    """The demo runs every step (as `make demo` does), then with --keep-running writes
    topology.json with what a client needs, and on Ctrl-C stops everything and exits 0. One
    run serves both: the steps are the same with and without --keep-running, and a demo run
    is the suite's longest test."""
    workdir = tmp_path / "demo"
    printed = tmp_path / "demo.out"  # a file, not a pipe: the demo never blocks on writing
    with printed.open("w") as out:
        demo = subprocess.Popen(
            [*GATEWAY, "demo", "--keep-running", "--workdir", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        described = workdir / "topology.json"
        deadline = time.monotonic() + 120
        while not described.exists():
            assert demo.poll() is None, printed.read_text()
            assert time.monotonic() < deadline, "topology.json was not written"
            time.sleep(0.1)
        topology = json.loads(described.read_text())
        assert described.stat().st_mode & 0o777 == 0o600  # it holds sign-in tokens
        endpoint = next(
            e for e in topology["consumer_endpoints"] if "UY/GOV/MSP/clinics" in e["clients"]
        )
        service = next(
            s for s in topology["services"] if s["id"] == "UY/GOV/DNIC/identity/population/v1"
        )
        assert Path(service["proto"]).read_text().startswith("// Sample provider service")
        method = next(m for m in service["methods"] if m["method"].endswith("/GetPerson"))
        agreement = next(a for a in topology["agreements"] if a["service"] == service["id"])
        assert set(topology["message_logs"]) == {"UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"}
        request = population.GetPersonRequest(**method["example_request"]).SerializeToString()
        metadata = routing_metadata(
            client=agreement["client"], service=service["id"], purpose=agreement["purposes"][0]
        )
        assert (
            endpoint["tls"] is not None
        )  # the demo's clinic endpoint requires client certificates
        credentials = credentials_for(endpoint, agreement["client"])
        outcome = asyncio.run(
            call_once(endpoint["address"], credentials, method["method"], request, metadata)
        )
        assert outcome.ok, outcome
        check_operations_ports(topology, workdir / "prometheus-targets.json")
        check_console(topology)
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
        output = printed.read_text()
        assert demo.returncode == 0, output
        check_every_step(output)
        assert output.index("The topology keeps running") < output.index("Stopping every process")
        assert "Prometheus scrapes every process listed in" in output
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # lets the demo stop its topology
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.kill()
