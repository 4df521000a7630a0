"""Checkpoints that pass their checksums but cannot serve: non-finite weights or logits,
config sizes beyond bounds or memory. Each is refused before it serves (and, for sizes,
before anything is allocated); the serving version stays; an alias move is applied
while a slow load runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import CONFIG_FILE, META_FILE, sha256_file, write_checkpoint
from gpt.registry import Registry, ResolvedModel
from server.engine.config import EngineConfig
from server.models.hotload import HotLoadConfig, HotLoader
from server.models.kv_budget import KVBudget
from server.models.manager import EngineBuilder, ModelManager
from server.models.sanity import LoadPlan, UnusableCheckpoint, check_config
from tests.conftest import make_tiny_model
from tests.hotload.helpers import publish_seeded, served_version
from tests.service.harness import wait_for


def publish_unusable(registry: Registry, tokenizer, name: str = "m", weights=None, config: dict | None = None,
                     aliases=()) -> ResolvedModel:
    """A version that verifies (every sha256 recorded after the change) but is unusable:
    `weights(model)` edits its tensors, `config` overrides config.json fields."""
    model = make_tiny_model(tokenizer, seed=7, tie_embeddings=False)
    if weights is not None:
        with torch.no_grad():
            weights(model)

    def write(tmp: Path) -> None:
        write_checkpoint(tmp, model, tokenizer, {"name": name, "stage": "sft"})
        if config:
            path = tmp / CONFIG_FILE
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
            meta = json.loads((tmp / META_FILE).read_text())
            meta["files"][CONFIG_FILE] = sha256_file(path)
            (tmp / META_FILE).write_text(json.dumps(meta))

    return registry.publish(name, write, aliases)


@pytest.fixture
def loader(manager, registry):
    outcomes = []
    h = HotLoader(manager, registry, HotLoadConfig(poll_interval_s=0.2), on_outcome=outcomes.append)
    h.outcomes = outcomes
    yield h
    h.stop()


def refused(h: HotLoader, version: int):
    wait_for(lambda: any(not o.ok and o.version == version for o in h.outcomes), timeout=60,
             message=f"version {version} refused")
    return next(o for o in h.outcomes if not o.ok and o.version == version)


def test_nan_weights_are_refused_and_the_good_version_keeps_serving(registry, tiny_tokenizer, manager, loader):
    publish_seeded(registry, tiny_tokenizer, seed=1)
    manager.load_default([])
    loader.start()
    bad = publish_unusable(registry, tiny_tokenizer, weights=lambda m: m.layers[1].mlp.down_proj.weight[3, 5].fill_(
        float("nan")))
    outcome = refused(loader, bad.version)
    assert "layers.1.mlp.down_proj.weight" in outcome.error and "1 NaN" in outcome.error, outcome.error
    assert served_version(manager) == 1 and [m.version for m in manager.models()] == [1]


def test_inf_weights_are_refused(registry, tiny_tokenizer, manager):
    publish_unusable(registry, tiny_tokenizer, weights=lambda m: m.embed_tokens.weight[0, 0].fill_(float("-inf")))
    with pytest.raises(UnusableCheckpoint, match=r"embed_tokens.weight holds non-finite values \(0 NaN, 1 Inf"):
        manager.load("m")
    assert not manager.ready


def test_finite_weights_whose_logits_overflow_are_refused(registry, tiny_tokenizer, manager):
    # Every tensor finite, but the head's products overflow float32: the forward is not.
    publish_unusable(registry, tiny_tokenizer, weights=lambda m: m.lm_head.weight.fill_(3e38))
    with pytest.raises(UnusableCheckpoint, match="warm-up forward pass gives non-finite logits"):
        manager.load("m")
    assert not manager.ready


def test_huge_context_is_refused_before_any_allocation(registry, tiny_tokenizer, manager, loader):
    publish_seeded(registry, tiny_tokenizer, seed=1)
    manager.load_default([])
    loader.start()
    started = time.monotonic()
    bad = publish_unusable(registry, tiny_tokenizer, config={"max_seq_len": 1_000_000_000})
    outcome = refused(loader, bad.version)
    # Before the fix the rotary tables alone were 128 GB, allocated until killed.
    assert outcome.seconds < 1.0 and time.monotonic() - started < 10
    assert "max_seq_len is 1000000000, above the bound of 1048576" in outcome.error, outcome.error
    assert served_version(manager) == 1


@pytest.mark.parametrize("field,value", [("vocab_size", 1 << 24), ("n_layers", 4096), ("n_heads", 2048),
                                         ("d_ff", 1 << 20)])
def test_each_size_has_a_bound_named_in_the_message(registry, tiny_tokenizer, manager, field, value):
    overrides = {field: value, **({"d_model": 4096} if field == "n_heads" else {})}
    publish_unusable(registry, tiny_tokenizer, config=overrides)
    with pytest.raises(UnusableCheckpoint, match=f"{field} is {value}, above the bound"):
        manager.load("m")


def test_context_beyond_the_kv_pool_of_a_version_is_refused(registry, tiny_tokenizer):
    builder = EngineBuilder(EngineConfig(max_num_seqs=4, block_size=8, device="cpu"))
    manager = ModelManager(registry, builder, kv_budget=KVBudget(4 << 20, 1 << 20))
    try:
        # tiny holds 512 bytes of fp32 KV a token: 1 MiB is 2048 tokens.
        publish_unusable(registry, tiny_tokenizer, config={"max_seq_len": 4096})
        with pytest.raises(UnusableCheckpoint, match="max_seq_len 4096 needs .* raise --kv-per-model-mb"):
            manager.load("m")
        publish_unusable(registry, tiny_tokenizer, config={"max_seq_len": 2048})
        assert manager.load("m@2").max_context == 2048
    finally:
        manager.shutdown()


def test_a_load_larger_than_free_memory_is_refused(tiny_tokenizer):
    config = make_tiny_model(tiny_tokenizer).config.replace(d_model=4096, n_heads=32, n_kv_heads=8, d_ff=16384,
                                                            n_layers=64)
    plan = LoadPlan(torch.device("cpu"), torch.float32, kv_pool_bytes=1 << 20, kv_pool_limit_bytes=None)
    with pytest.raises(UnusableCheckpoint, match=r"loading needs about .* GiB of host memory .* 8.0 GiB is free"):
        check_config(config, Path("/ckpt"), plan, host_free=8 << 30)
    check_config(config, Path("/ckpt"), plan, host_free=1 << 40)
    cuda = LoadPlan(torch.device("cuda"), torch.bfloat16, kv_pool_bytes=1 << 30, kv_pool_limit_bytes=None)
    with pytest.raises(UnusableCheckpoint, match=r"serving needs about .* on cuda"):
        check_config(config, Path("/ckpt"), cuda, host_free=1 << 40, device_free=4 << 30)


def test_a_roll_back_applies_while_a_slow_load_runs(registry, tiny_tokenizer, manager, loader, monkeypatch):
    """v1 (sft) and v2 (latest) loaded; v3 is published and its load hangs; the operator
    rolls latest back to v1: requests get v1 at once, and v3's late load does not take
    latest back."""
    publish_seeded(registry, tiny_tokenizer, seed=1, aliases=("sft",))
    publish_seeded(registry, tiny_tokenizer, seed=2)
    manager.load("m:sft")
    manager.load("m:latest")
    assert served_version(manager) == 2 and served_version(manager, "m:sft") == 1
    release = threading.Event()
    loading = threading.Event()
    load = manager.load

    def slow_load(ref):
        if ref.endswith("@3"):
            loading.set()
            release.wait(timeout=60)
        return load(ref)

    monkeypatch.setattr(manager, "load", slow_load)
    loader.start()
    try:
        publish_seeded(registry, tiny_tokenizer, seed=3)
        assert loading.wait(timeout=30), "version 3 never started loading"
        registry.set_alias("m", "latest", 1)
        wait_for(lambda: served_version(manager) == 1, timeout=5, message="latest rolled back to 1 during the load")
        assert loader.wait_retired(timeout_s=5, name=None) is False     # the v3 switch is still under way
    finally:
        release.set()
    wait_for(lambda: loader.wait_retired(timeout_s=0.1), timeout=60, message="the hot-loader idle")
    assert served_version(manager) == 1
    assert not manager.is_loaded("m", 3), "the superseded version 3 must be retired"
    assert any(o.superseded and o.version == 3 for o in loader.outcomes), loader.outcomes
