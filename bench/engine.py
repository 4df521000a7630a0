"""`sol bench engine`: the engine against its baselines, measured in the same run on the
same weights and prompts, reported as ratios.

  continuous batching  32 closed-loop clients (each sends its next request when the last
                       one ends) with mixed prompt and output lengths vs one request at a time
  vs transformers      HF `generate` on the exported weights, padded batches, greedy
  vs bare forward      the engine's forward (same packing, KV pool and attention) in a
                       plain loop, plans prebuilt, no scheduler, sampler or bookkeeping:
                       the practical limit. Step time: the engine's steps and the bare
                       loop's in turn on one thread (64 sequences). Served: the same batch
                       through a started engine read by asyncio clients (no target)
  prefix cache         time to first token with a warm vs cold 512-token system prompt
  KV capacity          sequences that fit a KV budget: paged blocks vs contiguous
                       max-length reservation

Writes engine.json and engine_throughput.png (tokens/s against concurrency) to --out.
Also runnable as `python -m bench.engine`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.model import GPT
from gpt.openmp import release_thread_pool
from gpt.tokenizer import SolTokenizer
from server.engine.blocks import blocks_for

TARGETS: dict[str, tuple[str, float] | None] = {
    "continuous_vs_one_at_a_time": (">=", 6.0),
    "engine_vs_hf_generate": (">=", 2.0),
    "engine_vs_bare_forward": (">=", 0.9),      # the overhead limit: within 10% of a bare forward
    # The same batch read by 64 asyncio readers on the engine's process, as the server
    # reads it: what the readers' share of the GIL and the cores adds (no target: see
    # run_engine and the README).
    "served_vs_bare_forward": None,
    "prefix_ttft_warm_over_cold": ("<=", 0.25),
    "kv_capacity_vs_contiguous": (">=", 3.0),
}


@dataclass
class Work:
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class BenchResult:
    setup: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)


# --- model and workload ---------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> tuple[GPT, SolTokenizer, str, list[str]]:
    from training.data.corpus import build_corpus

    corpus = build_corpus(max_bytes=2 << 20)
    texts = corpus.heldout or corpus.train
    if args.model:
        from gpt.checkpoint import load_checkpoint
        from gpt.registry import Registry

        resolved = Registry(args.registry).resolve(args.model)
        ckpt = load_checkpoint(resolved.path, torch.device("cpu"), torch.float32)
        return ckpt.model.eval(), ckpt.tokenizer, f"{args.model} ({resolved.path})", texts
    from gpt.config import preset
    from gpt.tokenizer import train_tokenizer

    config = preset(args.preset)
    tokenizer = train_tokenizer(corpus.train, vocab_size=config.vocab_size, show_progress=False)
    # The context is widened so a 512-token system prompt plus a question fits; RoPE
    # needs no other change. Weights are random: throughput does not depend on them.
    config = config.replace(vocab_size=tokenizer.vocab_size, max_seq_len=max(config.max_seq_len, 1024))
    torch.manual_seed(args.seed)
    return GPT(config).eval(), tokenizer, f"{args.preset} preset, random init, context {config.max_seq_len}", texts


def token_stream(tokenizer: SolTokenizer, texts: list[str], need: int) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
        if len(ids) >= need:
            break
    while len(ids) < need:
        ids += ids or [1]
    return ids


def mixed_workload(stream: list[int], n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int) -> list[Work]:
    rng = random.Random(seed)
    work = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        start = rng.randint(0, len(stream) - length - 1)
        work.append(Work(stream[start:start + length], rng.randint(*output_range)))
    return work


# --- measurements -----------------------------------------------------------------------------
def _dtype(model: GPT) -> torch.dtype:
    return next(model.parameters()).dtype


# Rounds of the paired steps and of the served engine on the same batch.
BARE_ROUNDS = 3

# EngineConfig fields every engine of the run shares (set from the command line).
ENGINE_SETTINGS: dict[str, Any] = {}


def _engine(model: GPT, tokenizer: SolTokenizer, start: bool = True, **config: Any):
    """An engine with the run's settings; `start=False`: a synchronous one, stepped on
    the calling thread."""
    from server.engine.config import EngineConfig
    from server.engine.offline import build_engine

    config = {**ENGINE_SETTINGS, **config}
    config.setdefault("device", "cpu")
    config.setdefault("dtype", _dtype(model))
    config.setdefault("num_blocks", 1024)
    return build_engine(model, EngineConfig(**config), start=start)


def run_engine(engine, work: list[Work], clients: int | None = None) -> dict[str, float]:
    """Serve `work` with `clients` closed-loop clients (each submits its next request when
    the previous one finishes; default: everything at once). Greedy with EOS ignored, so
    every request produces exactly max_tokens.

    The clients are coroutines on one asyncio loop, reading their streams as the server's
    loop does (`next_batch`): a blocked reader thread per client would wake on every step
    (64 threads on 2 cores) and take cores from the engine's OpenMP team."""
    import asyncio

    from server.engine.api import EngineRequest, RequestFinished, SamplingParams

    todo = list(reversed(work))
    produced: list[int] = []

    async def client() -> None:
        while todo:
            w = todo.pop()
            params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True)
            stream = engine.submit(EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=w.prompt_ids,
                                                 params=params))
            # Batches of events, one wake-up each, as the server's request path reads them.
            while events := await stream.next_batch():
                produced.extend(e.usage.completion_tokens for e in events if isinstance(e, RequestFinished))

    async def main() -> None:
        await asyncio.gather(*(client() for _ in range(clients or len(work))))

    start, cpu_start = time.perf_counter(), time.process_time()
    asyncio.run(main())
    return _rates(sum(produced), time.perf_counter() - start, time.process_time() - cpu_start)


