"""Peak RSS of `sol serve` loading a model users bring, against what it must hold: the
weights in the dtype it serves plus its KV pool. SmolLM2-135M's shape (bench/hf_checkpoint.py),
saved by transformers in fp32 and in bf16, each imported as `sol import-hf` does, then
served (gRPC, no HTTP, a fixed --kv-blocks pool) without --dtype and with --dtype
float32 / bfloat16. Reads the server's VmHWM once it answers health checks.

    python -m bench.serve_memory [--blocks 256] [--quick]

Target (issue 35): peak RSS <= 1.3x (weight bytes + KV pool bytes). The interpreter, torch
and gRPC take a few hundred MiB of their own; the same server loading a 2-layer model of
the same tokenizer is printed as the baseline, so that what a model adds is seen apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def _import(registry, hf_dir: Path, name: str):
    from gpt.hf import import_hf, tokenizer_files
    from gpt.registry import publish_checkpoint

    model, tokenizer = import_hf(hf_dir)          # in the dtype it is stored in
    resolved = publish_checkpoint(registry, name, model, tokenizer, {"stage": "imported", "source": str(hf_dir)},
                                  tokenizer_files=tokenizer_files(hf_dir))
    stored = str(next(model.parameters()).dtype).removeprefix("torch.")
    return resolved, model.config, stored


def measure(work: Path, ref: str, registry: Path, dtype: str | None, blocks: int) -> float:
    from bench.serve import start_server, stop_server
    from bench.vs_vllm import _peak_rss_mib

    tag = ref.replace("@", "-") + f"-{dtype or 'stored'}"
    home = work / f"home-{tag}"
    home.mkdir()
    proc, _ = start_server(home, registry, ref, "cpu", "sk-sol-admin-mem", work / f"serve-{tag}.log", watch=False,
                           dtype=dtype, extra_args=("--kv-blocks", str(blocks)))
    try:
        return _peak_rss_mib(proc.pid)
    finally:
        stop_server(proc)


def run(args: argparse.Namespace) -> int:
    import os

    from bench.hf_checkpoint import SMOLLM2_135M, build_checkpoint, weight_bytes
    from gpt.registry import Registry
    from training.data.corpus import build_corpus

    texts = build_corpus(max_bytes=2 << 20).train
    rows = []
    with tempfile.TemporaryDirectory(prefix="sol-serve-memory-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        base_dir = build_checkpoint(work / "hf-base", replace(SMOLLM2_135M, num_hidden_layers=2), texts)
        base, _, _ = _import(registry, base_dir, "baseline")
        baseline = measure(work, base.ref, registry.root, None, args.blocks)
        print(f"baseline (2 layers of the same shape, {weight_bytes(base_dir) / 2**20:.0f} MiB of weights): "
              f"peak RSS {baseline:.0f} MiB  [load {os.getloadavg()[0]:.2f}]", flush=True)
        for stored in ("float32", "bfloat16"):
            hf_dir = build_checkpoint(work / f"hf-{stored}", SMOLLM2_135M, texts, dtype=stored)
            resolved, config, got = _import(registry, hf_dir, f"smollm2-{stored.replace('float', 'fp')}")
            assert got == stored, f"imported as {got}, stored as {stored}"
            n_params = weight_bytes(hf_dir) // DTYPE_BYTES[stored]
            for served in (None, "float32", "bfloat16"):
                serve_dtype = served or stored     # what issue 35 asks for without --dtype
                weights = n_params * DTYPE_BYTES[serve_dtype]
                kv = blocks_bytes(config, args.blocks, serve_dtype)
                rss = measure(work, resolved.ref, registry.root, served, args.blocks)
                row = {"checkpoint": stored, "dtype_flag": served, "weights_mib": weights / 2**20,
                       "kv_pool_mib": kv / 2**20, "peak_rss_mib": rss, "ratio": rss * 2**20 / (weights + kv),
                       "ratio_over_baseline": (rss - baseline) * 2**20 / (weights + kv),
                       "load_average": os.getloadavg()[0]}
                rows.append(row)
                print(f"{stored:8} checkpoint, --dtype {served or '(none)':8}: peak RSS {rss:6.0f} MiB; weights "
                      f"({serve_dtype}) {row['weights_mib']:.0f} + KV {row['kv_pool_mib']:.0f} MiB -> "
                      f"{row['ratio']:.2f}x ({row['ratio_over_baseline']:.2f}x above the baseline)  "
                      f"[load {row['load_average']:.2f}]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"baseline_mib": baseline, "rows": rows}, indent=2), encoding="utf-8")
    return 0


def blocks_bytes(config, blocks: int, dtype: str) -> int:
    import torch

    from server.engine.kv_cache import kv_bytes_per_block

    return blocks * kv_bytes_per_block(config, 16, getattr(torch, dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=256, help="the server's KV pool (--kv-blocks, 16 tokens each)")
    parser.add_argument("--out", help="write the rows as JSON here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
