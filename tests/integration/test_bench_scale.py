"""`gateway bench --scale` end to end at a tiny scale: the seeded topology runs, every row
of the table is measured, and the results are written."""

from __future__ import annotations

import json
from pathlib import Path

from gateway_demo.bench_scale import run_scale_bench


def test_scale_bench_measures_every_row(tmp_path: Path) -> None:
    workdir = tmp_path / "bench-scale"
    assert run_scale_bench(workdir, 0.002, 1, watchers=3) == 0
    doc = json.loads((workdir / "scale.json").read_text())
    assert doc["counts"]["active_agreements"] == 100
    assert doc["configuration_bytes"] > 1_000
    assert doc["content_bytes"] > 10_000
    for row in ("publish_seconds", "api_seconds", "watchers_seconds", "refusal_seconds"):
        assert len(doc[row]) == 1
        assert isinstance(doc[row][0], float), (row, doc[row])
    assert all(isinstance(v, float) for v in doc["servers_ready"].values())
    assert doc["registry_memory_kib"]["VmHWM"] > 0
    assert all(m["VmHWM"] > 0 for m in doc["server_memory_kib"].values())
    assert not any("never" in v or "failed" in v for v in doc["table"].values())
