"""The engine gauges under vLLM's names, for gateways that route on them: the Kubernetes
Gateway API Inference Extension's endpoint picker and llm-d read
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`
and `vllm:lora_requests_info` (and, for its prefix-cache scorer, `vllm:cache_config_info`)
from every pod of an InferencePool (its "model server
protocol"). They are the same figures as sol's own `sol_num_requests_*` and
`sol_kv_cache_usage_perc`, sampled from `Engine.stats()` at scrape time, labelled
`model_name` as vLLM labels them, on the same /metrics endpoint.

A sol process may serve several model names, vLLM one: the picker reads the first series
of a family unless its metric flag names a label (`vllm:num_requests_waiting{model_name=demo}`),
so a pool should serve one model name (deploy/README.md, "Inference gateway").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

from server.engine.api import EngineStats

PREFIX = "vllm:"
WAITING = f"{PREFIX}num_requests_waiting"
RUNNING = f"{PREFIX}num_requests_running"
KV_USAGE = f"{PREFIX}kv_cache_usage_perc"
LORA_INFO = f"{PREFIX}lora_requests_info"
CACHE_INFO = f"{PREFIX}cache_config_info"
# What the endpoint picker reads by default (its --*-metric flags); deploy/validate.py
# checks the deployed picker asks for nothing else.
GATEWAY_METRICS = (WAITING, RUNNING, KV_USAGE, LORA_INFO, CACHE_INFO)


@dataclass
class ModelLoad:
    """One model name's engines (every loaded version) summed."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    def add(self, st: EngineStats) -> None:
        self.running += st.running
        self.waiting += st.waiting
        self.kv_blocks_used += st.kv_blocks_used
        self.kv_blocks_total += st.kv_blocks_total

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def model_loads(stats: Iterable[tuple[str, int, EngineStats]]) -> dict[str, ModelLoad]:
    loads: dict[str, ModelLoad] = {}
    for name, _version, st in stats:
        loads.setdefault(name, ModelLoad()).add(st)
    return loads


class GatewayCollector:
    """Registered beside sol's collectors; `stats()` is ModelManager.stats."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, int, EngineStats]]],
                 block_size: Callable[[], int | None] = lambda: None, started: float | None = None) -> None:
        self._stats = stats
        self._block_size = block_size
        # vLLM's lora_requests_info carries the time its adapter sets last changed, and the
        # picker keeps the newest series: one series, stamped with the process's start until
        # the sets first change.
        self._lora_sets: tuple[str, str, str] | None = None      # None: not read yet
        self._lora_changed = time.time() if started is None else started

    def collect(self):
        waiting = GaugeMetricFamily(WAITING, "Requests waiting for admission (vLLM's name, for gateways)",
                                    labels=["model_name"])
        running = GaugeMetricFamily(RUNNING, "Requests in the engine's running batch (vLLM's name, for gateways)",
                                    labels=["model_name"])
        kv = GaugeMetricFamily(KV_USAGE, "Fraction of KV cache blocks in use, 0-1 (vLLM's name, for gateways)",
                               labels=["model_name"])
        stats = list(self._stats())
        loads = model_loads(stats)
        for name, load in sorted(loads.items()):
            waiting.add_metric([name], load.waiting)
            running.add_metric([name], load.running)
            kv.add_metric([name], load.kv_usage)
        # The KV cache's shape, as vLLM's labels carry it (value 1): the picker's prefix
        # scorer sizes its model of each pod's cache from them. Every loaded version's pool
        # counts: they share the process's KV budget.
        cache = GaugeMetricFamily(CACHE_INFO, "KV cache layout: block_size tokens per block, num_gpu_blocks blocks in "
                                  "every loaded version's pool", labels=["block_size", "num_gpu_blocks"])
        block_size = self._block_size()
        if block_size and loads:
            cache.add_metric([str(block_size), str(sum(m.kv_blocks_total for m in loads.values()))], 1.0)
        lora = GaugeMetricFamily(LORA_INFO, "LoRA adapters running and waiting (comma-separated names, every "
                                 "engine's) and adapter slots per step; the value is when these last changed "
                                 "(Unix time)", labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        sets = (",".join(sorted({a for _, _, st in stats for a in st.running_adapters})),
                ",".join(sorted({a for _, _, st in stats for a in st.waiting_adapters})),
                str(max((st.max_loras for _, _, st in stats), default=0)))
        if sets != self._lora_sets:
            if self._lora_sets is not None:
                self._lora_changed = time.time()
            self._lora_sets = sets
        lora.add_metric(list(sets), self._lora_changed)
        yield from (waiting, running, kv, lora, cache)
