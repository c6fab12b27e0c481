"""Federation through a real registry process: its anchor, the admin API, gRPC and the CLI.

`gateway registry anchor` prints what `gateway pki init` wrote; a federation imported
through the admin API is in the configuration fetched over gRPC (verified with the instance
anchor); ending it reaches a Watch stream within seconds; approved outbound approvals and
the `outbound_approval_required` policy are published; `gateway admin federations` and
`gateway admin outbound` drive the same operations from the command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w

from certs.pki import init_pki
from gateway.configuration import (
    MAX_CONFIGURATION_BYTES,
    Anchor,
    GlobalConfiguration,
    verify_configuration,
)
from gateway.identifiers import MemberId, ServiceId, SubsystemId
from gateway.v1 import configuration_pb2 as pb
from gateway_client.admin import AdminApiError, AdminClient
from gateway_demo.runner import Runner
from security_server.config_client import signed_from_message

from .conftest import CLINICS, POPULATION

GATEWAY = Path(sys.executable).parent / "gateway"
PUSH_BOUND_SECONDS = 2.0
PY_CLIENT = "PY/GOB/MINSAL/hospitales"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A UY registry of the demo topology whose policy requires outbound approvals."""
    runner = Runner(tmp_path_factory.mktemp("federation-api") / "run")
    runner.prepare()
    config = runner.workdir / "registry.toml"
    settings = tomllib.loads(config.read_text())
    settings["policy"]["outbound_approval_required"] = True
    config.write_text(tomli_w.dumps(settings))
    try:
        runner.start("registry")
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="module")
def anchors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """anchor.json files of other instances' development PKIs, by instance code."""
    folder = tmp_path_factory.mktemp("foreign-pkis")
    files = {}
    for instance in ("AR", "PY", "CL"):
        init_pki(
            folder / instance,
            instance=instance,
            members=[MemberId.parse(f"{instance}/GOB/MINSAL")],
            servers=[],
            registry_addresses=[f"registry.{instance.lower()}.example:7000"],
            now=datetime.now(UTC),
        )
        files[instance] = folder / instance / "anchor.json"
    return files


def client(runner: Runner, role: str = "registry-admin", member: str | None = None) -> AdminClient:
    return AdminClient(
        runner.api_url, runner.token(role, member=member, subject=f"{role}@{member or 'uy'}")
    )


def anchor_doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def instance_anchor(runner: Runner) -> Anchor:
    return Anchor.from_json(json.loads((runner.pki / "anchor.json").read_text()))


def verified(runner: Runner, message: pb.SignedConfiguration) -> GlobalConfiguration:
    signed = signed_from_message(message, MAX_CONFIGURATION_BYTES)
    return verify_configuration(signed, instance_anchor(runner))


