"""Health (liveness, readiness through loading and drain), reflection, and Prometheus
metrics labelled by model and never by key."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.client import Client
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_metrics_reflection(tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    server = RunningServer(registry.root, tmp_path / "home", metrics_port=free_port())
    server._thread.start()
    server.call(server.app.start())
    try:
        target = server.target
        # Up but nothing loaded: alive, not ready.
        assert status(target, "liveness") == SERVING
        assert status(target, "") == NOT_SERVING
        assert status(target, "sol.v1.Inference") == NOT_SERVING
        server.call(server.app.load_models())
        wait_for(lambda: status(target, "") == SERVING, message="readiness")

        with grpc.insecure_channel(target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"sol.v1.Inference", "sol.v1.Admin", "grpc.health.v1.Health"} <= names

        with Client(target, admin_key=ADMIN_KEY) as admin:
            key, info = admin.create_key("metrics")
            admin.set_price("tiny", prompt_per_1k=1.0, completion_per_1k=2.0)
        with Client(target, api_key=key) as c:
            stream = c.chat_stream([{"role": "user", "content": "hello"}], model="tiny", max_tokens=8, ignore_eos=True)
            list(stream)
            billed = stream.usage.cost
            # ignore_eos: both replies run to max_tokens (8 + 3 tokens), whatever the sampled
            # tokens, so the counters below are exact.
            billed += c.chat([{"role": "user", "content": "hello"}], model="tiny", max_tokens=3,
                             ignore_eos=True).usage.cost
        assert billed > 0
        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()

        # A stream's RPC counter moves when its handler returns, just after the last message.
        stream_done = 'sol_requests_total{code="OK",method="ChatCompletionStream",model="tiny",protocol="grpc"} 1.0'
        def counted() -> str | None:
            text = scrape()
            return text if stream_done in text else None

        text = wait_for(counted, message="the stream's RPC count")
        for name in ("sol_time_to_first_token_seconds_bucket", "sol_inter_token_latency_seconds_bucket",
                     "sol_e2e_request_latency_seconds_bucket", "sol_request_queue_time_seconds_bucket",
                     "sol_num_requests_running", "sol_num_requests_waiting", "sol_kv_cache_usage_perc",
                     "sol_prefix_cache_queries_total", "sol_prefix_cache_hits_total", "sol_prompt_tokens_total",
                     "sol_generation_tokens_total", "sol_cached_tokens_total", "sol_request_success_total",
                     "sol_requests_total", "sol_model_version_info", "sol_ledger_spool_records",
                     "sol_models_loaded", "sol_cost_total"):
            assert f"\n{name}" in text, name
        assert 'sol_generation_tokens_total{model="tiny"} 11.0' in text
        assert 'sol_request_success_total{finished_reason="length",model="tiny"} 2.0' in text
        assert 'sol_requests_total{code="OK",method="ChatCompletionStream",model="tiny",protocol="grpc"} 1.0' in text
        assert 'sol_model_version_info{model="tiny",stage="base",version="1"} 1.0' in text
        cost_line = next(line for line in text.splitlines() if line.startswith('sol_cost_total{model="tiny"}'))
        assert abs(float(cost_line.split()[-1]) - billed) < 1e-9
        assert info.key_id not in text and key not in text

        # Drain: readiness flips, liveness stays.
        server.call(server.app.health.start_drain())
        assert status(target, "") == NOT_SERVING and status(target, "liveness") == SERVING
    finally:
        server.stop()
