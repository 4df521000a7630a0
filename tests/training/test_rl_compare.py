"""Smoke test of `sol report rl-compare` at a few steps: every run trains and publishes,
the table and the PNG are written, and the 2-process DPO run matches the 1-process one."""

from __future__ import annotations

import json
import math

from tests.training.own_data_helpers import publish_tiny, run_cli


def test_rl_compare_writes_its_table_and_plot(registry, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    publish_tiny(registry, tiny_tokenizer, max_seq_len=256)
    out = tmp_path / "report"
    assert run_cli(["report", "rl-compare", "--preset", "tiny", "--name", "own", "--from", "own:sft", "--registry",
                    str(registry.root), "--out", str(out), "--rl-steps", "2", "--eval-prompts", "8", "--threads", "1",
                    "--json"], monkeypatch) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["SFT (start)", "PPO", "GRPO", "DPO", "DPO, 2 processes"]
    assert all(0.0 <= r["reward"] <= 1.0 and 0.0 <= r["win_rate"] <= 1.0 for r in rows.values())
    assert rows["PPO"]["samples"] == rows["GRPO"]["samples"] == rows["DPO"]["samples"] > 0
    assert math.isclose(rows["DPO"]["dpo_eval_loss"], rows["DPO, 2 processes"]["dpo_eval_loss"], abs_tol=1e-4)
    assert all(rows[m]["seconds"] > 0 and rows[m]["peak_rss_mib"] > 0 for m in ("PPO", "GRPO", "DPO"))
    table = (out / "rl_compare.md").read_text()
    assert table.count("\n| ") == 7 and "rl_compare.png" in table      # header, rule, 5 rows
    assert (out / "rl_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
