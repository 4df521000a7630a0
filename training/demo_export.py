"""`sol data export-demo DIR`: the built-in tasks as the files `--data` takes, so that
the demo can be rerun from files and a user has a worked example of every format.

Written (the preset's draw for the seed, as `sol pipeline` would train on it):
sft.jsonl / sft_eval.jsonl (chat SFT), prefs.jsonl / prefs_eval.jsonl (canonical answer
over a corruption), prompts.jsonl / prompts_eval.jsonl (RL prompts with the fields
`training.rewards:builtin_tasks` checks), text.jsonl (pretraining task documents) and
corpus.txt (the local corpus' held-out part, as plain text). The *_eval files come from
the held-out split of the tasks, which no training file shares."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _write(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def export_demo(directory: Path, preset_name: str = "tiny", seed: int = 0) -> dict[str, int]:
    from training.data.corpus import build_corpus
    from training.data.tasks import preference_pairs, pretraining_documents
    from training.pipeline import RM_EVAL_SEED, eval_problems, preference_problems, rlhf_prompts, sft_problems
    from training.presets import pipeline_preset
    from training.rewards import problem_row

    p = pipeline_preset(preset_name).with_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    heldout = eval_problems(p)
    rm_train, rm_heldout = preference_problems(p, seed)

    def prefs(problems: list, pair_seed: int) -> Iterable[dict[str, Any]]:
        for pair in preference_pairs(problems, pair_seed).pairs:
            yield {"prompt": pair.problem.prompt, "chosen": pair.chosen, "rejected": pair.rejected}

    written = {
        "sft.jsonl": _write(directory / "sft.jsonl",
                            ({"messages": q.conversation()} for q in sft_problems(p, seed).problems)),
        "sft_eval.jsonl": _write(directory / "sft_eval.jsonl", ({"messages": q.conversation()} for q in heldout)),
        "prefs.jsonl": _write(directory / "prefs.jsonl", prefs(rm_train, seed)),
        "prefs_eval.jsonl": _write(directory / "prefs_eval.jsonl", prefs(rm_heldout, RM_EVAL_SEED)),
        "prompts.jsonl": _write(directory / "prompts.jsonl", map(problem_row, rlhf_prompts(p, seed).problems)),
        "prompts_eval.jsonl": _write(directory / "prompts_eval.jsonl", map(problem_row, heldout)),
        "text.jsonl": _write(directory / "text.jsonl", ({"text": d} for d in pretraining_documents(
            p.task_docs, p.task_doc_problems, seed, p.families))),
    }
    corpus = build_corpus(p.corpus_bytes)
    (directory / "corpus.txt").write_text("\n\n".join(corpus.heldout), encoding="utf-8")
    written["corpus.txt"] = len(corpus.heldout)
    return written
