"""Metrics as operators see them, from one real topology: first a real Prometheus server
(the Debian package's binary) scrapes every process with the repository's configuration
(deploy/prometheus/prometheus.yml): after allowed and refused calls its HTTP API answers
the counts per outcome code, every target is up, and every metric the Grafana dashboard
(deploy/grafana) names exists in a scrape; then the processes' own /metrics: counts per
outcome (as differences, after the calls above), the state gauges, and label sets that a
flood of made-up ids cannot grow. The Prometheus tests come first: they count the
topology's calls from its start."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_client.admin import AdminClient
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner, reserve_port
from gateway_demo.scrape import CONFIGURED_TARGETS, PROMETHEUS_CONFIG, REPO, write_scrape_targets

from .conftest import CLINICS, DNIC, GET_PERSON, GET_RECORD, IDENTITY, MSP, POPULATION, VACCINATION

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed: Debian package `prometheus` "
    "(scripts/debian-packages installs it when run as root)",
)

DASHBOARD = REPO / "deploy" / "grafana" / "gateway-dashboard.json"
PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
# the deploy configuration's scrape interval, and the test's: Prometheus sees a call within 1 s
DEPLOYED_INTERVAL, TEST_INTERVAL = "scrape_interval: 5s", "scrape_interval: 1s"
WAIT_SECONDS = 30.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Prometheus:
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a Prometheus HTTP API answer; fails the test with its error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:  # 400 and 422 carry the reason as JSON
            body = json.load(exc)
        assert body["status"] == "success", (params, body)
        return body["data"]

    def vector(self, expr: str, label: str) -> dict[str, float]:
        """An instant query's value per value of `label`."""
        result = self.api("/api/v1/query", query=expr)["result"]
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def eventually(read: Callable[[], T], holds: Callable[[T], bool], what: str) -> T:
    """What `read` answers once `holds` says so: Prometheus shows a change at its next scrape,
    and a process's lazily created series at the scrape after their first use."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        value = read()
        if holds(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {WAIT_SECONDS} s: {value!r}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runner(make_runner: Callable[..., Runner]) -> Runner:
    return make_runner(separate_trust_services=True)


@pytest.fixture(scope="module")
def prometheus(runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port with its own storage, run with the repository's
    configuration placed, like the targets file it names, as in the repository; stopped at
    the end whatever happens (and by Linux, should the test process die first)."""
    assert PROMETHEUS is not None
    root = tmp_path_factory.mktemp("prometheus")
    config = root / PROMETHEUS_CONFIG.relative_to(REPO)
    text = PROMETHEUS_CONFIG.read_text()
    assert text.count(DEPLOYED_INTERVAL) == 1, "the test shortens the deployed scrape interval"
    config.parent.mkdir(parents=True)
    config.write_text(text.replace(DEPLOYED_INTERVAL, TEST_INTERVAL))
    targets = root / CONFIGURED_TARGETS.relative_to(REPO)
    targets.parent.mkdir(parents=True)
    write_scrape_targets(targets, [runner])
    port = reserve_port()  # held until Prometheus stops (see reserve_port)
    address = f"127.0.0.1:{port.getsockname()[1]}"
    # setpriv asks Linux to send Prometheus SIGTERM when this process dies (a Go binary
    # cannot ask itself, and preexec_fn is unsafe beside gRPC's threads)
    setpriv = shutil.which("setpriv")
    command = [
        *([setpriv, "--pdeathsig", "TERM"] if setpriv else []),
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address={address}",
    ]
    log = root / "prometheus.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Prometheus(url=f"http://{address}", log=log)
    try:
        eventually(lambda: _ready(server, popen), bool, "Prometheus was not ready")
        yield server
    finally:
        popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        port.close()


def _ready(server: Prometheus, popen: subprocess.Popen[bytes]) -> bool:
    assert popen.poll() is None, f"prometheus exited:\n{server.log.read_text()[-3000:]}"
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, ConnectionError):
        return False


async def _call(address: str, method: str, body: bytes, **routing: str) -> Outcome:
    async with grpc.aio.insecure_channel(address) as channel:
        return await call_raw(
            channel,
            method,
            body,
            routing_metadata(
                client=routing["client"], service=routing["service"], purpose=routing["purpose"]
            ),
        )


