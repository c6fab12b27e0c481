"""`gateway bench --scale F`: the global configuration at F times a national instance.

Builds the demo topology (registry, OCSP responder, TSA, the Ministry of Health's and the
civil identification agency's security servers, the sample backends), seeds the
registry's database with F times the world of issue 13 (`gateway_demo.scale_world`:
1,000 members, 3,000 subsystems, 500 security servers, 5,000 services, 50,000 active and
5,000 expired agreements at F = 1), starts everything as real processes, and measures,
through public behaviour only (the Fetch and Watch RPCs, the admin API, the registry's
metrics, calls through the servers, /proc):

- the signed configuration's size (the protobuf `SignedConfiguration` Fetch returns);
- per change (one revocation through the admin API, `repeats` times): how long the
  registry took to publish it (its `gateway_registry_publish_seconds` histogram: build,
  sign, store), how long the API took to answer, how long after the answer all N watchers
  (`gateway_demo.scale_watch`, a subprocess with N concurrent Watch streams) had the new
  version, and how long from sending the request until a call through ss-msp under that
  agreement was refused (`agreement_revoked`);
- what a security server spends to verify, parse and install the document
  (`ConfigurationClient.accept` on the fetched document, in this process);
- the peak memory (VmHWM) of the real security servers and of the registry with the N
  watchers connected.

Everything waits with a timeout: a cell that never happens reads `never` or
`failed (reason)` and the bench goes on. Results go to `WORKDIR/scale.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from gateway.config_parts import apply_update
from gateway.configuration import Anchor
from gateway.v1 import configuration_pb2 as pb
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.revocation import (
    CLINICS,
    CLINICS_SERVER,
    ECHO,
    POPULATION,
    AdminApi,
    active_agreement,
)
from gateway_demo.runner import Process, Runner
from gateway_demo.scale_watch import fetch_configuration, parts_stream, signed_document
from gateway_demo.scale_world import Counts, seed_registry

SERVERS = ("ss-msp", "ss-dnic")
CALLERS = 4

# a measurement: seconds, or why there is none ("never", "failed (...)")
Value = float | str


# the demo's provider security server, whose snapshot the bench installs
PROVIDER_SERVER = "UY/GOV/DNIC/ss1"


@dataclass
class ScaleResults:
    scale: float
    repeats: int
    watchers: int
    counts: dict[str, int] = field(default_factory=dict)
    seed_seconds: float = 0.0
    admin_entries: int = 0
    registry_start_seconds: float = 0.0
    configuration_bytes: int | str = "never"
    # the signed canonical content, uncompressed
    content_bytes: int = 0
    # a security server's first WatchParts message (the snapshot of what it needs)
    snapshot_bytes: int | str = "never"
    # the WatchParts messages that brought each watcher a change (bytes, each)
    change_bytes: list[int] = field(default_factory=list)
    install_seconds: list[Value] = field(default_factory=list)
    servers_ready: dict[str, Value] = field(default_factory=dict)
    publish_seconds: list[Value] = field(default_factory=list)
    api_seconds: list[Value] = field(default_factory=list)
    watchers_seconds: list[Value] = field(default_factory=list)
    refusal_seconds: list[Value] = field(default_factory=list)
    # calls that failed otherwise than allowed or refused as revoked, by code, in all runs
    unexpected: dict[str, int] = field(default_factory=dict)
    server_memory_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    registry_memory_kib: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def memory_kib(proc: Process) -> dict[str, int]:
    """VmRSS and VmHWM of a running process (empty when it is gone)."""
    out: dict[str, int] = {}
    if proc.popen is None:
        return out
    try:
        for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return {}
    return out


def median(values: list[Value]) -> Value:
    """The median of the numbers; when a run has none, why (the first reason)."""
    numbers = [v for v in values if isinstance(v, float)]
    reasons = [v for v in values if isinstance(v, str)]
    if not values:
        return "not measured"
    if reasons and len(reasons) * 2 >= len(values):
        return reasons[0]
    return statistics.median(numbers)


def install_seconds(snapshot: pb.PartsUpdate, anchor: Anchor, server: str) -> float:
    """What a security server spends on its snapshot of the configuration in parts: inflate,
    verify, parse, build its configuration, store the parts."""
    from security_server.config_client import ConfigurationClient, update_from_message

    with tempfile.TemporaryDirectory() as folder:
        client = ConfigurationClient(
            anchor=anchor,
            cache_file=Path(folder) / "configuration.json",
            clock=lambda: datetime.now(UTC),
            server=server,
        )
        began = time.perf_counter()
        held = apply_update(
            None,
            update_from_message(snapshot, client.max_message_bytes),
            anchor,
            server=server,
        )
        client._write_parts(held)
        return time.perf_counter() - began


async def first_snapshot(address: str, instance: str, server: str) -> pb.PartsUpdate:
    """The first WatchParts message a security server gets: its snapshot."""
    async for message in parts_stream(address, instance, server):
        return message
    raise RuntimeError("the WatchParts stream ended without a message")


class Watchers:
    """The watcher subprocess's reports: each watcher's versions with arrival times."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.arrivals: list[dict[int, float]] = [{} for _ in range(count)]
        self.errors: list[list[str]] = [[] for _ in range(count)]
        self.first: set[int] = set()
        self.change_bytes: list[int] = []
        self.changed = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, address: str, instance: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway_demo.scale_watch",
            address,
            instance,
            str(self.count),
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            doc = json.loads(line)
            index = int(doc["w"])
            if "error" in doc:
                self.errors[index].append(str(doc["error"]))
            elif doc.get("version") is not None:
                self.arrivals[index].setdefault(int(doc["version"]), float(doc["t"]))
                if index in self.first:  # the first message of a stream is a snapshot
                    self.change_bytes.append(int(doc["bytes"]))
                self.first.add(index)
            self.changed.set()

    def latest(self, index: int) -> int:
        return max(self.arrivals[index], default=0)

    def healthy(self) -> list[int]:
        """Watchers that have received at least one version."""
        return [i for i in range(self.count) if self.arrivals[i]]

    def failure(self) -> str | None:
        """Why some watcher never received anything (its last error), if one did not."""
        for i in range(self.count):
            if not self.arrivals[i]:
                return self.errors[i][-1] if self.errors[i] else "nothing received"
        return None

    async def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()


