"""`sol bench train`: pretraining throughput of the shared loop against a bare
forward + backward + AdamW step on the same model and batch, measured alternately in one
process so that a busy machine slows both alike. MFU where the device's peak is known."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from gpt.device import autocast, default_device
from gpt.model import GPT
from training.loop import LoopConfig, make_optimizer, train
from training.presets import PipelinePreset
from training.stages.pretrain import PretrainConfig, PretrainStage

# Dense bf16 peak FLOP/s by device-name fragment (vendor data sheets, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(model: GPT, seq_len: int) -> float:
    """6 N (matmul weights, forward + backward) plus attention's 12 L d T (PaLM appendix)."""
    c = model.config
    n = model.num_parameters() - c.vocab_size * c.d_model * (1 if c.tie_embeddings else 0)
    return 6 * n + 12 * c.n_layers * c.d_model * seq_len


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare(model: GPT, cfg: LoopConfig, stage: PretrainStage, steps: int, device: torch.device) -> float:
    """tokens/s of the minimal loop: no schedule, no clipping, no logging, one batch."""
    optimizer = make_optimizer(model, cfg)
    batch = stage.micro_batch(0, 0, 0, 1)
    for i in range(steps + 2):
        if i == 2:                      # two warm-up steps (allocator, kernels)
            _sync(device)
            began = time.perf_counter()
        with autocast(device):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch[:, 1:].numel() / (time.perf_counter() - began)


def _loop(model: GPT, cfg: LoopConfig, stage: PretrainStage, steps: int, device: torch.device) -> float:
    seen: list[float] = []
    loop_cfg = LoopConfig(**{**cfg.__dict__, "steps": steps + 2, "log_every": 10 ** 9, "save_every": 0})
    timings: list[float] = []

    class Timed:
        # Times the loop from its third step on, like the bare loop's warm-up.
        name = "bench"

        def micro_batch(self, step, micro, rank, world):
            if step == 2:
                _sync(device)
                timings.append(time.perf_counter())
            return stage.micro_batch(step, micro, rank, world)

        def loss(self, m, batch):
            loss, parts = stage.loss(m, batch)
            seen.append(parts["tokens"])
            return loss, parts

    train(model, Timed(), loop_cfg, run_dir=None, progress=False)
    _sync(device)
    return sum(seen[2:]) / (time.perf_counter() - timings[0])


def run_bench(preset: PipelinePreset, steps: int = 20, rounds: int = 3) -> dict[str, Any]:
    device = default_device()
    torch.manual_seed(0)
    config = preset.model_config(preset.vocab_size)
    pcfg: PretrainConfig = preset.pretrain
    tokens = torch.randint(0, config.vocab_size, (200_000,))
    stage = PretrainStage(tokens, pcfg, device)
    bare, loop = [], []
    for _ in range(rounds):
        # Fresh models each round so that neither loop benefits from the other's state.
        bare.append(_bare(GPT(config).to(device).train(), pcfg.loop, stage, steps, device))
        loop.append(_loop(GPT(config).to(device), pcfg.loop, stage, steps, device))
    model = GPT(config)
    best_bare, best_loop = max(bare), max(loop)
    peak = device_peak_flops(device)
    mfu = best_loop * flops_per_token(model, pcfg.seq_len) / peak if peak else None
    return {"device": str(device), "threads": torch.get_num_threads(), "num_parameters": model.num_parameters(),
            "batch_size": pcfg.loop.batch_size, "seq_len": pcfg.seq_len, "bare_tokens_per_s": best_bare,
            "loop_tokens_per_s": best_loop, "ratio": best_loop / best_bare, "mfu": mfu,
            "rounds": {"bare": bare, "loop": loop}}


def run_cli(args) -> int:
    """`sol bench train`: run, print the table (or JSON) and return the exit status."""
    from client.output import emit, table
    from training.presets import pipeline_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(pipeline_preset(args.preset), steps=args.steps, rounds=args.rounds)
    mfu = "n/a (device peak unknown)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    human = "\n".join([
        f"device {result['device']} ({result['threads']} threads), model {result['num_parameters'] / 1e6:.2f}M "
        f"parameters, batch {result['batch_size']} x {result['seq_len']} tokens",
        table([["bare forward+backward+step", f"{result['bare_tokens_per_s']:.0f}"],
               ["sol training loop", f"{result['loop_tokens_per_s']:.0f}"]], ["loop", "tokens/s"]),
        f"ratio loop/bare: {result['ratio']:.3f} (target >= 0.9)",
        f"MFU: {mfu}",
    ])
    emit(result, args.json, human)
    return 0
