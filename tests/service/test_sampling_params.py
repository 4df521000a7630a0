"""One definition of each request parameter: the API's SamplingParams message and the
engine's dataclass list the same fields, the service maps them by name, and one
validate() owns every limit. logit_bias, the newest parameter, end to end over gRPC."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server import validation
from server.engine.api import JsonSchema, ResponseFormat, SamplingParams
from tests.service.harness import serve_tiny


def test_proto_and_dataclass_define_the_same_parameters():
    for message, cls in ((pb.SamplingParams, SamplingParams), (pb.ResponseFormat, ResponseFormat),
                         (pb.JsonSchema, JsonSchema)):
        assert set(message.DESCRIPTOR.fields_by_name) == {f.name for f in dataclasses.fields(cls)}, cls


def test_message_fields_map_to_the_nested_dataclass():
    msg = pb.SamplingParams(response_format={"type": "json_schema", "json_schema": {"schema": "{}", "strict": True}})
    params = validation.sampling_params(msg)
    assert params.response_format == ResponseFormat("json_schema", JsonSchema(schema="{}", strict=True))
    params = validation.sampling_params(pb.SamplingParams(response_format={"type": "regex", "regex": "a+"}))
    assert params.response_format == ResponseFormat("regex", regex="a+")


def test_unset_fields_keep_the_defaults_and_set_ones_are_mapped():
    params = validation.sampling_params(pb.SamplingParams())
    assert params == SamplingParams() and params.max_tokens is None
    msg = pb.SamplingParams(max_tokens=5, temperature=0.0, stop=["x"], logit_bias={3: -2.5}, ignore_eos=False)
    params = validation.sampling_params(msg)
    assert params.max_tokens == 5 and params.temperature == 0.0
    assert params.stop == ["x"] and params.logit_bias == {3: -2.5} and params.ignore_eos is False


@pytest.fixture(scope="module")
def stub(tmp_path_factory, tiny_tokenizer):
    server = serve_tiny(tmp_path_factory.mktemp("params"), tiny_tokenizer, "params")
    key = server.key
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.InferenceStub(channel), (("authorization", f"Bearer {key}"),)
    channel.close()
    server.stop()


def complete(stub, **params):
    s, md = stub
    return s.Completion(pb.CompletionRequest(model="tiny", prompt="Hello there",
                                             params=pb.SamplingParams(**params)), metadata=md, timeout=60)


def token_ids(stub, **params) -> list[int]:
    choice = complete(stub, max_tokens=6, ignore_eos=True, logprobs=1, **params).choices[0]
    return [lp.token_id for lp in choice.logprobs]


def test_logit_bias_steers_generation(stub):
    plain = token_ids(stub, temperature=0.0)
    favourite = 42 if 42 not in plain else 43
    assert token_ids(stub, temperature=0.0, logit_bias={favourite: 100.0}) == [favourite] * 6
    assert token_ids(stub, temperature=1.0, seed=7, logit_bias={favourite: 100.0}) == [favourite] * 6
    # A ban (-100) on the greedy first token moves the first choice elsewhere.
    assert token_ids(stub, temperature=0.0, logit_bias={plain[0]: -100.0})[0] != plain[0]


@pytest.mark.parametrize(("params", "words"), [
    ({"logit_bias": {10**6: 1.0}}, ["logit_bias token ids must be in [0,"]),
    ({"logit_bias": {5: 101.0}}, ["logit_bias values must be in [-100, 100]"]),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, ["at most 300 logit_bias entries"]),
    ({"stop_token_ids": [-1]}, ["stop_token_ids must be in [0,"]),
    ({"stop_token_ids": list(range(17))}, ["at most 16 stop_token_ids"]),
    ({"temperature": 3.0, "top_k": -1}, ["temperature must be in [0, 2]", "top_k must be >= 0"]),
])
def test_every_limit_is_checked_once_with_a_message_naming_it(stub, params, words):
    with pytest.raises(grpc.RpcError) as info:
        complete(stub, max_tokens=4, **params)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for w in words:
        assert w in info.value.details(), (w, info.value.details())
