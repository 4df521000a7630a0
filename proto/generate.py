"""Regenerate the Python stubs of proto/sol/v1/sol.proto with grpcio-tools.

The stubs are committed (so installing sol needs no code generation) and
tests/service/test_proto.py checks they match what this script produces.

    python -m proto.generate            # rewrite proto/sol/v1/sol_pb2*.py
    python -m proto.generate --out DIR  # write them elsewhere (the freshness check)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent          # holds sol/v1/sol.proto
PROTO_FILE = "sol/v1/sol.proto"
STUBS = ("sol_pb2.py", "sol_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into out_dir/sol/v1/ and return their paths."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # -I at proto/ keeps the descriptor's file name "sol/v1/sol.proto" (what reflection
    # clients see) instead of leaking this repository's layout into the API.
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO_ROOT / PROTO_FILE)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + PROTO_FILE)
    paths = [out_dir / "sol" / "v1" / name for name in STUBS]
    grpc_stub = paths[1]
    # The grpc stub imports its messages as `sol.v1`; in this repository they live in the
    # `proto.sol.v1` package.
    text = grpc_stub.read_text(encoding="utf-8")
    text = re.sub(r"^from sol\.v1 import ", "from proto.sol.v1 import ", text, flags=re.M)
    grpc_stub.write_text(text, encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the stubs under DIR/sol/v1 instead of in place")
    args = parser.parse_args(argv)
    if args.out:
        for p in generate(args.out):
            print(p)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for p in generate(Path(tmp)):
            target = PROTO_ROOT / "sol" / "v1" / p.name
            target.write_bytes(p.read_bytes())
            print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