def _rates(tokens: int, seconds: float, cpu_seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds}


def throughput_sweep(model: GPT, tokenizer: SolTokenizer, work: list[Work], levels: list[int],
                     per_level: dict[int, int]) -> list[dict[str, float]]:
    rows = []
    release_thread_pool()   # the engines' teams are then the only ones (see the bare loop's rounds)
    for c in levels:
        subset = work[:per_level.get(c, len(work))]
        engine = _engine(model, tokenizer, max_num_seqs=c, num_blocks=_blocks_for(work, 16) + 16)
        try:
            run = run_engine(engine, subset, clients=c)
        finally:
            engine.shutdown()
        rows.append({"concurrency": c, "requests": len(subset), **run})
        print(f"  concurrency {c:>3}: {run['tokens_per_s']:8.1f} tok/s wall, {run['tokens_per_cpu_s']:8.1f} tok/cpu-s "
              f"({len(subset)} requests)", flush=True)
    return rows


def _blocks_for(work: list[Work], block_size: int) -> int:
    return sum(blocks_for(len(w.prompt_ids) + w.max_tokens, block_size) for w in work)


@torch.inference_mode()
def hf_generate(model: GPT, tokenizer: SolTokenizer, work: list[Work], batch_size: int) -> dict[str, float]:
    """transformers' generate on the same weights and requests: left-padded batches of
    `batch_size` in arrival order, greedy; each batch runs until its longest request is
    done (static batching). Only each request's own max_tokens count as output."""
    import transformers

    from gpt.hf import hf_config, to_hf_state

    cfg = hf_config(model.config, tokenizer)
    cfg.pop("architectures", None)
    cfg.pop("torch_dtype", None)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    hf.load_state_dict(to_hf_state(model), strict=False)
    hf.tie_weights()
    hf.to(_dtype(model))
    useful = produced = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(work), batch_size):
        batch = work[i:i + batch_size]
        width = max(len(w.prompt_ids) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(batch):
            ids[row, width - len(w.prompt_ids):] = torch.tensor(w.prompt_ids)
            mask[row, width - len(w.prompt_ids):] = 1
        new = max(w.max_tokens for w in batch)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        produced += (out.shape[1] - width) * len(batch)
        useful += sum(w.max_tokens for w in batch)
    return {**_rates(useful, time.perf_counter() - start, time.process_time() - cpu_start),
            "tokens_generated_incl_padding": produced}


class BareLoop:
    """The practical limit: the engine's own forward (tokens packed into one row, the paged
    KV pool and the attention it would use) over a batch of equal prompts, then greedy
    decode, with every step's attention plan built up front. No scheduler, no sampler
    beyond argmax, no streams or bookkeeping: what is left between this and the engine is
    the engine's overhead. (A contiguous cache with SDPA instead measured the attention
    kernels, not the overhead: bf16 SDPA over a GQA cache took 40 ms per 64-sequence
    decode step where the paged kernel took 10, on an AVX-512 CPU without AMX.)"""

    def __init__(self, model: GPT, prompt: list[int], batch: int, new_tokens: int) -> None:
        from server.engine.kv_cache import PagedKVCache, RowSpec, plan_attention
        from server.engine.paged_attention import use_in_place

        block_size = 16
        per_row = blocks_for(len(prompt) + new_tokens, block_size)
        device = torch.device("cpu")
        in_place = use_in_place(ENGINE_SETTINGS.get("attention", "auto"), device)
        self.model = model
        self.cache = PagedKVCache(model.config, batch * per_row, block_size, device, _dtype(model), in_place=in_place)
        tables = [list(range(r * per_row, (r + 1) * per_row)) for r in range(batch)]
        self.plans = [plan_attention([RowSpec(0, len(prompt), t) for t in tables], block_size, device,
                                     _dtype(model), in_place)]
        self.plans += [plan_attention([RowSpec(len(prompt) + i, 1, t) for t in tables], block_size, device,
                                      _dtype(model), in_place) for i in range(new_tokens - 1)]
        self.last = torch.arange(1, batch + 1) * len(prompt) - 1        # each prompt's last packed token
        self.ids = torch.tensor(prompt * batch)[None]
        self.done = 0

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """The next step (the prefill, then one decode each): the batch's new tokens."""
        from server.engine.sampler import argmax_rows  # the engine's greedy pick, so both pay the same

        plan, first = self.plans[self.done], self.done == 0
        hidden = self.model.hidden_states(self.ids, plan.positions[None], self.cache.hook(plan))
        nxt = argmax_rows(self.model.lm_head(hidden[0, self.last] if first else hidden[0]).float())
        self.ids = nxt[None]
        self.done += 1
        return nxt


def bare_forward(model: GPT, prompt: list[int], batch: int, new_tokens: int,
                 keep_tokens: bool = False) -> dict[str, Any]:
    """The bare loop run through, timed. `keep_tokens` adds the generated ids (batch
    lists) to the result."""
    loop = BareLoop(model, prompt, batch, new_tokens)
    out: list[torch.Tensor] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        nxt = loop.step()
        if keep_tokens:
            out.append(nxt)
    result: dict[str, Any] = _rates(batch * new_tokens, time.perf_counter() - start, time.process_time() - cpu_start)
    if keep_tokens:
        result["token_ids"] = torch.stack(out, 1).tolist()
    return result


def paired_steps(model: GPT, tokenizer: SolTokenizer, prompt: list[int], batch: int,
                 new_tokens: int) -> dict[str, Any]:
    """The engine's step time against the bare loop's, step for step: a synchronous engine
    (as `offline.generate`, training and evaluation step it) and the bare loop take their
    steps in turn on this thread, each timed (for the engine, one whole iteration: taking
    submissions, scheduling, the forward, sampling, pushing events). Whatever the machine
    does to one step it does to its neighbour: on a shared machine two back-to-back runs
    of the same loop differ by up to 15%, a step and the next one far less. Both use the
    thread's OpenMP team and malloc arena, warm from the run so far, and fresh KV blocks
    in order, so only the step's own work differs."""
    from server.engine.api import EngineRequest, RequestFinished, SamplingParams

    loop = BareLoop(model, prompt, batch, new_tokens)
    engine = _engine(model, tokenizer, start=False, max_num_seqs=batch,
                     max_num_batched_tokens=max(512, batch * len(prompt)), enable_prefix_caching=False,
                     num_blocks=_blocks_for([Work(prompt, new_tokens)] * batch, 16) + 16)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    streams = engine.submit_many([EngineRequest(f"paired-{i}", list(prompt), params) for i in range(batch)])
    bare_s: list[float] = []
    engine_s: list[float] = []
    bare_cpu = engine_cpu = 0.0
    for _ in range(new_tokens):
        t0, c0 = time.perf_counter(), time.process_time()
        loop.step()
        t1, c1 = time.perf_counter(), time.process_time()
        if not engine.run_step():
            raise RuntimeError("the engine went idle before the bare loop's last step")
        t2, c2 = time.perf_counter(), time.process_time()
        bare_s.append(t1 - t0)
        engine_s.append(t2 - t1)
        bare_cpu += c1 - c0
        engine_cpu += c2 - c1
    if engine.run_step():
        raise RuntimeError("the engine took more steps than the bare loop (one prefill, then one decode per token)")
    tokens = sum(e.usage.completion_tokens for s in streams for e in s if isinstance(e, RequestFinished))
    if tokens != batch * new_tokens:
        raise RuntimeError(f"the engine made {tokens} tokens, not {batch * new_tokens}")
    return {
        "bare": _rates(tokens, sum(bare_s), bare_cpu),
        "engine": _rates(tokens, sum(engine_s), engine_cpu),
        # The target's ratio: time for the decode steps, 64 sequences decoding (the
        # prefill step, the same work for both, would dilute the overhead).
        "decode_ratio": sum(bare_s[1:]) / sum(engine_s[1:]),
        "prefill_ms": {"bare": bare_s[0] * 1e3, "engine": engine_s[0] * 1e3},
        "decode_step_ms_p50": {"bare": statistics.median(bare_s[1:]) * 1e3,
                               "engine": statistics.median(engine_s[1:]) * 1e3},
    }


def prefix_ttft(model: GPT, tokenizer: SolTokenizer, stream: list[int], repeats: int) -> dict[str, float]:
    """Time to first token for system prompt (512 tokens) + a short question: cold (no
    cache) vs warm (the system prompt's blocks cached by an earlier request)."""
    from server.engine.api import Delta, EngineRequest, SamplingParams

    # 512 tokens, or what the model's context leaves room for beside the question.
    system = stream[:min(512, model.config.max_seq_len - 24)]
    questions = [stream[600 + 40 * i: 620 + 40 * i] for i in range(repeats + 1)]

    def ttft(engine, prompt: list[int]) -> float:
        start = time.perf_counter()
        s = engine.submit(EngineRequest(request_id=uuid.uuid4().hex, prompt_ids=prompt,
                                        params=SamplingParams(temperature=0.0, max_tokens=1)))
        first = None
        for event in s:
            if first is None and isinstance(event, Delta):
                first = time.perf_counter() - start
        return first or float("nan")

    cold_engine = _engine(model, tokenizer, enable_prefix_caching=False, max_num_batched_tokens=1024)
    warm_engine = _engine(model, tokenizer, max_num_batched_tokens=1024)
    try:
        ttft(cold_engine, system + questions[0])          # warm-up of kernels, not of the cache
        ttft(warm_engine, system + questions[0])          # fills the prefix cache
        cold = [ttft(cold_engine, system + q) for q in questions[1:]]
        warm = [ttft(warm_engine, system + q) for q in questions[1:]]
    finally:
        cold_engine.shutdown()
        warm_engine.shutdown()
    return {"cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm),
            "system_prompt_tokens": len(system), "question_tokens": len(questions[1])}


def kv_capacity(model: GPT, work: list[Work], budget_bytes: int, block_size: int) -> dict[str, float]:
    """How many of the workload's sequences, at their final length, fit a KV budget:
    the real block allocator vs reserving the model's full context per sequence."""
    from server.engine.block_manager import BlockManager
    from server.engine.kv_cache import kv_bytes_per_block
    from server.engine.sequence import Sequence

    per_block = kv_bytes_per_block(model.config, block_size, _dtype(model))
    per_token = per_block // block_size
    blocks = BlockManager(budget_bytes // per_block, block_size)
    fitted = 0
    i = 0
    while True:
        w = work[i % len(work)]
        # Distinct first token per sequence so no prefix is shared: capacity from paging alone.
        tokens = [i % 7 + 1000] + w.prompt_ids + [0] * w.max_tokens
        seq = Sequence(request=None, index=0, token_ids=tokens, num_prompt_tokens=len(tokens), seed=0)
        if blocks.allocate(seq) is None:
            break
        fitted += 1
        i += 1
    contiguous = budget_bytes // (model.config.max_seq_len * per_token)
    exact = budget_bytes // (statistics.mean(len(w.prompt_ids) + w.max_tokens for w in work) * per_token)
    return {"budget_bytes": budget_bytes, "paged_sequences": fitted, "contiguous_max_len_sequences": contiguous,
            "contiguous_exact_len_sequences": int(exact)}


# --- report ---------------------------------------------------------------------------------
def draw(sweep: list[dict[str, float]], hf: dict[str, float], bare: dict[str, float], same: dict[str, float],
         served: dict[str, float], path: Path, rate: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["concurrency"] for r in sweep]
    ax.plot(xs, [r[rate] for r in sweep], marker="o", label="sol engine (max_num_seqs = concurrency)")
    ax.axhline(hf[rate], color="tab:red", ls="--", label=f"transformers generate, batch {hf['batch']}")
    ax.axhline(bare[rate], color="tab:green", ls=":",
               label=f"bare forward loop, batch {bare['batch']} (uniform lengths)")
    ax.plot([bare["batch"]], [same[rate]], marker="*", ms=12, ls="none", color="tab:green",
            label="sol engine's steps on the same batch (paired with the bare loop's)")
    ax.plot([bare["batch"]], [served[rate]], marker="P", ms=10, ls="none", color="tab:purple",
            label="the same, read by asyncio clients (as served)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / CPU-second" if rate == "tokens_per_cpu_s" else "generated tokens / s")
    ax.set_title(f"sol engine throughput vs concurrency (CPU, {title})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: BenchResult) -> None:
    print()
    print(f"{'ratio (' + result.setup['clock'] + ' clock)':<30} {'value':>10} {'target':>10}  ok")
    for name, value in result.ratios.items():
        goal = TARGETS[name]
        if goal is None:
            print(f"{name:<30} {value:>10.3f} {'-':>10}")
            continue
        op, target = goal
        ok = value >= target if op == ">=" else value <= target
        print(f"{name:<30} {value:>10.3f} {op + ' ' + str(target):>10}  {'yes' if ok else 'NO'}")
    m = result.measurements
    print(f"{'kv_bytes_per_token':<30} {m['kv_bytes_per_token']:>10}")
    print(f"{'peak_rss_mib':<30} {m['peak_rss_mib']:>10.0f}")


def default_out() -> Path:
    return Path(os.environ.get("SOL_HOME") or Path.home() / ".sol") / "bench" / "engine"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    ENGINE_SETTINGS["attention"] = args.attention
    t0 = time.perf_counter()
    model, tokenizer, model_desc, texts = build_model(args)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    stream = token_stream(tokenizer, texts, 20000)
    quick = args.quick
    n = args.concurrency
    total = args.requests or n * (2 if quick else 3)
    ctx = model.config.max_seq_len
    output_range = (16, 64) if quick else (32, 128)
    output_range = (min(output_range[0], ctx // 4), min(output_range[1], ctx // 4))
    prompt_range = (16, min(128 if quick else 256, ctx - output_range[1]))
    work = mixed_workload(stream, total, prompt_range, output_range, args.seed)
    # On a shared machine wall time measures the neighbours as much as sol. With one
    # thread, process CPU time is the time the same work takes on a dedicated core; with
    # several, idle spinning would count, so wall time is used.
    clock = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    rate = "tokens_per_cpu_s" if clock == "cpu" else "tokens_per_s"
    result = BenchResult(setup={
        "model": model_desc, "parameters": model.num_parameters(), "threads": torch.get_num_threads(),
        "device": "cpu", "dtype": str(_dtype(model)).removeprefix("torch."), "concurrency": n, "requests": total,
        "prompt_tokens_range": prompt_range,
        "output_tokens_range": output_range, "quick": quick, "torch": torch.__version__,
        "clock": clock, "load_average_at_start": os.getloadavg()[0], "attention": args.attention,
    })
    print(f"sol bench engine: {model_desc}, {model.num_parameters() / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads, {total} requests from {n} closed-loop clients", flush=True)

    # Warm-up: first calls allocate and pick kernels.
    warm = _engine(model, tokenizer)
    run_engine(warm, work[:4])
    warm.shutdown()

    print("throughput vs concurrency:", flush=True)
    levels = [1, 4, 16, n] if quick else [1, 2, 4, 8, 16, n]
    levels = sorted(set(levels))
    # Low concurrency is slow; a prefix of the workload gives its rate.
    per_level = {1: 4 if quick else 8, 2: 8 if quick else 16}
    result.sweep = throughput_sweep(model, tokenizer, work, levels, per_level)
    by_c = {r["concurrency"]: r for r in result.sweep}
    continuous = by_c[n][rate]
    result.ratios["continuous_vs_one_at_a_time"] = continuous / by_c[1][rate]

    print("transformers generate (padded batches)...", flush=True)
    hf = hf_generate(model, tokenizer, work, batch_size=n)
    hf["batch"] = n
    result.measurements["hf_generate"] = hf
    result.ratios["engine_vs_hf_generate"] = continuous / hf[rate]

    print("bare forward loop vs engine at the same batch size...", flush=True)
    uniform_prompt, uniform_new = (64, 48) if quick else (128, 96)
    uniform_new = min(uniform_new, ctx - uniform_prompt)
    prompt = stream[:uniform_prompt]
    paired_runs: list[dict[str, Any]] = []
    served_runs: list[dict[str, float]] = []
    uniform = [Work(list(prompt), uniform_new) for _ in range(n)]
    for _ in range(BARE_ROUNDS):
        paired_runs.append(paired_steps(model, tokenizer, prompt, n, uniform_new))
        # Served: a started engine read by asyncio clients, warmed first (a new stepping
        # thread's first steps pay for a new OpenMP team and first-touch pages in a new
        # malloc arena: a cold engine's 64-prompt prefill took 470 ms where the bare
        # loop's took 300), with room for the warm-up's blocks and then fresh ones in order.
        # One OpenMP team on the cores at a time: with a second team alive (the main
        # thread's beside the stepping thread's, or an idle engine thread's) libgomp has
        # more threads than cores and puts idle workers to sleep, so every op pays a
        # wake-up (gpt/openmp.py; the bare loop ran 40% slower beside an idle engine). The
        # main thread gives its team back, as a server's loading thread does, and the
        # engine (and its thread's team) is gone before the next round.
        release_thread_pool()
        engine = _engine(model, tokenizer, max_num_seqs=n, max_num_batched_tokens=max(512, n * uniform_prompt),
                         enable_prefix_caching=False,
                         num_blocks=2 * _blocks_for(uniform, 16) + 16)
        try:
            run_engine(engine, [Work(list(prompt), 2) for _ in range(n)])
            served_runs.append(run_engine(engine, uniform))
        finally:
            engine.shutdown()
    # The median round of the paired ratio (pairing already cancels the machine's drift;
    # the median drops a round that a burst of other work hit on one side).
    step_ratios = [r["decode_ratio"] for r in paired_runs]
    paired = sorted(paired_runs, key=lambda r: r["decode_ratio"])[len(paired_runs) // 2]
    bare = max((r["bare"] for r in paired_runs), key=lambda r: r[rate])
    bare["batch"] = n
    served = max(served_runs, key=lambda r: r[rate])
    served["rounds"] = [r[rate] for r in served_runs]
    result.measurements["paired_steps"] = {"median_round": paired, "ratio_rounds": step_ratios}
    result.measurements["bare_forward"] = bare
    result.measurements["served_same_batch"] = served
    result.ratios["engine_vs_bare_forward"] = statistics.median(step_ratios)
    # Throughput of the whole batch through the served engine against the bare loop's
    # best round: this one includes the readers' share of the GIL and the cores.
    result.ratios["served_vs_bare_forward"] = served[rate] / bare[rate]
    same = paired["engine"]

    print("prefix cache time to first token...", flush=True)
    release_thread_pool()
    ttft = prefix_ttft(model, tokenizer, stream, repeats=3 if quick else 5)
    result.measurements["prefix_cache"] = ttft
    result.ratios["prefix_ttft_warm_over_cold"] = ttft["warm_ttft_s"] / ttft["cold_ttft_s"]

    cap = kv_capacity(model, work, budget_bytes=args.kv_budget_mib << 20, block_size=16)
    result.measurements["kv_capacity"] = cap
    result.ratios["kv_capacity_vs_contiguous"] = cap["paged_sequences"] / max(1, cap["contiguous_max_len_sequences"])

    result.measurements["kv_bytes_per_token"] = model.config.kv_bytes_per_token(
        torch.empty((), dtype=_dtype(model)).element_size())
    result.measurements["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.measurements["wall_s"] = time.perf_counter() - t0
    (out / "engine.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    draw(result.sweep, hf, bare, same, served, out / "engine_throughput.png", rate, result.setup["dtype"])
    print_table(result)
    print(f"\nwrote {out / 'engine.json'} and {out / 'engine_throughput.png'} "
          f"({result.measurements['wall_s']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.commands import engine_arguments

    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    engine_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
