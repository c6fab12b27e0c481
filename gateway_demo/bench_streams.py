"""`gateway bench --streams`: streaming calls through both security servers against the
backend called directly, in the same run.

- **Large transfer**: `Download`, server streaming, `--stream-mib` MiB in 1 MiB messages
  (1 GiB by default): MB/s through the gateway and direct, and how far each security
  server's peak resident memory grew during the transfer (its peak is reset just before,
  through /proc/PID/clear_refs, and read from VmHWM after).
- **Many small messages**: `Chat`, bidirectional, 1 KiB messages for `--seconds` on one
  long stream, the writer running ahead of the reader by at most a window of messages:
  messages per second through the gateway and direct.

Each measurement alternates direct and gateway, `--repeats` times; medians are printed
with their ratios (the goal: at least 0.5 of direct for both), and the result is written
to WORKDIR/streams.json.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from gateway_demo.client import routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner

DOWNLOAD = "/demo.population.v1.PopulationRegistry/Download"
CHAT = "/demo.population.v1.PopulationRegistry/Chat"
CLINICS = "UY/GOV/MSP/clinics"
POPULATION = "UY/GOV/DNIC/identity/population/v1"
MSP, DNIC = "UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"
MIB = 1024 * 1024
# messages the bidirectional writer may be ahead of its reader
WINDOW = 64
# room for a 1 MiB message and its framing on the direct channel
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 * MIB)]


def _metadata() -> list[tuple[str, str]]:
    return routing_metadata(client=CLINICS, service=POPULATION, purpose="benchmark")


def reset_peak(pid: int) -> int:
    """Reset a process's peak resident memory to its current one; that, in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS")


def peak_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for process {pid}")


async def transfer(target: str, mib: int, via_gateway: bool) -> float:
    """Seconds to receive `mib` MiB in 1 MiB messages from `Download`."""
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_stream(
            DOWNLOAD,
            request_serializer=population.DownloadRequest.SerializeToString,
            response_deserializer=population.EchoMessage.FromString,
        )(
            population.DownloadRequest(count=mib, size=MIB),
            metadata=_metadata() if via_gateway else None,
            timeout=600,
        )
        began = time.perf_counter()
        received = 0
        async for message in call:
            received += len(message.payload)
        seconds = time.perf_counter() - began
    if received != mib * MIB:
        raise RuntimeError(f"received {received} bytes of {mib * MIB}")
    return seconds


async def chat_rate(target: str, seconds: float, via_gateway: bool) -> float:
    """Messages per second echoed on one bidirectional stream of 1 KiB messages."""
    payload = population.EchoMessage(payload=b"\x5a" * 1024)
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.stream_stream(
            CHAT,
            request_serializer=population.EchoMessage.SerializeToString,
            response_deserializer=population.EchoMessage.FromString,
        )(None, metadata=_metadata() if via_gateway else None, timeout=seconds + 60)
        window = asyncio.Semaphore(WINDOW)
        stop = time.perf_counter() + seconds
        sent = 0

        async def write() -> None:
            nonlocal sent
            while time.perf_counter() < stop:
                await window.acquire()
                await call.write(payload)
                sent += 1
            await call.done_writing()

        writer = asyncio.create_task(write())
        began = time.perf_counter()
        received = 0
        eof: Any = grpc.aio.EOF  # type: ignore[attr-defined]
        while (message := await call.read()) is not eof:
            assert len(message.payload) == 1024
            received += 1
            window.release()
        elapsed = time.perf_counter() - began
        await writer
    if received != sent:
        raise RuntimeError(f"{sent} messages sent, {received} echoed")
    return received / elapsed


def _pid(runner: Runner, name: str) -> int:
    return int(runner.processes[name].ready["pid"])


async def _measure(runner: Runner, mib: int, seconds: float, repeats: int) -> dict[str, Any]:
    direct = runner.backends["population"]
    gateway = runner.consumers[MSP]
    pids = {name: _pid(runner, name) for name in ("ss-msp", "ss-dnic")}
    transfers: dict[str, list[float]] = {"direct": [], "gateway": []}
    growth: dict[str, list[int]] = {name: [] for name in pids}
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    await transfer(gateway, 8, True)  # warm-up: connections, caches
    await chat_rate(gateway, 1.0, True)
    for repeat in range(repeats):
        order = ["direct", "gateway"] if repeat % 2 == 0 else ["gateway", "direct"]
        for target in order:
            if target == "gateway":
                before = {name: reset_peak(pid) for name, pid in pids.items()}
            took = await transfer(
                direct if target == "direct" else gateway, mib, target == "gateway"
            )
            transfers[target].append(mib * MIB / 1e6 / took)
            if target == "gateway":
                for name, pid in pids.items():
                    growth[name].append(peak_kib(pid) - before[name])
            print(f"   repeat {repeat + 1}: {target:<8} {mib} MiB in {took:.2f} s "
                  f"({transfers[target][-1]:.0f} MB/s)", flush=True)  # fmt: skip
        for target in order:
            rate = await chat_rate(
                direct if target == "direct" else gateway, seconds, target == "gateway"
            )
            rates[target].append(rate)
            print(
                f"   repeat {repeat + 1}: {target:<8} bidirectional {rate:.0f} messages/s",
                flush=True,
            )
    med = statistics.median
    return {
        "transfer_mib": mib,
        "transfer_mb_per_s": {k: med(v) for k, v in transfers.items()},
        "transfer_ratio": med(transfers["gateway"]) / med(transfers["direct"]),
        "peak_growth_mib": {k: max(v) / 1024 for k, v in growth.items()},
        "bidi_messages_per_s": {k: med(v) for k, v in rates.items()},
        "bidi_ratio": med(rates["gateway"]) / med(rates["direct"]),
        "runs": {"transfer": transfers, "bidi": rates, "growth_kib": growth},
    }


def run_streams_bench(*, workdir: Path, mib: int, seconds: float, repeats: int) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    runner = Runner(workdir)
    print(f"streams benchmark: {mib} MiB server-streamed in 1 MiB messages, and 1 KiB "
          f"messages on one bidirectional stream for {seconds:.0f} s; {repeats} repeats")  # fmt: skip
    runner.prepare()
    try:
        runner.start_all()
        result = asyncio.run(_measure(runner, mib, seconds, repeats))
    finally:
        runner.close()
    mbs, msgs = result["transfer_mb_per_s"], result["bidi_messages_per_s"]
    print()
    print(f"large transfer ({mib} MiB): gateway {mbs['gateway']:.0f} MB/s, direct "
          f"{mbs['direct']:.0f} MB/s: gateway/direct {result['transfer_ratio']:.2f} (goal 0.5)")  # fmt: skip
    for name, grown in result["peak_growth_mib"].items():
        print(f"   {name}: peak resident memory grew by at most {grown:.1f} MiB (bound 64 MiB)")
    print(f"bidirectional 1 KiB messages: gateway {msgs['gateway']:.0f}/s, direct "
          f"{msgs['direct']:.0f}/s: gateway/direct {result['bidi_ratio']:.2f} (goal 0.5)")  # fmt: skip
    (workdir / "streams.json").write_text(json.dumps(result, indent=2))
    bounded = all(v <= 64 for v in result["peak_growth_mib"].values())
    return 0 if bounded else 1
