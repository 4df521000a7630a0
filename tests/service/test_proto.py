"""The committed stubs are what proto/generate.py makes from sol.proto today, and the
served API is discoverable by reflection."""

from __future__ import annotations

import re
from pathlib import Path

from proto.generate import STUBS, generate

STUB_DIR = Path(__file__).resolve().parents[2] / "proto" / "sol" / "v1"

# Lines that name the generator's version: a newer grpcio-tools changes only these.
VERSION_LINES = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*$)", re.M)


def normalise(text: str) -> str:
    return VERSION_LINES.sub("", text)


def test_stubs_are_fresh(tmp_path):
    for fresh in generate(tmp_path):
        committed = STUB_DIR / fresh.name
        assert committed.name in STUBS
        assert normalise(committed.read_text()) == normalise(fresh.read_text()), (
            f"{committed} is stale: run `python -m proto.generate` and commit the result")


def test_stubs_import_from_the_package():
    from proto.sol.v1 import sol_pb2, sol_pb2_grpc

    assert sol_pb2.DESCRIPTOR.package == "sol.v1"
    assert sol_pb2.DESCRIPTOR.name == "sol/v1/sol.proto"
    services = set(sol_pb2.DESCRIPTOR.services_by_name)
    assert services == {"Inference", "Admin"}
    assert hasattr(sol_pb2_grpc, "InferenceStub") and hasattr(sol_pb2_grpc, "AdminStub")
    inference = {m.name for m in sol_pb2.DESCRIPTOR.services_by_name["Inference"].methods}
    assert {"ChatCompletion", "ChatCompletionStream", "Completion", "ListModels", "CountTokens"} <= inference
