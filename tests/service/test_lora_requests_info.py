"""vLLM's `lora_requests_info` carries sol's real adapter names: the adapters with
sequences admitted, those queued for a slot, and the slots per step; its value moves
when those sets change."""

from __future__ import annotations

import time

from server.engine.api import EngineRequest, SamplingParams
from server.gateway_metrics import LORA_INFO, GatewayCollector
from tests.conftest import make_tiny_model
from tests.engine.test_lora_engine import adapter, engine


def _info(collector: GatewayCollector) -> tuple[dict[str, str], float]:
    (family,) = [f for f in collector.collect() if f.name == LORA_INFO]
    (sample,) = family.samples
    return sample.labels, sample.value


def test_running_and_waiting_adapters_by_name(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, seed=0)
    eng = engine(model, max_loras=1)
    a, b = adapter(model, 1), adapter(model, 2)
    collector = GatewayCollector(lambda: [("tiny", 1, eng.stats())], started=100.0)
    assert _info(collector) == ({"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}, 100.0)
    prompt = tiny_tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=4)
    eng.submit_many([EngineRequest(request_id=f"r{i}", prompt_ids=prompt, params=params, adapter=ref)
                               for i, ref in enumerate((a, b, None))])
    eng.run_step()
    # One slot: ad1's sequence holds it, ad2's waits for it (never fails), the base runs.
    stats = eng.stats()
    assert (stats.running_adapters, stats.waiting_adapters, stats.max_loras) == (["ad1"], ["ad2"], 1)
    labels, stamp = _info(collector)
    assert labels == {"running_lora_adapters": "ad1", "waiting_lora_adapters": "ad2", "max_lora": "1"}
    assert time.time() - 5 <= stamp <= time.time()
    assert _info(collector)[1] == stamp                          # unchanged sets keep their stamp
    eng.run_until_idle()
    assert _info(collector)[0] == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "1"}
