"""Decoding for training and evaluation: the serving engine in its synchronous mode
(stepped on the caller's thread, no engine thread), on the model's own device and dtype
so that it reads the live weights, sized for training batches; and reply text from the
token ids it returns."""

from __future__ import annotations

from collections.abc import Iterable

from gpt.lora_trainable import LoraModel
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.blocks import blocks_for
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.offline import build_engine, live_config

# Sequences decoded together and tokens per step (the prefill chunk bound). Measured on
# the `cpu` preset's model shape (2 threads, one RLHF rollout: 2048 replies of up to 16
# tokens to ~25-token prompts): 512 / 4096 took 2.3 s, and so did 256 / 4096; 1024 / 4096
# 2.4 s, 2048 / 4096 2.8 s, 2048 / 16384 3.1 s; the old padded decode loop took 4.0 s.
MAX_NUM_SEQS = 512
MAX_NUM_BATCHED_TOKENS = 4096


def training_engine(model: GPT, max_len: int, max_num_seqs: int = MAX_NUM_SEQS,
                    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS) -> Engine:
    """A synchronous engine on `model`'s live weights whose KV pool holds `max_num_seqs`
    sequences of `max_len` tokens (prompt + reply) at once: the scheduler never has to
    preempt, and the pool is allocated once for as many calls as the engine is kept."""
    max_len = min(max_len, model.config.max_seq_len)
    lora: dict[str, int] = {}
    if isinstance(model, LoraModel):
        # A LoRA policy decodes as the base with its adapter in one slot (the serving
        # path), loaded per call by rollout_adapters (training/lora_training.py).
        lora = {"max_loras": 1, "max_lora_rank": model.spec.rank}
        model = model.base
    block_size = EngineConfig.block_size
    num_blocks = max_num_seqs * blocks_for(max_len, block_size)
    config = live_config(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         num_blocks=num_blocks, block_size=block_size, **lora)
    return build_engine(model, config, start=False)


def reply_text(tokenizer: SolTokenizer, token_ids: Iterable[int], stop_ids: Iterable[int]) -> str:
    """A reply's text without its stop tokens (the engine returns the one that ended it)."""
    stops = set(stop_ids)
    return tokenizer.decode([t for t in token_ids if t not in stops])
