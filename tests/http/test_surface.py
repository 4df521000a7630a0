"""The rest of the OpenAI/vLLM surface against a real server, through real clients: one
model (`openai` SDK models.retrieve), vLLM's /tokenize and /detokenize, `param` in every
400 about one field, gRPC reflection v1 beside v1alpha, CORS (off by default, an
allow-list when configured) and the startup log's URLs."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

import grpc
import openai
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.grpc import reflection
from tests.conftest import free_port
from tests.service.harness import RunningServer

USER = [{"role": "user", "content": "What is 2 + 2?"}]


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class Http:
    """Raw HTTP/1.1 to the server on loopback (headers lower-cased)."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.port, self.headers = port, headers or {}

    def request(self, method: str, path: str, json_body=None, headers: dict | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            body = None if json_body is None else json.dumps(json_body).encode()
            sent = {**self.headers, **({"Content-Type": "application/json"} if body else {}), **(headers or {})}
            conn.request(method, path, body=body, headers=sent)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, json: dict) -> Reply:  # noqa: A002 - the keyword requests and httpx use
        return self.request("POST", path, json)

    def options(self, path: str, headers: dict) -> Reply:
        return self.request("OPTIONS", path, headers=headers)


@pytest.fixture(scope="module")
def client(http_server, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_server.http_url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def raw(http_server, api_key):
    return Http(http_server.app.http_port, {"Authorization": f"Bearer {api_key}"})


# --- GET /v1/models/{id} -----------------------------------------------------------------------
@pytest.mark.parametrize(("ref", "root"), [("tiny@2", "tiny@2"), ("tiny:sft", "tiny@2"), ("tiny:base", "tiny@1"),
                                           ("tiny", "tiny@2"), ("tiny:latest", "tiny@2")])
def test_retrieve_model(client, ref, root):
    m = client.models.retrieve(ref)
    assert (m.id, m.object, m.owned_by) == (ref, "model", "sol")
    assert m.model_extra["root"] == root and m.created > 0
    assert m.model_extra["sol"]["max_context"] == 1024


def test_retrieve_matches_the_list(client):
    listed = {m.id: m for m in client.models.list()}
    for ref, card in listed.items():
        assert client.models.retrieve(ref) == card


@pytest.mark.parametrize("ref", ["nope", "tiny@99", "tiny:nosuchalias", "Not/A Model"])
def test_retrieve_unknown_is_404_in_openais_shape(client, raw, ref):
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve(ref)
    err = info.value.body
    assert err["param"] == "model" and err["type"] == "not_found_error" and err["code"] == "not_found"
    assert err["message"]
    body = raw.get(f"/v1/models/{ref.replace(' ', '%20')}").json()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_retrieve_needs_a_key(http_server):
    r = Http(http_server.app.http_port).get("/v1/models/tiny")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_request_usage_is_the_ledgers(client, raw):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
    billed = raw.get(f"/v1/requests/{r.id}/usage").json()
    assert billed["usage"] == r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens",
                                                           "prompt_tokens_details"}, exclude_none=True) | {
        "prompt_tokens_details": {"cached_tokens": r.usage.prompt_tokens_details.cached_tokens}}
    assert billed["sol"]["cost"] == pytest.approx(r.model_extra["sol"]["cost"]) and billed["model"] == r.model
    missing = raw.get("/v1/requests/never-sent/usage")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# --- /tokenize and /detokenize -------------------------------------------------------------------
def test_tokenize_messages_counts_what_a_chat_request_bills(client, raw):
    t = raw.post("/tokenize", json={"model": "tiny:sft", "messages": USER}).json()
    r = client.chat.completions.create(model="tiny:sft", messages=USER, max_tokens=1)
    assert t["count"] == len(t["tokens"]) == r.usage.prompt_tokens
    assert t["max_model_len"] == 1024 and "token_strs" not in t
    # Without the generation prompt the assistant's turn is not opened: one token fewer.
    bare = raw.post("/tokenize", json={"model": "tiny:sft", "messages": USER,
                                        "add_generation_prompt": False}).json()
    assert bare["tokens"] == t["tokens"][:-1]


def test_tokenize_prompt_and_detokenize_round_trip(client, raw):
    text = "Once upon a time, 48 + 27 = 75."
    t = raw.post("/tokenize", json={"model": "tiny:base", "prompt": text, "return_token_strs": True}).json()
    assert "".join(t["token_strs"]) == text and len(t["token_strs"]) == t["count"]
    r = client.completions.create(model="tiny:base", prompt=text, max_tokens=1)
    assert r.usage.prompt_tokens == t["count"]
    back = raw.post("/detokenize", json={"model": "tiny:base", "tokens": t["tokens"]}).json()
    assert back == {"prompt": text}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "tiny", "prompt": "a", "messages": USER}, 400, "prompt"),
    ("/tokenize", {"model": "tiny"}, 400, "messages"),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/tokenize", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/tokenize", {"model": "ghost", "prompt": "a"}, 404, "model"),
    ("/detokenize", {"model": "tiny", "tokens": [1, 2, 10**6]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "ghost", "tokens": [1]}, 404, "model"),
])
def test_token_endpoints_refuse_with_the_field(raw, path, body, status, param):
    r = raw.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_token_endpoints_need_a_key(http_server):
    anonymous = Http(http_server.app.http_port)
    assert anonymous.post("/tokenize", json={"model": "tiny", "prompt": "a"}).status_code == 401
    assert anonymous.post("/detokenize", json={"model": "tiny", "tokens": [1]}).status_code == 401


