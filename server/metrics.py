"""Prometheus metrics, named like vLLM's and labelled by model, never by API key (keys
are unbounded cardinality and per-key figures belong to the ledger), with one bounded
exception: the fair-share scheduler's gauges of the busiest `--metrics-top-tenants` keys
(by key id, at most that many series per model). Served on their own HTTP port. Engine
gauges are read from `Engine.stats()` at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.api import EngineStats

NS = "sol"

# The *_created series double every counter for no use on a scrape-based dashboard.
disable_created_metrics()
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters owned by the engines, sampled when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, int, EngineStats]]],
                 ledger: Callable[[], tuple[int, bool]]) -> None:
        self._stats = stats
        self._ledger = ledger

    def collect(self):
        running = GaugeMetricFamily(f"{NS}_num_requests_running", "Requests in the engine's running batch",
                                    labels=["model"])
        waiting = GaugeMetricFamily(f"{NS}_num_requests_waiting", "Requests waiting for admission",
                                    labels=["model"])
        kv = GaugeMetricFamily(f"{NS}_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)",
                               labels=["model"])
        queries = CounterMetricFamily(f"{NS}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=["model"])
        hits = CounterMetricFamily(f"{NS}_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels=["model"])
        preempt = CounterMetricFamily(f"{NS}_num_preemptions", "Sequences preempted by recompute",
                                      labels=["model"])
        per_model: dict[str, list[EngineStats]] = {}
        for name, _version, st in self._stats():
            per_model.setdefault(name, []).append(st)
        for name, all_stats in per_model.items():
            running.add_metric([name], sum(s.running for s in all_stats))
            waiting.add_metric([name], sum(s.waiting for s in all_stats))
            total = sum(s.kv_blocks_total for s in all_stats)
            kv.add_metric([name], sum(s.kv_blocks_used for s in all_stats) / total if total else 0.0)
            queries.add_metric([name], sum(s.prefix_cache_queries for s in all_stats))
            hits.add_metric([name], sum(s.prefix_cache_hits for s in all_stats))
            preempt.add_metric([name], sum(s.preemptions for s in all_stats))
        yield from _tenant_gauges(per_model)
        spool = GaugeMetricFamily(f"{NS}_ledger_spool_records", "Usage records spooled locally, waiting for the "
                                                                "ledger store")
        spooled, store_up = self._ledger()
        spool.add_metric([], spooled)
        up = GaugeMetricFamily(f"{NS}_ledger_store_up", "1 when the ledger store (Redis or SQLite) takes writes")
        up.add_metric([], 1 if store_up else 0)
        yield from (running, waiting, kv, queries, hits, preempt, spool, up)


def _tenant_gauges(per_model: dict[str, list[EngineStats]]) -> list[GaugeMetricFamily]:
    """The scheduler's view of its busiest tenants (EngineStats.tenants: already the top
    k of each engine), summed over a model's loaded versions."""
    running = GaugeMetricFamily(f"{NS}_tenant_requests_running", "A key's sequences in the last step's batch "
                                "(the busiest keys only)", labels=["model", "tenant"])
    waiting = GaugeMetricFamily(f"{NS}_tenant_requests_waiting", "A key's sequences waiting for admission "
                                "(the busiest keys only)", labels=["model", "tenant"])
    counter = GaugeMetricFamily(f"{NS}_tenant_virtual_tokens", "A key's virtual token counter: the service it "
                                "received over its share, in token costs (fair scheduling)",
                                labels=["model", "tenant"])
    for name, all_stats in per_model.items():
        rows: dict[str, list[float]] = {}
        for st in all_stats:
            for t in st.tenants:
                row = rows.setdefault(t.tenant, [0, 0, 0.0])
                row[0] += t.running
                row[1] += t.waiting
                row[2] = max(row[2], t.counter)
        for tenant, (r, w, c) in rows.items():
            running.add_metric([name, tenant], r)
            waiting.add_metric([name, tenant], w)
            counter.add_metric([name, tenant], c)
    return [running, waiting, counter]


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        m = ["model"]
        # One counter for both protocols: `code` is the gRPC status name for HTTP calls too
        # (400 -> INVALID_ARGUMENT, 429 -> RESOURCE_EXHAUSTED...), so one alert covers both.
        self.requests = Counter(f"{NS}_requests", "Finished requests by protocol (grpc, http), method and status "
                                "(the gRPC code name)", ["protocol", "model", "method", "code"], registry=r)
        self.success = Counter(f"{NS}_request_success", "Requests that produced output, by finish reason",
                               ["model", "finished_reason"], registry=r)
        self.ttft = Histogram(f"{NS}_time_to_first_token_seconds", "Arrival to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{NS}_inter_token_latency_seconds", "Time between tokens of a stream", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{NS}_e2e_request_latency_seconds", "Arrival to last token", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(f"{NS}_request_queue_time_seconds", "Arrival to first scheduled", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{NS}_prompt_tokens", "Prompt tokens of finished requests", m, registry=r)
        self.generation_tokens = Counter(f"{NS}_generation_tokens", "Tokens generated", m, registry=r)
        self.cached_tokens = Counter(f"{NS}_cached_tokens", "Prompt tokens served from the prefix cache", m,
                                     registry=r)
        self.cost = Counter(f"{NS}_cost", "Cost billed for finished requests, in price units", m, registry=r)
        self.model_info = Gauge(f"{NS}_model_version_info", "1 for each loaded model version",
                                ["model", "version", "stage"], registry=r)
        self.models_loaded = Gauge(f"{NS}_models_loaded", "Model versions loaded and warmed", registry=r)
        self.model_loads = Counter(f"{NS}_model_loads", "Model versions loaded", m, registry=r)
        self.model_load_failures = Counter(f"{NS}_model_load_failures", "Model versions refused at load", m,
                                           registry=r)
        self.model_load_seconds = Histogram(f"{NS}_model_load_seconds", "Verify + load + warm-up of a new version",
                                            m, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.ready = Gauge(f"{NS}_ready", "1 when the server is ready to take requests", registry=r)

    def attach(self, stats: Callable[[], Iterable[tuple[str, int, EngineStats]]],
               ledger: Callable[[], tuple[int, bool]]) -> None:
        """`ledger()` -> (records spooled, store reachable)."""
        self.registry.register(_EngineCollector(stats, ledger))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Start the /metrics HTTP endpoint on its own thread; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)

    def observe_finished(self, model: str, timings, usage, finish_reasons: Iterable[str],
                         token_times: list[tuple[float, int]], cost: float = 0.0) -> None:
        """`token_times`: (arrival, tokens) of each message of the first choice; a message
        of k tokens counts as k equal gaps."""
        if timings.first_token is not None:
            self.ttft.labels(model).observe(max(0.0, timings.first_token - timings.arrival))
        if timings.first_scheduled is not None:
            self.queue.labels(model).observe(max(0.0, timings.first_scheduled - timings.arrival))
        if timings.finished is not None:
            self.e2e.labels(model).observe(max(0.0, timings.finished - timings.arrival))
        for (a, _), (b, tokens) in zip(token_times, token_times[1:], strict=False):
            for _ in range(tokens):
                self.itl.labels(model).observe((b - a) / tokens)
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generation_tokens.labels(model).inc(usage.completion_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_tokens)
        self.cost.labels(model).inc(cost)
        for reason in finish_reasons:
            self.success.labels(model, reason).inc()
