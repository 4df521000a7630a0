"""Shared by the own-data tests: the `data` command group from this checkout's
pyproject.toml (an editable install made before it was declared lists no such entry
point), files written from rows, and a published tiny model."""

from __future__ import annotations

import json
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

from client import cli
from gpt.registry import Registry, publish_checkpoint
from tests.conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def declared_entry_points() -> list[EntryPoint]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [EntryPoint(name, value, cli.ENTRY_POINT_GROUP)
            for name, value in project["entry-points"][cli.ENTRY_POINT_GROUP].items()]


def run_cli(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(cli, "plugins", lambda: sorted(declared_entry_points(), key=lambda ep: ep.name))
    return cli.main(argv)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def publish_tiny(registry: Registry, tokenizer, seed: int = 0, **overrides) -> str:
    model = make_tiny_model(tokenizer, seed=seed, **overrides)
    publish_checkpoint(registry, "own", model, tokenizer, {"stage": "base", "step": 0}, aliases=("base", "sft"))
    return "own:base"


def registry_snapshot(registry: Registry) -> list[str]:
    """Every file under the registry: a failed stage must leave it unchanged."""
    return sorted(str(p.relative_to(registry.root)) for p in registry.root.rglob("*")) if registry.root.exists() \
        else []


def build_demo_registry(root: Path, tokenizer, sft_steps: int = 40) -> Registry:
    """The demo-style tiny model: the `tiny` preset's pretraining and SFT on the built-in
    tasks (with the session's tokenizer, and without the pipeline's evaluations), published
    as demo:base and demo:sft."""
    import dataclasses

    from training.data.corpus import build_corpus
    from training.data.tasks import pretraining_documents
    from training.loop import train
    from training.pipeline import sft_problems
    from training.presets import pipeline_preset
    from training.stages.pretrain import PretrainStage, token_stream
    from training.stages.sft import SFTStage

    p = pipeline_preset("tiny").with_seed(0)
    registry = Registry(root / "registry")
    model = make_tiny_model(tokenizer, seed=0, max_seq_len=256)
    docs = pretraining_documents(p.task_docs, p.task_doc_problems, 0, p.families)
    tokens = token_stream(tokenizer, build_corpus(p.corpus_bytes).train[:200] + docs, 0)
    train(model, PretrainStage(tokens, p.pretrain), p.pretrain.loop, progress=False)
    publish_checkpoint(registry, "demo", model, tokenizer, {"stage": "base", "step": p.pretrain.loop.steps},
                       aliases=("base",))
    conversations = [q.conversation() for q in sft_problems(p, 0).problems]
    sft = dataclasses.replace(p.sft, loop=dataclasses.replace(p.sft.loop, steps=sft_steps))
    train(model, SFTStage(tokenizer, conversations, sft), sft.loop, progress=False)
    publish_checkpoint(registry, "demo", model, tokenizer, {"stage": "sft", "step": sft_steps}, aliases=("sft",))
    return registry
