"""`sol bench lora`: decode throughput of one mixed workload on the base model alone and
with its requests spread over 1, 8 and 64 distinct LoRA adapters (rank 8, every target),
all in the same batches; prints tokens/s and each over the base's.

The model has random weights (throughput does not depend on them), every request
generates exactly `--max-tokens` tokens (eos ignored), and the engine is synchronous
(stepped on this thread), so the figures are the engine's and the adapter kernels' alone.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from gpt.config import preset
from gpt.lora import TARGETS, LoraAdapter, LoraSpec
from gpt.model import GPT
from server.engine.adapter_slots import AdapterRef
from server.engine.api import SamplingParams
from server.engine.config import EngineConfig
from server.engine.offline import build_engine, generate


def _adapters(model: GPT, count: int, rank: int) -> list[AdapterRef]:
    refs = []
    for i in range(count):
        weights = LoraAdapter.zeros_like(LoraSpec(rank, 2.0 * rank, tuple(TARGETS)), model.config, seed=i)
        for _, b in weights.weights.values():
            b.normal_(0.0, 0.01)
        refs.append(AdapterRef(f"bench-{i}", 1, weights))
    return refs


@dataclass
class Workload:
    """One side of the comparison: an engine and the same requests over `adapters`
    distinct adapters (0: the base alone)."""

    adapters: int
    engine: Any
    prompts: list[list[int]]
    per_request: list[AdapterRef | None]
    params: SamplingParams

    def tokens_per_s(self) -> float:
        """Generated tokens per second (wall) of one pass over the workload."""
        self.engine.reset_prefix_cache()
        start = time.perf_counter()
        outs = generate(self.engine, self.prompts, self.params, adapters=self.per_request)
        elapsed = time.perf_counter() - start
        return sum(len(o.token_ids) for o in outs) / elapsed


def _workload(model: GPT, adapters: int, args: argparse.Namespace) -> Workload:
    config = EngineConfig(device=args.device, dtype=torch.float32, max_num_seqs=args.concurrency,
                          max_loras=max(1, adapters), max_lora_rank=args.rank)
    engine = build_engine(model, config, start=False)
    refs = _adapters(model, adapters, args.rank)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(args.requests)]
    per_request = [refs[i % adapters] if adapters else None for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    generate(engine, prompts[:min(4, len(prompts))], params, adapters=per_request[:4])      # warm-up
    return Workload(adapters, engine, prompts, per_request, params)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT(preset(args.preset)).eval()
    workloads = [_workload(model, n, args) for n in [0, *args.adapters]]
    # Rounds alternate between the sides and each side's best round counts: a machine
    # whose load drifts (other processes, frequency) then hits every side alike.
    best = {w.adapters: 0.0 for w in workloads}
    for _ in tqdm(range(args.rounds), desc="rounds", disable=args.json):
        for w in workloads:
            best[w.adapters] = max(best[w.adapters], w.tokens_per_s())
    results = best
    base = results[0]
    rows = [{"adapters": n, "tok_per_s": round(tps, 1), "ratio_to_base": round(tps / base, 3)}
            for n, tps in results.items()]
    if args.json:
        print(json.dumps({"preset": args.preset, "rank": args.rank, "requests": args.requests, "rounds": args.rounds,
                          "concurrency": args.concurrency, "rows": rows}))
        return 0
    print(f"preset {args.preset}, rank {args.rank}, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.concurrency} per step, best of {args.rounds} alternating rounds")
    for row in rows:
        label = "base alone" if row["adapters"] == 0 else f"{row['adapters']} adapters"
        print(f"  {label:<12} {row['tok_per_s']:>9.1f} tok/s   x{row['ratio_to_base']:.3f} of base")
    return 0
