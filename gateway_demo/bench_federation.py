"""`gateway bench --federation`: a cross-border call against a local one, and how fast an
ended federation is enforced.

Two instances run as in the demo (UY, and AR from deploy/demo/topology-ar.toml), both on
this machine. Latency: the Uruguayan clinics call, one call at a time, the Uruguayan
population registry (local) and the Argentine one (cross-border, through AR's own
trust store, agreement and configuration), alternating the order each repeat; p50 and p99
per repeat, medians over repeats, and their ratio. Enforcement: UY's registry
administrator ends the federation and the clinics call until the first refusal with
`federation_ended`; the time from sending the end request to that refusal, per repeat
(the federation is made again between repeats).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import structlog

from gateway_client.admin import AdminClient
from gateway_demo import federation as fed
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import TEMPLATE_AR, Runner

LOCAL = ("UY/GOV/DNIC/identity/population/v1", "1.234.567-8")
CROSS = (fed.AR_POPULATION, "20.123.456")


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _latencies(uy: Runner, service: str, national_id: str, calls: int) -> list[float]:
    body = population.GetPersonRequest(national_id=national_id).SerializeToString()
    metadata = routing_metadata(client=fed.CLINICS, service=service, purpose=fed.PURPOSE)
    out = []
    async with uy.consumer_channel(fed.MSP, fed.CLINICS) as channel:
        for _ in range(calls):
            began = time.perf_counter()
            outcome = await call_raw(channel, fed.GET_PERSON, body, metadata)
            if not outcome.ok:
                raise RuntimeError(f"call to {service} failed: {outcome}")
            out.append((time.perf_counter() - began) * 1000)
    return out


def _anchor(runner: Runner) -> dict[str, object]:
    exported = subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", "registry", "anchor", "--config",
         str(runner.workdir / "registry.toml")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    anchor: dict[str, object] = json.loads(exported.stdout)
    anchor["addresses"] = [runner.registry_address]
    return anchor


def run_federation_bench(*, workdir: Path, repeats: int, calls: int) -> int:
    if repeats < 1 or calls < 1:
        print("bench: --repeats and --calls must be >= 1")
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    uy = Runner(workdir / "uy", federation_allowed=("AR",))
    ar = Runner(workdir / "ar", template=TEMPLATE_AR, federation_allowed=("UY",))
    print("== gateway bench --federation")
    print(f"   two instances on this machine; {calls} sequential calls per target and repeat")
    try:
        for runner in (uy, ar):
            runner.prepare()
            runner.start_all()
        if not fed.federate(uy, ar):
            print("bench: the registries did not federate")
            return 1
        fed.refused_without_agreement(uy)
        if not fed.agree_and_call(uy, ar).ok:
            print("bench: the cross-border call was not allowed")
            return 1
        runs: dict[str, list[tuple[float, float]]] = {"local": [], "cross-border": []}
        print(f"\n{'run':>6}  {'target':<13} {'p50 ms':>8} {'p99 ms':>8}")
        for repeat in range(repeats):
            order = [("local", LOCAL), ("cross-border", CROSS)]
            for name, (service, national_id) in order if repeat % 2 == 0 else order[::-1]:
                times = asyncio.run(_latencies(uy, service, national_id, calls))
                run = (_percentile(times, 0.5), _percentile(times, 0.99))
                runs[name].append(run)
                print(f"{repeat + 1:>6}  {name:<13} {run[0]:>8.2f} {run[1]:>8.2f}", flush=True)
        medians = {
            name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in runs.items()
        }
        admin = AdminClient(uy.api_url, uy.token("registry-admin", subject="bench@registry"))
        anchor = _anchor(ar)
        enforced = []
        for _ in range(repeats):
            began = time.monotonic()
            admin.end_federation("AR", "benchmark")
            while fed.cross_border_call(uy).error != "federation_ended":
                if time.monotonic() - began > 30:
                    print("bench: the ended federation was not enforced within 30 s")
                    return 1
            enforced.append((time.monotonic() - began) * 1000)
            admin.federate(anchor, reason="benchmark")
            while not fed.cross_border_call(uy).ok:
                time.sleep(0.05)
        print("\n== results (medians)")
        for name, (p50, p99) in medians.items():
            print(f"   {name:<13} p50 {p50:.2f} ms  p99 {p99:.2f} ms")
        print(
            f"   ratio cross-border/local p50: {medians['cross-border'][0] / medians['local'][0]:.2f}"
        )
        print(
            "   federation ended -> first refusal: median "
            f"{statistics.median(enforced):.0f} ms (per repeat: "
            + ", ".join(f"{t:.0f}" for t in enforced)
            + " ms)"
        )
        return 0
    finally:
        ar.close()
        uy.close()
