"""LoRA adapters served by a real server: a request naming an adapter entry runs on its
base's engine with the adapter, batched with requests on other adapters and on the base,
and answers as the merged model does; usage is metered under the adapter's name; an
adapter that cannot be served is refused with a clear error while the rest are served."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from client.client import Client
from client.types import SolError
from gpt.adapter_store import publish_adapter
from gpt.lora import TARGETS, LoraAdapter, LoraSpec, merge_into
from gpt.registry import Registry, publish_checkpoint
from tests.conftest import make_tiny_model
from tests.service.harness import ADMIN_KEY, RunningServer

PROMPT = "The quick brown fox jumps over the lazy dog and"


def lively_adapter(config, seed: int) -> LoraAdapter:
    adapter = LoraAdapter.zeros_like(LoraSpec(4, 8.0, tuple(TARGETS)), config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    for _, b in adapter.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
    return adapter


@pytest.fixture
def served(tmp_path, tiny_tokenizer):
    registry = Registry(tmp_path / "registry")
    base_model = make_tiny_model(tiny_tokenizer)
    base = publish_checkpoint(registry, "tiny", base_model, tiny_tokenizer, {"stage": "base"})
    a, b = lively_adapter(base_model.config, 1), lively_adapter(base_model.config, 2)
    publish_adapter(registry, "tenant-a", a, base)
    publish_adapter(registry, "tenant-b", b, base)
    publish_checkpoint(registry, "merged-a", merge_into(copy.deepcopy(base_model), a), tiny_tokenizer,
                       {"stage": "base"})
    server = RunningServer(registry.root, tmp_path / "home", models=["tiny", "merged-a"]).start()
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        server.key, _ = admin.create_key("lora")
    yield server, registry, base
    server.stop()


def test_adapter_requests_batched_with_others_match_the_merged_model(served):
    server, registry, base = served
    params = dict(temperature=0.0, max_tokens=8, logprobs=1)
    with Client(server.target, api_key=server.key, retries=0) as c:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.complete, PROMPT, m, **params)
                       for m in ("tenant-a", "tenant-b", "tiny", "tenant-a", "tiny", "tenant-b")]
            outs = [f.result() for f in futures]
        merged = c.complete(PROMPT, "merged-a", **params)
        plain = c.complete(PROMPT, "tiny", **params)
        b_again = c.complete(PROMPT, "tenant-b", **params)
        listed = {m.name: m for m in c.list_models()}
    assert listed["tenant-a"].parent == base.ref and listed["tenant-b"].stage == "adapter"
    for out in (outs[0], outs[3]):
        assert out.text == merged.text
        assert [lp.logprob for lp in out.choices[0].logprobs] == pytest.approx(
            [lp.logprob for lp in merged.choices[0].logprobs], abs=1e-4)
    assert outs[2].text == plain.text and merged.text != plain.text
    assert outs[1].text == b_again.text != merged.text     # B gives its own output, not A's cached one
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        by_model = {r.model: r for r in admin.usage().rows}
    assert by_model["tenant-a"].requests == 2 and by_model["tenant-b"].requests == 3
    assert by_model["tiny"].requests == 3


def test_an_adapter_that_cannot_be_served_is_refused_and_others_still_serve(served):
    server, registry, base = served
    version = registry.version_dir("tenant-b", 1)
    (version / "adapter_model.safetensors").write_bytes(b"corrupt")
    with Client(server.target, api_key=server.key, retries=0) as c:
        with pytest.raises(SolError, match="sha256"):
            c.complete(PROMPT, "tenant-b", max_tokens=2)
        with pytest.raises(SolError, match="not served"):
            c.complete(PROMPT, "no-such-adapter", max_tokens=2)
        assert c.complete(PROMPT, "tenant-a", max_tokens=2).text is not None


def test_a_new_adapter_version_is_served_without_reloading_the_base(served):
    server, registry, base = served
    with Client(server.target, api_key=server.key, retries=0) as c:
        before = c.complete(PROMPT, "tenant-a", temperature=0.0, max_tokens=8)
        as_b = c.complete(PROMPT, "tenant-b", temperature=0.0, max_tokens=8)
        config = server.app.models.resolve("tiny").engine.model.config
        publish_adapter(registry, "tenant-a", lively_adapter(config, 2), base)     # B's weights as a@2
        after = c.complete(PROMPT, "tenant-a", temperature=0.0, max_tokens=8)
        pinned = c.complete(PROMPT, "tenant-a@1", temperature=0.0, max_tokens=8)
    assert after.text == as_b.text != before.text and pinned.text == before.text
