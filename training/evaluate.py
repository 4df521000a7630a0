"""Evaluation: held-out task accuracy per family (greedy; the base model few-shot, chat
models through the chat template), base perplexity on held-out text, and the reward
model's pairwise accuracy on held-out preference pairs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt.chat import chat_prompt_ids, chat_stop_ids
from gpt.model import GPT
from gpt.tokenizer import SolTokenizer
from server.engine.api import JsonSchema, ResponseFormat, SamplingParams
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.offline import generate
from training.data.tasks import FAMILIES, PreferencePair, Problem, few_shot_prompt, sample_problems
from training.decoding import reply_text, training_engine
from training.stages.reward import pairwise_loss, sample_replies, score_replies

N_SHOTS = 3


@dataclass
class TaskAccuracy:
    accuracy: float
    per_family: dict[str, float]
    n: int
    samples: list[dict[str, str | bool]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_family": self.per_family, "n": self.n}


def newline_stop_ids(tokenizer: SolTokenizer) -> list[int]:
    """Every token whose text contains a newline ends a few-shot answer."""
    ids = [tokenizer.eos_ids[0]]
    for i in range(tokenizer.vocab_size):
        if not tokenizer.is_special(i) and b"\n" in tokenizer.decode_bytes([i]):
            ids.append(i)
    return ids


def few_shot_examples(seed: int) -> dict[str, list[Problem]]:
    """Fixed training-split demonstrations per family for the base model's prompt (every
    family's: each family's draw depends on its name only)."""
    return sample_problems(N_SHOTS, "train", seed + 77, FAMILIES).by_family()


@torch.no_grad()
def task_accuracy(model: GPT, tokenizer: SolTokenizer, problems: list[Problem], mode: str,
                  max_new_tokens: int = 24, shots_seed: int = 0, keep_samples: int = 3,
                  engine: Engine | None = None) -> TaskAccuracy:
    """Greedy accuracy. mode "chat": the chat template; "base": a few-shot plain-text
    prompt. Decoded by `engine` (one on `model`, e.g. kept by a training stage) or by a
    synchronous engine made for this call."""
    if mode not in ("chat", "base"):
        raise ValueError(f"mode must be 'chat' or 'base', got {mode!r}")
    model.eval()
    if mode == "chat":
        prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in problems]
        stops = chat_stop_ids(tokenizer)
    else:
        shots = few_shot_examples(shots_seed)
        prompts = [[tokenizer.eos_ids[0]] + tokenizer.encode(few_shot_prompt(shots[p.family], p)) for p in problems]
        stops = newline_stop_ids(tokenizer)
    if engine is None:
        engine = training_engine(model, max((len(p) for p in prompts), default=1) + max_new_tokens)
    outputs = generate(engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), stops)
    right: dict[str, list[bool]] = defaultdict(list)
    samples: list[dict[str, str | bool]] = []
    for problem, out in zip(problems, outputs, strict=True):
        text = reply_text(tokenizer, out.token_ids, stops)
        ok = problem.check(text)
        right[problem.family].append(ok)
        if len([s for s in samples if s["family"] == problem.family]) < keep_samples:
            samples.append({"family": problem.family, "prompt": problem.prompt, "reply": text,
                            "answer": problem.answer, "correct": ok})
    per_family = {f: sum(v) / len(v) for f, v in sorted(right.items())}
    total = sum(sum(v) for v in right.values())
    return TaskAccuracy(accuracy=total / max(1, len(problems)), per_family=per_family, n=len(problems),
                        samples=samples)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@torch.no_grad()
def structured_accuracy(model: GPT, tokenizer: SolTokenizer, problems: list[Problem],
                        max_new_tokens: int = 24) -> dict[str, dict[str, float]]:
    """For the families whose answers have a JSON Schema (Family.answer_schema): greedy
    held-out replies through the serving engine, free and with the schema as the
    response_format. Per family and mode, the share of replies that are a JSON object
    ("json") and that are right ("accuracy")."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    by_family: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        if FAMILIES[p.family].answer_schema is not None:
            by_family[p.family].append(p)
    if not by_family:
        return out
    stops = chat_stop_ids(tokenizer)
    grammars = GrammarCompiler.for_tokenizer(tokenizer, model.config.vocab_size)
    prompts_of = {f: [chat_prompt_ids(tokenizer, [{"role": "user", "content": p.prompt}]) for p in g]
                  for f, g in by_family.items()}
    engine = training_engine(model, max(len(p) for ps in prompts_of.values() for p in ps) + max_new_tokens)
    for family, group in sorted(by_family.items()):
        fmt = ResponseFormat("json_schema", JsonSchema(family, FAMILIES[family].answer_schema, strict=True))
        row: dict[str, float] = {"n": len(group)}
        for mode, rf in (("free", None), ("constrained", fmt)):
            params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, response_format=rf)
            replies = [reply_text(tokenizer, o.token_ids, stops)
                       for o in generate(engine, prompts_of[family], params, stops, grammars=grammars)]
            row[f"{mode}_json"] = sum(map(_is_json_object, replies)) / len(group)
            row[f"{mode}_accuracy"] = sum(p.check(r) for p, r in zip(group, replies, strict=True)) / len(group)
        out[family] = row
    return out


