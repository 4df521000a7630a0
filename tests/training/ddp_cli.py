"""`sol train ...` as the DDP and kill-resume tests run it, alone or under torchrun:
`python -m tests.training.ddp_cli OUT.json [PRESET-OVERRIDES-JSON] -- train ARGS...`.

Rank 0's `--json` output goes to OUT.json. The overrides set the tiny preset's batch
sizes (`{"sft": {"batch_size": 8}, "rlhf": {"rollouts": 16}}`: loop fields or the stage
config's own), so that one process can take the global batch of two. With
SOL_TEST_KILL_AT=N the process SIGKILLs itself right after writing the resumable state
of step N: a crash at a known point, with nothing flushed or cleaned up after it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from tests.training.own_data_helpers import declared_entry_points


def _override(preset, overrides: dict) -> None:
    for key, values in overrides.items():
        if key == "dpo":
            continue
        cfg = getattr(preset, key)
        loop = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cfg.loop)}}
        own = {k: v for k, v in values.items() if k not in loop}
        setattr(preset, key, dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, **loop), **own))


def main() -> int:
    out, overrides, argv = sys.argv[1], json.loads(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:]
    from client import cli
    from training import loop, presets

    original = presets.pipeline_preset

    def preset(name: str):
        p = original(name)
        _override(p, overrides)
        return p

    presets.pipeline_preset = preset
    if "dpo" in overrides:      # DPO's config is not part of the preset
        from training import own_data_commands
        from training.stages.dpo import DPOConfig

        def dpo_config(**kwargs) -> DPOConfig:
            cfg = DPOConfig(**kwargs)
            return dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, **overrides["dpo"]))

        own_data_commands.DPOConfig = dpo_config
    kill_at = int(os.environ.get("SOL_TEST_KILL_AT", "0"))
    if kill_at:
        save = loop.save_state

        def save_then_die(run_dir, model, optimizer, step, stage, cfg):
            path = save(run_dir, model, optimizer, step, stage, cfg)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        loop.save_state = save_then_die
    cli.plugins = lambda: sorted(declared_entry_points(), key=lambda ep: ep.name)
    if os.environ.get("RANK", "0") != "0":
        return cli.main(argv)
    with Path(out).open("w") as f, contextlib.redirect_stdout(f):
        return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
