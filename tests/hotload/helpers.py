"""Versions whose outputs differ, and a checkpoint that is broken on arrival."""

from __future__ import annotations

import os

from gpt.checkpoint import MODEL_FILE, write_checkpoint
from gpt.registry import Registry, ResolvedModel, publish_checkpoint
from server.engine.api import SamplingParams
from server.engine.offline import build_engine, generate
from tests.conftest import make_tiny_model

PROMPT = [{"role": "user", "content": "Tell me about the standard library."}]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def publish_seeded(registry: Registry, tokenizer, seed: int, name: str = "m", aliases=()) -> ResolvedModel:
    # Untied heads: random tied-embedding models all echo their input, untied ones differ.
    model = make_tiny_model(tokenizer, seed=seed, tie_embeddings=False)
    return publish_checkpoint(registry, name, model, tokenizer, {"stage": "sft", "seed": seed}, aliases=aliases)


def publish_broken(registry: Registry, tokenizer, name: str = "m") -> ResolvedModel:
    """A version whose safetensors is truncated after its checksum was recorded: it
    arrives broken, as a half-copied file would."""
    model = make_tiny_model(tokenizer, seed=999)

    def write(tmp):
        write_checkpoint(tmp, model, tokenizer, {"name": name, "stage": "sft"})
        path = tmp / MODEL_FILE
        os.truncate(path, path.stat().st_size // 3)

    return registry.publish(name, write)


def expected_text(registry: Registry, ref: str) -> str:
    """What greedy decoding of PROMPT gives on a version, computed offline."""
    from gpt.chat import chat_prompt_ids
    from gpt.checkpoint import load_checkpoint

    ckpt = load_checkpoint(registry.resolve(ref).path)
    engine = build_engine(ckpt.model, start=False)
    out = generate(engine, [chat_prompt_ids(ckpt.tokenizer, PROMPT)], GREEDY)
    # GREEDY ignores EOS and the requests show special tokens, so no token is hidden: the
    # served text is these tokens' text.
    return ckpt.tokenizer.decode(out[0].token_ids)


def served_version(manager, ref: str = "m") -> int | None:
    """The version `ref` resolves to on the manager, None when it names none."""
    try:
        return manager.resolve(ref).version
    except LookupError:
        return None