@torch.no_grad()
def perplexity(model: GPT, tokenizer: SolTokenizer, texts: list[str], seq_len: int = 128,
               max_tokens: int = 50_000, batch_size: int = 16) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the held-out texts."""
    model.eval()
    device = next(model.parameters()).device
    ids: list[int] = []
    for doc in tokenizer.encode_batch(texts):
        ids += [tokenizer.eos_ids[0], *doc]
        if len(ids) >= max_tokens:
            break
    n = (min(len(ids), max_tokens) - 1) // seq_len
    if n == 0:
        return float("nan")
    stream = torch.tensor(ids[:n * seq_len + 1], dtype=torch.long)
    windows = torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def reward_accuracy(rm: torch.nn.Module, tokenizer: SolTokenizer, pairs: list[PreferencePair]) -> dict[str, float]:
    """Share of held-out pairs where the chosen reply outscores the rejected one, overall
    and by the rejected reply's source (a policy sample or a corruption)."""
    rm.eval()
    chosen = score_replies(rm, tokenizer, [(p.problem.prompt, p.chosen) for p in pairs])
    rejected = score_replies(rm, tokenizer, [(p.problem.prompt, p.rejected) for p in pairs])
    wins = (chosen > rejected).tolist()
    out = {"accuracy": sum(wins) / max(1, len(wins)), "n": float(len(wins)),
           "loss": pairwise_loss(chosen, rejected).item() if wins else float("nan")}
    for source in sorted({p.source for p in pairs}):
        picked = [w for w, p in zip(wins, pairs, strict=True) if p.source == source]
        out[f"accuracy_{source}"] = sum(picked) / len(picked)
    return out


@torch.no_grad()
def reward_ranking(policy: GPT, rm: torch.nn.Module, tokenizer: SolTokenizer, problems: list[Problem],
                   samples_per_problem: int, seed: int, engine: Engine | None = None
                   ) -> dict[str, dict[str, float | None]]:
    """How well the reward model ranks the policy's own samples, per task family: what
    RL against it can reach. For each problem, `samples_per_problem` replies at
    temperature 1 are scored; reported are the share of samples that are correct, the
    share of problems whose samples are mixed (some right, some wrong: the only ones that
    carry a learning signal), the share of (right, wrong) pairs within a problem that the
    reward model orders correctly, and best-of-n accuracy (the top-scored sample
    correct). Best-of-n at or below the policy's greedy accuracy means the reward cannot
    lead RL past it on that family. Unfinished replies count as wrong. `engine`: one on
    `policy` to sample with (default: one made for this call)."""
    replies = sample_replies(policy, tokenizer, [p.prompt for p in problems], samples_per_problem, seed,
                             engine=engine)
    items = [(p.prompt, text or "") for p, texts in zip(problems, replies, strict=True) for text in texts]
    scores = score_replies(rm, tokenizer, items).view(len(problems), samples_per_problem).tolist()
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p, texts, row in zip(problems, replies, scores, strict=True):
        right = [text is not None and p.check(text) for text in texts]
        fam = stats[p.family]
        fam["sample_accuracy"] += [float(r) for r in right]
        fam["mixed"].append(float(0 < sum(right) < len(right)))
        fam["pair_accuracy"] += [float(a > b) for a, ra in zip(row, right, strict=True) if ra
                                 for b, rb in zip(row, right, strict=True) if not rb]
        fam["best_of_n"].append(float(right[max(range(len(row)), key=row.__getitem__)]))
    return {family: {key: (sum(v) / len(v) if v else None) for key, v in sorted(fam.items())}
            for family, fam in sorted(stats.items())}
