"""Checkpoint sanity: what a checksum cannot say about a version before it serves.

A checkpoint whose every sha256 matches can still be unusable: its weights may hold
NaN or Inf (a diverged run published as is), which warm up and then serve empty,
billed answers; or its config.json may ask for sizes no server can hold
(`max_seq_len: 1000000000` makes the rotary tables alone 128 GB), which used to
allocate until the process was killed. The manager runs three checks, each before the
step it protects:

1. `check_config`, on config.json alone, before anything is allocated: every size
   within a fixed bound, the context within the KV pool one version may have
   (--kv-per-model-mb), and the memory the load will take within what the host (and
   the accelerator) has free. The message names the field, its value and the bound.
2. `check_weights`, once the tensors are loaded and before an engine exists: every
   floating-point tensor finite, checked one tensor at a time (one boolean temporary
   the size of that tensor, never a copy of the model).
3. `check_forward`, once the engine has the model on its device and dtype: a short
   forward pass gives finite logits (bf16 overflow shows here, not in the fp32 file).

Each raises UnusableCheckpoint, a CheckpointError: the hot-loader refuses the version
and the serving one stays; a model named on the command line fails the start with the
message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError
from gpt.config import ModelConfig

GiB = 1 << 30


class UnusableCheckpoint(CheckpointError):
    """A checkpoint that verifies but must not serve: sizes beyond bounds, non-finite weights or logits."""


@dataclass(frozen=True)
class SanityLimits:
    """Fixed bounds on config.json, whatever the machine: beyond these a config is a
    mistake (or an attack), not a model. Generous for every family sol serves."""

    max_seq_len: int = 1 << 20          # tokens of context
    vocab_size: int = 1 << 21
    d_model: int = 1 << 16
    d_ff: int = 1 << 18
    n_layers: int = 1024
    n_heads: int = 1024
    # The share of free memory a load may plan to take: the rest is headroom for the
    # serving version, the allocator and the request path.
    memory_fraction: float = 0.9


@dataclass(frozen=True)
class LoadPlan:
    """Where and how a version will be held once loaded, as the manager knows it
    before loading: the engine's device and dtype and the KV pool it will reserve."""

    device: torch.device
    dtype: torch.dtype
    kv_pool_bytes: int                   # the pool the engine will allocate
    kv_pool_limit_bytes: int | None      # the most a version's pool may take (the budget's per-model share)
    kv_limit_flag: str = "--kv-per-model-mb"


def rope_bytes(config: ModelConfig, element_size: int) -> int:
    """The rotary cos and sin tables: two (max_seq_len, head_dim) buffers."""
    return 2 * config.max_seq_len * config.head_dim * element_size


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def host_bytes_needed(config: ModelConfig, plan: LoadPlan) -> int:
    """Peak host memory of a load: the model built in fp32 and the file's tensors
    loaded beside it (2x the fp32 weights) plus its rotary tables; on a CPU engine in
    another dtype, the engine's converted copy; on a CPU engine, the KV pool too."""
    params = config.num_parameters()
    peak = 2 * params * 4 + rope_bytes(config, 4)
    if plan.device.type == "cpu":
        if plan.dtype != torch.float32:
            elem = _element_size(plan.dtype)
            peak += params * elem + rope_bytes(config, elem)
        peak += plan.kv_pool_bytes
    return peak


def device_bytes_needed(config: ModelConfig, plan: LoadPlan) -> int:
    """Accelerator memory of a loaded version: weights, rotary tables and KV pool."""
    elem = _element_size(plan.dtype)
    return config.num_parameters() * elem + rope_bytes(config, elem) + plan.kv_pool_bytes


def available_host_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, lowered to the cgroup's
    limit minus its usage in a container. None where neither can be read."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def available_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB"


def check_config(config: ModelConfig, directory: Path, plan: LoadPlan | None,
                 limits: SanityLimits = SanityLimits(),
                 host_free: int | None = None, device_free: int | None = None) -> None:
    """Refuse a config.json whose sizes are out of bounds or will not fit, before any
    allocation. `host_free` / `device_free` default to what the machine reports."""
    where = Path(directory) / CONFIG_FILE
    for name in ("max_seq_len", "vocab_size", "d_model", "d_ff", "n_layers", "n_heads"):
        value, bound = getattr(config, name), getattr(limits, name)
        if value > bound:
            raise UnusableCheckpoint(f"unusable checkpoint: {where}: {name} is {value}, above the bound of {bound} "
                                     f"this server accepts")
    if plan is None:
        return
    if plan.kv_pool_limit_bytes is not None:
        # One full-context sequence must fit in the pool, or a long request can never run.
        needed = config.kv_bytes_per_token(_element_size(plan.dtype)) * config.max_seq_len
        if needed > plan.kv_pool_limit_bytes:
            raise UnusableCheckpoint(
                f"unusable checkpoint: {where}: max_seq_len {config.max_seq_len} needs {_gib(needed)} of KV cache for "
                f"one full-context sequence, above the {plan.kv_pool_limit_bytes >> 20} MiB a model version's KV "
                f"pool may take; lower max_seq_len or raise {plan.kv_limit_flag}")
    sizes = (f"{config.num_parameters()} parameters, max_seq_len {config.max_seq_len}, d_model {config.d_model}, "
             f"n_layers {config.n_layers}, vocab_size {config.vocab_size}")
    host_free = available_host_bytes() if host_free is None else host_free
    _must_fit(host_bytes_needed(config, plan), host_free, limits, f"{where}: loading", "of host memory", sizes)
    if plan.device.type != "cpu":
        device_free = available_device_bytes(plan.device) if device_free is None else device_free
        _must_fit(device_bytes_needed(config, plan), device_free, limits, f"{where}: serving", f"on {plan.device}",
                  sizes)


def _must_fit(needed: int, free: int | None, limits: SanityLimits, what: str, where: str, sizes: str) -> None:
    if free is not None and needed > free * limits.memory_fraction:
        raise UnusableCheckpoint(f"unusable checkpoint: {what} needs about {_gib(needed)} {where} ({sizes}); "
                                 f"{_gib(free)} is free")


_CHECK_SLICE = 1 << 20      # elements per isfinite call in check_weights


def check_weights(tensors: dict[str, torch.Tensor], directory: Path, file: str = MODEL_FILE) -> None:
    """Every floating-point tensor finite, one tensor at a time (tied tensors once)."""
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        # In slices: isfinite over a whole embedding made temporaries of its size (184 MiB
        # of peak RSS over a 113 MiB fp32 embedding, SmolLM2-135M's shape).
        flat = tensor.detach().reshape(-1)
        if not all(bool(torch.isfinite(part).all()) for part in flat.split(_CHECK_SLICE)):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            raise UnusableCheckpoint(
                f"unusable checkpoint: {Path(directory) / file}: tensor {name} holds non-finite values "
                f"({nan} NaN, {inf} Inf of {tensor.numel()}); the run that wrote it diverged")


def check_forward(model: torch.nn.Module, token_ids: list[int], directory: Path) -> None:
    """A short forward pass on the model as it will serve (device, dtype) gives finite logits."""
    param = next(model.parameters())
    ids = torch.tensor([token_ids], dtype=torch.long, device=param.device)
    with torch.inference_mode():
        logits = model(ids)
    if not bool(torch.isfinite(logits).all()):
        raise UnusableCheckpoint(
            f"unusable checkpoint: {directory}: a warm-up forward pass gives non-finite logits (NaN or Inf) "
            f"in {param.dtype} on {param.device}; the weights overflow there")
