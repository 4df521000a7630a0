"""`sol serve --dtype bfloat16`: the engine runs its weights and KV cache in bf16 (half
the KV bytes per token) and serves the same API."""

from __future__ import annotations

import pytest
import torch

from client.client import Client
from server.config import ServerConfig, engine_config
from server.engine.config import parse_dtype
from tests.service.harness import ADMIN_KEY, RunningServer


def test_dtype_names_are_checked():
    assert ServerConfig().engine.dtype is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        parse_dtype("float16x")


def test_a_bf16_server_serves_with_half_the_kv_bytes(tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    server = RunningServer(registry.root, tmp_path / "home", engine=engine_config(dtype=torch.bfloat16)).start()
    try:
        (model,) = server.app.models.models()
        engine = model.engine
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        assert engine.cache.pool.dtype == torch.bfloat16
        with Client(server.target, admin_key=ADMIN_KEY) as admin:
            key = admin.create_key("bf16")[0]
        with Client(server.target, api_key=key) as c:
            out = c.complete("Hello", model="tiny", max_tokens=5, temperature=0, ignore_eos=True)
        assert out.usage.completion_tokens == 5
    finally:
        server.stop()