# --- param in 400s --------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": 5}, "temperature"),                       # the service's limits
    ({"top_p": 0}, "top_p"),
    ({"n": 20}, "n"),
    ({"max_tokens": 5000}, "max_tokens"),                       # the context
    ({"stop": ["x"] * 9}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "regex"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"temperature": "hot"}, "temperature"),                    # FastAPI/Pydantic's type checks
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"content": "no role"}]}, "messages[1].role"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": ""}, "model"),
    ({"max_tokens": 2**40}, "max_tokens"),
])
def test_chat_400_names_the_field(client, extra, param):
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.body["param"] == param, info.value.body
    assert info.value.param == param


def test_completion_400_names_the_field(client):
    for extra, param in (({"echo": True}, "echo"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
                         ({"logprobs": -1}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**{"model": "tiny:base", "prompt": "Hi", "max_tokens": 2, **extra})
        assert info.value.body["param"] == param, info.value.body


def test_a_400_about_several_fields_names_none(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, temperature=5, top_p=5)
    assert info.value.body["param"] is None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, temperature="hot", top_p="cold")
    assert info.value.body["param"] is None


def test_unknown_model_in_a_request_is_404_with_param(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ghost", messages=USER)
    assert info.value.body["param"] == "model"


# --- gRPC reflection, v1 and v1alpha -----------------------------------------------------------------
def _v1_call(channel: grpc.Channel):
    """A v1 reflection client: the v1 method path, messages in v1's wire format (the same
    as v1alpha's; grpc-go and grpcurl speak it)."""
    return channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes(http_server, version):
    with grpc.insecure_channel(http_server.target) as ch:
        call = _v1_call(ch) if version == "v1" else reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
        req = reflection_pb2.ServerReflectionRequest
        listed, sol_file, self_file, missing = list(call(iter([
            req(list_services=""), req(file_containing_symbol="sol.v1.Inference"),
            req(file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"),
            req(file_containing_symbol="no.such.Service")]), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"sol.v1.Inference", "sol.v1.Admin", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in sol_file.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "sol.v1" and "Inference" in [s.name for s in f.service] for f in files)
    (described,) = [descriptor_pb2.FileDescriptorProto.FromString(b)
                    for b in self_file.file_descriptor_response.file_descriptor_proto]
    assert described.package == f"grpc.reflection.{version}"
    assert described.service[0].method[0].input_type == f".grpc.reflection.{version}.ServerReflectionRequest"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_descriptor_is_v1alpha_renamed():
    v1 = reflection.v1_file()
    assert v1.package == "grpc.reflection.v1" and not v1.GetOptions().deprecated
    alpha = reflection_pb2.DESCRIPTOR
    assert list(v1.message_types_by_name) == list(alpha.message_types_by_name)
    for name, message in v1.message_types_by_name.items():
        assert [(f.name, f.number) for f in message.fields] == \
            [(f.name, f.number) for f in alpha.message_types_by_name[name].fields]


# --- CORS and the startup log -------------------------------------------------------------------------
def _preflight(port: int, origin: str) -> Reply:
    return Http(port).options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default(http_server):
    port = http_server.app.http_port
    r = _preflight(port, "https://elsewhere.example")
    assert "access-control-allow-origin" not in r.headers
    r = Http(port).get("/health", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allow_list_and_startup_log(tiny_checkpoint, tmp_path, capfd, api_key):
    registry, _ = tiny_checkpoint
    allowed = "https://app.example.com"
    server = RunningServer(registry.root, tmp_path / "home", http_port=free_port(),
                           cors_origins=[allowed, "http://localhost:5173"]).start()
    try:
        port = server.app.http_port
        log = capfd.readouterr().err
        assert f"HTTP (OpenAI-compatible) API on http://127.0.0.1:{port}/v1" in log
        assert f"playground on http://127.0.0.1:{port}/" in log
        assert f"CORS: {allowed}, http://localhost:5173" in log
        ok = _preflight(port, allowed)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in ok.headers
        refused = _preflight(port, "https://evil.example")
        assert "access-control-allow-origin" not in refused.headers
        # A refusal carries the header too, so the page can read the error.
        r = Http(port).get("/v1/models", headers={"Origin": allowed})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == allowed
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    finally:
        server.stop()


def test_cors_origins_setting_is_checked(monkeypatch):
    from server.config import ServerConfig

    monkeypatch.setenv("SOL_CORS_ORIGINS", "https://a.example, https://b.example:8443/")
    assert ServerConfig().cors_origins == ["https://a.example", "https://b.example:8443"]
    monkeypatch.setenv("SOL_CORS_ORIGINS", "a.example")
    with pytest.raises(ValueError, match="SOL_CORS_ORIGINS"):
        ServerConfig()
    monkeypatch.delenv("SOL_CORS_ORIGINS")
    assert ServerConfig().cors_origins == []
