"""What `sol data check` runs: a stage's own loader on one file, and its counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.datasets.render import Counts

# The RL reply length the `tiny` and `cpu` presets give rollouts, when --max-new-tokens is not given.
DEFAULT_MAX_NEW_TOKENS = 16


def check_file(path: Path, kind: str, ref: str | None = None, registry_root: Path | None = None,
               skip_long: bool = False, max_new_tokens: int | None = None, reward: str | None = None
               ) -> dict[str, Any]:
    """Raise the stage's DataError for the first bad row, else return the counts. With a
    checkpoint `ref` rows are also encoded with its tokenizer and context (tokens,
    truncated, skipped); without one only their structure is checked."""
    from training.datasets.prefs import encode_prefs, read_prefs
    from training.datasets.prompts import encode_prompts, read_prompts
    from training.datasets.sft import encode_sft, read_sft
    from training.datasets.text import read_text

    readers = {"sft": read_sft, "prefs": read_prefs, "prompts": read_prompts, "text": read_text}
    rows = readers[kind](path)
    counts: dict[str, Any] = {"rows": len(rows), "tokens": None, "trained_tokens": None, "truncated": None,
                              "skipped": None}
    out: dict[str, Any] = {"file": str(path), "kind": kind, "ok": True, "from": ref}
    if ref is not None:
        from gpt.checkpoint import load_checkpoint
        from gpt.registry import Registry

        ckpt = load_checkpoint(Registry(registry_root).resolve(ref).path)
        tokenizer, context = ckpt.tokenizer, ckpt.model.config.max_seq_len
        out["context"] = context
        result: Counts
        if kind == "sft":
            result = encode_sft(str(path), rows, tokenizer, context, skip_long).counts
        elif kind == "prefs":
            result = encode_prefs(str(path), rows, tokenizer, context, skip_long).counts
        elif kind == "prompts":
            result = encode_prompts(str(path), rows, tokenizer, context, max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                    skip_long).counts
        else:
            result = Counts(rows=len(rows), tokens=sum(len(tokenizer.encode(d.text)) + 1 for d in rows))
        counts.update(result.to_dict())
    if reward is not None:
        if kind != "prompts":
            raise ValueError("--reward checks a reward function against a prompts file (--kind prompts)")
        from training.rewards import RewardFunction

        first = rows[0]
        value = RewardFunction.load(reward)(first.messages, "", first.row.data, first.where)
        out["reward_on_first_row"] = value
    out["counts"] = counts
    return out
