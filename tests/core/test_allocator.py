"""The allocator thresholds apply on Linux/glibc and leave tensors' values alone."""

from __future__ import annotations

import sys

import pytest
import torch

from gpt.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_thresholds_apply_and_repeat_calls_are_harmless():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
    # Large blocks freed and allocated again: reused heap memory, same arithmetic.
    x = torch.arange(4 << 20, dtype=torch.float32)
    for _ in range(3):
        y = x * 2 + 1
        del y
    assert float((x * 2 + 1)[-1]) == float(2 * ((4 << 20) - 1) + 1)
