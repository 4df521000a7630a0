"""An adapter trained by `sol train sft --lora-rank` is served by its name over HTTP to
the openai SDK at once: listed under /v1/models with its base as root (vLLM's field), and its greedy
completion equals that of the model `sol models merge` made of it."""

from __future__ import annotations

import json

import openai
import pytest

from client.client import Client
from gpt.registry import Registry
from tests.conftest import free_port
from tests.service.harness import ADMIN_KEY, RunningServer
from tests.training.own_data_helpers import publish_tiny, run_cli, write_jsonl
from tests.training.test_lora_training import CHATS


@pytest.fixture
def served(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    common = ["--registry", str(registry.root), "--json"]
    assert run_cli(["train", "sft", "--from", "own:base", "--name", "own", "--data", str(chats), "--steps", "30",
                    "--lr", "3e-3", "--lora-rank", "8", "--adapter-name", "adder", "--preset", "tiny", "--quiet",
                    "--run-dir", str(tmp_path / "runs"), *common], monkeypatch) == 0
    assert run_cli(["models", "merge", "adder", "--name", "adder-merged", *common], monkeypatch) == 0
    capsys.readouterr()
    server = RunningServer(registry.root, tmp_path / "home", http_port=free_port(),
                           models=["own", "adder-merged"]).start()
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        key, _ = admin.create_key("lora-sdk")
    yield openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0), registry
    server.stop()


def test_a_trained_adapter_is_served_by_name_as_its_merged_model(served):
    sdk, registry = served
    listed = {m.id: m for m in sdk.models.list().data}
    # vLLM's field for an adapter's base model is `root`.
    assert "adder" in listed and (listed["adder"].model_extra or {}).get("root") == registry.resolve("own").ref
    outs = {}
    for model in ("adder", "adder-merged", "own"):
        r = sdk.completions.create(model=model, prompt="What is 4 plus 3?", max_tokens=8, temperature=0.0,
                                   logprobs=1)
        outs[model] = r
    assert outs["adder"].usage.completion_tokens == 8
    assert outs["adder"].choices[0].text == outs["adder-merged"].choices[0].text
    assert outs["adder"].choices[0].logprobs.token_logprobs == pytest.approx(
        outs["adder-merged"].choices[0].logprobs.token_logprobs, abs=1e-4)
    assert outs["adder"].choices[0].text != outs["own"].choices[0].text, json.dumps(
        {k: v.choices[0].text for k, v in outs.items()})
