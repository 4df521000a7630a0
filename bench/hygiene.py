"""`sol bench hygiene`: sampled chat completions of a served model must not show special
tokens as text. `sol serve` runs on the model; N chat completions over gRPC, sampled at
temperature 1 (so the model does emit role-start and end tokens where greedy would not),
from the training tasks' held-out prompts; each reply's text is searched for every special
token of the model's tokenizer. Prints what was found, how the replies ended, and exits 1
when any reply shows one."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm


@dataclass
class HygieneReport:
    model: str
    completions: int
    with_special_text: int
    found: dict[str, int] = field(default_factory=dict)      # special token text -> replies showing it
    finish_reasons: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    examples: list[str] = field(default_factory=list)         # a few offending replies, for the reader
    wall_s: float = 0.0


def held_out_prompts(n: int, seed: int) -> list[str]:
    """n user prompts in the task families' own wording, cycled from held-out problems."""
    from training.data.tasks import sample_problems

    problems = sample_problems(max(1, n // 8 + 1), "heldout", seed).problems
    return [problems[i % len(problems)].prompt for i in range(n)]


def special_texts(tokenizer) -> list[str]:
    """The text of every special token, longest first (so `<|end|>` is reported as itself,
    not as a shorter one it contains)."""
    return sorted(tokenizer.special_ids, key=len, reverse=True)


def shown_specials(text: str, specials: list[str]) -> list[str]:
    return [s for s in specials if s and s in text]


async def sample(target: str, api_key: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                 temperature: float, seed: int, specials: list[str]) -> HygieneReport:
    from client.aio import AsyncClient

    report = HygieneReport(model=model, completions=len(prompts), with_special_text=0)
    found: collections.Counter[str] = collections.Counter()
    finishes: collections.Counter[str] = collections.Counter()
    queue = list(enumerate(prompts))
    bar = tqdm(total=len(prompts), desc="completions", unit="req")

    async def worker(client: AsyncClient) -> None:
        while queue:
            i, prompt = queue.pop()
            reply = await client.chat([{"role": "user", "content": prompt}], model=model,
                                      max_tokens=max_tokens, temperature=temperature, seed=seed + i)
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
            finishes[reason] += 1
            report.completion_tokens += reply.usage.completion_tokens
            shown = shown_specials(text, specials)
            if shown:
                report.with_special_text += 1
                found.update(shown)
                if len(report.examples) < 5:
                    report.examples.append(text)
            bar.update(1)

    began = time.perf_counter()
    async with AsyncClient(target, api_key=api_key, retries=2) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    bar.close()
    report.wall_s = time.perf_counter() - began
    report.found, report.finish_reasons = dict(found), dict(finishes)
    return report


def run(args: argparse.Namespace) -> int:
    from bench.serve import start_server, stop_server
    from client.client import Client
    from gpt.checkpoint import load_checkpoint
    from gpt.registry import Registry

    registry = Registry(args.registry)
    resolved = registry.resolve(args.model)
    tokenizer = load_checkpoint(resolved.path, device="cpu").tokenizer
    specials = special_texts(tokenizer)
    prompts = held_out_prompts(args.completions, args.seed)
    admin_key = "sk-admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="sol-bench-hygiene-") as tmp:
        home = Path(tmp)
        proc, target = start_server(home, registry.root, args.model, None, admin_key, home / "serve.log")
        try:
            with Client(target, admin_key=admin_key) as admin:
                key = admin.create_key("hygiene")[0]
            report = asyncio.run(sample(target, key, args.model, prompts, args.concurrency, args.max_tokens,
                                        args.temperature, args.seed, specials))
        finally:
            stop_server(proc)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"sol bench hygiene: {report.completions} chat completions of {args.model} "
              f"(temperature {args.temperature:g}, up to {args.max_tokens} tokens, {report.completion_tokens} "
              f"tokens in {report.wall_s:.0f} s); special tokens searched: {', '.join(specials)}")
        print(f"finish reasons: {report.finish_reasons}")
        print(f"replies showing special-token text: {report.with_special_text} of {report.completions}"
              + (f" {report.found}" if report.found else ""))
        for text in report.examples:
            print(f"  e.g. {text!r}")
    return 1 if report.with_special_text else 0
