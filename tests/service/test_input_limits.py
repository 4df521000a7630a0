"""Input that used to make the server answer INTERNAL / HTTP 500, or exhaust it, through
the public API of a real server on loopback (gRPC and HTTP): grammar bombs, a key's share
of the compile pool, model versions that are not ASCII numbers, schemas nested a
thousand levels deep, Unicode digits as token ids, and prices that are not finite."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time

import grpc
import pytest

from client.client import Client
from client.types import SolError
from proto.sol.v1 import sol_pb2 as pb
from proto.sol.v1 import sol_pb2_grpc as pb_grpc
from server.engine.grammar import GrammarCompiler
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_REFS = ["tiny@²", "tiny@" + "9" * 5000, "tiny@١", "tiny@0", "tiny@99999999999", "tiny@-1", "tiny@ 1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("limits")
    s = RunningServer(publish_tiny(root, tiny_tokenizer, max_seq_len=1024), root / "home", http_port=free_port(),
                      grammar_compiles_per_key=1).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def key(admin) -> tuple[str, str]:
    clear, info = admin.create_key("limits")
    return clear, info.key_id


@pytest.fixture(scope="module")
def client(server, key):
    with Client(server.target, api_key=key[0], retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server, key):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel), (("authorization", f"Bearer {key[0]}"),)
    channel.close()


def http_post(server, key: str, path: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.app.http_port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {key}",
                                                       "Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def grpc_code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def completion(stub, params: pb.SamplingParams, model: str = "tiny", prompt: str = "Data:"):
    inference, _, md = stub
    return grpc_code(inference.Completion, pb.CompletionRequest(model=model, prompt=prompt, params=params),
                     metadata=md, timeout=60)


# --- grammar bombs ------------------------------------------------------------------------------

@pytest.mark.parametrize("regex", ["a{9000000}", "(a{1001}){1000}"])
def test_grammar_bomb_is_refused_naming_the_limit_on_both_protocols(server, stub, key, regex):
    code, message = completion(stub, pb.SamplingParams(max_tokens=4, response_format=pb.ResponseFormat(
        type="regex", regex=regex)))
    assert code == INVALID and "initial_lexer_fuel=" in message, (code, message)
    status, body = http_post(server, key[0], "/v1/completions", {
        "model": "tiny", "prompt": "Data:", "max_tokens": 4, "response_format": {"type": "regex", "regex": regex}})
    assert status == 400 and "initial_lexer_fuel=" in body["error"]["message"], body


def test_bombs_do_not_stall_other_requests(server, client, stub):
    """A stream's longest gap between tokens while distinct bombs arrive: before the limits
    the engine computed each bomb's first mask in its step (1-7 s each on this machine)."""
    gaps: list[float] = []

    def bombs():
        for i in range(4):
            completion(stub, pb.SamplingParams(max_tokens=4, response_format=pb.ResponseFormat(
                type="regex", regex=f"(a{{{1001 + i}}}){{1000}}")))

    stream = client.complete_stream("Once", model="tiny", max_tokens=400, ignore_eos=True, temperature=0.0)
    it = iter(stream)
    next(it)
    sender = threading.Thread(target=bombs)
    sender.start()
    last = time.monotonic()
    for _ in it:
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    sender.join()
    assert max(gaps) < 1.0, sorted(gaps)[-5:]


def test_a_key_has_a_share_of_the_compile_pool(server, client, key):
    (model,) = server.app.models.models()
    compiler: GrammarCompiler = model.grammars()
    release = threading.Event()
    real = compiler.compile

    def slow(fmt):
        release.wait(30)
        return real(fmt)

    compiler.compile = slow
    results: list = []
    try:
        first = threading.Thread(target=lambda: results.append(
            client.complete("Code:", model="tiny", regex="[A-Z]{3}", max_tokens=4)))
        first.start()
        wait_for(lambda: server.app.service.compile_slots.held(key[1]) == 1, message="the first compile to start")
        with pytest.raises(SolError) as info:
            client.complete("Code:", model="tiny", regex="[0-9]{3}", max_tokens=4)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after_s
        assert "compile" in info.value.message
        # The same constraint, already compiling, waits for that compile: no second slot.
        second = threading.Thread(target=lambda: results.append(
            client.complete("Code:", model="tiny", regex="[A-Z]{3}", max_tokens=4)))
        second.start()
        time.sleep(0.2)
        release.set()
        first.join(60)
        second.join(60)
    finally:
        release.set()
        compiler.compile = real
    assert len(results) == 2 and all(r.choices for r in results)
    assert server.app.service.compile_slots.held(key[1]) == 0
    assert client.complete("Code:", model="tiny", regex="[0-9]{3}", max_tokens=4).choices


