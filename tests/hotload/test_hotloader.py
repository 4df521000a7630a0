"""The hot-loader against a real model manager and real engines (no gRPC): new versions
swap in, broken ones are refused, retired versions release their engines."""

import gc
import weakref

import pytest

from server.engine.config import EngineConfig
from server.models.hotload import HotLoadConfig, HotLoader
from server.models.manager import EngineBuilder, ModelManager
from tests.hotload.helpers import expected_text, publish_broken, publish_seeded, served_version
from tests.service.harness import wait_for


@pytest.fixture
def hotloader(manager, registry):
    loaders = []

    def make(**config):
        h = HotLoader(manager, registry, HotLoadConfig(poll_interval_s=0.2, **config))
        loaders.append(h)
        h.start()
        return h

    yield make
    for h in loaders:
        h.stop()


def test_new_version_swaps_in_and_the_old_one_is_released(registry, tiny_tokenizer, manager, hotloader):
    publish_seeded(registry, tiny_tokenizer, seed=1, aliases=("sft",))
    manager.load_default([])
    h = hotloader()
    old = manager.resolve("m")
    old_engine, old_model = weakref.ref(old.engine), weakref.ref(old.engine.model)
    assert old.version == 1
    del old

    publish_seeded(registry, tiny_tokenizer, seed=2, aliases=("sft",))
    wait_for(lambda: served_version(manager) == 2, message="version 2 served")
    assert served_version(manager, "m:sft") == 2
    assert [m.version for m in manager.models()] == [2]
    assert h.wait_retired()
    gc.collect()
    assert old_engine() is None and old_model() is None, "retired weights are still referenced"
    assert expected_text(registry, "m@2") != expected_text(registry, "m@1")


def test_broken_checkpoint_is_refused_and_the_old_version_keeps_serving(registry, tiny_tokenizer, manager,
                                                                        hotloader):
    publish_seeded(registry, tiny_tokenizer, seed=1)
    manager.load_default([])
    outcomes = []
    h = hotloader()
    h.on_outcome = outcomes.append
    broken = publish_broken(registry, tiny_tokenizer)
    wait_for(lambda: any(not o.ok for o in outcomes), message="the broken version refused")
    refused = next(o for o in outcomes if not o.ok)
    assert refused.ref == broken.ref and "model.safetensors" in refused.error
    assert served_version(manager) == 1
    publish_seeded(registry, tiny_tokenizer, seed=3)
    wait_for(lambda: served_version(manager) == 3, message="the next good version served")


def test_requests_in_flight_finish_on_their_version(registry, tiny_tokenizer, manager, hotloader):
    from gpt.chat import chat_prompt_ids
    from server.engine.api import EngineRequest, RequestFinished, SamplingParams

    publish_seeded(registry, tiny_tokenizer, seed=1)
    manager.load_default([])
    h = hotloader()
    old = manager.checkout("m")
    stream = old.engine.submit(EngineRequest("long", chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hi"}]),
                                             SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)))
    publish_seeded(registry, tiny_tokenizer, seed=2)
    wait_for(lambda: served_version(manager) == 2, message="version 2 served")
    assert not h.wait_retired(timeout_s=0.2), "a version with a request in flight must not be retired yet"
    events = list(stream)
    old.release()
    assert isinstance(events[-1], RequestFinished) and events[-1].usage.completion_tokens == 60
    assert h.wait_retired()


def test_followed_refs_limit_what_loads(registry, tiny_tokenizer, manager, hotloader):
    publish_seeded(registry, tiny_tokenizer, seed=1, aliases=("base",))
    manager.load("m:base")
    hotloader(follow=["m:base"])
    publish_seeded(registry, tiny_tokenizer, seed=2, aliases=("sft",))     # moves latest and sft only
    publish_seeded(registry, tiny_tokenizer, seed=3, aliases=("base",))
    wait_for(lambda: served_version(manager, "m:base") == 3, message="base follows")
    assert not manager.is_loaded("m", 2)


def test_models_appearing_after_start_are_loaded(registry, tiny_tokenizer, manager, hotloader):
    hotloader()
    assert not manager.ready
    publish_seeded(registry, tiny_tokenizer, seed=1, name="fresh", aliases=("base",))
    wait_for(lambda: manager.ready, message="a model loaded")
    assert served_version(manager, "fresh:base") == 1


