"""The one place where sol picks its device and dtype (CUDA + bf16 when present, else CPU + fp32)."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    forced = os.environ.get("SOL_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device):
    """bf16 autocast on CUDA for training; a no-op context on CPU (fp32 there)."""
    enabled = device.type == "cuda" and default_dtype(device) == torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