@needs_prometheus
def test_every_process_is_a_target_and_up(runner: Runner, prometheus: Prometheus) -> None:
    """Prometheus found every process with an operations port in the targets file (named by
    its `process` label) and scrapes each."""
    expected = {name: 1.0 for name in runner.ops_urls()}
    assert {"registry", "ocsp", "tsa", "ss-msp", "ss-dnic"} <= set(expected)
    eventually(
        lambda: prometheus.vector('up{job="gateway"}', "process"),
        lambda up: up == expected,
        "not every process was scraped",
    )
    instances = prometheus.vector(
        'count by (gateway_instance) (up{job="gateway"})', "gateway_instance"
    )
    assert instances == {"UY": len(expected)}


@pytest.fixture(scope="module")
def prometheus_calls(runner: Runner) -> None:
    """3 allowed calls and 3 refused ones: 2 without an agreement, 1 for a purpose the
    agreement does not cover."""
    allowed = {"client": CLINICS, "service": POPULATION, "purpose": "healthcare-identification"}
    no_agreement = {"client": IDENTITY, "service": VACCINATION, "purpose": "identity-check"}
    marketing = {**allowed, "purpose": "marketing"}
    msp, dnic = runner.consumers[MSP], runner.consumers[DNIC]
    outcomes = [
        *(asyncio.run(_call(msp, GET_PERSON, PERSON, **allowed)) for _ in range(3)),
        *(asyncio.run(_call(dnic, GET_RECORD, b"", **no_agreement)) for _ in range(2)),
        asyncio.run(_call(msp, GET_PERSON, PERSON, **marketing)),
    ]
    codes = [o.error or ("ok" if o.ok else o.code.name) for o in outcomes]
    assert codes == [*["ok"] * 3, *["no_agreement"] * 2, "purpose_not_covered"], outcomes


