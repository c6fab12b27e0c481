"""The demo's federation steps: a second country's instance, and a call across the border.

Argentina's instance (deploy/demo/topology-ar.toml) runs beside Uruguay's with its own
registry, CA, OCSP responder, TSA and security server. The registry administrators
federate by importing each other's anchor (`gateway registry anchor`); the Uruguayan
clinics' call to the Argentine population registry is refused until AR, the provider's
instance, holds an active agreement for it, then allowed; an auditor of each country, with
its own registry's token, traces the exchange over both countries' auditor APIs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway_client.admin import AdminClient
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import TEMPLATE_AR, Runner

MSP, CLINICS = "UY/GOV/MSP/ss1", "UY/GOV/MSP/clinics"
RENAPER, AR_POPULATION = "AR/GOB/RENAPER/ss1", "AR/GOB/RENAPER/identidad/poblacion/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
PURPOSE = "healthcare-identification"


def start_ar(workdir: Path) -> Runner:
    ar = Runner(
        workdir,
        template=TEMPLATE_AR,
        federation_allowed=("UY",),
        separate_trust_services=True,
        separate_backends=True,
    )
    ar.prepare()
    ar.start_all()
    for name, proc in ar.processes.items():
        shown = {k: v for k, v in proc.ready.items() if k in ("listen", "provider", "consumer")}
        metrics = f"  metrics={proc.ready['ops']}/metrics" if "ops" in proc.ready else ""
        print(f"   AR {name:<17} pid {proc.ready.get('pid')}  {shown}{metrics}")
    return ar


def _gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def federate(uy: Runner, ar: Runner) -> bool:
    """Each registry administrator imports the other instance's exported anchor."""
    ok = True
    for here, there in ((uy, ar), (ar, uy)):
        exported = _gateway("registry", "anchor", "--config", str(there.workdir / "registry.toml"))
        if exported.returncode != 0:
            print(f"   anchor export failed: {exported.stderr.strip()}")
            return False
        anchor = json.loads(exported.stdout)
        anchor["addresses"] = [there.registry_address]
        admin = AdminClient(here.api_url, here.token("registry-admin", subject="admin@registry"))
        done = admin.federate(anchor, reason="bilateral health data agreement UY-AR")
        print(
            f"   $ gateway registry anchor (instance {anchor['instance']}) | "
            f"gateway admin federations add  -> {_instance(here)} federates with "
            f"{anchor['instance']}: {done.get('state', done)}"
        )
        ok = ok and done.get("state") == "active"
    return ok


def _instance(runner: Runner) -> str:
    return str(json.loads((runner.pki / "anchor.json").read_text())["instance"])


def call_person(runner: Runner, server: str, client: str, service: str = AR_POPULATION) -> Outcome:
    """One GetPerson call about the Argentine person, through a server's consumer endpoint."""

    async def go() -> Outcome:
        async with runner.consumer_channel(server, client) as channel:
            return await call_raw(
                channel,
                GET_PERSON,
                population.GetPersonRequest(national_id="20.123.456").SerializeToString(),
                routing_metadata(
                    client=client,
                    service=service,
                    purpose=PURPOSE,
                    user_id="dr.rodriguez",
                    subject="20.123.456",
                ),
            )

    return asyncio.run(go())


def cross_border_call(uy: Runner) -> Outcome:
    """The Uruguayan clinics' call to the Argentine population registry."""
    return call_person(uy, MSP, CLINICS)


def _until(done: Callable[[Outcome], bool], uy: Runner, timeout: float = 15.0) -> Outcome:
    deadline = time.monotonic() + timeout
    while True:
        outcome = cross_border_call(uy)
        if done(outcome) or time.monotonic() > deadline:
            return outcome
        time.sleep(0.3)


def _show(outcome: Outcome) -> None:
    if outcome.ok:
        print(f"   allowed: OK  message id {outcome.message_id}")
    else:
        print(f"   refused: {outcome.code.name} [{outcome.error}] {outcome.details}")


def refused_without_agreement(uy: Runner) -> Outcome:
    print(f"   {CLINICS} (UY) -> {AR_POPULATION} (AR)  purpose={PURPOSE}")
    outcome = _until(
        lambda o: o.error not in ("instance_not_federated", "federated_configuration_unavailable"),
        uy,
    )
    _show(outcome)
    return outcome


def agree_and_call(uy: Runner, ar: Runner) -> Outcome:
    """AR's administrators record the cross-border agreement; the call is then allowed."""
    admin = AdminClient(ar.api_url, ar.token("registry-admin", subject="admin@registro.gob.ar"))
    provider = AdminClient(
        ar.api_url,
        ar.token("member-admin", member="AR/GOB/RENAPER", subject="admin@renaper.gob.ar"),
    )
    agreement = admin.request_agreement(
        client=CLINICS,
        service=AR_POPULATION,
        purposes=[PURPOSE],
        legal_basis_kind="law",
        legal_basis_reference="Acuerdo bilateral de salud UY-AR, art. 4",
        reason="patients treated across the border",
    )["id"]
    print(f"   AR registry: agreement {agreement} requested for the Uruguayan clinics")
    print(f"   RENAPER approves: state {provider.act(agreement, 'approve', 'for care')['state']}")
    print(
        f"   AR registry approves: state {admin.act(agreement, 'approve', 'law checked')['state']}"
    )
    outcome = _until(lambda o: o.error != "no_agreement", uy)
    _show(outcome)
    if outcome.ok and outcome.body is not None:
        person = population.Person.FromString(outcome.body)
        print(
            f"   answer from Argentina: {person.given_name} {person.family_name}, born {person.birth_date}"
        )
    return outcome


def trace_both_countries(uy: Runner, ar: Runner, message_id: str) -> bool:
    """Each country's auditor token for its own server; one trace over both."""
    uy_token = uy.token("auditor", subject="auditor@agesic.gub.uy")
    ar_token = ar.token("auditor", subject="auditor@registro.gob.ar")
    deadline = time.monotonic() + 15
    while True:
        result = _gateway(
            "audit", "trace", message_id,
            "--url", uy.auditor_url(MSP), "--token", uy_token,
            "--url", ar.auditor_url(RENAPER), "--token", ar_token,
            env={**os.environ},
        )  # fmt: skip
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(
        f"   $ gateway audit trace {message_id} --url <UY ss-msp> --token <UY auditor> "
        "--url <AR ss-renaper> --token <AR auditor>"
    )
    for line in (result.stdout.strip() or result.stderr.strip()).splitlines():
        print(f"     {line}")
    return result.returncode == 0
