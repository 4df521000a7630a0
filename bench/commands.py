"""CLI: `sol bench engine|grammar|hygiene|lora|serve|crash|fairness|fuzz|hotload|train|vs-vllm`. The flags live here and each benchmark
module is imported only when it runs, so `sol --help` does not pay for torch twice."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from client.output import add_json_flag


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output directory (default $SOL_HOME/bench/engine)")
    parser.add_argument("--quick", action="store_true", help="shorter prompts and outputs, fewer sweep points")
    parser.add_argument("--preset", default="small", help="model preset when no --model is given")
    parser.add_argument("--model", help="benchmark a published model instead (name, name:alias, name@version)")
    parser.add_argument("--registry", help="registry directory (default $SOL_HOME/registry)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests in all (default: 3 per client, 2 with --quick)")
    parser.add_argument("--kv-budget-mib", type=int, default=64, help="KV budget for the capacity ratio")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and KV cache dtype for every contender (default float32)")
    parser.add_argument("--attention", choices=["auto", "in-place", "gather"], default="auto",
                        help="the engine's attention over the KV pool (EngineConfig.attention; default auto)")
    parser.add_argument("--clock", choices=["cpu", "wall"],
                        help="time basis of the ratios (default: cpu with --threads 1, else wall)")


def register(sub, bench_sub) -> None:
    p = bench_sub.add_parser("engine", help="serving engine throughput, latency and KV capacity ratios")
    engine_arguments(p)
    p.set_defaults(handler=_lazy("bench.engine"))

    p = bench_sub.add_parser("lora", help="throughput of the base alone vs 1, 8 and 64 distinct LoRA adapters in "
                             "one mixed workload")
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64], help="distinct adapter counts")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64, help="sequences per step (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each side's best counts (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.lora"))

    p = bench_sub.add_parser("hygiene", help="sampled chat completions of a served model: none may show a special "
                             "token as text (exit 1 if one does)")
    p.add_argument("--model", default="demo:rlhf", help="model reference (default demo:rlhf, what the main job "
                   "trains)")
    p.add_argument("--registry", help="registry directory (default $SOL_HOME/registry)")
    p.add_argument("--completions", type=int, default=1000, help="chat completions to sample (default 1000)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.hygiene"))

    p = bench_sub.add_parser("grammar", help="structured outputs: tokens/s with half the batch under a JSON schema "
                             "vs none; TTFT added by a cold and a cached compile")
    p.add_argument("--out", help="output directory (default $SOL_HOME/bench/grammar)")
    p.add_argument("--preset", default="small", help="model preset when no --model is given (default small)")
    p.add_argument("--model", help="benchmark a published model instead (name, name:alias, name@version)")
    p.add_argument("--registry", help="registry directory (default $SOL_HOME/registry)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    p.add_argument("--requests", type=int, default=128, help="requests per measurement (default 128)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's best counts (default 2)")
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_lazy("bench.grammar"))

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
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.serve", "run_bench_serve"))

    p = bench_sub.add_parser("crash", help="crash-safe metering: SIGKILL and restart `sol serve` under mixed "
                             "gRPC/HTTP streaming load; the ledger against what clients received")
    p.add_argument("--cycles", type=int, default=20, help="kills (default 20)")
    p.add_argument("--clients", type=int, default=6, help="streaming clients, half gRPC, half HTTP (default 6)")
    p.add_argument("--ledger", choices=["sqlite", "redis"], default="sqlite",
                   help="embedded SQLite (default), or a redis-server started on a free port")
    p.add_argument("--redis-url", help="an existing Redis for the ledger (beats --ledger)")
    p.add_argument("--metering-tokens", type=int, default=16, help="the server's --metering-tokens (default 16)")
    p.add_argument("--home", help="SOL_HOME of the server (default: a new temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_lazy("bench.crash", "run_bench_crash"))

    p = bench_sub.add_parser("fairness", help="a light key's TTFT beside a flooding key under fcfs and fair "
                             "scheduling; throughput; 2:1 shares")
    p.add_argument("--preset", default="tiny", help="model preset, random init (default tiny)")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each measured phase (default 12)")
    p.add_argument("--rounds", type=int, default=2, help="alternating fcfs/fair mixed phases (default 2)")
    p.add_argument("--weights-seconds", type=float, default=30.0,
                   help="shortest 2:1 shares phase (default 30; longer on a slow machine, until heavy-1 is "
                   "expected to finish 10 batches of requests, at most 180 s)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="the server's batch (default 8; the heavy tenant "
                   "runs more streams than this)")
    p.add_argument("--heavy-clients", type=int, default=32, help="the heavy tenant's streams (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="light prompts; heavy ones are 8x (default 16)")
    p.add_argument("--max-tokens", type=int, default=16, help="light requests' output (default 16)")
    p.add_argument("--heavy-max-tokens", type=int, default=32, help="heavy requests' output (default 32)")
    p.add_argument("--out", default=None, help="output directory (default $SOL_HOME/bench/fairness)")
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.fairness", "run_bench_fairness"))

    p = bench_sub.add_parser("hotload", help="latency during model swaps vs steady state; publish-to-serve time")
    p.add_argument("--preset", default="small", help="model preset of the published versions (default small)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--steady-s", type=float, default=20.0)
    p.add_argument("--swaps", type=int, default=3)
    p.add_argument("--swap-interval-s", type=float, default=10.0)
    p.add_argument("--out", default=None, help="output directory (default $SOL_HOME/bench/hotload)")
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.hotload", "run_bench_hotload"))

    from bench.vs_vllm import register_bench as register_vs_vllm

    register_vs_vllm(bench_sub)

    from training.presets import DEFAULT_PRESET, PRESETS

    p = bench_sub.add_parser(
        "train", help="pretraining tokens/s of the shared loop vs a bare forward+backward+step loop")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each loop")
    p.add_argument("--threads", type=int, default=None)
    add_json_flag(p)
    p.set_defaults(handler=_lazy("bench.train", "run_cli"))

    register_fuzz(bench_sub)


def register_fuzz(bench_sub) -> None:
    p = bench_sub.add_parser("fuzz", help="hostile input over gRPC and HTTP against a tiny-model server: status "
                             "counts (no INTERNAL/500 expected), health after, RSS growth, a healthy client's p99")
    p.add_argument("--cases", type=int, default=1000, help="cases to send at most (default 1000)")
    p.add_argument("--seconds", type=float, default=600.0, help="time bound of the run (default 600)")
    p.add_argument("--concurrency", type=int, default=4, help="cases in flight at once (default 4)")
    p.add_argument("--baseline-seconds", type=float, default=10.0,
                   help="the healthy client alone first, for its latency without the fuzz (default 10)")
    p.add_argument("--seed", type=int, default=0)
    # The stated bound: what a run of hostile input may add to the server's resident memory
    # (grammar caches are bounded at 64 MiB per model version; the rest is allocator slack).
    p.add_argument("--rss-cap-mib", type=float, default=256.0,
                   help="the server's RSS may grow at most this much over the run (default 256)")
    p.set_defaults(handler=_lazy("bench.fuzz"))


def _lazy(module: str, function: str = "run") -> Callable[[argparse.Namespace], int]:
    """A handler that imports its benchmark module only when that benchmark runs."""
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return handler
