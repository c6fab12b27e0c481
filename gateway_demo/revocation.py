"""How long a revocation takes to be enforced: from the revoke API call to the first refusal.

One run, on a running demo topology: the Ministry of Health's member administrator
requests an agreement for the clinics to call the population registry for a fresh
purpose, the provider's administrator and a registry administrator approve it, and calls
are made until one succeeds. Then `concurrency` callers keep calling under that agreement
while a registry administrator revokes it through the admin API; the run measures the
time from sending the revoke request to the first call answered `agreement_revoked`.
Used by the integration test (which asserts the bound) and by `gateway bench revocation`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.runner import Runner

CLINICS = "UY/GOV/MSP/clinics"
CLINICS_SERVER = "UY/GOV/MSP/ss1"
POPULATION = "UY/GOV/DNIC/identity/population/v1"
ECHO = "/demo.population.v1.PopulationRegistry/Echo"


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationRun:
    agreement: str
    # from sending the revoke request to the first call refused with agreement_revoked
    seconds_to_refusal: float
    # how long the revoke request itself took to answer
    api_seconds: float
    calls_before: int
    calls_after: int


class AdminApi:
    """The registry's admin API, asynchronously, for the benchmarks."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, timeout: float | None = None
    ) -> None:
        self.session = session
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout) if timeout else None

    async def post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=self.timeout,
        ) as response:
            doc: dict[str, Any] = await response.json()
            if response.status >= 300:
                raise RuntimeError(f"{path}: {response.status} {doc}")
            return doc


async def active_agreement(
    api: AdminApi, runner: Runner, purpose: str, why: str = "revocation measurement"
) -> str:
    """Request and approve an agreement for the clinics to call the population registry for
    `purpose`; return its id."""
    consumer = runner.token("member-admin", member="UY/GOV/MSP", subject="msp-admin")
    provider = runner.token("member-admin", member="UY/GOV/DNIC", subject="dnic-admin")
    admin = runner.token("registry-admin", subject="registry-admin")
    created = await api.post(
        "/v1/agreements",
        consumer,
        {
            "client": CLINICS,
            "service": POPULATION,
            "purposes": [purpose],
            "legal_basis": {"kind": "law", "reference": why},
            "reason": why,
        },
    )
    agreement_id = str(created["id"])
    await api.post(f"/v1/agreements/{agreement_id}/approve", provider, {})
    await api.post(f"/v1/agreements/{agreement_id}/approve", admin, {})
    return agreement_id


async def measure_revocation(
    runner: Runner, *, run: int, concurrency: int = 8, timeout: float = 30.0
) -> RevocationRun:
    """One measured revocation under load (see the module docstring)."""
    purpose = f"revocation-{run}-{time.time_ns()}"
    admin = runner.token("registry-admin", subject="registry-admin")
    metadata = routing_metadata(client=CLINICS, service=POPULATION, purpose=purpose)
    channel = runner.consumer_channel(CLINICS_SERVER, CLINICS)
    async with aiohttp.ClientSession() as session, channel:
        api = AdminApi(session, runner.api_url)
        agreement_id = await active_agreement(api, runner, purpose)
        deadline = time.monotonic() + timeout
        while not (await call_raw(channel, ECHO, b"", metadata)).ok:
            if time.monotonic() > deadline:
                raise RuntimeError(f"agreement {agreement_id} was never enforced as active")
        revoked_at: float | None = None
        refused_at: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        counts = {"before": 0, "after": 0}
        flowing = asyncio.Event()  # set once the load has made 20 calls per caller

        async def caller() -> None:
            while not refused_at.done() and time.monotonic() < deadline:
                outcome = await call_raw(channel, ECHO, b"x" * 64, metadata)
                now = time.perf_counter()
                counts["before" if revoked_at is None else "after"] += 1
                if counts["before"] >= 20 * concurrency:
                    flowing.set()
                if outcome.error == "agreement_revoked" and not refused_at.done():
                    refused_at.set_result(now)
                elif not outcome.ok and not refused_at.done():
                    refused_at.set_exception(
                        RuntimeError(f"unexpected answer under load: {outcome}")
                    )

        callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
        try:
            await asyncio.wait_for(flowing.wait(), timeout)
            revoked_at = time.perf_counter()
            await api.post(
                f"/v1/agreements/{agreement_id}/revoke", admin, {"reason": "measurement"}
            )
            api_done = time.perf_counter()
            first_refusal = await asyncio.wait_for(refused_at, timeout)
        finally:
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
    return RevocationRun(
        agreement=agreement_id,
        seconds_to_refusal=first_refusal - revoked_at,
        api_seconds=api_done - revoked_at,
        calls_before=counts["before"],
        calls_after=counts["after"],
    )


def run_revocation_bench(*, workdir: Path, repeats: int, concurrency: int) -> int:
    """`gateway bench --revocation`: start the demo topology and measure `repeats` runs."""
    if repeats < 1 or concurrency < 1:
        print("bench: repeats and concurrency must be >= 1")
        return 2
    print("== gateway bench --revocation")
    print(
        f"   {repeats} run(s): an agreement is approved, {concurrency} callers call under it, "
        "a registry administrator revokes it through the admin API; measured: from sending "
        "the revoke request to the first call refused with agreement_revoked"
    )
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    runner = Runner(workdir)
    try:
        runner.prepare()
        runner.start_all()

        async def measure() -> list[RevocationRun]:
            return [
                await measure_revocation(runner, run=i, concurrency=concurrency)
                for i in range(repeats)
            ]

        runs = asyncio.run(measure())
    finally:
        runner.close()
    for r in runs:
        print(
            f"   {r.agreement}: refused after {r.seconds_to_refusal * 1000:7.1f} ms "
            f"(API answered in {r.api_seconds * 1000:.1f} ms; {r.calls_before} calls before, "
            f"{r.calls_after} after)"
        )
    median = statistics.median(r.seconds_to_refusal for r in runs)
    print(
        f"   median {median * 1000:.1f} ms, max "
        f"{max(r.seconds_to_refusal for r in runs) * 1000:.1f} ms (bound: 2000 ms)"
    )
    (workdir / "revocation.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in runs], indent=1)
    )
    return 0 if median < 2.0 else 1
