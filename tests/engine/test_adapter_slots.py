"""The engine's adapter slots: pinned while in use, kept loaded when idle, the least
recently used idle one evicted for a newcomer, and no slot when every one is pinned."""

from __future__ import annotations

import torch

from gpt.config import ModelConfig
from gpt.lora import LoraAdapter, LoraSpec
from gpt.lora_batch import LoraStack
from server.engine.adapter_slots import AdapterRef, AdapterSlots

CONFIG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)


def ref(name: str, version: int = 1, value: float = 1.0) -> AdapterRef:
    adapter = LoraAdapter.zeros_like(LoraSpec(2, 4.0, ("q",)), CONFIG)
    adapter.weights[(0, "q")][1].fill_(value)
    return AdapterRef(name, version, adapter)


def test_pins_reuse_and_lru_eviction():
    slots = AdapterSlots(LoraStack(CONFIG, slots=2, max_rank=2, dtype=torch.float32))
    a, b, c = ref("a", value=1.0), ref("b", value=2.0), ref("c", value=3.0)
    sa = slots.slot(a)
    assert slots.slot(a) == sa and slots.loads == 1              # the same adapter shares its slot
    sb = slots.slot(b)
    assert sb != sa and not slots.can_take(c) and slots.slot(c) is None   # every slot pinned: wait
    slots.release(sa)
    assert slots.slot(c) is None                                 # a still holds one pin
    slots.release(sa)
    assert slots.running() == ["b"]
    sc = slots.slot(c)
    assert sc == sa and slots.loaded() == [("b", 1), ("c", 1)]   # a, idle, was evicted for c
    assert float(slots.stack.b[(0, "q")][sc].max()) == 3.0       # c's weights are in the slot


def test_a_new_version_is_another_adapter_with_another_cache_salt():
    slots = AdapterSlots(LoraStack(CONFIG, slots=2, max_rank=2, dtype=torch.float32))
    v1, v2 = ref("a", 1, 1.0), ref("a", 2, 5.0)
    s1, s2 = slots.slot(v1), slots.slot(v2)
    assert s1 != s2 and v1.cache_salt != v2.cache_salt
    assert float(slots.stack.b[(0, "q")][s2].max()) == 5.0
    slots.release(s1)
    slots.release(s2)
    assert slots.slot(ref("a", 1, 1.0)) == s1 and slots.loads == 2   # idle but still loaded
