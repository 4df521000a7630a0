"""Bytes that are not a request, and values too long to echo: every RPC of Inference and
Admin answers INVALID_ARGUMENT with a short message, counts the call in the request
metrics, and logs nothing at ERROR; no input makes the server answer INTERNAL or UNKNOWN.
A real server on loopback, raw bytes through a channel without serializers."""

from __future__ import annotations

import logging

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.client import Client
from client.types import SolError
from proto.sol.v1 import sol_pb2 as pb
from server.errors import MAX_MESSAGE_BYTES, bounded
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny, wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("Inference", "Admin")]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
METHOD_IDS = [f"{s.name}.{m.name}" for s, m in METHODS]
MSG = [{"role": "user", "content": "hi"}]
HUGE = "a" * 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("wire")
    s = RunningServer(publish_tiny(root, tiny_tokenizer), root / "home").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_key(server) -> str:
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        return admin.create_key("wire")[0]


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def raw_call(channel: grpc.Channel, service, method, data: bytes, metadata=()) -> grpc.RpcError | None:
    """Send `data` as the request bytes; the error the server answered, or None."""
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path)(data, metadata=metadata, timeout=30):
                pass
        else:
            channel.unary_unary(path)(data, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err
    return None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def bad_utf8(message_type) -> bytes | None:
    """The message with its first string field set to bytes that are not UTF-8."""
    for f in message_type.fields:
        if f.type == f.TYPE_STRING and not f.is_repeated:
            return _varint(f.number << 3 | 2) + b"\x02\xc3\x28"
    return None


def counted(server, method: str, code: str) -> float:
    return server.app.metrics.registry.get_sample_value(
        "sol_requests_total", {"protocol": "grpc", "model": "", "method": method, "code": code}) or 0.0


def no_errors_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()[:200]) for r in bad]


@pytest.mark.parametrize(("service", "method"), METHODS, ids=METHOD_IDS)
def test_corrupt_bytes_are_invalid_argument(server, channel, api_key, caplog, service, method):
    payloads = [b"\xff\xff\xff", b"\x0f"]        # a tag cut short; wire type 7, which does not exist
    if (utf8 := bad_utf8(method.input_type)) is not None:
        payloads.append(utf8)
    key = api_key if service.name == "Inference" else ADMIN_KEY
    before = counted(server, method.name, "INVALID_ARGUMENT")
    with caplog.at_level(logging.INFO):
        for data in payloads:
            # With and without a key: the bytes are judged before anything else.
            for md in ((("authorization", f"Bearer {key}"),), ()):
                err = raw_call(channel, service, method, data, md)
                assert err is not None and err.code() == INVALID, (data, err)
                assert f"not a valid {method.input_type.full_name}" in err.details()
                assert len(err.details()) < 300
    # The status leaves before the frame's `finally` counts it: wait for the count.
    wait_for(lambda: counted(server, method.name, "INVALID_ARGUMENT") == before + 2 * len(payloads), timeout=5,
             message=f"{method.name} counted as INVALID_ARGUMENT")
    no_errors_logged(caplog)


def test_invalid_utf8_says_so(channel, api_key):
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    method = service.methods_by_name["ChatCompletion"]
    err = raw_call(channel, service, method, bad_utf8(method.input_type),
                   (("authorization", f"Bearer {api_key}"),))
    assert err.code() == INVALID and "UTF-8" in err.details()


def test_health_and_reflection_still_answer(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"sol.v1.Inference", "sol.v1.Admin"} <= names


def test_a_huge_model_name_gets_a_short_invalid_argument(server, api_key, caplog):
    with Client(server.target, api_key=api_key, admin_key=ADMIN_KEY, retries=0) as c, \
            caplog.at_level(logging.INFO):
        calls = {
            "chat": lambda: c.chat(MSG, model=HUGE),
            "chat_stream": lambda: list(c.chat_stream(MSG, model=HUGE)),
            "complete": lambda: c.complete("x", model=HUGE),
            "version": lambda: c.chat(MSG, model=HUGE + "@x"),
            "alias": lambda: c.chat(MSG, model="tiny:" + HUGE),
            "count_tokens": lambda: c.count_tokens(HUGE, prompt="x"),
            "role": lambda: c.chat([{"role": HUGE, "content": "x"}], model="tiny"),
            "request_id": lambda: c.chat(MSG, model="tiny", request_id=HUGE),
            "set_price": lambda: c.set_price(HUGE, 1.0, 1.0),
            "usage_day": lambda: c.usage(from_day=HUGE),
            "load": lambda: c.load_model(HUGE),
            "unload": lambda: c.unload_model(HUGE),
            "set_alias": lambda: c.set_alias(HUGE, "x", 1),
        }
        for what, call in calls.items():
            with pytest.raises(SolError) as info:
                call()
            assert info.value.code == INVALID, (what, info.value)
            assert len(info.value.message) < 400, (what, len(info.value.message))
            assert "(100000 characters)" in info.value.message or what == "version", (what, info.value.message)
        with pytest.raises(SolError) as info:
            c.revoke_key(HUGE)
        assert info.value.code == grpc.StatusCode.NOT_FOUND and len(info.value.message) < 400
    no_errors_logged(caplog)


def test_bounded_is_the_last_guard():
    assert bounded("short") == "short"
    for text in ("x" * 10_000, "é" * 10_000, "😀" * 10_000):
        cut = bounded(text)
        assert len(cut.encode()) <= MAX_MESSAGE_BYTES and cut.endswith("(message cut)")
        assert cut.startswith(text[:100])
    assert bounded("a\ud800b") == "a?b"              # a lone surrogate cannot be sent as UTF-8


# --- fuzz: nothing a caller sends makes the server answer INTERNAL or UNKNOWN ------------------

SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(index=st.integers(0, len(METHODS) - 1), data=st.binary(max_size=256))
def test_fuzz_bytes(server, channel, api_key, index, data):
    service, method = METHODS[index]
    # Admin without a key: bytes that happen to parse are refused (UNAUTHENTICATED) before
    # they could change keys, prices or models.
    md = (("authorization", f"Bearer {api_key}"),) if service.name == "Inference" else ()
    err = raw_call(channel, service, method, data, md)
    assert err is None or err.code() not in SERVER_FAULTS, (method.name, data, err.details())
    assert err is None or len(err.details()) <= MAX_MESSAGE_BYTES


@FUZZ
@given(model=st.text(max_size=300), role=st.text(max_size=40), request_id=st.text(max_size=300),
       prompt=st.text(max_size=200))
def test_fuzz_fields(server, api_key, model, role, request_id, prompt):
    with Client(server.target, api_key=api_key, retries=0) as c:
        for call in (lambda: c.count_tokens(model, prompt=prompt or "x"),
                     lambda: c.count_tokens("tiny", messages=[{"role": role, "content": prompt}]),
                     lambda: c.chat(MSG, model=model, max_tokens=1, request_id=request_id or None),
                     lambda: c.complete(prompt or "x", model="tiny", max_tokens=1, request_id=request_id or None)):
            try:
                call()
            except SolError as err:
                assert err.code not in SERVER_FAULTS, err
                assert len(err.message.encode()) <= MAX_MESSAGE_BYTES
