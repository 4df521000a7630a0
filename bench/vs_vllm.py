"""`sol bench vs-vllm`: sol against vLLM's CPU build on the same weights, side by side in
one run, reported as sol/vLLM ratios.

  offline  vLLM's `LLM.generate` (a subprocess in vLLM's own venv) vs sol's engine driven
           in-process (a fresh spawned process; the engine on its own thread, as
           `server.engine.offline.generate` runs it): every request submitted at once, wall
           time to the last token
  online   `vllm serve` (OpenAI HTTP, SSE) vs `sol serve` (gRPC), N closed-loop streaming
           clients each

In both modes the two engines are loaded at once and their rounds alternate (the one not
measured sits idle; each round starts once both are idle), so that a slow stretch of a
shared machine lands on both.

Both get the same Hugging Face export of one random sol checkpoint, the same prompt token
ids, greedy, exactly T new tokens (EOS ignored), the same cores (CPU affinity, inherited
by every subprocess) and the same thread counts. Prints tokens/s, TTFT and ITL
percentiles, sol/vLLM ratios and the share of greedy tokens on which the two agree.
Writes vs_vllm.json and vs_vllm.png to --out.

vLLM lives in .bench/vllm-venv (`bash scripts/setup-vllm.sh`); sol never imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import random
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vllm_stats import (
    Shape,
    agreement,
    best_round,
    latency_summary,
    mixed_shapes,
    per_request_tpot,
    ratio,
    sol_over_vllm,
    uniform_shapes,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".bench" / "vllm-venv"
DEFAULT_CT2_VENV = ROOT / ".bench" / "ct2-venv"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
MODELS = ("small", "demo", "smollm2")
RATIO_KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms")


@dataclass
class Request:
    prompt_ids: list[int]
    new_tokens: int


@dataclass
class Prepared:
    """One random model: its sol checkpoint (served by sol), its Hugging Face export
    (loaded by vLLM) and what the workloads need."""

    name: str
    description: str
    parameters: int
    context: int
    registry: Path
    ref: str
    ckpt_path: Path
    hf_dir: Path
    kv_bytes_per_token_fp32: int


# --- models ---------------------------------------------------------------------------------
def model_config(name: str):
    """(config, tokenizer vocabulary) for `small` (gpt.config, 11M) or `demo` (the cpu
    pipeline preset's model, 0.87M)."""
    from gpt.config import preset
    from training.presets import PRESETS

    if name == "small":
        return preset("small"), preset("small").vocab_size
    if name == "demo":
        p = PRESETS["cpu"]()
        return p.model_config(p.vocab_size), p.vocab_size
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def lively_init(model, seed: int) -> None:
    """Re-draw the weights so greedy decoding depends on the context: sol's training init
    (std 0.02 everywhere) gives near-uniform logits whose argmax is one token repeated,
    which would make the agreement check pass for any engine. Scaled like a trained model
    instead: embeddings std 0.5, matrices std 1/sqrt(fan_in). Throughput does not depend
    on the values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.5 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def prepare_imported(name: str, work: Path, corpus_texts: list[str], seed: int, shape=None) -> tuple[Prepared, Any]:
    """A model users bring: a random-weight Llama checkpoint of SmolLM2-135M's shape saved
    by transformers with its own tokenizer (bench/hf_checkpoint.py), imported into sol as
    `sol import-hf` does. vLLM and CTranslate2 read the transformers directory itself."""
    from bench.hf_checkpoint import SMOLLM2_135M, build_checkpoint
    from gpt.hf import import_hf, tokenizer_files
    from gpt.registry import Registry, publish_checkpoint

    shape = shape or SMOLLM2_135M
    hf_dir = build_checkpoint(work / f"hf-{name}", shape, corpus_texts, seed)
    model, tokenizer = import_hf(hf_dir)
    registry = Registry(work / "registry")
    resolved = publish_checkpoint(registry, f"vsvllm-{name}", model, tokenizer,
                                  {"stage": "imported", "source": str(hf_dir), "family": model.config.family},
                                  tokenizer_files=tokenizer_files(hf_dir))
    config = model.config
    prepared = Prepared(
        name=name, description=f"{name}: Llama checkpoint saved by transformers, imported; {config.n_layers} "
        f"layers, d_model {config.d_model}, {shape.num_attention_heads}/{shape.num_key_value_heads} heads, "
        f"d_ff {shape.intermediate_size}, vocab {config.vocab_size} (tokenizer {tokenizer.vocab_size}), tied, "
        f"context {config.max_seq_len}, random weights (seed {seed})",
        parameters=model.num_parameters(), context=config.max_seq_len, registry=registry.root,
        ref=f"{resolved.name}@{resolved.version}", ckpt_path=Path(resolved.path), hf_dir=hf_dir,
        kv_bytes_per_token_fp32=config.kv_bytes_per_token(4))
    del model
    return prepared, tokenizer


def prepare_model(name: str, work: Path, corpus_texts: list[str], seed: int) -> tuple[Prepared, Any]:
    import torch

    if name == "smollm2":
        return prepare_imported(name, work, corpus_texts, seed)

    from gpt.checkpoint import load_checkpoint
    from gpt.hf import export_hf
    from gpt.model import GPT
    from gpt.registry import Registry, publish_checkpoint
    from gpt.tokenizer import train_tokenizer

    config, vocab = model_config(name)
    tokenizer = train_tokenizer(corpus_texts, vocab_size=vocab, show_progress=False)
    config = config.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = GPT(config).eval()
    lively_init(model, seed)
    registry = Registry(work / "registry")
    resolved = publish_checkpoint(registry, f"vsvllm-{name}", model, tokenizer, {"stage": "base"})
    # Export what sol serves (the published checkpoint, read back), as `sol export-hf` does.
    ckpt = load_checkpoint(resolved.path, device="cpu")
    hf_dir = work / f"hf-{name}"
    export_hf(ckpt.model, ckpt.tokenizer, hf_dir)
    prepared = Prepared(
        name=name, description=f"{name}: {config.n_layers} layers, d_model {config.d_model}, "
        f"vocab {config.vocab_size}, context {config.max_seq_len}, random weights (seed {seed})",
        parameters=model.num_parameters(), context=config.max_seq_len, registry=registry.root,
        ref=f"{resolved.name}@{resolved.version}", ckpt_path=Path(resolved.path), hf_dir=hf_dir,
        kv_bytes_per_token_fp32=config.kv_bytes_per_token(4))
    return prepared, ckpt.tokenizer


# --- workloads ------------------------------------------------------------------------------
def token_stream(tokenizer, texts: list[str], need: int) -> list[int]:
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
        if len(ids) >= need:
            break
    return ids


def stable_prompt(tokenizer, stream: list[int], length: int, rng: random.Random) -> list[int]:
    """`length` ids whose text encodes back to the same ids: the online sol client sends
    text (sol's Completion API takes a string) and vLLM gets ids, so both must see the
    same tokens. A window cut inside a merge or a UTF-8 sequence does not round-trip;
    another window is tried."""
    ids: list[int] = []
    for _ in range(200):
        start = rng.randint(0, len(stream) - length - 1)
        ids = stream[start:start + length]
        if tokenizer.encode(tokenizer.decode(ids)) == ids:
            return ids
    raise RuntimeError(f"no window of {length} tokens round-trips through the tokenizer")


def build_workloads(args: argparse.Namespace, context: int, tokenizer, texts: list[str]) -> dict[str, list[Request]]:
    stream = token_stream(tokenizer, texts, 60_000)
    rng = random.Random(args.seed)
    shapes: dict[str, list[Shape]] = {}
    if args.workload in ("uniform", "all"):
        new = min(args.uniform_new, context // 2)
        shapes["uniform"] = uniform_shapes(args.uniform_requests, min(args.uniform_prompt, context - new), new)
    if args.workload in ("mixed", "all"):
        scale = 0.5 if args.quick else 1.0
        shapes["mixed"] = mixed_shapes(args.mixed_requests, args.seed, context, prompt_median=48 * scale,
                                       new_median=48 * scale)
    return {name: [Request(stable_prompt(tokenizer, stream, s.prompt_len, rng), s.new_tokens) for s in ss]
            for name, ss in shapes.items()}


def warmup_requests(tokenizer, texts: list[str], seed: int) -> list[Request]:
    """A few requests of other text (so they warm kernels, not the prefix cache)."""
    stream = token_stream(tokenizer, list(reversed(texts)), 4000)
    rng = random.Random(seed + 1)
    return [Request(stable_prompt(tokenizer, stream, 24 + 8 * i, rng), 16) for i in range(4)]


def _wire(requests: list[Request]) -> list[list[Any]]:
    return [[r.prompt_ids, r.new_tokens] for r in requests]


# --- environment ----------------------------------------------------------------------------
def pin(cores: list[int], threads: int) -> dict[str, str]:
    """Pin this process (and so every subprocess: affinity is inherited) to `cores`, and
    set the thread environment both engines read. Returns what was set."""
    os.sched_setaffinity(0, cores)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           # vLLM's CPU worker binds its OpenMP threads to these cores itself.
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
           "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    return env


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_space_gib), "VLLM_LOGGING_LEVEL": "WARNING",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if TCMALLOC.exists():
        # vLLM's CPU docs: preload tcmalloc (its allocator is faster for the many small
        # per-step tensors). sol's side runs with glibc malloc, as `sol serve` does.
        env["LD_PRELOAD"] = ":".join(x for x in (str(TCMALLOC), env.get("LD_PRELOAD", "")) if x)
    return env


def vllm_python(args: argparse.Namespace) -> Path:
    py = Path(args.vllm_venv) / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_venv}; run `bash scripts/setup-vllm.sh` first")
    return py


def load_average() -> float:
    return os.getloadavg()[0]


# --- offline --------------------------------------------------------------------------------
def _sol_offline_child(conn, ckpt_path: str, dtype: str, threads: int, max_num_seqs: int,
                       max_num_batched_tokens: int, warmup: list[list[Any]]) -> None:
    """In a fresh process: sol's engine on its own thread, as `server.engine.offline.generate`
    runs it (submit everything, read every stream to the end), the in-process counterpart
    of `LLM.generate`. Not the synchronous mode (run_until_idle on the caller's thread):
    on the main thread with 2 torch threads it ran 10-40x slower on a loaded machine.

    A round server on `conn`: sends its facts once warm, then runs one round per list of
    requests received, until None (then sends its peak RSS)."""
    import torch

    from gpt.checkpoint import load_checkpoint
    from server.engine.api import Delta, EngineRequest, RequestFinished, SamplingParams
    from server.engine.config import EngineConfig
    from server.engine.offline import build_engine

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # Read straight into the dtype it runs in, as `sol serve` does (no fp32 copy in its peak RSS).
    ckpt = load_checkpoint(Path(ckpt_path), device="cpu", dtype=getattr(torch, dtype))
    engine = build_engine(ckpt.model, EngineConfig(
        device="cpu", dtype=getattr(torch, dtype), max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens))
    load_s = time.perf_counter() - t0
    counter = iter(range(1 << 30))
    # Steps the engine ran: counted here, around its step, so the engine keeps no counter.
    steps = [0]
    step = engine.step

    def counted_step() -> None:
        steps[0] += 1
        step()

    engine.step = counted_step

    def run(requests: list[list[Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        # Together, as LLM.generate adds every request before its first step.
        streams = engine.submit_many([EngineRequest(f"r{next(counter)}", ids, SamplingParams(
            temperature=0.0, max_tokens=new, ignore_eos=True)) for ids, new in requests])
        events = [list(s) for s in streams]   # each blocks until its request is done
        wall = time.perf_counter() - start
        rows = []
        for evs in events:
            ids: list[int] = []
            timings = None
            for ev in evs:
                if isinstance(ev, Delta):
                    ids += ev.token_ids
                elif isinstance(ev, RequestFinished):
                    timings = ev.timings
            ttft = tpot = None
            if timings is not None and timings.first_token is not None:
                ttft = timings.first_token - timings.arrival
                tpot = per_request_tpot(timings.first_token, timings.finished or timings.first_token, len(ids))
            rows.append({"token_ids": ids, "ttft_s": ttft, "tpot_s": tpot})
        return {"wall_s": wall, "tokens": sum(len(r["token_ids"]) for r in rows), "requests": rows}

    run(warmup)
    conn.send({"load_s": load_s, "kv_bytes_per_token": engine.model.config.kv_bytes_per_token(
        engine.cache.pool.element_size()), "kv_blocks": engine.blocks.num_blocks})
    while (requests := conn.recv()) is not None:
        steps0 = steps[0]
        conn.send({**run(requests), "steps": steps[0] - steps0})
    engine.shutdown()
    conn.send({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


@dataclass
class OfflineWorker:
    """An engine loaded in its own process, running one offline round per call."""

    name: str
    facts: dict[str, Any]
    run: Callable[[list[Request]], dict[str, Any]]
    cpu_s: Callable[[], float]
    # VmHWM of its processes (summed over a group), read while they live.
    peak_rss_mib: Callable[[], float]


@contextlib.contextmanager
def sol_offline_worker(args: argparse.Namespace, m: Prepared, dtype: str,
                       warmup: list[Request]) -> Iterator[OfflineWorker]:
    import multiprocessing

    from bench.serve import _cpu_seconds

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sol_offline_child, args=(child, str(m.ckpt_path), DTYPES[dtype], args.threads,
                                                       args.max_num_seqs, args.max_num_batched_tokens,
                                                       _wire(warmup)), daemon=True)
    proc.start()

    def receive() -> dict[str, Any]:
        _await_answer(parent.poll, proc.is_alive, "sol's offline worker", args.vllm_timeout_s)
        return parent.recv()

    try:
        facts = receive()

        def run(requests: list[Request]) -> dict[str, Any]:
            parent.send(_wire(requests))
            return receive()

        yield OfflineWorker("sol", facts, run, lambda: _cpu_seconds(proc.pid or 0),
                            lambda: _peak_rss_mib(proc.pid or 0))
        parent.send(None)
        facts.update(receive())
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _await_answer(ready: Callable[[float], bool], alive: Callable[[], bool], who: str, timeout_s: float) -> None:
    """Wait until a worker's answer can be read (`ready(seconds)` waits up to that long);
    RuntimeError when the worker dies or takes longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ready(1.0):
        if not alive():
            raise RuntimeError(f"{who} died")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{who} gave no answer in {timeout_s:g} s")


@contextlib.contextmanager
def vllm_offline_worker(args: argparse.Namespace, m: Prepared, dtype: str, warmup: list[Request],
                        work: Path) -> Iterator[OfflineWorker]:
    spec = {"model_dir": str(m.hf_dir), "dtype": DTYPES[dtype], "max_model_len": m.context,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "enforce_eager": args.enforce_eager, "warmup": _wire(warmup)}
    with _subprocess_worker(args, "vllm", vllm_python(args), "vllm_offline_worker.py", spec, vllm_env(args),
                            work / f"vllm-offline-{m.name}-{dtype}") as worker:
        yield worker


def ct2_python(args: argparse.Namespace) -> Path | None:
    """CTranslate2's venv Python, None where there is none (the anchor is then left out)."""
    py = Path(args.ct2_venv) / "bin" / "python"
    return py if args.ct2_venv and py.exists() else None


def ct2_convert(args: argparse.Namespace, m: Prepared, dtype: str, work: Path) -> Path:
    """The Hugging Face directory converted by CTranslate2's transformers converter, in a
    process of its own (the converter loads the model with transformers)."""
    out = work / f"ct2-{m.name}-{dtype}"
    if not out.exists():
        converter = Path(args.ct2_venv) / "bin" / "ct2-transformers-converter"
        done = subprocess.run([str(converter), "--model", str(m.hf_dir), "--output_dir", str(out),
                               "--quantization", DTYPES[dtype], "--low_cpu_mem_usage"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"CTranslate2's converter failed on {m.hf_dir}:\n{done.stderr[-3000:]}")
    return out


@contextlib.contextmanager
def ct2_offline_worker(args: argparse.Namespace, m: Prepared, dtype: str, warmup: list[Request],
                       work: Path) -> Iterator[OfflineWorker]:
    python = ct2_python(args)
    assert python is not None
    spec = {"model_dir": str(ct2_convert(args, m, dtype, work)), "compute_type": DTYPES[dtype],
            "threads": args.threads, "warmup": _wire(warmup)}
    with _subprocess_worker(args, "ct2", python, "ct2_offline_worker.py", spec, {**os.environ},
                            work / f"ct2-offline-{m.name}-{dtype}") as worker:
        yield worker


@contextlib.contextmanager
def _subprocess_worker(args: argparse.Namespace, name: str, python: Path, script: str, spec: dict[str, Any],
                       env: dict[str, str], stem: Path) -> Iterator[OfflineWorker]:
    """Another engine's offline round server (bench/*_offline_worker.py) in its own venv's
    Python and its own session (so its subprocesses are counted and stopped with it)."""
    spec_path = stem.with_name(stem.name + ".json")
    log_path = stem.with_name(stem.name + ".log")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    # Rounds go in on the worker's stdin and results come back on a pipe of their own
    # (engines log to stdout and stderr), one JSON line each.
    read_fd, write_fd = os.pipe()
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(python), str(Path(__file__).with_name(script)), str(spec_path), str(write_fd)],
                            env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                            pass_fds=(write_fd,), start_new_session=True, text=True)
    os.close(write_fd)
    results = os.fdopen(read_fd, encoding="utf-8")
    assert proc.stdin is not None

    def failed(why: str) -> RuntimeError:
        return RuntimeError(f"{why}; log {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")

    def receive() -> dict[str, Any]:
        # One answer per request, one line each: the reader never buffers a line that
        # select cannot see.
        try:
            _await_answer(lambda s: bool(select.select([read_fd], [], [], s)[0]), lambda: proc.poll() is None,
                          f"{name}'s offline worker", args.vllm_timeout_s)
        except RuntimeError as err:
            raise failed(str(err)) from None
        line = results.readline()
        if not line:
            proc.wait(30)
            raise failed(f"{name}'s offline worker ended ({proc.returncode})")
        return json.loads(line)

    def run(requests: list[Request]) -> dict[str, Any]:
        proc.stdin.write(json.dumps(_wire(requests)) + "\n")
        proc.stdin.flush()
        return receive()

    try:
        yield OfflineWorker(name, receive(), run, lambda: _group_cpu_seconds(proc.pid),
                            lambda: _group_peak_rss_mib(proc.pid))
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
        results.close()
        log.close()


def summarize_offline(run: dict[str, Any]) -> dict[str, float]:
    """Offline: tokens/s over the whole batch, TTFT per request from submission, and ITL as
    each request's mean time per output token after the first (TPOT)."""
    rows = run["requests"]
    ttft = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in rows if r["tpot_s"] is not None]
    return {"tokens_per_s": run["tokens"] / run["wall_s"], "tokens": run["tokens"], "wall_s": run["wall_s"],
            "requests": len(rows), **latency_summary(ttft, "ttft"), **latency_summary(tpot, "itl"),
            "rounds_tokens_per_s": run.get("rounds_tokens_per_s", [])}


# --- online ---------------------------------------------------------------------------------
def _closed_loop(clients: int, requests: list[Request], one) -> tuple[float, list[Any]]:
    return asyncio.run(_closed_loop_async(clients, requests, one))


def summarize_online(wall_s: float, results: list[tuple[float, list[tuple[float, list[int]]]]]) -> dict[str, float]:
    """results: per request (start time, [(arrival, token ids of that message)]). ITL: the
    gaps between messages, a message of k tokens standing for k equal gaps."""
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    for start, arrivals in results:
        if not arrivals:
            continue
        ttft.append(arrivals[0][0] - start)
        tokens += sum(len(ids) for _, ids in arrivals)
        for (t0, _), (t1, ids) in zip(arrivals, arrivals[1:], strict=False):
            itl.extend([(t1 - t0) / len(ids)] * len(ids))
    return {"tokens_per_s": tokens / wall_s, "tokens": tokens, "wall_s": wall_s, "requests": len(results),
            **latency_summary(ttft, "ttft"), **latency_summary(itl, "itl")}


@dataclass
class OnlineServer:
    """A running server under test: `measure` runs one round of closed-loop streaming
    clients against it; `cpu_s` reads the server's CPU time."""

    name: str
    load_s: float
    run: Callable[[list[Request], int], tuple[float, list[Any]]]
    cpu_s: Callable[[], float]
    peak_rss_mib: Callable[[], float] = lambda: float("nan")

    def measure(self, requests: list[Request], clients: int) -> dict[str, Any]:
        cpu0 = self.cpu_s()
        wall, results = self.run(requests, clients)
        return {"wall_s": wall, "results": results, "tokens": _tokens(results), "server_cpu_s": self.cpu_s() - cpu0}


@contextlib.contextmanager
def sol_server(args: argparse.Namespace, m: Prepared, tokenizer, work: Path, dtype: str) -> Iterator[OnlineServer]:
    from bench.serve import _cpu_seconds, start_server, stop_server
    from client.aio import AsyncClient
    from client.client import Client

    admin_key = "sk-sol-admin-vs-vllm"
    home = work / f"sol-home-{m.name}-{dtype}"
    home.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    proc, target = start_server(home, m.registry, m.ref, "cpu", admin_key, work / f"sol-serve-{m.name}-{dtype}.log",
                                watch=False, dtype=DTYPES[dtype], extra_args=(
                                    "--max-num-seqs", str(args.max_num_seqs),
                                    "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                                    "--stream-interval", str(args.stream_interval)))
    load_s = time.perf_counter() - t0
    try:
        with Client(target, admin_key=admin_key) as admin:
            key, _ = admin.create_key("vs-vllm")

        def make_one(client: AsyncClient):
            async def one(r: Request) -> tuple[float, list[tuple[float, list[int]]]]:
                start = time.perf_counter()
                arrivals = []
                async for chunk in client.complete_stream(tokenizer.decode(r.prompt_ids), model=m.ref,
                                                          max_tokens=r.new_tokens, temperature=0.0,
                                                          ignore_eos=True):
                    ids = [t for d in chunk.deltas for t in d.token_ids]
                    if ids:
                        arrivals.append((time.perf_counter(), ids))
                return start, arrivals
            return one

        def run(requests: list[Request], clients: int) -> tuple[float, list[Any]]:
            async def main() -> tuple[float, list[Any]]:
                async with AsyncClient(target, api_key=key, retries=0, timeout=3600) as client:
                    return await _closed_loop_async(clients, requests, make_one(client))
            return asyncio.run(main())

        yield OnlineServer("sol", load_s, run, lambda: _cpu_seconds(proc.pid), lambda: _peak_rss_mib(proc.pid))
    finally:
        stop_server(proc)


async def _closed_loop_async(clients: int, requests: list[Request], one) -> tuple[float, list[Any]]:
    """`clients` workers take requests in order until none is left; (wall time, results by
    request index)."""
    results: list[Any] = [None] * len(requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one(requests[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0, results


def _tokens(results: list[tuple[float, list[tuple[float, list[int]]]]]) -> int:
    return sum(len(ids) for _, arrivals in results for _, ids in arrivals)


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process (Linux), NaN where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(args: argparse.Namespace, m: Prepared, work: Path, dtype: str = "fp32") -> Iterator[OnlineServer]:
    from bench.openai_stream import stream_completion, wait_healthy

    port = _free_port()
    # `vllm serve` itself fails in this install (its CLI looks up the distribution "vllm",
    # installed as "vllm-cpu"); the API server module takes the same arguments.
    cmd = [str(vllm_python(args)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(m.hf_dir),
           "--served-model-name", m.name, "--dtype", DTYPES[dtype], "--max-model-len", str(m.context),
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--stream-interval", str(args.stream_interval)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    log_path = work / f"vllm-serve-{m.name}-{dtype}.log"
    t0 = time.perf_counter()
    # Its own session, so the API server, engine core and worker go down together.
    proc = subprocess.Popen(cmd, env=vllm_env(args), stdout=open(log_path, "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        asyncio.run(wait_healthy("127.0.0.1", port, args.vllm_timeout_s, lambda: proc.poll() is None))

        async def one(r: Request) -> tuple[float, list[tuple[float, list[int]]]]:
            start = time.perf_counter()
            arrivals = await stream_completion("127.0.0.1", port, {
                "model": m.name, "prompt": r.prompt_ids, "max_tokens": r.new_tokens, "min_tokens": r.new_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True})
            return start, arrivals

        yield OnlineServer("vllm", time.perf_counter() - t0,
                           lambda requests, clients: _closed_loop(clients, requests, one),
                           lambda: _group_cpu_seconds(proc.pid), lambda: _group_peak_rss_mib(proc.pid))
    except Exception as err:
        raise RuntimeError(f"vLLM server run failed: {err}; log {log_path}:\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}") from err
    finally:
        _stop_group(proc)


def _group_peak_rss_mib(pgid: int) -> float:
    """The sum of VmHWM over the live processes of a process group (vLLM runs three): an
    upper bound of the group's peak, each process's peak taken at once."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    total += _peak_rss_mib(int(entry.name))
            except OSError:
                continue
    return total


def _group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (Linux /proc)."""
    from bench.serve import _cpu_seconds

    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    total += _cpu_seconds(int(entry.name))
            except OSError:        # gone meanwhile
                continue
    return total


def wait_until_idle(cpus: list[Callable[[], float]], window_s: float = 0.25, busy_cpu_s: float = 0.03,
                    timeout_s: float = 15.0) -> None:
    """Wait until none of the processes whose CPU time `cpus` read is working: vLLM's
    server kept a core busy for about a second after each burst of requests (0.25 CPU-s
    in every 0.25 s window, then 0), which would land on whichever engine runs next."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = [cpu() for cpu in cpus]
        time.sleep(window_s)
        if all(cpu() - b < busy_cpu_s for cpu, b in zip(cpus, before, strict=True)):
            return


def alternating_rounds(args: argparse.Namespace, runners: dict[str, Callable[[list[Request]], dict[str, Any]]],
                       cpus: list[Callable[[], float]], workloads: dict[str, list[Request]]) -> dict[str, dict[str, Any]]:
    """Every runner's rounds of each workload, alternating between the runners (the first
    of a round goes last in the next), so that a slow stretch of a shared machine lands
    on each; the best round of each runner. Each round starts once every process is idle
    (`cpus` read their CPU time)."""
    best: dict[str, dict[str, Any]] = {name: {} for name in runners}
    order = list(runners)
    for workload, requests in workloads.items():
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
        for i in range(max(1, args.rounds)):
            for name in (order if i % 2 == 0 else order[::-1]):
                wait_until_idle(cpus)
                rounds[name].append(runners[name](requests))
        for name in runners:
            best[name][workload] = best_round(rounds[name])
    return best


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group this benchmark started, then SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# --- report ---------------------------------------------------------------------------------
def compare(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        row["sol_over_vllm"] = sol_over_vllm(row["sol"], row["vllm"], RATIO_KEYS)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':6} {'dtype':5} {'workload':8} {'mode':7} | {'vLLM tok/s':>10} {'sol tok/s':>9} {'sol/vLLM':>8} | "
            f"{'TTFT p50 ms v/s':>17} | {'ITL p50 ms v/s':>15} | {'ITL p99 ms v/s':>15} | agree req/tok")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        v, s, a = r["vllm"], r["sol"], r["agreement"]
        print(f"{r['model']:6} {r['dtype']:5} {r['workload']:8} {r['mode']:7} | {v['tokens_per_s']:10.0f} "
              f"{s['tokens_per_s']:9.0f} {r['sol_over_vllm']['tokens_per_s']:8.2f} | "
              f"{v['ttft_p50_ms']:8.1f}/{s['ttft_p50_ms']:<8.1f} | {v['itl_p50_ms']:7.2f}/{s['itl_p50_ms']:<7.2f} | "
              f"{v['itl_p99_ms']:7.2f}/{s['itl_p99_ms']:<7.2f} | "
              f"{a['requests_identical']:.0%}/{a['tokens_agree']:.1%}")


def print_resources(rows: list[dict[str, Any]]) -> None:
    """Load time and peak RSS per engine beside vLLM's, and CTranslate2 where it ran."""
    head = (f"{'model':7} {'dtype':5} {'mode':7} | {'load s v/s':>11} {'sol/vLLM':>8} | {'peak RSS MiB v/s':>17} "
            f"{'sol/vLLM':>8} | {'CT2 tok/s':>9} {'sol/CT2':>7} {'CT2 load s':>10} {'CT2 RSS':>8}")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        v, s = r["vllm"], r["sol"]
        rss = "peak_rss_mib" if r["mode"] == "offline" else "server_peak_rss_mib"
        vl, sl, vr, sr = v.get("load_s", math.nan), s.get("load_s", math.nan), v.get(rss, math.nan), s.get(rss, math.nan)
        c = r.get("ct2")
        ct2 = (f"{c['tokens_per_s']:9.0f} {r['sol_over_ct2']['tokens_per_s']:7.2f} {c['load_s']:10.1f} "
               f"{c['peak_rss_mib']:8.0f}") if c else f"{'-':>9} {'-':>7} {'-':>10} {'-':>8}"
        print(f"{r['model']:7} {r['dtype']:5} {r['mode']:7} | {vl:5.1f}/{sl:<5.1f} {ratio(sl, vl):8.2f} | "
              f"{vr:8.0f}/{sr:<8.0f} {ratio(sr, vr):8.2f} | {ct2}")


def draw(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} {r['dtype']}\n{r['workload']} {r['mode']}" for r in rows]
    xs = range(len(rows))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(rows) + 2), 8), sharex=True)
    for ax, key, ylabel in ((top, "tokens_per_s", "generated tokens / s"), (bottom, "ttft_p50_ms", "TTFT p50 (ms)")):
        for shift, engine, color in ((-width / 2, "vllm", "tab:blue"), (width / 2, "sol", "tab:orange")):
            vals = [r[engine][key] for r in rows]
            bars = ax.bar([x + shift for x in xs], vals, width, label="vLLM CPU" if engine == "vllm" else "sol",
                          color=color)
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    bottom.set_yscale("log")
    top.legend()
    peak = max(max(r["vllm"]["tokens_per_s"], r["sol"]["tokens_per_s"]) for r in rows)
    top.set_ylim(0, peak * 1.22)   # room for the ratio above each pair
    for x, r in zip(xs, rows, strict=True):
        height = max(r["vllm"]["tokens_per_s"], r["sol"]["tokens_per_s"])
        top.annotate(f"sol/vLLM\nx{r['sol_over_vllm']['tokens_per_s']:.2f}", (x, height), xytext=(0, 12),
                     textcoords="offset points", ha="center", va="bottom", fontsize=8, weight="bold")
    bottom.set_xticks(list(xs), labels, fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ---------------------------------------------------------------------------------
def _selected(value: str, choices: tuple[str, ...]) -> list[str]:
    return list(choices) if value == "all" else [value]


def run(args: argparse.Namespace) -> int:
    import torch

    from training.data.corpus import build_corpus

    if args.quick:
        args.uniform_requests, args.uniform_prompt, args.uniform_new = 16, 64, 32
        args.mixed_requests = min(args.mixed_requests, 32)
        args.clients = min(args.clients, 8)
    available = sorted(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else available[:args.threads]
    args.threads = args.threads or len(cores)
    env_set = pin(cores, args.threads)
    torch.set_num_threads(args.threads)
    vllm_python(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    setup = {"cores": cores, "threads": args.threads, "env": env_set, "quick": args.quick, "clients": args.clients,
             "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
             "stream_interval": args.stream_interval,
             "vllm_kv_space_gib": args.kv_space_gib, "vllm_enforce_eager": args.enforce_eager,
             "tcmalloc_for_vllm": TCMALLOC.exists(), "torch": torch.__version__, "python": platform.python_version(),
             "cpu": _cpu_name(), "load_average_at_start": load_average(), "uptime_at_start": _uptime(),
             "rounds": args.rounds, "seed": args.seed, "command": " ".join(sys.argv)}
    print(f"sol vs vLLM: cores {cores}, {args.threads} threads, load {setup['load_average_at_start']:.2f}", flush=True)
    corpus = build_corpus(max_bytes=2 << 20)
    texts = corpus.heldout or corpus.train
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sol-vs-vllm-") as tmp:
        work = Path(tmp)
        for name in _selected(args.model, MODELS):
            m, tokenizer = prepare_model(name, work, corpus.train, args.seed)
            workloads = build_workloads(args, m.context, tokenizer, texts)
            warmup = warmup_requests(tokenizer, texts, args.seed)
            models[name] = {"description": m.description, "parameters": m.parameters,
                            "kv_bytes_per_token_fp32": m.kv_bytes_per_token_fp32,
                            "workloads": {k: {"requests": len(v), "prompt_tokens": sum(len(r.prompt_ids) for r in v),
                                              "new_tokens": sum(r.new_tokens for r in v),
                                              "prompt_lens": [len(r.prompt_ids) for r in v],
                                              "new_lens": [r.new_tokens for r in v]} for k, v in workloads.items()}}
            print(f"\n{m.description}; {m.parameters / 1e6:.2f}M parameters", flush=True)
            if args.mode in ("offline", "all"):
                for dtype in _selected(args.dtype, tuple(DTYPES)):
                    print(f"[{name} {dtype} offline] sol's engine and vLLM's LLM.generate, each in its own "
                          "process, rounds alternating...", flush=True)
                    with contextlib.ExitStack() as stack:
                        s = stack.enter_context(sol_offline_worker(args, m, dtype, warmup))
                        v = stack.enter_context(vllm_offline_worker(args, m, dtype, warmup, work))
                        workers = [s, v]
                        if with_ct2(args, dtype, skipped):
                            workers.append(stack.enter_context(ct2_offline_worker(args, m, dtype, warmup, work)))
                        best = alternating_rounds(args, {w.name: w.run for w in workers}, [w.cpu_s for w in workers],
                                                  workloads)
                        peaks = {w.name: w.peak_rss_mib() for w in workers}
                    for wl in workloads:
                        sw, vw = best["sol"][wl], best["vllm"][wl]
                        rows.append({"model": name, "dtype": dtype, "workload": wl, "mode": "offline",
                                     "sol": {**summarize_offline(sw), "steps": sw["steps"], "load_s": s.facts["load_s"],
                                             "peak_rss_mib": peaks["sol"],
                                             "kv_bytes_per_token": s.facts["kv_bytes_per_token"],
                                             "rounds_tokens_per_s": sw["rounds_tokens_per_s"]},
                                     "vllm": {**summarize_offline(vw), "load_s": v.facts["load_s"],
                                              "peak_rss_mib": peaks["vllm"],
                                              "rounds_tokens_per_s": vw["rounds_tokens_per_s"]},
                                     "engine_versions": {"vllm": v.facts["vllm"]},
                                     "agreement": agreement([r["token_ids"] for r in sw["requests"]],
                                                            [r["token_ids"] for r in vw["requests"]])})
                        if "ct2" in best:
                            cw = best["ct2"][wl]
                            rows[-1]["ct2"] = {**summarize_offline(cw), "load_s": workers[2].facts["load_s"],
                                               "peak_rss_mib": peaks["ct2"],
                                               "rounds_tokens_per_s": cw["rounds_tokens_per_s"]}
                            rows[-1]["engine_versions"]["ctranslate2"] = workers[2].facts["ctranslate2"]
                            rows[-1]["sol_over_ct2"] = {"tokens_per_s": ratio(
                                rows[-1]["sol"]["tokens_per_s"], rows[-1]["ct2"]["tokens_per_s"])}
                            rows[-1]["agreement_ct2"] = agreement([r["token_ids"] for r in sw["requests"]],
                                                                  [r["token_ids"] for r in cw["requests"]])
                        _progress(rows[-1])
            if args.mode in ("online", "all"):
                for dtype in _selected(args.dtype, tuple(DTYPES)):
                    print(f"[{name} {dtype} online] sol serve ({args.clients} gRPC clients) and vLLM's server "
                          f"({args.clients} HTTP clients), rounds alternating...", flush=True)
                    with sol_server(args, m, tokenizer, work, dtype) as sol, vllm_server(args, m, work, dtype) as vllm:
                        for server in (sol, vllm):
                            server.run(warmup, 4)
                        best = alternating_rounds(
                            args, {server.name: functools.partial(server.measure, clients=args.clients)
                                   for server in (sol, vllm)}, [sol.cpu_s, vllm.cpu_s], workloads)
                        sol_rss, vllm_rss = sol.peak_rss_mib(), vllm.peak_rss_mib()
                    for wl in workloads:
                        sw, vw = best["sol"][wl], best["vllm"][wl]
                        rows.append({"model": name, "dtype": dtype, "workload": wl, "mode": "online",
                                     "sol": {**summarize_online(sw["wall_s"], sw["results"]),
                                             "server_cpu_s": sw["server_cpu_s"], "server_peak_rss_mib": sol_rss,
                                             "load_s": sol.load_s,
                                             "rounds_tokens_per_s": sw["rounds_tokens_per_s"]},
                                     "vllm": {**summarize_online(vw["wall_s"], vw["results"]), "load_s": vllm.load_s,
                                              "server_peak_rss_mib": vllm_rss, "rounds_tokens_per_s": vw["rounds_tokens_per_s"]},
                                     "agreement": agreement(_online_ids(sw["results"]), _online_ids(vw["results"]))})
                        _progress(rows[-1])
    compare(rows)
    setup["load_average_at_end"] = load_average()
    setup["uptime_at_end"] = _uptime()
    setup["wall_s"] = time.perf_counter() - t_start
    setup["peak_rss_mib_bench_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"setup": setup, "models": models, "rows": rows, "skipped": skipped,
              "notes": {"offline_itl": "per-request mean time per output token after the first (TPOT)",
                        "online_itl": "gaps between streamed messages, per token",
                        "ratios": "sol / vLLM: above 1 is better for tokens_per_s, worse for latencies",
                        "agreement": "tokens_agree counts tokens before each request's first divergence"}}
    (out / "vs_vllm.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if rows:
        draw(rows, out / "vs_vllm.png", f"sol vs vLLM CPU build: cores {cores}, {args.threads} "
             f"threads, load {setup['load_average_at_start']:.1f}->{setup['load_average_at_end']:.1f}")
    print_table(rows)
    if rows:
        print_resources(rows)
    for s in skipped:
        print(f"skipped: {s}")
    print(f"\nload average {setup['load_average_at_start']:.2f} at start, {setup['load_average_at_end']:.2f} at end; "
          f"wrote {out / 'vs_vllm.json'} and {out / 'vs_vllm.png'} ({setup['wall_s']:.0f} s)")
    return 0


def with_ct2(args: argparse.Namespace, dtype: str, skipped: list[str]) -> bool:
    """Whether CTranslate2 runs beside this offline measurement; why not goes in `skipped`."""
    python = ct2_python(args)
    if python is None:
        return False
    why = None
    if args.workload != "uniform":
        why = "CTranslate2 batches statically: it runs with --workload uniform only"
    else:
        done = subprocess.run([str(python), "-c", "import ctranslate2; print(' '.join("
                               "sorted(ctranslate2.get_supported_compute_types('cpu'))))"],
                              capture_output=True, text=True)
        if DTYPES[dtype] not in done.stdout.split():
            why = f"CTranslate2 {dtype}: not among its CPU compute types here ({done.stdout.strip() or done.stderr})"
    if why and why not in skipped:
        skipped.append(why)
    return why is None


def _online_ids(results: list[tuple[float, list[tuple[float, list[int]]]]]) -> list[list[int]]:
    return [[t for _, ids in arrivals for t in ids] for _, arrivals in results]


def _progress(row: dict[str, Any]) -> None:
    v, s, a = row["vllm"], row["sol"], row["agreement"]
    print(f"  {row['workload']:8} vLLM {v['tokens_per_s']:7.0f} tok/s, sol {s['tokens_per_s']:7.0f} tok/s "
          f"(x{s['tokens_per_s'] / v['tokens_per_s']:.2f}); TTFT p50 {v['ttft_p50_ms']:.0f}/{s['ttft_p50_ms']:.0f} ms; "
          f"agree {a['requests_identical']:.0%} of requests, {a['tokens_agree']:.1%} of tokens", flush=True)
    if "ct2" in row:
        c, ca = row["ct2"], row["agreement_ct2"]
        print(f"  {'':8} CTranslate2 {c['tokens_per_s']:7.0f} tok/s (sol x{row['sol_over_ct2']['tokens_per_s']:.2f}); "
              f"agree {ca['requests_identical']:.0%} of requests", flush=True)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for vs_vllm.json and vs_vllm.png")
    parser.add_argument("--quick", action="store_true", help="small workloads (16 x 64 -> 32, 32 mixed, 8 clients)")
    parser.add_argument("--workload", choices=["uniform", "mixed", "all"], default="all")
    parser.add_argument("--mode", choices=["offline", "online", "all"], default="all")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "all"], default="all")
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all",
                        help="small (11M, gpt.config), demo (0.87M, the cpu pipeline preset's model) or "
                        "smollm2 (135M, SmolLM2-135M's shape: a transformers checkpoint imported into sol)")
    parser.add_argument("--threads", type=int, default=2, help="threads per engine (default 2)")
    parser.add_argument("--cores", help="comma-separated CPU ids to pin to (default: the first --threads allowed)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients online (default 32)")
    parser.add_argument("--uniform-requests", type=int, default=64)
    parser.add_argument("--uniform-prompt", type=int, default=128)
    parser.add_argument("--uniform-new", type=int, default=128)
    parser.add_argument("--mixed-requests", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="both engines' batch limit, offline "
                        "and online (sol serve --max-num-seqs)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="both engines' tokens per step, offline and online (vLLM's CPU default)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="both servers' tokens per streamed message online (default 1, both engines' default)")
    parser.add_argument("--kv-space-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--vllm-venv", default=str(DEFAULT_VENV))
    parser.add_argument("--ct2-venv", default=str(DEFAULT_CT2_VENV),
                        help="CTranslate2's venv (scripts/setup-ct2.sh), a second offline anchor where present; "
                        "'' leaves it out")
    parser.add_argument("--vllm-timeout-s", type=float, default=900)
    parser.add_argument("--rounds", type=int, default=2, help="repeat each measurement (online: alternating "
                        "between the servers), keep each engine's "
                        "fastest (a shared machine's other work only ever slows a run down)")
    parser.add_argument("--seed", type=int, default=0)


def register_bench(bench_subparsers) -> None:
    """Add `vs-vllm` to `sol bench`."""
    p = bench_subparsers.add_parser("vs-vllm", help="sol vs vLLM's CPU build on the same weights, side by side")
    add_arguments(p)
    p.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_vllm", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
