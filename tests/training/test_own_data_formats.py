"""The data formats on real files: what each loader keeps, masks, truncates and skips,
and the arithmetic of the new objectives (DPO, GRPO's group advantages)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gpt.chat import render_chat
from tests.conftest import make_tiny_model
from tests.training.own_data_helpers import run_cli, write_jsonl
from training.batching import IGNORE_INDEX
from training.datasets.errors import DataError
from training.datasets.prefs import load_prefs
from training.datasets.prompts import load_prompts
from training.datasets.sft import load_sft
from training.datasets.split import heldout_split
from training.datasets.text import load_text
from training.heads import PolicyWithValue
from training.loop import LoopConfig
from training.own_data import Reward
from training.rewards import RewardFunction, builtin_tasks
from training.stages.dpo import DPOConfig, DPOStage, dpo_eval
from training.stages.rlhf import RLHFConfig, RLHFStage

USER = {"role": "user", "content": "What is 2 + 3?"}


def _trained(tokenizer, inputs_targets) -> str:
    _, targets = inputs_targets
    return tokenizer.decode([t for t in targets if t != IGNORE_INDEX and not tokenizer.is_special(t)])


def test_sft_weight_zero_turns_are_context_and_tools_are_kept(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{
        "messages": [{"role": "system", "content": "Be brief."}, USER,
                     {"role": "assistant", "content": "six", "weight": 0},
                     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "5", "weight": 1}],
        "tools": [{"type": "function", "function": {"name": "add"}}]}])
    data = load_sft(path, tiny_tokenizer, context=256)
    assert _trained(tiny_tokenizer, data.examples[0]) == "5"
    assert data.conversations[0].tools == [{"type": "function", "function": {"name": "add"}}]
    assert data.counts.rows == 1 and data.counts.trained_tokens == len(tiny_tokenizer.encode("5")) + 1


def test_prompt_completion_forms_match_the_messages_form(tmp_path, tiny_tokenizer):
    rows = [{"messages": [USER, {"role": "assistant", "content": "5"}]},
            {"prompt": "What is 2 + 3?", "completion": "5"},
            {"prompt": [USER], "completion": [{"role": "assistant", "content": "5"}]}]
    data = load_sft(write_jsonl(tmp_path / "sft.jsonl", rows), tiny_tokenizer, context=256)
    assert data.examples[0] == data.examples[1] == data.examples[2]
    ids = render_chat(tiny_tokenizer, rows[0]["messages"]).ids
    assert data.examples[0][0] == ids[:-1]


def test_long_rows_are_truncated_from_the_right_or_skipped(tmp_path, tiny_tokenizer):
    long_reply = "word " * 100
    rows = [{"prompt": "hi", "completion": long_reply}, {"prompt": "long " * 100, "completion": "5"},
            {"prompt": "hi", "completion": "5"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=r"sft.jsonl:2: messages: expected a prompt shorter"):
        load_sft(path, tiny_tokenizer, context=32)
    data = load_sft(path, tiny_tokenizer, context=32, skip_long=True)
    assert (data.counts.rows, data.counts.truncated, data.counts.skipped) == (2, 1, 1)
    assert len(data.examples[0][0]) == 31           # 32 tokens: 31 inputs, 31 targets
    assert data.conversations[1].row.line == 3


def test_preference_forms_and_completion_masks(tmp_path, tiny_tokenizer):
    multi_turn = [USER, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]
    rows = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
            {"prompt": [USER], "chosen": [{"role": "assistant", "content": "5"}],
             "rejected": [{"role": "assistant", "content": "6"}]},
            {"messages": multi_turn, "chosen": "8", "rejected": "9"}]
    data = load_prefs(write_jsonl(tmp_path / "prefs.jsonl", rows), tiny_tokenizer, context=256)
    assert data.pairs[0].chosen.ids == data.pairs[1].chosen.ids and data.pairs[0].rejected.ids == data.pairs[1].rejected.ids
    # The assistant turn inside the multi-turn prompt is context: only the completion is trained.
    chosen = data.pairs[2].chosen
    trained = [t for t, m in zip(chosen.ids, chosen.mask, strict=True) if m]
    assert tiny_tokenizer.decode([t for t in trained if not tiny_tokenizer.is_special(t)]) == "8"
    assert data.counts.rows == 3


def test_prompt_rows_pass_their_fields_to_the_reward(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [USER], "bonus": 2},
                                                    {"prompt": "Say hi", "bonus": 0.5}])
    data = load_prompts(path, tiny_tokenizer, context=256, max_new_tokens=8)
    reward = Reward(tiny_tokenizer, function=RewardFunction.load("python:tests.training.own_data_rewards:uses_row"))
    score = reward.scorer(data)
    assert score([0, 1, 1], ["a", "b", "c"], [True, True, False]) == [3.0, 1.5, 1.5]
    assert data.prompts[1].messages == [{"role": "user", "content": "Say hi"}]


def test_builtin_tasks_reward_checks_the_row_answer():
    row = {"messages": [{"role": "user", "content": "What is 48 + 27?"}], "family": "add", "key": "48+27",
           "answer": "75"}
    assert builtin_tasks(row["messages"], "75", row) == 1.0
    assert builtin_tasks(row["messages"], "76", row) == 0.0


def test_text_files_jsonl_and_txt(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("Once upon a time.\n\nThe end.\n")
    assert [d.text for d in load_text(txt).documents] == ["Once upon a time.\n\nThe end.\n"]
    jsonl = write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}, {"text": "two"}])
    assert [(d.line, d.text) for d in load_text(jsonl).documents] == [(1, "one"), (2, "two")]


def test_heldout_split_is_a_tenth_and_deterministic_by_seed():
    rows = list(range(50))
    train, held = heldout_split(rows, seed=3, path="x")
    assert len(held) == 5 and sorted(train + held) == rows
    assert heldout_split(rows, seed=3, path="x") == (train, held)
    assert heldout_split(rows, seed=4, path="x")[1] != held


def test_dpo_loss_is_log2_at_the_reference_and_falls_when_trained(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(8)]
    data = load_prefs(write_jsonl(tmp_path / "p.jsonl", rows), tiny_tokenizer, context=64)
    reference = make_tiny_model(tiny_tokenizer, seed=1)
    policy = make_tiny_model(tiny_tokenizer, seed=1)
    cfg = DPOConfig(LoopConfig(steps=5, batch_size=4, lr=5e-3, warmup_steps=1))
    stage = DPOStage(reference, data.pairs, tiny_tokenizer.eot_id, cfg)
    before = dpo_eval(policy, stage.ref, data.pairs, tiny_tokenizer.eot_id, cfg.beta)
    assert math.isclose(before["loss"], math.log(2), rel_tol=1e-5) and before["accuracy"] == 0.5
    from training.loop import train

    train(policy, stage, cfg.loop, progress=False)
    after = dpo_eval(policy, stage.ref, data.pairs, tiny_tokenizer.eot_id, cfg.beta)
    assert after["loss"] < before["loss"] and after["accuracy"] == 1.0


def test_grpo_advantages_are_group_z_scores(tiny_tokenizer):
    prompts = [render_chat(tiny_tokenizer, [{"role": "user", "content": f"q{i}"}], add_generation_prompt=True).ids
               for i in range(4)]
    cfg = RLHFConfig(LoopConfig(batch_size=4, seed=0), rollouts=8, samples_per_prompt=4, max_new_tokens=4,
                     algo="grpo")
    model = make_tiny_model(tiny_tokenizer, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)         # sharper logits: replies of different lengths

    def score(picks, texts, finished):
        return [float(len(t)) for t in texts]

    stage = RLHFStage(PolicyWithValue(model), make_tiny_model(tiny_tokenizer, seed=2), None, tiny_tokenizer, None,
                      cfg, prompt_ids=prompts, scorer=score)
    ro = stage.make_rollout(0, 0, 1)
    per_reply = (ro.advantages * ro.mask).sum(1) / ro.mask.sum(1)
    groups = per_reply.view(-1, 4)
    assert torch.allclose(groups.mean(1), torch.zeros(2), atol=1e-5)
    assert ro.ref_logp is not None and torch.all(ro.values == 0)
    with pytest.raises(ValueError, match="GRPO needs a group"):
        RLHFStage(PolicyWithValue(model), model, None, tiny_tokenizer, None,
                  RLHFConfig(algo="grpo", samples_per_prompt=1), prompt_ids=prompts, scorer=score)


def test_data_check_counts_and_export_demo_round_trip(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    registry, resolved = tiny_checkpoint
    assert run_cli(["data", "export-demo", str(tmp_path / "demo"), "--json"], monkeypatch) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert {"sft.jsonl", "prefs.jsonl", "prompts.jsonl", "text.jsonl", "corpus.txt"} <= set(files)
    for name, kind in (("sft.jsonl", "sft"), ("prefs_eval.jsonl", "prefs"), ("prompts_eval.jsonl", "prompts"),
                       ("text.jsonl", "text")):
        argv = ["data", "check", str(tmp_path / "demo" / name), "--kind", kind, "--from", resolved.ref,
                "--registry", str(registry.root), "--json"]
        assert run_cli(argv, monkeypatch) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["ok"] and out["counts"]["rows"] == files[name] and out["counts"]["tokens"] > 0
    # Without a checkpoint: structure only.
    assert run_cli(["data", "check", str(tmp_path / "demo" / "sft.jsonl"), "--kind", "sft"], monkeypatch) == 0
    assert "rows" in capsys.readouterr().out