@needs_prometheus
@pytest.mark.usefixtures("prometheus_calls")
def test_calls_are_counted_per_outcome_code(prometheus: Prometheus) -> None:
    """After 3 allowed calls, 2 refused without an agreement and 1 refused for a purpose
    the agreement does not cover, Prometheus answers those counts per outcome code."""
    expected = {"ok": 3.0, "no_agreement": 2.0, "purpose_not_covered": 1.0}
    eventually(
        lambda: prometheus.vector('sum by (code) (gateway_calls_total{role="consumer"})', "code"),
        lambda counts: counts == expected,
        "the consumers' calls per code differ",
    )
    # the labels name the configuration's ids; the provider saw the allowed calls only
    by_client = prometheus.vector(
        f'gateway_calls_total{{role="consumer", client="{CLINICS}", service="{POPULATION}"}}',
        "code",
    )
    assert by_client == {"ok": 3.0, "purpose_not_covered": 1.0}
    provider = eventually(
        lambda: prometheus.vector('sum by (code) (gateway_calls_total{role="provider"})', "code"),
        lambda counts: counts.get("ok") == 3.0,
        "the provider's allowed calls differ",
    )
    assert provider == {"ok": 3.0}


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The gateway_* metric names an expression reads: label matchers and the label lists
    of `by (...)` and the like are label names (gateway_instance), not metrics."""
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\bgateway_[a-z0-9_]+\b", bare))


def scraped_names(runner: Runner) -> set[str]:
    """The sample names of one scrape of every process's /metrics."""
    names: set[str] = set()
    for url in runner.ops_urls().values():
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        names |= {
            re.split(r"[{\s]", line, maxsplit=1)[0]
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
    return names


@needs_prometheus
@pytest.mark.usefixtures("prometheus_calls")
def test_dashboard_names_only_metrics_the_processes_expose(
    runner: Runner, prometheus: Prometheus
) -> None:
    """Every gateway_* metric the dashboard reads exists in a scrape of the processes (after
    the calls, and an admin API request), and every expression has data in Prometheus: no
    panel of the dashboard stays empty."""
    exprs = dashboard_exprs()
    wanted = set().union(*map(metric_names, exprs))
    assert {"gateway_calls_total", "gateway_call_seconds_bucket", "gateway_ready"} <= wanted
    AdminClient(runner.api_url, runner.token("registry-admin")).agreements()
    eventually(
        lambda: wanted - scraped_names(runner),
        lambda missing: not missing,
        "dashboard metrics missing from every process's /metrics",
    )
    # the configuration metrics name the instance they follow in `followed_instance`, so
    # that Prometheus's own `instance` label stays the target's address
    ages = prometheus.vector("gateway_configuration_age_seconds", "followed_instance")
    assert set(ages) == {"UY"}, ages
    # Grafana's variables, as it would fill them in
    filled = [e.replace("$__rate_interval", "1m").replace("$gateway_instance", ".*") for e in exprs]
    eventually(
        lambda: [e for e in filled if not prometheus.api("/api/v1/query", query=e)["result"]],
        lambda empty: not empty,
        "dashboard expressions with no data in Prometheus",
    )


# ---- the processes' own /metrics ----------------------------------------------------------

ALLOWED = "healthcare-identification"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(runner: Runner, process: str) -> Samples:
    """Every sample of a process's /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(runner.ops_url(process) + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def call_counts(samples: Samples, role: str) -> dict[tuple[str, str, str, str], float]:
    """gateway_calls_total of one role: (client, service, method, code) -> count."""
    found = {}
    for (name, labels), value in samples.items():
        if name == "gateway_calls_total" and dict(labels)["role"] == role:
            d = dict(labels)
            found[(d["client"], d["service"], d["method"], d["code"])] = value
    return found


def api_status(runner: Runner, path: str, token: str) -> int:
    """The HTTP status of one GET to the registry's admin API."""
    request = urllib.request.Request(
        runner.api_url + path, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def person(
    runner: Runner, *, client: str = CLINICS, service: str = POPULATION, purpose: str = ALLOWED
) -> Outcome:
    body = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    async with runner.consumer_channel(MSP) as channel:
        return await call_raw(
            channel,
            GET_PERSON,
            body,
            routing_metadata(client=client, service=service, purpose=purpose),
        )


async def consumer_calls_when(
    runner: Runner, done: Callable[[dict[tuple[str, str, str, str], float]], bool]
) -> dict[tuple[str, str, str, str], float]:
    """ss-msp's consumer call counts once `done` holds of them (or after 5 s)."""
    for _ in range(50):
        counted = call_counts(scrape(runner, "ss-msp"), "consumer")
        if done(counted):
            break
        await asyncio.sleep(0.1)
    return counted


def diff(
    after: dict[tuple[str, str, str, str], float], before: dict[tuple[str, str, str, str], float]
) -> dict[tuple[str, str, str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def test_calls_are_counted_per_outcome_on_both_servers(runner: Runner) -> None:
    """Three allowed calls and two for a purpose no agreement covers: the consumer counts
    both outcomes under the configuration's ids, the provider the three it answered; the
    latency histograms and the log's commits moved with them."""
    before_msp, before_dnic = scrape(runner, "ss-msp"), scrape(runner, "ss-dnic")
    outcomes = [await person(runner) for _ in range(3)]
    outcomes += [await person(runner, purpose="marketing") for _ in range(2)]
    assert [o.error for o in outcomes] == [None] * 3 + ["purpose_not_covered"] * 2, outcomes
    consumer_counts = {
        (CLINICS, POPULATION, GET_PERSON, "ok"): 3.0,
        (CLINICS, POPULATION, GET_PERSON, "purpose_not_covered"): 2.0,
    }
    provider_counts = {(CLINICS, POPULATION, GET_PERSON, "ok"): 3.0}
    # a call's outcome can reach the caller just before its handler counts it
    for _ in range(50):
        msp, dnic = scrape(runner, "ss-msp"), scrape(runner, "ss-dnic")
        counted = diff(call_counts(msp, "consumer"), call_counts(before_msp, "consumer"))
        if counted == consumer_counts and (
            diff(call_counts(dnic, "provider"), call_counts(before_dnic, "provider"))
            == provider_counts
        ):
            break
        await asyncio.sleep(0.1)
    assert (
        diff(call_counts(msp, "consumer"), call_counts(before_msp, "consumer")) == consumer_counts
    )
    assert (
        diff(call_counts(dnic, "provider"), call_counts(before_dnic, "provider")) == provider_counts
    )

    def moved(samples: Samples, old: Samples, name: str, **labels: str) -> float:
        return (value(samples, name, **labels) or 0.0) - (value(old, name, **labels) or 0.0)

    assert moved(msp, before_msp, "gateway_call_seconds_count", role="consumer") == 5
    assert moved(msp, before_msp, "gateway_provider_seconds_count") == 3
    assert moved(dnic, before_dnic, "gateway_backend_seconds_count") == 3
    # a request and a response record per answered call on each side, and two refusals
    assert moved(msp, before_msp, "gateway_log_batch_records_sum") == 3 * 2 + 2
    assert moved(dnic, before_dnic, "gateway_log_batch_records_sum") == 3 * 2
    assert moved(msp, before_msp, "gateway_log_commit_seconds_count") >= 1
    assert value(msp, "gateway_calls_in_flight", role="consumer") == 0
    assert value(dnic, "gateway_peer_streams_open") == 1  # ss-msp's stream to it


def test_state_gauges_show_configuration_certificates_and_ocsp(runner: Runner) -> None:
    """Configuration version, age and expiry per instance; seconds to expiry of each own
    certificate; the age of each held OCSP answer; readiness."""
    samples = scrape(runner, "ss-msp")
    version = value(samples, "gateway_configuration_version", followed_instance="UY")
    assert version is not None and version >= 1
    age = value(samples, "gateway_configuration_age_seconds", followed_instance="UY")
    expiry = value(samples, "gateway_configuration_expiry_seconds", followed_instance="UY")
    assert age is not None and 0 <= age < 600
    assert expiry is not None and 0 < expiry <= 600
    for certificate in ("authentication", "signing:UY/GOV/MSP"):
        left = value(samples, "gateway_certificate_expiry_seconds", certificate=certificate)
        assert left is not None and left > 86_400, certificate
        held = value(samples, "gateway_ocsp_answer_age_seconds", certificate=certificate)
        assert held is not None and 0 <= held < 600, certificate
    assert value(samples, "gateway_ready") == 1.0
    assert value(samples, "gateway_tsa_failures_total") == 0.0
    assert value(samples, "gateway_log_unstamped_records") is not None
    assert value(samples, "gateway_log_queue_records") is not None


async def test_made_up_ids_add_no_series(runner: Runner) -> None:
    """200 calls naming random clients and services (well formed, and not) add at most one
    series per refusal code, all labelled unknown: the label set is bounded by the
    configuration, whatever callers send."""
    await person(runner, client="UY/GOV/MSP/nobody", service=POPULATION)  # the series exist
    await person(runner, client=CLINICS, service="UY/GOV/DNIC/identity/nothing/v1")
    seeded = {
        ("unknown", "unknown", "other", "client_not_served"),
        (CLINICS, "unknown", "other", "unknown_service"),
    }
    # a refusal reaches the caller before the server's handler counts it
    before = await consumer_calls_when(runner, lambda c: seeded <= set(c))

    async def junk(i: int) -> Outcome:
        tag = uuid.uuid4().hex[:8]
        if i % 2:
            return await person(runner, client=f"UY/GOV/MSP/{tag}", service=POPULATION)
        return await person(runner, client=CLINICS, service=f"UY/GOV/DNIC/identity/{tag}/v1")

    outcomes = await asyncio.gather(*(junk(i) for i in range(200)))
    assert {o.error for o in outcomes} == {"client_not_served", "unknown_service"}
    after = await consumer_calls_when(
        runner, lambda c: sum(diff(c, before).values()) >= 200 or set(c) != set(before)
    )
    assert set(after) == set(before)
    grown = diff(after, before)
    assert grown == {
        ("unknown", "unknown", "other", "client_not_served"): 100.0,
        (CLINICS, "unknown", "other", "unknown_service"): 100.0,
    }


async def test_registry_and_trust_services_count_their_requests(runner: Runner) -> None:
    """The registry counts API requests by route template and status, agreements by
    state and watchers; the OCSP responder and the TSA count their answers."""
    assert (await person(runner)).ok  # records for the TSA to stamp
    token = runner.token("registry-admin")
    agreement = "AGR-2026-0001"
    statuses = [
        api_status(runner, path, token)
        for path in (f"/v1/agreements/{agreement}", "/v1/agreements/NOPE-1")
    ]
    assert statuses == [200, 404]
    registry = scrape(runner, "registry")
    route = "/v1/agreements/{id}"
    assert (
        value(registry, "gateway_registry_api_requests_total", route=route, status="200") or 0
    ) >= 1
    assert (
        value(registry, "gateway_registry_api_requests_total", route=route, status="404") or 0
    ) >= 1
    assert not any(
        name == "gateway_registry_api_requests_total" and "NOPE" in dict(labels)["route"]
        for name, labels in registry
    )
    assert (value(registry, "gateway_registry_agreements", state="active") or 0) >= 1
    assert (value(registry, "gateway_registry_watchers") or 0) >= 2  # both servers
    version = value(registry, "gateway_configuration_version")
    assert version is not None and version >= 1
    assert (value(registry, "gateway_registry_publish_seconds_count") or 0) >= 1
    ocsp = scrape(runner, "ocsp")
    assert (value(ocsp, "gateway_ocsp_requests_total", answer="good") or 0) >= 1
    deadline = time.monotonic() + 10
    while not value(scrape(runner, "tsa"), "gateway_tsa_requests_total", answer="granted"):
        assert time.monotonic() < deadline, "the TSA counted no granted stamp"
        await asyncio.sleep(0.2)
