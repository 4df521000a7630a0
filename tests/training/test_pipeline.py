"""The tiny pipeline end to end through the CLI: four verified checkpoints that the
server's loader accepts, a report with plots, and a stage rerun through `sol train`."""

from __future__ import annotations

import json

from client.cli import main
from gpt.checkpoint import load_checkpoint
from gpt.registry import Registry
from training.heads import REWARD_HEAD, VALUE_HEAD


def test_tiny_pipeline_publishes_four_checkpoints(tmp_path, capsys):
    root = tmp_path / "registry"
    assert main(["pipeline", "--preset", "tiny", "--name", "e2e", "--seed", "3", "--registry", str(root),
                 "--quiet", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "checkpoints:" in printed

    registry = Registry(root)
    aliases = registry.aliases("e2e")
    assert {"base", "sft", "rm", "rlhf", "latest"} <= set(aliases)
    parents = {}
    for alias in ("base", "sft", "rm", "rlhf"):
        ckpt = load_checkpoint(registry.resolve(f"e2e:{alias}").path)
        assert ckpt.meta["stage"] == alias and ckpt.meta["seed"] == 3
        assert ckpt.meta["data_fingerprint"] and "metrics" in ckpt.meta and ckpt.meta["step"] > 0
        parents[alias] = ckpt.meta["parent"]
        if alias == "rm":
            assert f"{REWARD_HEAD}.weight" in ckpt.heads
        if alias == "rlhf":
            assert f"{VALUE_HEAD}.weight" in ckpt.heads
            assert ckpt.meta["reward_model"] == f"e2e@{aliases['rm']}"
    assert parents == {"base": None, "sft": f"e2e@{aliases['base']}", "rm": f"e2e@{aliases['sft']}",
                       "rlhf": f"e2e@{aliases['sft']}"}

    reports = list((root / "e2e" / "reports").glob("*/report.md"))
    assert len(reports) == 1
    report_dir = reports[0].parent
    for png in ("losses.png", "rlhf.png", "accuracy.png"):
        assert (report_dir / png).stat().st_size > 5000
    summary = json.loads((report_dir / "summary.json").read_text())
    assert set(summary["metrics"]) == {"base", "sft", "rm", "rlhf"}
    assert "| base |" in reports[0].read_text()

    # One stage on its own, from the published SFT model, resumable in its own run dir.
    assert main(["train", "sft", "--preset", "tiny", "--name", "e2e", "--registry", str(root), "--steps", "3",
                 "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage"] == "sft" and load_checkpoint(out["path"]).meta["step"] == 3
