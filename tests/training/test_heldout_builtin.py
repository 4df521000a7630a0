"""`sol train sft` and `sol train reward` on the built-in tasks report the held-out loss
before and after the stage, as they do when trained from a file."""

from __future__ import annotations

import json
import math

from tests.training.own_data_helpers import publish_tiny, run_cli


def test_builtin_sft_and_reward_report_heldout_losses(registry, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    publish_tiny(registry, tiny_tokenizer, max_seq_len=256)
    common = ["--preset", "tiny", "--name", "own", "--registry", str(registry.root), "--run-dir", str(tmp_path),
              "--quiet", "--json", "--threads", "1"]
    assert run_cli(["train", "sft", "--from", "own:base", "--steps", "6", "--lr", "3e-3", *common], monkeypatch) == 0
    sft = json.loads(capsys.readouterr().out)
    assert sft["eval_loss_after"] < sft["eval_loss_before"], sft
    assert run_cli(["train", "reward", "--from", "own:base", "--steps", "4", *common], monkeypatch) == 0
    rm = json.loads(capsys.readouterr().out)
    assert math.isfinite(rm["eval_loss_before"]) and math.isfinite(rm["eval_loss_after"]), rm
    assert rm["eval_loss_after"] != rm["eval_loss_before"] and 0.0 <= rm["eval_accuracy"] <= 1.0, rm