_METRIC = re.compile(
    r"^(gateway_registry_publish_seconds_sum|gateway_registry_publish_seconds_count"
    r"|gateway_configuration_version) ([0-9.e+-]+)$",
    re.M,
)


async def registry_metrics(session: aiohttp.ClientSession, runner: Runner) -> dict[str, float]:
    url = runner.ops_url("registry") + "/metrics"
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
        text = await response.text()
    return {name: float(value) for name, value in _METRIC.findall(text)}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "failed (timed out)"
    return f"failed ({type(exc).__name__}: {str(exc)[:160]})"


@dataclass
class _Change:
    publish: Value = "never"
    api: Value = "never"
    watchers: Value = "never"
    refusal: Value = "not measured"
    # calls under way that failed otherwise than allowed or refused `agreement_revoked`
    unexpected: dict[str, int] = field(default_factory=dict)


async def measure_change(
    runner: Runner,
    watchers: Watchers,
    session: aiohttp.ClientSession,
    *,
    run: int,
    servers_ready: bool,
    timeout: float,
) -> _Change:
    """One revocation through the admin API, measured (see the module docstring)."""
    out = _Change()
    api = AdminApi(session, runner.api_url, timeout)
    admin = runner.token("registry-admin", subject="registry-admin")
    target = f"AGR-SYN-{run + 1:07d}"  # a synthetic active agreement, without real servers
    metadata: list[tuple[str, str]] | None = None
    channel = runner.consumer_channel(CLINICS_SERVER, CLINICS)
    callers: list[asyncio.Task[None]] = []
    refused_at: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    try:
        if not servers_ready:
            out.refusal = "never (the security servers never became ready)"
        else:
            purpose = f"scale-{run}-{time.time_ns()}"
            try:
                target = await active_agreement(api, runner, purpose, "scale measurement")
                metadata = routing_metadata(client=CLINICS, service=POPULATION, purpose=purpose)
                deadline = time.monotonic() + timeout
                while not (await call_raw(channel, ECHO, b"", metadata, timeout=timeout)).ok:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    await asyncio.sleep(0.05)
            except Exception as exc:
                out.refusal = "never (the new agreement was not enforced as active: "
                out.refusal += _reason(exc) + ")"
                metadata = None
        before = await registry_metrics(session, runner)
        version = int(before.get("gateway_configuration_version", 0))
        await watchers.wait(
            lambda: all(watchers.latest(i) >= version for i in watchers.healthy()), timeout
        )
        if metadata is not None:
            flowing = asyncio.Event()
            counts = {"calls": 0}
            call_metadata = metadata

            async def caller() -> None:
                while not refused_at.done():
                    outcome = await call_raw(
                        channel, ECHO, b"x" * 64, call_metadata, timeout=timeout
                    )
                    now = time.monotonic()
                    counts["calls"] += 1
                    if counts["calls"] >= 5 * CALLERS:
                        flowing.set()
                    if outcome.error == "agreement_revoked" and not refused_at.done():
                        refused_at.set_result(now)
                    elif not outcome.ok and outcome.error != "agreement_revoked":
                        why = outcome.error or outcome.code.name
                        out.unexpected[why] = out.unexpected.get(why, 0) + 1

            callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
            await asyncio.wait_for(flowing.wait(), timeout)
        sent = time.monotonic()
        try:
            await api.post(f"/v1/agreements/{target}/revoke", admin, {"reason": "scale bench"})
        except Exception as exc:
            out.api = out.publish = out.watchers = _reason(exc)
            return out
        answered = time.monotonic()
        out.api = answered - sent
        after = await registry_metrics(session, runner)
        published = after.get("gateway_registry_publish_seconds_count", 0) - before.get(
            "gateway_registry_publish_seconds_count", 0
        )
        if published >= 1:
            out.publish = (
                after["gateway_registry_publish_seconds_sum"]
                - before["gateway_registry_publish_seconds_sum"]
            ) / published
        new = int(after.get("gateway_configuration_version", 0))
        broken = watchers.failure()
        if broken is not None:
            out.watchers = f"failed ({broken})"
        elif await watchers.wait(
            lambda: all(watchers.latest(i) >= new for i in range(watchers.count)), timeout
        ):
            last = max(
                min(t for v, t in watchers.arrivals[i].items() if v >= new)
                for i in range(watchers.count)
            )
            out.watchers = last - answered
        else:
            errors = [e[-1] for e in watchers.errors if e]
            out.watchers = f"never (within {timeout:.0f} s)" + (
                f"; last error {errors[-1]}" if errors else ""
            )
        if metadata is not None:
            try:
                out.refusal = await asyncio.wait_for(refused_at, timeout) - sent
            except TimeoutError:
                out.refusal = f"never (within {timeout:.0f} s)"
        return out
    finally:
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await channel.close(None)


