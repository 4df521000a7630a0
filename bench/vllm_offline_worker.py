"""Offline generation with vLLM's `LLM.generate`, run by `bench.vs_vllm` with the vLLM
virtual environment's Python (`.bench/vllm-venv`): it imports vLLM and the standard
library only, never sol, so neither environment needs the other's packages.

    python bench/vllm_offline_worker.py SPEC.json RESULT.json

SPEC: {"model_dir", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
"enforce_eager", "warmup": [[ids, new_tokens], ...], "workloads": {name: [[ids, new], ...]}}.
RESULT: per workload the wall time of one `generate` call over all its requests, and per
request the output ids, time to first token and time per output token.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _params(new_tokens: int):
    from vllm import SamplingParams

    # Greedy and exactly new_tokens: EOS ignored, as on the sol side.
    return SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)


def _run(llm, requests: list[list[Any]]) -> dict[str, Any]:
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = [_params(new) for _, new in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    rows = []
    for out in outputs:
        ids = list(out.outputs[0].token_ids)
        m = out.metrics
        # first_token_latency: arrival at the frontend to the first token (seconds);
        # first/last_token_ts: engine-core monotonic stamps, so their difference is exact.
        ttft = m.first_token_latency if m is not None else None
        tpot = ((m.last_token_ts - m.first_token_ts) / (len(ids) - 1)) if m is not None and len(ids) > 1 else None
        rows.append({"token_ids": ids, "ttft_s": ttft, "tpot_s": tpot})
    return {"wall_s": wall, "tokens": sum(len(r["token_ids"]) for r in rows), "requests": rows}


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM

    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
              enforce_eager=spec.get("enforce_eager", False), seed=0,
              # Per-request timestamps (TTFT, TPOT) are only kept with stats on.
              disable_log_stats=False)
    load_s = time.perf_counter() - t0
    # First calls compile and allocate; sol gets the same warm-up.
    _run(llm, spec["warmup"])
    result: dict[str, Any] = {"vllm": vllm.__version__, "load_s": load_s, "workloads": {}}
    for name, requests in spec["workloads"].items():
        # Repeated; the fastest round is kept (the same rule as the sol side, whose
        # helper this environment cannot import).
        rounds = [_run(llm, requests) for _ in range(max(1, spec.get("rounds", 1)))]
        best = max(rounds, key=lambda r: r["tokens"] / r["wall_s"])
        result["workloads"][name] = {**best, "rounds_tokens_per_s": [r["tokens"] / r["wall_s"] for r in rounds]}
        print(f"vllm offline {name}: {result['workloads'][name]['tokens'] / result['workloads'][name]['wall_s']:.0f}"
              " tok/s", flush=True)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
