"""Offline generation with CTranslate2's `Generator.generate_batch`, run by
`bench.vs_vllm` with the CTranslate2 virtual environment's Python (`.bench/ct2-venv`):
it imports CTranslate2 and the standard library only, never sol.

    python bench/ct2_offline_worker.py SPEC.json RESULT_FD

SPEC: {"model_dir" (converted by `ct2-transformers-converter` beforehand, in a process of
its own so that the converter's transformers copy of the weights is not in this peak
RSS), "compute_type" (float32 ...), "threads", "warmup": [[ids, new_tokens], ...]}. The
same round protocol as bench/vllm_offline_worker.py: loads the model, warms up, writes
{"ctranslate2", "load_s"} as one JSON line to RESULT_FD, then answers
each JSON line of requests on stdin with one line: wall time and per request the output
ids. CTranslate2 batches statically (one `generate_batch` over all requests), so it
reports no per-request first-token time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any


def _run(generator, vocabulary: list[str], requests: list[list[Any]]) -> dict[str, Any]:
    new = {n for _, n in requests}
    if len(new) != 1:
        raise SystemExit("the CTranslate2 worker takes rounds of one output length (the uniform workload)")
    (new_tokens,) = new
    start_tokens = [[vocabulary[i] for i in ids] for ids, _ in requests]
    start = time.perf_counter()
    # Greedy and exactly new_tokens: min_length keeps EOS from ending a sequence early.
    results = generator.generate_batch(start_tokens, max_length=new_tokens, min_length=new_tokens,
                                       sampling_topk=1, include_prompt_in_result=False)
    wall = time.perf_counter() - start
    rows = [{"token_ids": list(r.sequences_ids[0]), "ttft_s": None, "tpot_s": None} for r in results]
    return {"wall_s": wall, "tokens": sum(len(r["token_ids"]) for r in rows), "requests": rows}


def main(spec_path: str, result_fd: int) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    results = os.fdopen(result_fd, "w", encoding="utf-8")
    t0 = time.perf_counter()
    import ctranslate2

    generator = ctranslate2.Generator(spec["model_dir"], device="cpu", compute_type=spec["compute_type"],
                                      inter_threads=1, intra_threads=spec["threads"])
    load_s = time.perf_counter() - t0
    with open(os.path.join(spec["model_dir"], "vocabulary.json"), encoding="utf-8") as f:
        vocabulary = json.load(f)
    for ids, new in spec["warmup"]:
        _run(generator, vocabulary, [[ids, new]])
    results.write(json.dumps({"ctranslate2": ctranslate2.__version__, "load_s": load_s}) + "\n")
    results.flush()
    for line in sys.stdin:
        if line.strip():
            result = _run(generator, vocabulary, json.loads(line))
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"ctranslate2 offline round: {result['tokens'] / result['wall_s']:.0f} tok/s", flush=True)
            results.write(json.dumps(result) + "\n")
            results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