def _wait_servers(runner: Runner, timeout: float) -> dict[str, Value]:
    """Seconds until each security server was ready, or why it was not (never killed)."""
    began = time.monotonic()
    out: dict[str, Value] = {}
    pending = set(SERVERS)
    while pending:
        for name in sorted(pending):
            proc = runner.processes[name]
            assert proc.popen is not None
            if proc.ready_path.exists():
                proc.ready = json.loads(proc.ready_path.read_text())
                out[name] = time.monotonic() - began
                pending.discard(name)
            elif proc.popen.poll() is not None:
                out[name] = f"failed (exited with {proc.popen.returncode})"
                pending.discard(name)
        if pending and time.monotonic() - began > timeout:
            for name in pending:
                status = re.findall(r'"status": ?"([A-Z_]+)"', runner.tail(name, 20))
                out[name] = f"never (within {timeout:.0f} s" + (
                    f"; {status[-1]})" if status else ")"
                )
            break
        time.sleep(0.05)
    return out


async def _measure(
    runner: Runner, results: ScaleResults, *, ready_timeout: float, change_timeout: float
) -> None:
    address, instance = runner.registry_address, runner.instance
    try:
        signed = await fetch_configuration(address, instance, timeout=change_timeout)
        results.configuration_bytes = signed.ByteSize()
        anchor = Anchor.from_json(json.loads((runner.pki / "anchor.json").read_text()))
        document = signed_document(signed)
        results.content_bytes = len(document.content)
        snapshot = await first_snapshot(address, instance, PROVIDER_SERVER)
        results.snapshot_bytes = snapshot.ByteSize()
        for _ in range(results.repeats):
            results.install_seconds.append(install_seconds(snapshot, anchor, PROVIDER_SERVER))
    except Exception as exc:
        results.configuration_bytes = _reason(exc)
    for name in SERVERS:
        runner.launch(name)
    results.servers_ready = await asyncio.to_thread(_wait_servers, runner, ready_timeout)
    ready = all(isinstance(v, float) for v in results.servers_ready.values())
    watchers = Watchers(results.watchers)
    try:
        await watchers.start(address, instance)
        await watchers.wait(
            lambda: len(watchers.healthy()) == watchers.count, max(10.0, change_timeout / 2)
        )
        async with aiohttp.ClientSession() as session:
            for run in range(results.repeats):
                change = await measure_change(
                    runner,
                    watchers,
                    session,
                    run=run,
                    servers_ready=ready,
                    timeout=change_timeout,
                )
                results.publish_seconds.append(change.publish)
                results.api_seconds.append(change.api)
                results.watchers_seconds.append(change.watchers)
                results.refusal_seconds.append(change.refusal)
                for why, n in change.unexpected.items():
                    results.unexpected[why] = results.unexpected.get(why, 0) + n
                print(
                    f"   run {run + 1}: publish {_show(change.publish)}, API {_show(change.api)}, "
                    f"all watchers {_show(change.watchers)}, refusal {_show(change.refusal)}",
                    flush=True,
                )
        results.registry_memory_kib = memory_kib(runner.processes["registry"])
        results.change_bytes = watchers.change_bytes
    finally:
        await watchers.close()
    for name in SERVERS:
        results.server_memory_kib[name] = memory_kib(runner.processes[name])


