"""Prometheus scrape targets of running topologies: a file for Prometheus's file-based
service discovery (`file_sd_configs`, JSON), naming each process's operations port with
its process name and its gateway instance as labels.

`deploy/prometheus/prometheus.yml` reads the file the demo writes; the Prometheus test
writes its own the same way. It only describes processes: it never starts, stops or
probes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway_demo.runner import Runner

# beside topology.json in the demo's workdir; deploy/prometheus/prometheus.yml reads it
TARGETS_FILE = "prometheus-targets.json"


def scrape_targets(runners: Iterable[Runner]) -> list[dict[str, Any]]:
    """One target group per process with an operations port, labelled `process` (its name
    in the runner: registry, ocsp, tsa, ss-msp...) and `gateway_instance` (UY, AR). Not
    `instance`: Prometheus sets that label to the target's host:port."""
    return [
        {
            "targets": [urlsplit(url).netloc],
            "labels": {"process": name, "gateway_instance": runner.instance},
        }
        for runner in runners
        for name, url in runner.ops_urls().items()
    ]


def write_scrape_targets(path: Path, runners: Iterable[Runner]) -> None:
    """Write the targets file whole, then rename it into place: Prometheus watches the file
    and must never read half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(scrape_targets(runners), indent=2) + "\n")
    os.replace(partial, path)


# deploy/prometheus/prometheus.yml, and the targets file it names (a path relative to its
# folder): the default demo workdir's
REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
CONFIGURED_TARGETS = REPO / "var" / "demo" / TARGETS_FILE


def prometheus_hint(targets: Path) -> str:
    """One line telling a user how to start Prometheus on `targets` with the repository's
    configuration (and what to change in it for a targets file elsewhere)."""
    command = (
        f"prometheus --config.file={PROMETHEUS_CONFIG} --storage.tsdb.path={REPO / 'var' / 'prometheus'}"
        " --web.listen-address=127.0.0.1:9090"
    )
    if targets.resolve() == CONFIGURED_TARGETS:
        return f"Prometheus scrapes every process listed in {targets} with: {command}"
    return (
        f"Prometheus scrapes every process listed in {targets} with: {command}, once"
        f" file_sd_configs in {PROMETHEUS_CONFIG.name} names that file"
    )
