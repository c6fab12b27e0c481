"""Metric labels come from the configuration: a call's labels stay bounded whatever the
caller names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from gateway.configuration import Service
from gateway.identifiers import ServiceId
from security_server.metrics import CallLabels, ServerMetrics, StateCollector, backend_code

SERVICE = Service(
    id=ServiceId.parse("UY/GOV/DNIC/identity/population/v1"),
    description="population",
    methods=("/demo.population.v1.PopulationRegistry/GetPerson",),
)


def test_a_listed_method_is_labelled_and_any_other_is_other() -> None:
    labels = CallLabels()
    assert (labels.client, labels.service, labels.method) == ("unknown", "unknown", "other")
    labels.known_service(SERVICE, "/demo.population.v1.PopulationRegistry/GetPerson")
    assert labels.service == str(SERVICE.id)
    assert labels.method == "/demo.population.v1.PopulationRegistry/GetPerson"
    labels.known_service(SERVICE, "/made.up.Service/" + "x" * 500)
    assert labels.method == "other"


def test_a_service_open_to_any_method_labels_none() -> None:
    labels = CallLabels()
    anything = Service(id=SERVICE.id, description="", methods=())
    labels.known_service(anything, "/whatever.the.Caller/Sends")
    assert labels.method == "other"


def test_backend_codes_are_a_bounded_set() -> None:
    assert backend_code(0) == "ok"
    assert backend_code(5) == "backend_not_found"
    assert backend_code(12345) == "backend_unknown"


def test_counting_many_unknown_calls_keeps_one_series() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    for _ in range(100):
        metrics.call("consumer", CallLabels(code="client_not_served"), 0.001)
    series = [
        s
        for family in registry.collect()
        if family.name == "gateway_calls"
        for s in family.samples
        if s.name == "gateway_calls_total"
    ]
    assert len(series) == 1 and series[0].value == 100


def test_state_gauges_are_read_at_scrape_time() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)

    class Config:
        instance = "UY"
        version = 7
        generated_at = now - timedelta(seconds=30)
        expires_at = now + timedelta(seconds=570)

    failures = [0]
    registry = CollectorRegistry()
    registry.register(
        StateCollector(
            clock=lambda: now,
            configurations=lambda: [Config()],  # type: ignore[list-item]
            certificates=(),
            ocsp_produced_at=lambda sha: None,
            tsa_failures=lambda: failures[0],
        )
    )
    assert (
        registry.get_sample_value("gateway_configuration_version", {"followed_instance": "UY"}) == 7
    )
    assert (
        registry.get_sample_value("gateway_configuration_age_seconds", {"followed_instance": "UY"})
        == 30
    )
    expiry = registry.get_sample_value(
        "gateway_configuration_expiry_seconds", {"followed_instance": "UY"}
    )
    assert expiry == 570
    failures[0] = 3
    assert registry.get_sample_value("gateway_tsa_failures_total") == 3