def _show(value: Value | int, unit: str = "s") -> str:
    if isinstance(value, str):
        return value
    if unit == "B":
        return f"{value / 1e6:.2f} MB"
    if unit == "KiB":
        return f"{value / 1024:.0f} MiB"
    return f"{value:.3f} s"


def table(results: ScaleResults) -> list[tuple[str, str]]:
    ss_peak = [m["VmHWM"] for m in results.server_memory_kib.values() if "VmHWM" in m]
    registry_peak = results.registry_memory_kib.get("VmHWM")
    return [
        (
            "whole configuration, one document (Fetch, as sent)",
            _show(results.configuration_bytes, "B"),
        ),
        ("its content, uncompressed", _show(results.content_bytes, "B")),
        ("a security server's snapshot (WatchParts, as sent)", _show(results.snapshot_bytes, "B")),
        (
            "a change's message per watcher (median, largest)",
            f"{statistics.median(results.change_bytes) / 1e3:.1f} KB, "
            f"{max(results.change_bytes) / 1e3:.1f} KB"
            if results.change_bytes
            else "not measured",
        ),
        ("registry: publish after one change", _show(median(results.publish_seconds))),
        ("revoke API answer", _show(median(results.api_seconds))),
        (
            f"all of {results.watchers} watchers have the new version",
            _show(median(results.watchers_seconds)),
        ),
        (
            "security server: verify, parse and install its snapshot",
            _show(median(results.install_seconds)),
        ),
        (
            "security server memory (peak, larger of the two)",
            _show(max(ss_peak), "KiB") if ss_peak else "not measured",
        ),
        (
            f"registry memory (peak, {results.watchers} watchers)",
            _show(registry_peak, "KiB") if registry_peak else "not measured",
        ),
        ("revoke → first refusal, real servers", _show(median(results.refusal_seconds))),
        (
            "calls failing otherwise meanwhile",
            ", ".join(f"{n} x {why}" for why, n in sorted(results.unexpected.items())) or "none",
        ),
    ]


