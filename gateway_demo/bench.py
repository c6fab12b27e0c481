"""`gateway bench` (`make bench`): throughput and latency of unary calls, directly to the
sample backend and through both security servers, in the same run.

The whole demo topology runs as real processes (see `Runner`). The load generator runs
in a separate process of its own (`python -m gateway_demo.bench --load ...`), so its CPU
use is the same for both targets: an asyncio gRPC client with one channel and a fixed
number of concurrent callers, each calling `Echo` in a loop with a random body. Direct
and gateway runs alternate; each is repeated, and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ECHO = "/demo.population.v1.PopulationRegistry/Echo"
CONSUMER_SERVER = "UY/GOV/MSP/ss1"
PROVIDER_SERVER = "UY/GOV/DNIC/ss1"
CLIENT = "UY/GOV/MSP/clinics"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
PURPOSE = "benchmark"
WARMUP_SECONDS = 1.0
CALL_TIMEOUT = 10.0
# share of calls the traced topology records: the sampling an operator would run under
# load (every call traced costs about a third of the throughput on 2 cores; measure it
# with --trace-ratio 1)
TRACE_RATIO = 0.01


# ---- load generator (runs in its own process) ------------------------------------------


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def _own_peak_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def _load(
    *,
    target: str,
    method: str,
    metadata: list[tuple[str, str]],
    concurrency: int,
    seconds: float,
    warmup: float,
    body_bytes: int,
) -> dict[str, Any]:
    import grpc

    from gateway_demo.generated import population_pb2 as population

    body = population.EchoMessage(payload=os.urandom(body_bytes)).SerializeToString()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    error_samples: dict[str, str] = {}
    warm_errors = 0
    completed = 0

    async with grpc.aio.insecure_channel(target) as channel:
        call: Any = channel.unary_unary(method, None, None)
        await asyncio.wait_for(channel.channel_ready(), timeout=10.0)
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def worker() -> None:
            nonlocal warm_errors, completed
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                code = "OK"
                details = ""
                try:
                    answer = await call(body, metadata=metadata, timeout=CALL_TIMEOUT)
                    if len(answer) != len(body):
                        code, details = "BAD_ANSWER", f"{len(answer)} bytes back"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    trailing: Any = exc.trailing_metadata() or ()
                    gateway_error = dict(trailing).get("gateway-error")
                    if gateway_error:
                        code = f"{code}[{gateway_error}]"
                    details = str(exc.details())
                t1 = time.perf_counter()
                completed += 1
                if t1 < measure_from:  # completed during the warm-up: not measured
                    if code != "OK":
                        warm_errors += 1
                    continue
                if t1 > stop_at:  # completed after the window: not measured either
                    return
                if code == "OK":
                    latencies.append(t1 - t0)
                else:
                    errors[code] += 1
                    error_samples.setdefault(code, details[:300])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = seconds

    latencies.sort()
    count = len(latencies)
    return {
        "count": count,
        "elapsed": elapsed,
        "rps": count / elapsed if elapsed > 0 else 0.0,
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        "error_samples": error_samples,
        "warmup_errors": warm_errors,
        "p50_ms": _percentile(latencies, 0.50) * 1000.0,
        "p99_ms": _percentile(latencies, 0.99) * 1000.0,
        "mean_ms": (statistics.fmean(latencies) * 1000.0) if latencies else 0.0,
        "peak_kib": _own_peak_kib(),
        # every call answered, warm-up and the window's end included (CPU per call)
        "completed": completed,
    }


def _load_main(ns: argparse.Namespace) -> int:
    metadata = [(str(k), str(v)) for k, v in json.loads(ns.metadata)]

    async def main() -> dict[str, Any]:
        return await _load(
            target=ns.target,
            method=ns.method,
            metadata=metadata,
            concurrency=ns.concurrency,
            seconds=ns.seconds,
            warmup=ns.warmup,
            body_bytes=ns.body_bytes,
        )

    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main())
    print(json.dumps(result), flush=True)
    return 0


def load_command(
    *,
    target: str,
    metadata: list[tuple[str, str]],
    concurrency: int,
    seconds: float,
    body_bytes: int,
    method: str = ECHO,
    warmup: float = WARMUP_SECONDS,
) -> list[str]:
    """The command line of one load-generator process (also used by profiling scripts)."""
    return [
        sys.executable,
        "-m",
        "gateway_demo.bench",
        "--load",
        "--target",
        target,
        "--method",
        method,
        "--metadata",
        json.dumps(metadata),
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        "--body-bytes",
        str(body_bytes),
    ]


def run_load(
    command: list[str], *, seconds: float, warmup: float = WARMUP_SECONDS
) -> dict[str, Any]:
    """Run one load-generator process and return its JSON result."""
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + warmup + CALL_TIMEOUT + 60.0,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"load generator failed with {done.returncode}:\n{done.stderr[-3000:]}{done.stdout[-1000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---- the benchmark -----------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


class Scraper:
    """Scrapes operations ports every second in a thread, as Prometheus would, so that the
    observed topology pays for its scrapes during the runs."""

    def __init__(self, urls: list[str], interval: float = 1.0) -> None:
        self.urls = urls
        self.interval = interval
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for url in self.urls:
                try:
                    # our own http:// operations ports
                    with urllib.request.urlopen(url + "/metrics", timeout=5) as answer:  # noqa: S310
                        answer.read()
                    self.count += 1
                except OSError:
                    pass

    def stop(self) -> int:
        """Stop scraping; how many scrapes answered."""
        self._stop.set()
        self._thread.join()
        return self.count


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs) if runs else 0.0


def _pid(runner: Any, process: str) -> int:
    pid: int = runner.processes[process].popen.pid
    return pid


def _stamped(runner: Any) -> dict[str, str]:
    """'stamped/total' records of each security server's log."""
    return {
        runner.server_names[server]: "{}/{}".format(*runner.stamped(server))
        for server in runner.server_names
    }


