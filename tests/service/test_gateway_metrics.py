"""The metrics an inference gateway routes on, under vLLM's names, read from a real
server's /metrics during a load and checked against the engine's own stats: waiting and
running requests, KV cache usage (labelled model_name), and lora_requests_info."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

from client.client import Client
from gpt.registry import Registry, publish_checkpoint
from server.config import engine_config
from server.gateway_metrics import GATEWAY_METRICS, model_loads
from tests.conftest import free_port, make_tiny_model
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

CLIENTS = 6
SEQS = 2                      # the engine runs 2 at a time: the other 4 wait


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_gateway_metrics_follow_the_engine_under_load(tiny_tokenizer, tmp_path):
    registry = Registry(tmp_path / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tiny_tokenizer, max_seq_len=1024), tiny_tokenizer,
                       {"stage": "sft"}, aliases=("sft",))
    started = time.time()
    server = RunningServer(registry.root, tmp_path / "home", http_port=free_port(), metrics_port=free_port(),
                           engine=engine_config(max_num_seqs=SEQS)).start()
    try:
        with Client(server.target, admin_key=ADMIN_KEY) as admin:
            key = admin.create_key("gw")[0]
        client = openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0)
        port = server.app.metrics_port
        engines = server.app.models

        # Idle: the families exist, at zero, under the served model's name.
        idle = scrape(port)
        for name in GATEWAY_METRICS:
            assert name in idle, f"{name} is not exported"
        assert idle["vllm:num_requests_waiting"] == {(("model_name", "tiny"),): 0.0}
        assert idle["vllm:num_requests_running"] == {(("model_name", "tiny"),): 0.0}
        assert idle["vllm:kv_cache_usage_perc"] == {(("model_name", "tiny"),): 0.0}
        ((labels, stamp),) = idle["vllm:lora_requests_info"].items()
        slots = str(next(iter(engines.models())).engine.config.max_loras)     # --max-loras, as vLLM's
        assert dict(labels) == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": slots}
        assert started - 1 <= stamp <= time.time()
        (((_, size), (_, blocks)),) = idle["vllm:cache_config_info"]
        (engine,) = [m.engine for m in engines.models()]
        assert (int(size), int(blocks)) == (engine.config.block_size, engine.stats().kv_blocks_total)

        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                               max_tokens=300, temperature=1.0, extra_body={"ignore_eos": True})

        threads = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: model_loads(engines.stats())["tiny"].waiting > 0, timeout=60, message="a queue")
            # The engine moves while the scrape runs: keep the samples whose engine stats
            # read the same just before and just after the scrape, and compare those.
            matched = 0
            for _ in range(200):
                before = model_loads(engines.stats())["tiny"]
                seen = scrape(port)
                after = model_loads(engines.stats())["tiny"]
                if before != after or before.waiting == 0:
                    continue
                label = (("model_name", "tiny"),)
                assert seen["vllm:num_requests_waiting"][label] == before.waiting
                assert seen["vllm:num_requests_running"][label] == before.running >= 1
                assert seen["vllm:kv_cache_usage_perc"][label] == before.kv_usage > 0
                # The same figures as sol's own names, from the same scrape.
                assert seen["sol_num_requests_waiting"][(("model", "tiny"),)] == before.waiting
                assert seen["sol_kv_cache_usage_perc"][(("model", "tiny"),)] == before.kv_usage
                matched += 1
                if matched == 3:
                    break
            assert matched == 3, "the engine never held still across a scrape"
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        wait_for(lambda: scrape(port)["vllm:num_requests_running"][(("model_name", "tiny"),)] == 0,
                 timeout=30, message="idle again")
    finally:
        server.stop()