def run_scale_bench(
    workdir: Path,
    scale: float,
    repeats: int,
    watchers: int = 20,
    *,
    ready_timeout: float | None = None,
    change_timeout: float | None = None,
) -> int:
    """`gateway bench --scale F` (see the module docstring); 0 when it ran to the end."""
    if scale <= 0 or repeats < 1 or watchers < 1:
        print("bench: --scale must be > 0, --repeats and --watchers >= 1")
        return 2
    ready_timeout = ready_timeout or 30.0 + 30.0 * scale
    change_timeout = change_timeout or 20.0 + 20.0 * scale
    counts = Counts.at(scale)
    print(f"== gateway bench --scale {scale:g}")
    print(
        f"   {counts.members} members, {counts.subsystems} subsystems, {counts.servers} security "
        f"servers, {counts.services} services, {counts.active_agreements} active and "
        f"{counts.expired_agreements} expired agreements (plus the demo topology); "
        f"{repeats} change(s), {watchers} watchers",
        flush=True,
    )
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    results = ScaleResults(scale=scale, repeats=repeats, watchers=watchers)
    # no periodic publication during the measurements: only the changes publish
    runner = Runner(workdir, validity_seconds=7200.0, refresh_seconds=3600.0)
    try:
        runner.prepare()
        seed = seed_registry(
            workdir / "state" / "registry.db", instance=runner.instance, scale=scale
        )
        results.counts = {k: int(v) for k, v in vars_of(seed.counts).items()}
        results.seed_seconds = seed.seconds
        results.admin_entries = seed.admin_entries
        print(
            f"   seeded in {seed.seconds:.1f} s ({seed.admin_entries} admin log entries)",
            flush=True,
        )
        for name in runner.processes:
            if name.startswith("backend-") or name in runner.trust_services:
                runner.start(name)
        began = time.monotonic()
        runner.start("registry", timeout=60.0 + 120.0 * scale)
        results.registry_start_seconds = time.monotonic() - began
        print(f"   registry ready in {results.registry_start_seconds:.1f} s", flush=True)
        # quiet: the configuration client logs each document it installs
        logging_config = structlog.get_config()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        try:
            asyncio.run(
                _measure(
                    runner, results, ready_timeout=ready_timeout, change_timeout=change_timeout
                )
            )
        finally:
            structlog.configure(**logging_config)
    finally:
        runner.close()
    rows = table(results)
    width = max(len(name) for name, _ in rows)
    print(f"\n   {'':<{width}}  F = {scale:g} (medians of {repeats})")
    for name, value in rows:
        print(f"   {name:<{width}}  {value}")
    for server, ready in results.servers_ready.items():
        print(f"   {server} ready: {_show(ready)}")
    doc = {**vars_of(results), "table": dict(rows)}
    (workdir / "scale.json").write_text(json.dumps(doc, indent=1))
    print(f"   results: {workdir / 'scale.json'}")
    return 0


def vars_of(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)
