"""Request parameters come from the proto descriptor: the library's keywords and the
CLI's flags follow SamplingParams without a hand-kept list, map fields included (tested
on a message built here, with the `map<int32, float> logit_bias` the API is getting)."""

from __future__ import annotations

import argparse
import json

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from client.cli import build_parser
from client.params import (
    MAP,
    REPEATED,
    SAMPLING_FIELDS,
    SCALAR,
    add_flags,
    build_message,
    describe,
    from_args,
    sampling_pb,
)
from proto.sol.v1 import sol_pb2 as pb

F = descriptor_pb2.FieldDescriptorProto


def fake_params_class():
    """A SamplingParams-like message with one field of every shape the CLI handles."""
    file = descriptor_pb2.FileDescriptorProto(name="fake/params.proto", package="fake", syntax="proto3")
    enum = file.enum_type.add(name="Mode")
    enum.value.add(name="MODE_UNSET", number=0)
    enum.value.add(name="FAST", number=1)
    msg = file.message_type.add(name="Params")
    entry = msg.nested_type.add(name="LogitBiasEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    msg.field.add(name="top_p", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL, proto3_optional=True,
                  oneof_index=0)
    msg.oneof_decl.add(name="_top_p")
    msg.field.add(name="stop", number=2, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    msg.field.add(name="logit_bias", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                  type_name=".fake.Params.LogitBiasEntry")
    msg.field.add(name="ignore_eos", number=4, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    msg.field.add(name="mode", number=5, type=F.TYPE_ENUM, label=F.LABEL_OPTIONAL, type_name=".fake.Mode")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fake.Params"))


def test_fields_are_the_descriptors():
    assert tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields) == SAMPLING_FIELDS
    shapes = {p.name: p.shape for p in describe(pb.SamplingParams.DESCRIPTOR)}
    assert shapes["stop"] == REPEATED and shapes["top_p"] == SCALAR


def test_every_shape_becomes_a_flag_and_a_message():
    cls = fake_params_class()
    params = describe(cls.DESCRIPTOR)
    by_name = {p.name: p for p in params}
    assert by_name["logit_bias"].shape == MAP
    assert (by_name["logit_bias"].key_type, by_name["logit_bias"].value_type) == (int, float)
    assert by_name["mode"].choices == ("MODE_UNSET", "FAST")

    parser = argparse.ArgumentParser()
    add_flags(parser, params)
    args = parser.parse_args(["--top-p", "0.5", "--stop", "a", "--stop", "b", "--logit-bias", "5=-1.5",
                              "--logit-bias", " 7 = 2 ", "--ignore-eos", "--mode", "FAST"])
    given = from_args(args, params)
    assert given == {"top_p": 0.5, "stop": ["a", "b"], "logit_bias": {5: -1.5, 7: 2.0}, "ignore_eos": True,
                     "mode": "FAST"}
    msg = build_message(cls, given)
    assert dict(msg.logit_bias) == {5: -1.5, 7: 2.0} and list(msg.stop) == ["a", "b"] and msg.mode == 1
    assert msg.HasField("top_p")

    # Unset flags send nothing, so the server's defaults apply.
    assert from_args(parser.parse_args([]), params) == {}
    assert not build_message(cls, {}).HasField("top_p")
    assert from_args(parser.parse_args(["--no-ignore-eos"]), params) == {"ignore_eos": False}


@pytest.mark.parametrize("bad", [["--logit-bias", "5"], ["--logit-bias", "x=1"], ["--logit-bias", "5=y"],
                                 ["--mode", "SLOW"], ["--top-p", "high"]])
def test_bad_values_are_refused_by_the_parser(bad, capsys):
    params = describe(fake_params_class().DESCRIPTOR)
    parser = argparse.ArgumentParser()
    add_flags(parser, params)
    with pytest.raises(SystemExit):
        parser.parse_args(bad)
    assert "--" + bad[0].lstrip("-") in capsys.readouterr().err


def test_library_keywords():
    msg = build_message(pb.SamplingParams, {"stop": "\n", "temperature": 0.0, "seed": None})
    assert list(msg.stop) == ["\n"] and msg.HasField("temperature") and not msg.HasField("seed")
    with pytest.raises(TypeError, match="top_p"):
        build_message(pb.SamplingParams, {"top_q": 0.9})


def test_chat_and_complete_take_every_sampling_field():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    messages = {p.name for p in describe(pb.SamplingParams.DESCRIPTOR) if p.value_type is None}
    assert messages == {"response_format"}          # a message: its shortcuts are the flags
    for command in ("chat", "complete"):
        options = {s for a in sub.choices[command]._actions for s in a.option_strings}
        for name in set(SAMPLING_FIELDS) - messages:
            assert "--" + name.replace("_", "-") in options, (command, name)
        assert {"--json-schema", "--regex", "--grammar", "--json-object", "--strict"} <= options


def test_response_format_shortcuts(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    msg = sampling_pb({"json_schema": schema, "strict": True, "max_tokens": 5})
    fmt = msg.response_format
    assert fmt.type == "json_schema" and json.loads(fmt.json_schema.schema) == schema and fmt.json_schema.strict
    assert sampling_pb({"regex": "a+"}).response_format.regex == "a+"
    assert sampling_pb({"json_object": True}).response_format.type == "json_object"
    # OpenAI's shape, with the schema as an object, is taken as it is.
    openai = sampling_pb({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert json.loads(openai.response_format.json_schema.schema) == schema
    assert not sampling_pb({}).HasField("response_format")
    with pytest.raises(TypeError, match="one response format"):
        sampling_pb({"regex": "a", "grammar": "start: \"a\""})
    with pytest.raises(TypeError, match="strict applies to json_schema"):
        sampling_pb({"regex": "a", "strict": True})

    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema))
    parser = build_parser()
    args = parser.parse_args(["complete", "hi", "--json-schema", str(path), "--strict", "--max-tokens", "9"])
    given = from_args(args)
    assert given == {"max_tokens": 9, "json_schema": json.dumps(schema), "strict": True}
    assert from_args(parser.parse_args(["complete", "hi", "--regex", "[0-9]+"])) == {"regex": "[0-9]+"}
    with pytest.raises(SystemExit):
        parser.parse_args(["complete", "hi", "--regex", "a", "--json-object"])
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not JSON"):
        from_args(parser.parse_args(["complete", "hi", "--json-schema", str(bad)]))
