"""The engine's settings: one dataclass read by the engine, its scheduler and its KV pool."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt.config import ModelConfig
from server.engine.blocks import blocks_for
from server.engine.kv_cache import kv_bytes_per_block

DEFAULT_KV_BUDGET_BYTES = 256 << 20
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value: str) -> torch.dtype:
    if value not in DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16 (got {value!r})")
    return DTYPES[value]


_UNSET: Any = object()


def parse_scheduling(value: str) -> str:
    if value not in ("fair", "fcfs"):
        raise ValueError(f"scheduling must be fair or fcfs (got {value!r})")
    return value


def served(default: Any, *, help: str, env: str | None = None, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, default_text: str | None = None,
           serve_default: Any = _UNSET) -> Any:
    """An EngineConfig field that `sol serve` sets: its help, environment variable and flag
    travel in the field's metadata, from which server/config.py generates the flag and reads
    the environment (the engine itself reads neither). `serve_default`: what a server uses
    when neither is given, where that differs from an engine made in code."""
    meta = {"serve": {"help": help, "env": env, "flag": flag, "parse": parse, "default_text": default_text,
                      "serve_default": default if serve_default is _UNSET else serve_default}}
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = served(
        None, flag="--kv-blocks", parse=int, help="KV pool per model version in blocks (turns the KV budget off)",
        default_text="sized within the KV budget")
    # or a memory budget (default: 256 MiB, capped at what max_num_seqs full-context sequences need)
    kv_cache_bytes: int | None = None
    # The step's limits (vLLM's --max-num-seqs / --max-num-batched-tokens): more sequences
    # per step raise throughput under load; a larger token budget takes more of a long
    # prompt per step (faster time to first token) at the cost of a longer step for the
    # sequences decoding beside it.
    max_num_seqs: int = served(64, help="sequences per engine step")
    max_num_batched_tokens: int = served(512, help="tokens per engine step (the prefill chunk bound)")
    max_waiting: int = served(4096, help="requests waiting per model version; beyond it new ones are refused "
                                         "(RESOURCE_EXHAUSTED / 429)")
    enable_prefix_caching: bool = True
    # Who goes next (server/engine/policy.py): "fcfs" = arrival order; "fair" = virtual
    # token counters per tenant (EngineRequest.tenant), weighted shares, bands, priorities.
    # A server shares by API key unless told otherwise; an engine of its own (training,
    # benches) has one tenant and keeps arrival order.
    scheduling: str = served("fcfs", env="SOL_SCHEDULING", parse=parse_scheduling, serve_default="fair",
                             help="fair (a share per API key) or fcfs (arrival order)")
    # A tenant's requests submitted and not yet scheduled, at most (0 = no bound beyond
    # max_waiting): beyond it submit raises TenantOverloaded for that tenant alone.
    max_waiting_per_tenant: int = served(0, flag="--max-waiting-per-key", env="SOL_MAX_WAITING_PER_KEY",
                                         serve_default=1024,
                                         help="requests one key may have waiting for a model, beyond which it gets "
                                              "RESOURCE_EXHAUSTED / HTTP 429; 0 = only --max-waiting")
    # Fair share: a batch-band tenant whose oldest waiting request has waited this long is
    # ordered as interactive (the aging bound of the bands).
    band_aging_s: float = served(5.0, flag="--band-aging",
                                 help="seconds a batch-band key's request waits before it is ordered as interactive "
                                      "(fair scheduling)")
    # Fair share: a prompt token served from the prefix cache is charged this fraction of
    # the request's input cost (it costs a lookup, not a forward).
    cached_cost_fraction: float = 0.1
    # A sequence paused by backpressure keeps its KV blocks this long, then gives them up
    # (full ones stay in the prefix cache) and is recomputed when its reader catches up.
    pause_grace_s: float = 2.0
    # Attention over the KV pool: "auto" = the in-place kernel on the CPU (built on first
    # use) else gathered copies + SDPA; "in-place" or "gather" to insist on one.
    attention: str = "auto"
    kernel_arch: str = served("native", env="SOL_KERNEL_ARCH",
                              help="-march of the CPU kernels built on first use (an image run on other "
                                   "machines prebuilds them for a common target such as x86-64-v3)")
    # On a few cores the event loop and a stepping thread whose OpenMP team spans every
    # core take turns on the same cores; README's configuration table has the measurement
    # that kept the full team the default.
    threads: int = served(0, flag="--engine-threads", env="SOL_ENGINE_THREADS", parse=int,
                          help="intra-op threads of each model's stepping thread on the CPU; 0 = the process's",
                          default_text="torch's thread count (OMP_NUM_THREADS)")
    # LoRA (server/engine/adapter_slots.py): adapters one step may use at once, and the
    # rank their stacked weights are padded to; the stack is made on the first adapter
    # request, so a model served without adapters pays no memory for it.
    max_loras: int = served(4, help="LoRA adapter slots per model version: distinct adapters in one step "
                                    "(more wait for a slot)")
    max_lora_rank: int = served(16, help="the largest LoRA rank served (adapters above it are refused)")
    device: str | None = served(None, help="cpu, cuda, cuda:1 ...", default_text="CUDA when present")
    dtype: torch.dtype | None = served(None, env="SOL_DTYPE", parse=parse_dtype,
                                       help="weights and KV cache dtype: float32 or bfloat16",
                                       default_text="bfloat16 on CUDA, float32 on CPU")


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
    full = config.max_num_seqs * blocks_for(mc.max_seq_len, config.block_size)
    return max(1, min(DEFAULT_KV_BUDGET_BYTES // per_block, full))
