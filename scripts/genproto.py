"""Regenerate the committed protobuf modules from their .proto sources.

`python scripts/genproto.py` writes them in place; `--check DIR` writes them into DIR
instead so that a test can compare the two. Only message modules (`*_pb2.py` and their
`.pyi` stubs) are generated: the gRPC service glue is written by hand at the edges, so
that the core package never imports grpc.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent

# (include dir, output dir, proto files relative to the include dir)
TARGETS = [
    (ROOT / "proto", Path("."), ["gateway/v1/exchange.proto", "gateway/v1/configuration.proto"]),
    (
        ROOT / "gateway_demo" / "protos",
        Path("gateway_demo/generated"),
        ["population.proto", "vaccination.proto"],
    ),
]


def generate(out_root: Path) -> None:
    for include, out, files in TARGETS:
        dest = out_root / out
        dest.mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{include}",
            f"--python_out={dest}",
            f"--pyi_out={dest}",
            *[str(include / f) for f in files],
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {files}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", type=Path, help="write into this folder instead")
    ns = parser.parse_args()
    generate(ns.check if ns.check else ROOT)


if __name__ == "__main__":
    sys.exit(main())
