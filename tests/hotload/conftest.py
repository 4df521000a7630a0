"""The model manager the hot-load tests share: real engines on a small fixed KV pool."""

import pytest

from server.engine.config import EngineConfig
from server.models.manager import ModelManager, default_engine_factory


@pytest.fixture
def manager(registry):
    m = ModelManager(registry, default_engine_factory(EngineConfig(num_blocks=64, block_size=8)))
    yield m
    m.shutdown()
