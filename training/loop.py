"""The one training loop every stage shares: a stage supplies micro-batches and a loss.

AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay,
gradient accumulation and clipping, bf16 autocast on CUDA, optional torch.compile, DDP
when launched by torchrun, tqdm with an ETA and a metrics JSONL per run (rank 0 only).

Resuming restores the model, the optimizer, the step (which is the data position: every
stage draws batch `step` deterministically from its seed, so nothing else about the data
needs storing), the RNG states and the stage's own state (e.g. the RLHF KL
coefficient, and its current rollout batch, which the weights at its start sampled). State is safetensors + JSON + one `torch.save` of tensors and plain
containers that is read back with `weights_only=True`; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from gpt.allocator import keep_freed_memory
from gpt.device import autocast
from training.distributed import DistInfo, current, mean_across_ranks

STATE_DIR = "state"
METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopConfig:
    steps: int = 100
    batch_size: int = 16             # sequences (or pairs, or rollouts) per micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 = off
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 0              # resumable state every N steps (0 = only at the end)


class Stage(Protocol):
    """A loss and a data source. `micro_batch` must be a pure function of its arguments
    and the stage's seed, so that a resumed run draws the same data."""

    name: str

    def micro_batch(self, step: int, micro: int, rank: int, world: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class LoopResult:
    step: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def last(self, key: str, default: float = float("nan")) -> float:
        for record in reversed(self.history):
            if key in record:
                return record[key]
        return default


def lr_at(cfg: LoopConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    # Decay matrices only: decaying norms' gains and biases just fights the loss.
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# --- resumable state ---------------------------------------------------------------------------

def save_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               stage: Stage, cfg: LoopConfig) -> Path:
    """Write state into a temporary directory and rename it into place, so a crash while
    saving leaves the previous state intact."""
    final = run_dir / STATE_DIR
    tmp = run_dir / f".{STATE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors: dict[str, Any] = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    if hasattr(stage, "tensor_state"):
        # What a stage holds between steps that is not a pure function of the step (RLHF's
        # rollout batch, sampled by the weights at its start): restored as it was.
        tensors["stage"] = stage.tensor_state()
    torch.save(tensors, tmp / "optim.pt")
    version, internal, gauss = random.getstate()
    stage_state = stage.state_dict() if hasattr(stage, "state_dict") else {}
    (tmp / "trainer.json").write_text(json.dumps({
        "step": step, "python_rng": [version, list(internal), gauss], "stage": stage_state,
        "config": asdict(cfg)}), encoding="utf-8")
    old = run_dir / f".{STATE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, stage: Stage) -> int:
    """Restore what `save_state` wrote; returns the step to continue from (0 if none)."""
    state = run_dir / STATE_DIR
    if not (state / "trainer.json").is_file():
        return 0
    meta = json.loads((state / "trainer.json").read_text(encoding="utf-8"))
    load_model(model, str(state / "model.safetensors"))
    tensors = torch.load(state / "optim.pt", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if hasattr(stage, "load_state_dict"):
        stage.load_state_dict(meta.get("stage") or {})
    if hasattr(stage, "load_tensor_state"):
        stage.load_tensor_state(tensors.get("stage") or {})
    return int(meta["step"])


# --- the loop ----------------------------------------------------------------------------------

def train(model: nn.Module, stage: Stage, cfg: LoopConfig, run_dir: Path | None = None,
          info: DistInfo | None = None, progress: bool = True, resume: bool = True,
          on_log: Callable[[dict[str, float]], None] | None = None) -> LoopResult:
    """Run `cfg.steps` optimizer steps of `stage` on `model` (already on its device).
    With `run_dir`, metrics go to `run_dir/metrics.jsonl` and resumable state to
    `run_dir/state/`; an existing state is resumed when `resume`."""
    info = info or current()
    keep_freed_memory()
    optimizer = make_optimizer(model, cfg)
    start = 0
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            start = load_state(run_dir, model, optimizer, stage)
    runner: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)
    metrics_file = (run_dir / METRICS_FILE).open("a", encoding="utf-8") if run_dir and info.is_main else None
    result = LoopResult(step=start, seconds=0.0)
    bar = tqdm(total=cfg.steps, initial=start, desc=stage.name, disable=not (progress and info.is_main),
               dynamic_ncols=True, leave=False)
    began = time.perf_counter()
    window_start, window_tokens = began, 0.0
    # Logged values are means over the steps since the last record, so curves are not
    # single-batch noise.
    window: dict[str, float] = {}
    window_steps = 0
    model.train()
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = stage.micro_batch(step, micro, info.rank, info.world)
                last = micro == cfg.grad_accum - 1
                sync = runner.no_sync() if info.enabled and not last and hasattr(runner, "no_sync") else nullcontext()
                with sync, autocast(info.device):
                    loss, parts = stage.loss(runner, batch)
                    (loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            if cfg.grad_clip > 0:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(stage, "after_step"):
                stage.after_step(step)
            window_tokens += sums.get("tokens", 0.0)
            for k, v in sums.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            done = step + 1
            bar.update(1)
            if "loss" in sums:
                bar.set_postfix(loss=f"{sums['loss']:.3f}", refresh=False)
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = mean_across_ranks({k: v / window_steps for k, v in window.items()}, info)
                window, window_steps = {}, 0
                now = time.perf_counter()
                if window_tokens:
                    record["tokens_per_s"] = window_tokens * info.world / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0.0
                record.update(step=done, lr=lr, elapsed_s=now - began)
                result.history.append(record)
                if metrics_file:
                    metrics_file.write(json.dumps({"stage": stage.name, **record}) + "\n")
                    metrics_file.flush()
                if on_log:
                    on_log(record)
            if run_dir is not None and info.is_main and (
                    (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
                save_state(run_dir, model, optimizer, done, stage, cfg)
            result.step = done
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    model.eval()
    result.seconds = time.perf_counter() - began
    return result
