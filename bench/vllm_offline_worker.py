"""Offline generation with vLLM's `LLM.generate`, run by `bench.vs_vllm` with the vLLM
virtual environment's Python (`.bench/vllm-venv`): it imports vLLM and the standard
library only, never sol, so neither environment needs the other's packages.

    python bench/vllm_offline_worker.py SPEC.json RESULT_FD

SPEC: {"model_dir", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
"enforce_eager", "warmup": [[ids, new_tokens], ...]}. A round server: once loaded and
warm it writes {"vllm", "load_s"} as one JSON line to the file descriptor RESULT_FD, then
for each JSON line on stdin (a round's requests, [[ids, new_tokens], ...]) runs one
`generate` call over all of them and writes the round's result line: its wall time and
per request the output ids, time to first token and time per output token. It ends when
stdin closes. (vLLM logs to stdout and stderr, hence a descriptor of its own.)
"""

from __future__ import annotations

import json
import os
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


def main(spec_path: str, result_fd: int) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    results = os.fdopen(result_fd, "w", encoding="utf-8")
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
    results.write(json.dumps({"vllm": vllm.__version__, "load_s": load_s}) + "\n")
    results.flush()
    for line in sys.stdin:
        if line.strip():
            result = _run(llm, json.loads(line))
            print(f"vllm offline round: {result['tokens'] / result['wall_s']:.0f} tok/s", flush=True)
            results.write(json.dumps(result) + "\n")
            results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