# --- model versions -----------------------------------------------------------------------------

@pytest.mark.parametrize("ref", BAD_REFS, ids=lambda r: repr(r[:12]))
def test_bad_model_versions_are_invalid_argument_everywhere(server, stub, admin, key, ref):
    inference, admin_stub, md = stub
    admin_md = (("authorization", f"Bearer {ADMIN_KEY}"),)
    calls = {
        "Completion": lambda: inference.Completion(pb.CompletionRequest(
            model=ref, prompt="hi", params=pb.SamplingParams(max_tokens=2)), metadata=md, timeout=30),
        "CountTokens": lambda: inference.CountTokens(pb.CountTokensRequest(model=ref, prompt="hi"), metadata=md,
                                                     timeout=30),
        "LoadModel": lambda: admin_stub.LoadModel(pb.LoadModelRequest(model=ref), metadata=admin_md, timeout=30),
        "UnloadModel": lambda: admin_stub.UnloadModel(pb.UnloadModelRequest(model=ref), metadata=admin_md,
                                                      timeout=30),
    }
    for name, call in calls.items():
        code, message = grpc_code(call)
        assert code == INVALID and "ASCII digits" in message, (name, code, message[:200])
    status, body = http_post(server, key[0], "/v1/completions", {"model": ref, "prompt": "hi", "max_tokens": 2})
    assert status == 400 and "ASCII digits" in body["error"]["message"], (status, body)


# --- deep schemas and token ids -----------------------------------------------------------------

def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def nested_text(depth: int) -> str:
    """nested(depth) as JSON text, written without recursion (json.dumps would overflow)."""
    return '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth


def test_deeply_nested_schema_is_refused_on_both_protocols(server, stub, key):
    for depth in (1000, 2500):          # the second is past what json.loads can parse at all
        text = nested_text(depth)
        code, message = completion(stub, pb.SamplingParams(max_tokens=4, response_format=pb.ResponseFormat(
            type="json_schema", json_schema=pb.JsonSchema(name="deep", schema=text))))
        assert code == INVALID and ("levels deep" in message or "characters long" in message), (code, message)
    body = b'{"model": "tiny", "prompt": "x", "max_tokens": 4, "response_format": {"type": "json_schema", ' \
           b'"json_schema": {"name": "deep", "schema": ' + nested_text(1000).encode() + b"}}}"
    status, answer = http_post(server, key[0], "/v1/completions", body)
    assert status == 400, (status, answer)
    # Deep enough to refuse, shallow enough for any JSON parser: sol's own message.
    status, answer = http_post(server, key[0], "/v1/completions", {
        "model": "tiny", "prompt": "x", "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(70)}}})
    assert status == 400 and "levels deep" in answer["error"]["message"], answer


def test_logit_bias_keys_are_ascii_token_ids(server, key):
    for bad in ("١", " 1", "1_0", "+1", "9" * 5000):
        status, body = http_post(server, key[0], "/v1/completions",
                                 {"model": "tiny", "prompt": "x", "max_tokens": 2, "logit_bias": {bad: 5}})
        assert status == 400 and "ASCII digits" in body["error"]["message"], (bad, status, body)
    status, _ = http_post(server, key[0], "/v1/completions",
                          {"model": "tiny", "prompt": "x", "max_tokens": 2, "logit_bias": {"1": 5}})
    assert status == 200


# --- prices -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308, 1e6 * 1.5, -1.0])
def test_set_price_refuses_non_finite_and_out_of_range(server, admin, key, value):
    for prompt, completion_ in ((value, 1.0), (1.0, value)):
        with pytest.raises(SolError) as info:
            admin.set_price("tiny", prompt_per_1k=prompt, completion_per_1k=completion_)
        assert info.value.code == INVALID and "per 1K tokens" in info.value.message, info.value.message
    # Nothing was stored: requests over HTTP still answer 200 with a finite cost.
    status, body = http_post(server, key[0], "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert status == 200, body
    report = admin.usage()
    assert report.rows and all(math.isfinite(r.cost) for r in report.rows)
