"""The CPU attention kernel that reads the paged KV pool in place (csrc/paged_attention.cpp).

The portable path gathers each sequence's blocks into padded copies in every layer and
runs scaled-dot-product attention on them; on the CPU that gather was a third of a decode
step. This kernel walks the block tables instead. It is compiled on first use with
PyTorch's extension builder (a C++ compiler and `ninja`, about 30 s, then cached under
`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); where it cannot be built the
engine keeps the portable path and says so once in the log. CUDA always takes the
portable path (SDPA).

It is compiled for the machine it runs on (`-march=native`, EngineConfig.kernel_arch).
An image built on one machine and run on others prebuilds it for a common target (e.g.
`x86-64-v3`; `sol serve --kernel-arch`, env SOL_KERNEL_ARCH; deploy/docker/Dockerfile
does).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"


def cflags(arch: str = "native") -> list[str]:
    # -march=native: the kernel's loops vectorise to the machine's widest units (AVX-512
    # where present); a native build's name carries the CPU's flags, so a cache shared
    # between different machines never loads one built for another.
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragma is compiled into
    # the kernel itself; without the flag it ran every item on the calling thread (2.52 ms
    # a layer at 2 threads against 2.58 at 1, `small`, 64 decodes).
    return ["-O3", f"-march={arch}", "-fopenmp"]


# Links libgomp.so.1, which resolves to the copy torch has already loaded (the same
# soname), so the kernel and torch's ops share one OpenMP runtime and its thread pools.
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def available(arch: str = "native") -> bool:
    """Build or load the kernel once per process (for the first `arch` asked); False,
    logged once, if that fails."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load(arch)
        return _state["ok"]


def _load(arch: str) -> bool:
    try:
        from torch.utils.cpp_extension import load

        flags = cflags(arch)
        # A native build is this CPU's; one for a named target (an image's) serves any.
        machine = _cpu_flags() if arch == "native" else ""
        tag = hashlib.sha256((machine + " ".join(flags + LDFLAGS)).encode()).hexdigest()[:10]
        load(name=f"sol_paged_attention_{tag}", sources=[str(SOURCE)], extra_cflags=flags,
             extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
        return hasattr(torch.ops.sol_paged, "paged_attention")
    except Exception as exc:  # no compiler, no ninja, a read-only cache: keep serving
        log.warning("the paged attention kernel could not be built (%s); using the gather path", exc)
        return False


ATTENTION_CHOICES = ("auto", "in-place", "gather")


def use_in_place(setting: str, device: torch.device, arch: str = "native") -> bool:
    """Resolve EngineConfig.attention: "auto" takes the kernel on the CPU where it builds;
    "in-place" insists on it; "gather" is the portable path (the one CUDA runs)."""
    if setting not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, not {setting!r}")
    if setting == "gather" or device.type != "cpu":
        if setting == "in-place":
            raise ValueError("the in-place paged attention kernel runs on the CPU only")
        return False
    if available(arch):
        return True
    if setting == "in-place":
        raise RuntimeError("the in-place paged attention kernel could not be built (see the log)")
    return False


def paged_attention(out: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    tokens: torch.Tensor, row_of_token: torch.Tensor, positions: torch.Tensor,
                    block_tables: torch.Tensor, scale: float) -> None:
    """Fill out[t] for each t in `tokens`: query q[t] (H, D) attends to positions
    0..positions[t] of its row's sequence, read through block_tables[row_of_token[t]]
    from the pools: keys (blocks, kv_heads, head_dim, block_size), values (blocks,
    kv_heads, block_size, head_dim)."""
    torch.ops.sol_paged.paged_attention(out, q, k_pool, v_pool, tokens, row_of_token, positions,
                                        block_tables, scale)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store new keys and values (kv_heads, tokens, head_dim), any strides, in their pool
    slots (block * block_size + position), in the pools' layouts (see paged_attention)."""
    torch.ops.sol_paged.write_kv(k_pool, v_pool, k, v, slots)