def test_wait_retired_returns_only_once_the_retired_pool_is_back(registry, tiny_tokenizer, monkeypatch):
    """A retired version counts as retiring until its close has returned: an engine
    shutdown still under way must not let wait_retired report the KV pool free."""
    import threading

    from gpt.checkpoint import load_checkpoint
    from server.models.kv_budget import KVBudget
    from server.models.manager import LoadedModel

    builder = EngineBuilder(EngineConfig(max_num_seqs=4, block_size=8))
    publish_seeded(registry, tiny_tokenizer, seed=1)
    pool = builder.pool_bytes(load_checkpoint(registry.resolve("m").path).config)
    budget = KVBudget(total_bytes=2 * pool, per_model_bytes=pool)
    manager = ModelManager(registry, builder, kv_budget=budget)
    close = LoadedModel.close
    let_close = threading.Event()

    def held_close(self, timeout_s=30.0):
        let_close.wait(timeout=30)          # the shutdown takes as long as the test says
        close(self, timeout_s)

    monkeypatch.setattr(LoadedModel, "close", held_close)
    h = HotLoader(manager, registry, HotLoadConfig(poll_interval_s=0.2))
    try:
        manager.load_default([])
        h.start()
        publish_seeded(registry, tiny_tokenizer, seed=2)
        wait_for(lambda: served_version(manager) == 2, timeout=60, message="version 2 served")
        assert not h.wait_retired(timeout_s=0.3), "version 1's close has not returned yet"
        assert budget.used_bytes == 2 * pool
        let_close.set()
        assert h.wait_retired()
        assert budget.used_bytes == pool
    finally:
        let_close.set()
        h.stop()
        manager.shutdown()


def test_kv_budget_is_never_over_committed_across_a_swap(registry, tiny_tokenizer):
    """Room for two versions' pools: a swap fits (serving + loading), a third version
    waits for the retired one to give its pool back, and the total never exceeds it."""
    from server.models.kv_budget import KVBudget, KVBudgetExhausted

    builder = EngineBuilder(EngineConfig(max_num_seqs=4, block_size=8))
    publish_seeded(registry, tiny_tokenizer, seed=1)
    from gpt.checkpoint import load_checkpoint

    pool = builder.pool_bytes(load_checkpoint(registry.resolve("m").path).config)
    budget = KVBudget(total_bytes=2 * pool, per_model_bytes=pool)
    manager = ModelManager(registry, builder, kv_budget=budget, kv_wait_s=0.5)
    peak = []
    h = HotLoader(manager, registry, HotLoadConfig(poll_interval_s=0.2))
    try:
        manager.load_default([])
        assert budget.used_bytes == pool
        assert manager.resolve("m").kv_reserved == pool     # the engine's pool is exactly the reservation
        h.start()
        for seed in (2, 3, 4):
            published = publish_seeded(registry, tiny_tokenizer, seed=seed)
            wait_for(lambda v=published.version: served_version(manager) == v, timeout=60,
                     message=f"version {published.version} served")
            peak.append(budget.used_bytes)
        assert h.wait_retired()
        assert budget.used_bytes == pool and max(peak) <= 2 * pool
        # Two versions pinned by hand fill the budget; a third is refused with a clear error.
        manager.load("m@1")
        with pytest.raises(KVBudgetExhausted, match="KV budget exhausted"):
            manager.load("m@2")
        assert budget.used_bytes == 2 * pool
    finally:
        h.stop()
        manager.shutdown()
    assert budget.used_bytes == 0


def test_adapter_entries_are_not_loaded_as_models(manager, registry, tiny_checkpoint):
    # An adapter version in the registry (with its own latest alias) must neither break
    # the default load nor be hot-loaded as a model of its own.
    from gpt.adapter_store import publish_adapter
    from gpt.checkpoint import load_checkpoint
    from gpt.lora import LoraAdapter, LoraSpec

    _, base = tiny_checkpoint
    config = load_checkpoint(base.path).model.config
    publish_adapter(registry, "tenant", LoraAdapter.zeros_like(LoraSpec(2, 4.0, ("q",)), config), base)
    loaded = manager.load_default([])
    assert [m.name for m in loaded] == ["tiny"]
    h = HotLoader(manager, registry, HotLoadConfig(poll_interval_s=0.2))
    outcome = h.switch("tenant", "latest", 1)
    assert not outcome.ok and "adapter" in outcome.error
    assert not manager.is_loaded("tenant", 1)