# the gateway topologies measured side by side: name, what it is, Runner options (the
# "traced" one also sends its spans to the benchmark's OTLP receiver)
TOPOLOGIES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "gateway",
        "load generator -> ss-msp consumer -> mTLS -> ss-dnic provider -> backend (signed, "
        "OCSP-stapled, logged and batch time-stamped on both sides; metrics on and scraped "
        "every second, tracing off: the defaults)",
        {},
    ),
    (
        "no-tsa",
        "the same path without a time-stamping authority (the cost of batch time-stamps "
        "is gateway/no-tsa)",
        {"timestamping": {"enabled": False}},
    ),
    (
        "unobserved",
        "the same path with no metrics (ops.metrics = false) and no tracing (the cost of "
        "metrics is gateway/unobserved)",
        {"ops": {"metrics": False}},
    ),
    (
        "traced",
        "the same path with metrics scraped and the sampled calls' spans exported over "
        "OTLP/HTTP to a receiver in this process (the cost of metrics and tracing together "
        "is traced/unobserved)",
        {},
    ),
]


def run_bench(
    *,
    workdir: Path,
    concurrency: int,
    seconds: float,
    repeats: int,
    body_bytes: int,
    trace_ratio: float = TRACE_RATIO,
) -> int:
    from gateway_demo.baselines import (
        Baseline,
        cpu_seconds,
        nginx_missing,
        start_bare,
        start_nginx,
    )
    from gateway_demo.client import routing_metadata
    from gateway_demo.otlp import Collector
    from gateway_demo.runner import Runner

    if concurrency < 1 or seconds <= 0 or repeats < 1 or body_bytes < 0:
        print("bench: concurrency and repeats must be >= 1, seconds > 0, body bytes >= 0")
        return 2
    if not 0.0 < trace_ratio <= 1.0:
        print("bench: the trace ratio must be above 0 and at most 1")
        return 2
    cpus = os.cpu_count()
    print("== gateway bench")
    print(
        f"   unary {ECHO} with {body_bytes}-byte bodies, {concurrency} concurrent calls, "
        f"{seconds:g} s per run after a {WARMUP_SECONDS:g} s warm-up, {repeats} repeat(s)"
    )
    print(f"   {'direct':<10} load generator -> population backend (plain gRPC)")
    print(
        f"   {'nginx':<10} load generator -> nginx -> mTLS (grpc_pass grpcs://, client "
        "certificate, server name verified) -> nginx -> backend: two nginx hops, one worker each"
    )
    print(
        f"   {'bare':<10} load generator -> Python forwarder -> mTLS -> Python forwarder -> "
        "backend: two bare grpc.aio hops on uvloop, bytes forwarded, no security work"
    )
    for name, what, _ in TOPOLOGIES:
        print(f"   {name:<10} {what}")
    print(f"   the traced topology records a share of {trace_ratio:g} of its calls' traces")
    print(
        f"   every process shares this machine's {cpus} CPU core(s): the results depend on "
        "the core count (the gateway path has 4 busy processes, the direct path 2)"
    )

    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    collector = Collector(decode=False)
    collector.start()
    traced: dict[str, Any] = {
        "tracing": {"otlp_endpoint": collector.url, "sample_ratio": trace_ratio},
        "trace_backends": False,
    }
    topologies = {
        # one process per backend: its CPU per call is read from /proc
        name: Runner(
            workdir / name,
            separate_backends=True,
            **options,
            **(traced if name == "traced" else {}),
        )
        for name, _, options in TOPOLOGIES
    }
    runner = topologies["gateway"]
    gateways = list(topologies)
    baselines: dict[str, Baseline] = {}
    runs: list[dict[str, Any]] = []
    peaks: dict[str, int | None] = {}
    load_peak: int | None = None
    try:
        print("\n   starting the topologies ...", flush=True)
        for r in topologies.values():
            r.prepare()
            r.start_all()
        backend = runner.backends["population"]
        baselines["bare"] = start_bare(runner.pki, backend, runner.reserve_address)
        missing = nginx_missing()
        if missing is None:
            baselines["nginx"] = start_nginx(
                runner.pki, backend, runner.reserve_address, workdir / "nginx"
            )
        else:
            print(f"   nginx: not measured, {missing}")
        scraper = Scraper(
            [url for name in ("gateway", "traced") for url in topologies[name].ops_urls().values()]
        )
        scraper.start()
        gateway_metadata = routing_metadata(client=CLIENT, service=SERVICE, purpose=PURPOSE)
        endpoints: dict[str, tuple[str, list[tuple[str, str]]]] = {
            "direct": (runner.backends["population"], []),
            **{name: (baseline.address, []) for name, baseline in baselines.items()},
            **{
                name: (topology.consumers[CONSUMER_SERVER], gateway_metadata)
                for name, topology in topologies.items()
            },
        }
        targets = {
            name: load_command(
                target=address,
                metadata=metadata,
                concurrency=concurrency,
                seconds=seconds,
                body_bytes=body_bytes,
            )
            for name, (address, metadata) in endpoints.items()
        }
        # p50 with one caller, for the direct call, the baselines and the gateway
        lone_seconds = max(2.0, seconds / 2)
        lone = {
            name: load_command(
                target=address,
                metadata=metadata,
                concurrency=1,
                seconds=lone_seconds,
                body_bytes=body_bytes,
            )
            for name, (address, metadata) in endpoints.items()
            if name in ("direct", "gateway", *baselines)
        }
        print(
            f"\n{'run':>6}  {'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
        )
        backend_pid = _pid(runner, "backend-population")

        def cpu(name: str) -> float:
            """CPU seconds so far of the processes a call to `name` goes through."""
            if name == "direct":
                return cpu_seconds(backend_pid)
            if name in baselines:
                return baselines[name].cpu_seconds() + cpu_seconds(backend_pid)
            topology = topologies[name]
            return sum(
                cpu_seconds(_pid(topology, process))
                for process in (
                    topology.server_names[CONSUMER_SERVER],
                    topology.server_names[PROVIDER_SERVER],
                    "backend-population",
                )
            )

        names = [*baselines, *gateways]
        for repeat in range(1, repeats + 1):
            # the targets rotate every repeat, so that none always follows the direct run
            shift = (repeat - 1) % len(names)
            order = ["direct", *names[shift:], *names[:shift]]
            for name in order:
                command = targets[name]
                used = cpu(name)
                result = run_load(command, seconds=seconds)
                used = cpu(name) - used
                result.update(run=repeat, target=name)
                result["cpu_ms_per_call"] = (
                    1000.0 * used / result["completed"] if result.get("completed") else 0.0
                )
                if name in lone:
                    one = run_load(lone[name], seconds=lone_seconds)
                    result["p50_one_caller_ms"] = one["p50_ms"]
                runs.append(result)
                print(
                    f"{repeat:>6}  {name:<10} {result['rps']:>9.1f} {result['p50_ms']:>8.2f} "
                    f"{result['p99_ms']:>8.2f} {result['errors']:>7}",
                    flush=True,
                )
                if result["errors"]:
                    for code, n in result["error_codes"].items():
                        print(f"        {n} x {code}: {result['error_samples'].get(code, '')}")
                peak = result.get("peak_kib")
                if isinstance(peak, int):
                    load_peak = max(load_peak or 0, peak)
        for name, proc in runner.processes.items():
            peaks[name] = proc.peak_memory_kib()
        time.sleep(2.0)  # the last batch of the run gets its stamp, the last spans leave
        stamped_records = _stamped(runner)
        scraped = scraper.stop()
    finally:
        for baseline in baselines.values():
            baseline.close()
        for r in topologies.values():
            r.close()
        collector.stop()
    spans = collector.span_count()

    by_target = {
        t: [r for r in runs if r["target"] == t] for t in ("direct", *baselines, *gateways)
    }
    medians = {
        t: {
            "rps": _median(rs, "rps"),
            "p50_ms": _median(rs, "p50_ms"),
            "p99_ms": _median(rs, "p99_ms"),
            "p50_one_caller_ms": _median(
                [r for r in rs if "p50_one_caller_ms" in r], "p50_one_caller_ms"
            ),
            "cpu_ms_per_call": _median(rs, "cpu_ms_per_call"),
            "errors": sum(int(r["errors"]) for r in rs),
        }
        for t, rs in by_target.items()
    }

    def over(target: str, base: str) -> tuple[float, list[float]]:
        """req/s of `target` over `base`'s: of the medians, and per repeat."""
        median = medians[base]["rps"]
        return (medians[target]["rps"] / median if median else 0.0), [
            t["rps"] / b["rps"] if b["rps"] else 0.0
            for b, t in zip(by_target[base], by_target[target], strict=True)
        ]

    def listed(ratios: list[float]) -> str:
        return f"  (per repeat: {', '.join(f'{r:.3f}' for r in ratios)})"

    ratios: dict[str, dict[str, Any]] = {}
    ratio, per_repeat = over("gateway", "direct")
    stamping, stamping_per_repeat = over("gateway", "no-tsa")
    observed, observed_per_repeat = over("gateway", "unobserved")
    tracing, tracing_per_repeat = over("traced", "unobserved")

    print(
        f"\n{'median':>6}  {'target':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
        f" {'p50 1 caller':>13} {'CPU ms/call':>12}"
    )
    for t, m in medians.items():
        alone = f"{m['p50_one_caller_ms']:.2f}" if m["p50_one_caller_ms"] else "-"
        print(
            f"{'':>6}  {t:<10} {m['rps']:>9.1f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} "
            f"{m['errors']:>7} {alone:>13} {m['cpu_ms_per_call']:>12.3f}"
        )
    print(
        "\n   CPU ms/call: user and system time of the target's processes (both servers or "
        "hops, and the backend) over the run, warm-up included, per call answered"
    )
    print(f"\n   ratio gateway/direct (medians of req/s): {ratio:.3f}" + listed(per_repeat))
    for base in baselines:
        over_base, over_base_per_repeat = over("gateway", base)
        lone_ratio = (
            medians["gateway"]["p50_one_caller_ms"] / medians[base]["p50_one_caller_ms"]
            if medians[base]["p50_one_caller_ms"]
            else 0.0
        )
        print(
            f"   ratio gateway/{base} (medians of req/s): {over_base:.3f}; p50 with one "
            f"caller gateway/{base}: {lone_ratio:.2f}x" + listed(over_base_per_repeat)
        )
        ratios[f"gateway/{base}"] = {
            "rps": over_base,
            "rps_per_repeat": over_base_per_repeat,
            "p50_one_caller": lone_ratio,
        }
    print(
        f"   ratio gateway/no-tsa (medians of req/s): {stamping:.3f}, so batch time-stamping "
        f"costs {100 * (1 - stamping):.1f}% of throughput" + listed(stamping_per_repeat)
    )
    print(
        f"   ratio gateway/unobserved (medians of req/s): {observed:.3f}, so metrics (scraped "
        f"{scraped} times in all) cost {100 * (1 - observed):.1f}% of throughput"
        + listed(observed_per_repeat)
    )
    print(
        f"   ratio traced/unobserved (medians of req/s): {tracing:.3f}, so metrics and tracing "
        f"({spans} spans exported) cost {100 * (1 - tracing):.1f}% of throughput"
        + listed(tracing_per_repeat)
    )
    print(
        "   records time-stamped on the gateway topology at the end: "
        + ", ".join(f"{k} {v}" for k, v in stamped_records.items())
    )
    if medians["direct"]["p50_ms"]:
        slower = medians["gateway"]["p50_ms"] / medians["direct"]["p50_ms"]
        print(f"   p50 latency gateway/direct: {slower:.2f}x")
    print("\n   peak memory (VmHWM, MiB)")
    for name, kib in peaks.items():
        print(f"   {name:<20} {_mib(kib):>8}")
    print(f"   {'load generator':<20} {_mib(load_peak):>8}")

    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": ECHO,
        "concurrency": concurrency,
        "body_bytes": body_bytes,
        "seconds": seconds,
        "warmup_seconds": WARMUP_SECONDS,
        "repeats": repeats,
        "trace_ratio": trace_ratio,
        "cpu_count": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runs": runs,
        "medians": medians,
        "ratio_gateway_direct_rps": ratio,
        "ratio_per_repeat": per_repeat,
        "ratio_stamped_unstamped_rps": stamping,
        "ratio_stamped_unstamped_per_repeat": stamping_per_repeat,
        "ratio_observed_unobserved_rps": observed,
        "ratio_observed_unobserved_per_repeat": observed_per_repeat,
        "ratio_traced_unobserved_rps": tracing,
        "ratio_traced_unobserved_per_repeat": tracing_per_repeat,
        "ratios_over_baselines": ratios,
        "scrapes": scraped,
        "spans": spans,
        "stamped_records": stamped_records,
        "peak_memory_kib": {**peaks, "load-generator": load_peak},
    }
    results = workdir / "results.json"
    results.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\n   results written to {results}")

    gateway_errors = sum(medians[t]["errors"] for t in gateways)
    if gateway_errors:
        print(f"FAILED: {gateway_errors} gateway call(s) failed")
        return 1
    if not spans:
        print("FAILED: the traced topology exported no span")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_demo.bench",
        description="Load generator of `gateway bench` (or the benchmark itself without --load).",
    )
    parser.add_argument("--load", action="store_true", help="run as the load generator")
    parser.add_argument("--target", help="host:port to call (with --load)")
    parser.add_argument("--method", default=ECHO)
    parser.add_argument("--metadata", default="[]", help="JSON list of [key, value] pairs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=WARMUP_SECONDS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    parser.add_argument("--trace-ratio", type=float, default=TRACE_RATIO)
    ns = parser.parse_args(argv)
    if ns.load:
        if not ns.target:
            parser.error("--load needs --target")
        return _load_main(ns)
    return run_bench(
        workdir=ns.workdir,
        concurrency=ns.concurrency,
        seconds=ns.seconds,
        repeats=ns.repeats,
        body_bytes=ns.body_bytes,
        trace_ratio=ns.trace_ratio,
    )


if __name__ == "__main__":
    sys.exit(main())
