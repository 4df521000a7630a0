"""The frame around every call (server/call_frame.py), on both protocols: a bug inside a
call reaches the user as INTERNAL / HTTP 500 with a reference and no traceback, the log
holds the traceback under that reference, the call is counted once as INTERNAL, and the
server goes on serving."""

from __future__ import annotations

import json
import logging
import re

import grpc
import pytest

from client.client import Client
from client.types import SolError
from tests.conftest import free_port
from tests.http.test_http_api import post
from tests.service.harness import ADMIN_KEY, RunningServer, publish_tiny


def counted(server, protocol: str, method: str, code: str) -> float:
    samples = server.app.service.metrics.requests.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total") and s.labels["protocol"] == protocol
               and s.labels["method"] == method and s.labels["code"] == code)


@pytest.fixture
def server(tiny_tokenizer, tmp_path):
    s = RunningServer(publish_tiny(tmp_path, tiny_tokenizer), tmp_path / "home", http_port=free_port()).start()
    yield s
    s.stop()


def test_a_bug_in_a_call_is_internal_with_a_reference_on_both_protocols(server, monkeypatch, caplog):
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        key, _ = admin.create_key("frame")
    real = server.app.service.prompt_ids

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(server.app.service, "prompt_ids", broken)
    with caplog.at_level(logging.ERROR), Client(server.target, api_key=key, retries=0) as c:
        with pytest.raises(SolError) as err:
            c.count_tokens("tiny", prompt="hello")
        assert err.value.code == grpc.StatusCode.INTERNAL
        grpc_ref = re.search(r"ref ([0-9a-f]{12})", err.value.message).group(1)
        status, _, body = post(server, key, "/tokenize", {"model": "tiny", "prompt": "hello"})
        assert status == 500, body
        http_ref = re.search(r"ref ([0-9a-f]{12})", json.loads(body)["error"]["message"]).group(1)
        for message in (err.value.message, body.decode()):
            assert "secret detail" not in message and "Traceback" not in message
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    for ref in (grpc_ref, http_ref):
        (record,) = [r for r in logged if ref in r.getMessage()]
        assert record.exc_info and "secret detail" in str(record.exc_info[1])
    assert counted(server, "grpc", "CountTokens", "INTERNAL") == 1
    assert counted(server, "http", "Tokenize", "INTERNAL") == 1
    monkeypatch.setattr(server.app.service, "prompt_ids", real)
    with Client(server.target, api_key=key, retries=0) as c:
        assert c.count_tokens("tiny", prompt="hello") > 0
    assert counted(server, "grpc", "CountTokens", "OK") == 1