async def fetch(runner: Runner) -> GlobalConfiguration:
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        call = channel.unary_unary(
            "/gateway.v1.Configuration/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        return verified(runner, await call(pb.FetchRequest(instance="UY")))


def run_gateway(*args: str, token: str | None = None, url: str | None = None) -> Any:
    env = {
        k: v for k, v in os.environ.items() if k not in ("GATEWAY_REGISTRY_URL", "GATEWAY_TOKEN")
    }
    if url is not None:
        env["GATEWAY_REGISTRY_URL"] = url
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return subprocess.run(
        [str(GATEWAY), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# ---- the anchor --------------------------------------------------------------------------


def test_registry_anchor_prints_what_pki_init_wrote(runner: Runner, tmp_path: Path) -> None:
    """`gateway registry anchor` parses as an anchor and equals the PKI's anchor.json; the
    addresses come from --address, else anchor_addresses, else listen; bad settings exit 2."""
    config = runner.workdir / "registry.toml"
    printed = run_gateway("registry", "anchor", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    doc = json.loads(printed.stdout)
    assert doc == json.loads((runner.pki / "anchor.json").read_text())
    assert Anchor.from_json(doc) == instance_anchor(runner)
    assert doc["addresses"] == [runner.registry_address]

    given = run_gateway(
        "registry",
        "anchor",
        "--config",
        str(config),
        "--address",
        "a.uy:7000",
        "--address",
        "b.uy:7000",
    )
    assert given.returncode == 0, given.stderr
    assert Anchor.from_json(json.loads(given.stdout)).addresses == ("a.uy:7000", "b.uy:7000")

    settings = tomllib.loads(config.read_text())
    settings["anchor_addresses"] = ["registry.gub.uy:443"]
    other = tmp_path / "registry.toml"
    other.write_text(tomli_w.dumps(settings))
    configured = run_gateway("registry", "anchor", "--config", str(other))
    assert json.loads(configured.stdout)["addresses"] == ["registry.gub.uy:443"]

    settings["signing_certificate"] = str(tmp_path / "missing.crt")
    other.write_text(tomli_w.dumps(settings))
    missing = run_gateway("registry", "anchor", "--config", str(other))
    assert missing.returncode == 2
    assert "cannot read the configuration-signing certificate" in missing.stderr
    assert missing.stdout == ""
    bad = run_gateway("registry", "anchor", "--config", str(config), "--address", "nowhere")
    assert bad.returncode == 2
    assert "'nowhere' is not HOST:PORT" in bad.stderr
    absent = run_gateway("registry", "anchor", "--config", str(tmp_path / "absent.toml"))
    assert absent.returncode == 2
    assert "absent.toml" in absent.stderr


# ---- publication -------------------------------------------------------------------------


async def test_federation_is_published_and_its_end_is_pushed_within_seconds(
    runner: Runner, anchors: dict[str, Path]
) -> None:
    """A Watch stream receives the federation with AR's anchor, then its end (state ended)
    within PUSH_BOUND_SECONDS of the API call; the admin log records both and verifies."""
    admin = client(runner)
    async with grpc.aio.insecure_channel(runner.registry_address) as channel:
        watch = channel.unary_stream(
            "/gateway.v1.Configuration/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.SignedConfiguration.FromString,
        )
        current = await fetch(runner)
        assert "AR" not in current.federations
        assert current.outbound_approval_required is True
        stream = watch(pb.WatchRequest(instance="UY", known_version=current.version))
        updates = stream.__aiter__()

        async def next_with(predicate: Any) -> GlobalConfiguration:
            while True:
                config = verified(runner, await asyncio.wait_for(updates.__anext__(), 10))
                if predicate(config):
                    return config

        await asyncio.to_thread(admin.federate, anchor_doc(anchors["AR"]), "Convenio UY-AR")
        config = await next_with(lambda c: "AR" in c.federations)
        federation = config.federations["AR"]
        assert federation.active is True
        assert federation.anchor == Anchor.from_json(anchor_doc(anchors["AR"]))

        sent = time.monotonic()
        await asyncio.to_thread(admin.end_federation, "AR", "the convention was suspended")
        config = await next_with(lambda c: not c.federations["AR"].active)
        elapsed = time.monotonic() - sent
        stream.cancel()
    assert elapsed < PUSH_BOUND_SECONDS
    assert config.federations["AR"].ended_at is not None
    entries = [
        (e["action"], e["target"], e["to_state"], e["reason"])
        for e in admin.admin_log(limit=1000)
        if e["target"] == "AR"
    ]
    assert entries == [
        ("federate", "AR", "active", "Convenio UY-AR"),
        ("end_federation", "AR", "ended", "the convention was suspended"),
    ]
    assert admin.verify_admin_log()["verified"] is True


async def test_approved_outbound_approvals_are_published(
    runner: Runner, anchors: dict[str, Path]
) -> None:
    """A requested outbound approval is not published; once approved it is, in the
    configuration security servers fetch; cross-border agreement requests need the
    federation too."""
    admin, msp = client(runner), client(runner, "member-admin", "UY/GOV/MSP")
    service = "PY/GOB/MINSAL/hospitales/historias/v1"
    with pytest.raises(AdminApiError) as refused:
        msp.request_outbound(CLINICS, service, ["continuity-of-care"], "PY-AGR-12")
    assert (refused.value.status, refused.value.kind) == (409, "conflict")
    assert "PY, which UY does not federate with" in refused.value.message
    with pytest.raises(AdminApiError) as refused:
        admin.request_agreement(PY_CLIENT, POPULATION, ["cross-border-care"], "contract", "C-1")
    assert (refused.value.status, refused.value.kind) == (409, "conflict")

    admin.federate(anchor_doc(anchors["PY"]), "Convenio UY-PY")
    requested = msp.request_outbound(CLINICS, service, ["continuity-of-care"], "PY-AGR-12")
    assert requested["state"] == "requested"
    key = (SubsystemId.parse(CLINICS), ServiceId.parse(service))
    assert key not in (await fetch(runner)).outbound_approvals
    approved = admin.act_outbound(requested["id"], "approve", "convention checked")
    assert approved["state"] == "approved"
    published = (await fetch(runner)).outbound_approvals[key]
    assert published.purposes == frozenset({"continuity-of-care"})
    msp.act_outbound(requested["id"], "revoke", "no longer needed")
    assert key not in (await fetch(runner)).outbound_approvals

    agreement = admin.request_agreement(
        PY_CLIENT, POPULATION, ["cross-border-care"], "contract", "C-1"
    )
    assert (agreement["client"], agreement["state"]) == (PY_CLIENT, "requested")


# ---- the command line --------------------------------------------------------------------


def test_federations_and_outbound_from_the_command_line(
    runner: Runner, anchors: dict[str, Path]
) -> None:
    """`gateway admin federations add|list|end` and `gateway admin outbound
    request|approve|list|revoke`; a member administrator cannot federate (exit 1, 403)."""
    url = runner.api_url
    registry = runner.token("registry-admin", subject="ana.perez@agesic")
    msp = runner.token("member-admin", member="UY/GOV/MSP", subject="martin.garcia@msp")

    def ok(*args: str, token: str = registry) -> str:
        result = run_gateway("admin", *args, token=token, url=url)
        assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
        return str(result.stdout)

    cl = str(anchors["CL"])
    refused = run_gateway(
        "admin", "federations", "add", "--anchor", cl, "--reason", "x", token=msp, url=url
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("error (403 forbidden): only a registry administrator")

    added = ok("federations", "add", "--anchor", cl, "--reason", "Convenio UY-CL")
    assert "state:" in added and "active" in added
    header, *rows = ok("federations", "list").splitlines()
    assert header.split() == ["INSTANCE", "STATE", "SINCE", "ENDED", "ADDRESSES", "REASON"]
    assert any(r.split()[:2] == ["CL", "active"] for r in rows)

    service = "CL/GOB/MINSAL/vacunas/registro/v1"
    requested = json.loads(
        ok(
            "outbound",
            "request",
            "--client",
            CLINICS,
            "--service",
            service,
            "--purpose",
            "vaccination-check",
            "--agreement",
            "CL-AGR-3",
            "--reason",
            "travellers",
            "--json",
            token=msp,
        )
    )
    approval = requested["id"]
    ok("outbound", "approve", approval, "--reason", "checked")
    header, *rows = ok("outbound", "list", token=msp).splitlines()
    assert header.split() == ["ID", "STATE", "CLIENT", "SERVICE", "PURPOSES", "AGREEMENT"]
    row = next(r for r in rows if r.startswith(approval + " "))
    assert row.split() == [approval, "approved", CLINICS, service, "vaccination-check", "CL-AGR-3"]
    no_reason = run_gateway("admin", "outbound", "revoke", approval, token=msp, url=url)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    revoked = json.loads(
        ok("outbound", "revoke", approval, "--reason", "over", "--json", token=msp)
    )
    assert revoked["state"] == "revoked"

    ended = json.loads(ok("federations", "end", "CL", "--reason", "ended", "--json"))
    assert ended["state"] == "ended"
    again = run_gateway(
        "admin", "federations", "end", "CL", "--reason", "again", token=registry, url=url
    )
    assert again.returncode == 1
    assert again.stderr.startswith("error (409 conflict): the federation with CL already ended")
    log = ok("log", "list", "--limit", "1000")
    actions = [line.split()[3:5] for line in log.splitlines()[1:]]
    assert ["federate", "CL"] in actions and ["end_federation", "CL"] in actions
    assert ["approve_outbound", approval] in actions
