"""CLI: `sol serve`, `sol bench serve` (and `sol bench engine` from the engine's module)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from pathlib import Path


def register(sub, bench_sub) -> None:
    p = sub.add_parser("serve", help="serve models over gRPC (Inference, Admin, health, reflection) with metering",
                       description="Serve registry models over gRPC. Without --redis-url the ledger is an embedded "
                                   "SQLite file under $SOL_HOME; without an admin key one is generated into "
                                   "$SOL_HOME/admin.key (the CLI's admin commands read it from there).")
    p.add_argument("--host", default=os.environ.get("SOL_HOST", "0.0.0.0"), help="address to bind (SOL_HOST; "
                   "default 0.0.0.0)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SOL_PORT") or 50051),
                   help="gRPC port (SOL_PORT; default 50051)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SOL_METRICS_PORT") or 9400),
                   help="Prometheus port, 0 = off (SOL_METRICS_PORT; default 9400)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("SOL_HTTP_PORT") or 8000),
                   help="OpenAI-compatible HTTP API and playground page, 0 = off (SOL_HTTP_PORT; default 8000)")
    p.add_argument("--registry", type=Path, default=None, help="registry directory (default: $SOL_HOME/registry)")
    p.add_argument("--model", action="append", default=[], metavar="REF",
                   help="model to serve: NAME, NAME:ALIAS or NAME@VERSION (repeatable; default: every model's "
                        "latest in the registry)")
    p.add_argument("--redis-url", default=os.environ.get("SOL_REDIS_URL") or None,
                   help="Redis for the ledger, quotas and keys, shared by replicas (SOL_REDIS_URL; default: the "
                        "embedded SQLite ledger)")
    p.add_argument("--admin-key-file", type=Path, default=None,
                   help="file holding the admin key (or SOL_ADMIN_KEY; default: $SOL_HOME/admin.key, generated)")
    p.add_argument("--grace-period", type=float, default=float(os.environ.get("SOL_GRACE_PERIOD") or 30.0),
                   help="seconds running requests get to finish after SIGTERM (SOL_GRACE_PERIOD; default 30)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV pool per model version in blocks (default: sized by the engine within the KV budget)")
    p.add_argument("--kv-budget-mb", type=int, default=int(os.environ.get("SOL_KV_BUDGET_MB") or 1024),
                   help="KV memory shared by every loaded model version, swaps included (SOL_KV_BUDGET_MB; "
                        "default 1024)")
    p.add_argument("--kv-per-model-mb", type=int, default=int(os.environ.get("SOL_KV_PER_MODEL_MB") or 256),
                   help="the most one version's KV pool may take (SOL_KV_PER_MODEL_MB; default 256)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request sets none (capped by the context; default 256)")
    p.add_argument("--cached-discount", type=float, default=0.5,
                   help="price discount of cached prompt tokens for models without a SetPrice (default 0.5)")
    p.add_argument("--no-watch", dest="watch", action="store_false",
                   help="do not follow the registry (default: hot-load new versions and moved aliases)")
    p.add_argument("--poll-interval", type=float, default=float(os.environ.get("SOL_POLL_INTERVAL") or 2.0),
                   help="registry rescan period in seconds, the fallback where filesystem events are missing "
                        "(SOL_POLL_INTERVAL; default 2)")
    p.set_defaults(handler=_serve)

    p = bench_sub.add_parser("serve", help="streaming clients over gRPC on loopback vs the in-process engine")
    p.add_argument("--model", default=None, help="model reference (default: a random tiny/small model)")
    p.add_argument("--registry", type=Path, default=None)
    p.add_argument("--preset", default="small", help="model preset when no --model is given (default small)")
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    p.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--no-watch", dest="watch", action="store_false",
                   help="run the server without following the registry (isolates serving from hot-load)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each side's best counts (default 3)")
    p.add_argument("--device", default=None, help="cpu, cuda ... for both sides (default: CUDA when present)")
    p.add_argument("--http", action="store_true",
                   help="also stream the same load over the OpenAI-compatible HTTP API (SSE) and compare it with gRPC")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_bench_serve)

    # The engine's own benchmark lives with the engine.
    if importlib.util.find_spec("server.engine.bench") is not None:
        importlib.import_module("server.engine.bench").register_bench(bench_sub)
    from server.hotload_bench import register_bench as register_hotload_bench

    register_hotload_bench(bench_sub)


def _serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.config import ServerConfig

    config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
                          models=args.model,
                          redis_url=args.redis_url, admin_key_file=args.admin_key_file,
                          grace_period_s=args.grace_period, device=args.device, kv_blocks=args.kv_blocks,
                          default_max_tokens=args.default_max_tokens, cached_discount=args.cached_discount,
                          watch=args.watch, poll_interval_s=args.poll_interval,
                          kv_budget_mb=args.kv_budget_mb, kv_per_model_mb=args.kv_per_model_mb)
    if args.registry is not None:
        config.registry = args.registry
    if args.admin_key_file is not None:
        config.admin_key = None          # an explicit file beats the environment
    return serve(config)


def _bench_serve(args: argparse.Namespace) -> int:
    from server.bench import run_bench_serve

    return run_bench_serve(args)
