"""The model manager the hot-load tests share: real engines on a small fixed KV pool."""

import pytest

from server.engine.config import EngineConfig
from server.models.manager import EngineBuilder, ModelManager


@pytest.fixture
def manager(registry):
    m = ModelManager(registry, EngineBuilder(EngineConfig(num_blocks=64, block_size=8)))
    yield m
    m.shutdown()
