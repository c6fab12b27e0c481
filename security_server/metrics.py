"""The security server's Prometheus metrics.

Label values come from the configuration, never from a caller's unchecked input: a call's
client, service and method are labelled only once they are known to the configuration
(a served or agreed client, a catalogued service, one of the service's listed methods) and
read "unknown" or "other" until then, and its code is "ok", one of our stable error codes
or a backend's gRPC status. A flood of calls naming random ids therefore adds no series.

Per call the data path does one counter increment and one or two histogram observations;
everything else is read from the server's state when Prometheus scrapes (`set_function`
and a collector), so it costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.configuration import GlobalConfiguration, Service

UNKNOWN = "unknown"
OTHER = "other"
# seconds: from a millisecond (a refusal) to a slow backend's deadline
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# a backend's own gRPC status passed through: one code per status, a bounded set
BACKEND_CODES = {s.value[0]: f"backend_{s.name.lower()}" for s in grpc.StatusCode}


@dataclass(slots=True)
class CallLabels:
    """What one call's metrics say of it, filled in as its facts are checked."""

    client: str = UNKNOWN
    service: str = UNKNOWN
    method: str = OTHER
    code: str = "ok"

    def known_service(self, service: Service, method: str) -> None:
        """The service is in the configuration; the method is labelled when it is one of the
        service's listed methods (a service that allows any method labels none)."""
        self.service = str(service.id)
        self.method = method if method in service.methods else OTHER


def backend_code(status: int) -> str:
    return "ok" if status == 0 else BACKEND_CODES.get(status, "backend_unknown")


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.calls = Counter(
            "gateway_calls_total",
            "Calls handled, by role, client, service, method and outcome code",
            ["role", "client", "service", "method", "code"],
            registry=registry,
        )
        self.call_seconds = Histogram(
            "gateway_call_seconds",
            "Duration of a whole call as this server handles it",
            ["role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.provider_seconds = Histogram(
            "gateway_provider_seconds",
            "Consumer: the provider leg of a call (sent to answer received)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.backend_seconds = Histogram(
            "gateway_backend_seconds",
            "Provider: the call to the service's backend",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_calls_in_flight",
            "Calls being handled now",
            ["role"],
            registry=registry,
        )
        self.log_queue = Gauge(
            "gateway_log_queue_records",
            "Records waiting to be written to the message log (exchanges and audit records)",
            registry=registry,
        )
        self.log_batch = Histogram(
            "gateway_log_batch_records",
            "Records written in one commit of the message log",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.log_commit_seconds = Histogram(
            "gateway_log_commit_seconds",
            "Duration of one commit of the message log",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.unstamped = Gauge(
            "gateway_log_unstamped_records",
            "Records logged and waiting for a time-stamp",
            registry=registry,
        )
        self.peer_streams = Gauge(
            "gateway_peer_streams_open",
            "Provider: exchange streams open from peer security servers",
            registry=registry,
        )

        # the children of each label set, looked up once: labels() validates on every call
        self._counters: dict[tuple[str, str, str, str, str], Counter] = {}
        self._durations = {r: self.call_seconds.labels(r) for r in ("consumer", "provider")}

    def call(self, role: str, labels: CallLabels, seconds: float) -> None:
        key = (role, labels.client, labels.service, labels.method, labels.code)
        counter = self._counters.get(key)
        if counter is None:  # a bounded set: the labels come from the configuration
            counter = self._counters[key] = self.calls.labels(*key)
        counter.inc()
        self._durations[role].observe(seconds)

    def commit(self, records: int, seconds: float) -> None:
        self.log_batch.observe(records)
        self.log_commit_seconds.observe(seconds)

    def watch(
        self,
        *,
        in_flight: dict[str, Callable[[], float]],
        log_queue: Callable[[], float],
        unstamped: Callable[[], float],
        peer_streams: Callable[[], float],
    ) -> None:
        """Gauges read from the server's state at each scrape."""
        for role, read in in_flight.items():
            self.in_flight.labels(role).set_function(read)
        self.log_queue.set_function(log_queue)
        self.unstamped.set_function(unstamped)
        self.peer_streams.set_function(peer_streams)


@dataclass(frozen=True, slots=True)
class OwnCertificate:
    """One of this server's own certificates, by the label its metrics carry: its
    "authentication" certificate or "signing:MEMBER"."""

    label: str
    certificate: x509.Certificate
    sha256: str


class StateCollector(Collector):
    """Gauges computed at scrape time from the server's configurations, certificates and
    held OCSP answers: ages and seconds to expiry."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        configurations: Callable[[], Iterable[GlobalConfiguration]],
        certificates: Iterable[OwnCertificate],
        ocsp_produced_at: Callable[[str], datetime | None],
        tsa_failures: Callable[[], int],
    ) -> None:
        self.clock = clock
        self.configurations = configurations
        self.certificates = tuple(certificates)
        self.ocsp_produced_at = ocsp_produced_at
        self.tsa_failures = tsa_failures

    def describe(self) -> Iterable[Metric]:
        return list(self._families(at=None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(at=self.clock()))

    def _families(self, at: datetime | None) -> Iterator[Metric]:
        version = GaugeMetricFamily(
            "gateway_configuration_version",
            "Version of the configuration in force, per instance followed",
            labels=["followed_instance"],
        )
        age = GaugeMetricFamily(
            "gateway_configuration_age_seconds",
            "Seconds since the configuration in force was generated, per instance followed",
            labels=["followed_instance"],
        )
        expiry = GaugeMetricFamily(
            "gateway_configuration_expiry_seconds",
            "Seconds until the configuration in force expires (negative: expired)",
            labels=["followed_instance"],
        )
        certificate_expiry = GaugeMetricFamily(
            "gateway_certificate_expiry_seconds",
            "Seconds until each of this server's own certificates expires",
            labels=["certificate"],
        )
        ocsp_age = GaugeMetricFamily(
            "gateway_ocsp_answer_age_seconds",
            "Age of the OCSP answer held about each of this server's own certificates",
            labels=["certificate"],
        )
        failures = CounterMetricFamily(
            "gateway_tsa_failures",
            "Batches that no time-stamping authority stamped (each TSA tried in turn)",
        )
        if at is not None:
            failures.add_metric([], float(self.tsa_failures()))
            for config in self.configurations():
                version.add_metric([config.instance], float(config.version))
                age.add_metric([config.instance], (at - config.generated_at).total_seconds())
                expiry.add_metric([config.instance], (config.expires_at - at).total_seconds())
            for own in self.certificates:
                left = own.certificate.not_valid_after_utc - at
                certificate_expiry.add_metric([own.label], left.total_seconds())
                produced = self.ocsp_produced_at(own.sha256)
                if produced is not None:
                    ocsp_age.add_metric([own.label], (at - produced).total_seconds())
        yield from (version, age, expiry, certificate_expiry, ocsp_age, failures)
