"""A real sol server with HTTP on (same process, loop and engines as its gRPC), shared by
the tests of a module: two versions of a tiny model, `tiny@1` (alias base) and `tiny@2`
(aliases sft and latest), priced, and an API key."""

from __future__ import annotations

import pytest

from client.client import Client
from gpt.registry import Registry, publish_checkpoint
from tests.conftest import free_port, make_tiny_model
from tests.service.harness import ADMIN_KEY, RunningServer


@pytest.fixture(scope="module")
def http_server(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    registry = Registry(root / "registry")
    for seed, alias in ((0, "base"), (1, "sft")):
        # A longer context than the preset's, so streams can run long enough to be cut.
        publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, seed=seed, max_seq_len=1024),
                           tiny_tokenizer, {"stage": alias}, aliases=(alias,))
    server = RunningServer(registry.root, root / "home", http_port=free_port(),
                           models=["tiny:base", "tiny:sft"]).start()
    with Client(server.target, admin_key=ADMIN_KEY) as admin:
        admin.set_price("tiny", prompt_per_1k=1.0, completion_per_1k=2.0, cached_discount=0.5)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(http_server):
    with Client(http_server.target, admin_key=ADMIN_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def api_key(admin) -> str:
    return admin.create_key("http")[0]


def engine_idle(server: RunningServer) -> bool:
    return all((st := m.engine.stats()).running == 0 and st.waiting == 0 and st.kv_blocks_used == 0
               for m in server.app.models.models())
