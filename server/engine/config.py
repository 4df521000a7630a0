"""The engine's settings: one dataclass read by the engine, its scheduler and its KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt.config import ModelConfig
from server.engine.kv_cache import kv_bytes_per_block

DEFAULT_KV_BUDGET_BYTES = 256 << 20


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None          # KV pool size in blocks; or
    kv_cache_bytes: int | None = None      # a memory budget (default: 256 MiB, capped at what
                                           # max_num_seqs full-context sequences need)
    max_num_seqs: int = 64                 # sequences in one step
    max_num_batched_tokens: int = 512      # tokens in one step (the prefill chunk bound)
    max_waiting: int = 4096                # beyond this, submit raises EngineOverloaded
    enable_prefix_caching: bool = True
    # Who goes next (server/engine/policy.py): "fcfs" = arrival order; "fair" = virtual
    # token counters per tenant (EngineRequest.tenant), weighted shares, bands, priorities.
    scheduling: str = "fcfs"
    # A tenant's requests submitted and not yet scheduled, at most (0 = no bound beyond
    # max_waiting): beyond it submit raises EngineOverloaded for that tenant alone.
    max_waiting_per_tenant: int = 0
    # Fair share: a batch-band tenant whose oldest waiting request has waited this long is
    # ordered as interactive (the aging bound of the bands).
    band_aging_s: float = 5.0
    # Fair share: a prompt token served from the prefix cache is charged this fraction of
    # the request's input cost (it costs a lookup, not a forward).
    cached_cost_fraction: float = 0.1
    # A sequence paused by backpressure keeps its KV blocks this long, then gives them up
    # (full ones stay in the prefix cache) and is recomputed when its reader catches up.
    pause_grace_s: float = 2.0
    # Attention over the KV pool: "auto" = the in-place kernel on the CPU (built on first
    # use) else gathered copies + SDPA; "in-place" or "gather" to insist on one.
    attention: str = "auto"
    kernel_arch: str = "native"            # the kernel's -march (a common target for images)
    # Intra-op (OpenMP) threads of the stepping thread on the CPU; 0 = the process's
    # setting (server.config.engine_threads).
    threads: int = 0
    device: str | None = None              # default: gpt.device.default_device()
    dtype: torch.dtype | None = None       # default: bf16 on CUDA, fp32 on CPU


def resolve_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """The engine's device and dtype: as configured, else CUDA + bf16 when present."""
    from gpt.device import default_device, default_dtype

    device = torch.device(config.device) if config.device else default_device()
    return device, config.dtype or default_dtype(device)


def kv_pool_blocks(mc: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> int:
    """Blocks in the KV pool: `num_blocks`, else `kv_cache_bytes` worth, else the default
    budget capped at what `max_num_seqs` full-context sequences can use."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = kv_bytes_per_block(mc, config.block_size, dtype)
    if config.kv_cache_bytes is not None:
        return max(1, config.kv_cache_bytes // per_block)
    full = config.max_num_seqs * -(-mc.max_seq_len // config.block_size)
    return max(1, min(DEFAULT_KV_BUDGET_BYTES // per_block, full))
