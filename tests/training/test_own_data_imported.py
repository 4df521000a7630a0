"""Training an imported model on the user's own data: a Qwen2-style checkpoint saved by
transformers with its own tokenizer and ChatML template, imported, fine-tuned from a chat
file (loss masks from the model's own template) and with DPO from preference pairs; the
held-out loss falls and the result serves as a model of the same family."""

from __future__ import annotations

import json

import pytest

from gpt.checkpoint import load_checkpoint
from tests.http.test_imported_model_serving import _checkpoint
from tests.training.own_data_helpers import run_cli, write_jsonl

pytest.importorskip("transformers")

CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
         for a in range(1, 9) for b in range(1, 9)]
PAIRS = [{"prompt": [{"role": "user", "content": f"Say hi to {name}."}],
          "chosen": [{"role": "assistant", "content": f"Hi {name}!"}],
          "rejected": [{"role": "assistant", "content": "No."}]} for name in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo",
                                                                                "Gus", "Hal", "Ivy", "Jo")]


def _run(argv, capsys, monkeypatch) -> dict:
    assert run_cli(argv, monkeypatch) == 0
    return json.loads(capsys.readouterr().out)


def test_an_imported_model_trains_on_a_chat_file_and_preference_pairs(tmp_path, hf_tokenizer_dirs, capsys,
                                                                      monkeypatch):
    directory, _, _ = _checkpoint(tmp_path, hf_tokenizer_dirs["qwen"], "qwen2")
    registry = tmp_path / "registry"
    common = ["--registry", str(registry), "--quiet", "--json"]
    assert run_cli(["import-hf", str(directory), "--name", "qwen", "--registry", str(registry)], monkeypatch) == 0
    capsys.readouterr()
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    sft = _run(["train", "sft", "--from", "qwen", "--name", "qwen", "--data", str(chats), "--steps", "30",
                "--run-dir", str(tmp_path / "runs-sft"), *common], capsys, monkeypatch)
    assert sft["eval_loss_after"] < sft["eval_loss_before"] - 0.5, sft
    trained = load_checkpoint(registry / "qwen" / sft["ref"].split("@")[1])
    # Still the model's own tokenizer and template (not sol's), so it serves as it came.
    assert trained.tokenizer.chat_template and "<|im_start|>" in trained.tokenizer.chat_template
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    dpo = _run(["train", "dpo", "--from", sft["ref"], "--name", "qwen", "--data", str(prefs), "--steps", "20",
                "--run-dir", str(tmp_path / "runs-dpo"), *common], capsys, monkeypatch)
    assert dpo["eval_loss_after"] < dpo["eval_loss_before"], dpo
