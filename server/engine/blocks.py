"""Block arithmetic: how many KV blocks hold a number of tokens. Every part of the engine
(and the benches and training that size its pool) counts blocks through this one function."""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that hold `num_tokens` (the last one partly filled)."""
    return -(-num_tokens // block_size)
