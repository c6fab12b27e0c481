"""The committed protobuf modules are exactly what the .proto sources generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    "gateway/v1/exchange_pb2.py",
    "gateway/v1/exchange_pb2.pyi",
    "gateway/v1/configuration_pb2.py",
    "gateway/v1/configuration_pb2.pyi",
    "gateway_demo/generated/population_pb2.py",
    "gateway_demo/generated/population_pb2.pyi",
    "gateway_demo/generated/vaccination_pb2.py",
    "gateway_demo/generated/vaccination_pb2.pyi",
]


def test_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    """Regenerating from proto/ gives byte-identical modules (run `make proto` if not)."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--check", str(tmp_path)],
        check=True,
        cwd=ROOT,
    )
    produced = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*_pb2.py*"))
    assert produced == sorted(GENERATED)
    stale = [
        name for name in GENERATED if (tmp_path / name).read_bytes() != (ROOT / name).read_bytes()
    ]
    assert not stale, f"generated code differs from the .proto sources: {stale}; run `make proto`"
