"""`sol bench grammar`: what structured outputs cost the engine.

  throughput     closed-loop clients, half of the requests under a JSON schema (a
                 matcher per sequence, a bitmask per step for those rows) vs none, on the
                 same work: each free twin makes exactly as many tokens as its constrained
                 run did (greedy, eos ignored), so only the constraint differs; generated
                 tokens/s, the ratio's target >= 0.85
  time to first  an idle engine, one request at a time: free, with a cold compile (a
  token          schema not seen before, compiled in a worker thread as the request path
                 does), and with the compile cached; the TTFT each adds over free

Writes grammar.json to --out ($SOL_HOME/bench/grammar).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench.engine import _engine, _rates, build_model, token_stream
from server.engine.api import (
    Delta,
    EngineRequest,
    JsonSchema,
    RequestFinished,
    ResponseFormat,
    SamplingParams,
)
from server.engine.grammar import GrammarCompiler

TARGET = 0.85

# Nested objects in an open-ended array: the model decides when to close it, so a
# constrained answer is as long as a free one often enough to keep the batch full.
SCHEMA = {"type": "object", "properties": {
    "rows": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"}}, "required": ["id", "name", "kind", "ok"]}}},
    "required": ["rows"]}


def json_format(schema: dict[str, Any]) -> ResponseFormat:
    return ResponseFormat("json_schema", JsonSchema("bench", schema, strict=True))


def closed_loop(engine, prompts: list[list[int]], max_tokens: list[int], constrained: list[bool],
                compiled, clients: int) -> dict[str, Any]:
    """Serve every prompt with `clients` closed-loop clients; request i makes at most
    max_tokens[i] (greedy, eos ignored) and is under the grammar when constrained[i] (it
    then ends where its JSON does). Rates, and the tokens each request made."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(prompts)):
        todo.put(i)
    produced = [0] * len(prompts)

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            grammar = compiled if constrained[i] else None
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True,
                                    response_format=json_format(SCHEMA) if grammar else None)
            s = engine.submit(EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=prompts[i], params=params,
                                            grammar=grammar))
            produced[i] = sum(e.usage.completion_tokens for e in s if isinstance(e, RequestFinished))

    start, cpu_start = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**_rates(sum(produced), time.perf_counter() - start, time.process_time() - cpu_start),
            "per_request": produced}


def first_token_s(engine, prompt: list[int], fmt: ResponseFormat | None, compiler: GrammarCompiler,
                  pool: concurrent.futures.ThreadPoolExecutor) -> float:
    """Seconds from the request to its first token, the compile (in the pool) included."""
    start = time.perf_counter()
    grammar = None
    if fmt is not None:
        grammar = compiler.cached(fmt) or pool.submit(compiler.compile, fmt).result()
    s = engine.submit(EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=prompt, grammar=grammar,
                                    params=SamplingParams(temperature=0.0, max_tokens=1, response_format=fmt)))
    first = float("nan")
    for event in s:
        if isinstance(event, Delta) and first != first:
            first = time.perf_counter() - start
    return first


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(os.environ.get("SOL_HOME") or Path.home() / ".sol") / "bench" / "grammar"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, desc, texts = build_model(args)
    stream = token_stream(tokenizer, texts, 20000)
    prompts = [stream[64 * i: 64 * i + args.prompt_tokens] for i in range(args.requests)]
    t = time.perf_counter()
    compiler = GrammarCompiler.for_tokenizer(tokenizer, model.config.vocab_size)
    tokenizer_s = time.perf_counter() - t
    compiled = compiler.compile(json_format(SCHEMA))
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    rate = "tokens_per_cpu_s" if clock == "cpu" else "tokens_per_s"
    print(f"sol bench grammar: {desc}, vocabulary {model.config.vocab_size}, {torch.get_num_threads()} threads, "
          f"{args.requests} requests from {args.concurrency} closed-loop clients, max_tokens {args.max_tokens}",
          flush=True)

    engine = _engine(model, tokenizer, max_num_seqs=args.concurrency)
    half = [i % 2 == 0 for i in range(len(prompts))]
    try:
        closed_loop(engine, prompts, [8] * len(prompts), half, compiled, args.concurrency)      # warm-up
        runs: dict[str, list[dict[str, Any]]] = {"free": [], "half_constrained": []}
        for _ in range(args.rounds):      # alternating rounds; each side's best counts
            constrained_run = closed_loop(engine, prompts, [args.max_tokens] * len(prompts), half, compiled,
                                          args.concurrency)
            runs["half_constrained"].append(constrained_run)
            runs["free"].append(closed_loop(engine, prompts, constrained_run["per_request"], [False] * len(prompts),
                                            compiled, args.concurrency))
        best = {k: max(v, key=lambda r: r[rate]) for k, v in runs.items()}
        for k, r in best.items():
            print(f"  {k:<17} {r[rate]:9.1f} tok/s ({clock})  {r['tokens']} tokens in {r['seconds']:.2f} s", flush=True)
        ratio = best["half_constrained"][rate] / best["free"][rate]

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        prompt = prompts[0]
        first_token_s(engine, prompt, None, compiler, pool)                                  # warm-up
        free = [first_token_s(engine, prompt, None, compiler, pool) for _ in range(args.ttft_repeats)]
        # A schema not seen before each time (another property name), then the same one again.
        cold, cached = [], []
        for i in range(args.ttft_repeats):
            schema = {**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}": {"type": "integer"}}}
            cold.append(first_token_s(engine, prompt, json_format(schema), compiler, pool))
            cached.append(first_token_s(engine, prompt, json_format(schema), compiler, pool))
        pool.shutdown()
    finally:
        engine.shutdown()
    ttft = {"free_s": statistics.median(free), "cold_compile_s": statistics.median(cold),
            "cached_compile_s": statistics.median(cached)}
    added = {"cold_compile_added_s": ttft["cold_compile_s"] - ttft["free_s"],
             "cached_compile_added_s": ttft["cached_compile_s"] - ttft["free_s"]}
    result = {"setup": {"model": desc, "vocab_size": model.config.vocab_size, "threads": torch.get_num_threads(),
                        "clock": clock, "requests": args.requests, "concurrency": args.concurrency,
                        "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "schema": SCHEMA,
                        "tokenizer_info_s": tokenizer_s},
              "throughput": runs, "ratio_half_constrained_vs_free": ratio, "ttft": {**ttft, **added}}
    (out / "grammar.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print()
    print(f"{'half constrained / free tokens/s':<36} {ratio:8.3f}  target >= {TARGET}  "
          f"{'yes' if ratio >= TARGET else 'NO'}")
    print(f"{'TTFT free':<36} {ttft['free_s'] * 1e3:8.2f} ms")
    print(f"{'TTFT added by a cold compile':<36} {added['cold_compile_added_s'] * 1e3:8.2f} ms")
    print(f"{'TTFT added by a cached compile':<36} {added['cached_compile_added_s'] * 1e3:8.2f} ms")
    print(f"{'tokenizer info (once per model)':<36} {tokenizer_s * 1e3:8.2f} ms")
    print(f"\nwrote {out / 'grammar.json'}")
    return 0
