"""Training LoRA adapters: `sol train sft|dpo --lora-rank R` trains only the adapter's A
and B over a frozen base, publishes it as a registry entry of its own (PEFT's files,
naming its base version), and that adapter serves: in the engine it decodes as the model
`sol models merge` makes of it, and PEFT loads the files made for an imported Qwen2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gpt.adapter_store import adapter_base, load_published_adapter
from gpt.checkpoint import load_checkpoint, read_meta
from gpt.lora import LoraSpec
from gpt.lora_trainable import LoraModel
from gpt.registry import Registry
from server.engine.adapter_slots import AdapterRef
from server.engine.api import SamplingParams
from server.engine.config import EngineConfig
from server.engine.offline import build_engine, generate
from tests.conftest import make_tiny_model
from tests.training.own_data_helpers import publish_tiny, registry_snapshot, run_cli, write_jsonl
from training.decoding import training_engine
from training.loop import LoopConfig, make_optimizer, train
from training.lora_training import as_gpt, rollout_adapters
from training.stages.sft import SFTConfig, SFTStage, sft_example

CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
         for a in range(1, 9) for b in range(1, 9)]
PAIRS = [{"prompt": [{"role": "user", "content": f"Say hi to {name}."}],
          "chosen": [{"role": "assistant", "content": f"Hi {name}!"}],
          "rejected": [{"role": "assistant", "content": "No."}]}
         for name in ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: a second thread only contends on the shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(argv: list[str], capsys, monkeypatch) -> dict:
    assert run_cli(argv, monkeypatch) == 0
    return json.loads(capsys.readouterr().out)


def _engine(model, **overrides):
    cfg = dict(device="cpu", dtype=torch.float32, num_blocks=64, max_loras=2, max_lora_rank=16)
    cfg.update(overrides)
    return build_engine(model, EngineConfig(**cfg), start=False)


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(tiny_tokenizer):
    base = make_tiny_model(tiny_tokenizer, seed=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = LoraModel(base, LoraSpec(4, 8.0, ("q", "v", "down")), dropout=0.1)
    optimizer = make_optimizer(model, LoopConfig())
    in_optimizer = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    adapter_size = sum(a.numel() + b.numel() for a, b in model.adapter().weights.values())
    assert in_optimizer == model.trainable_parameters() == adapter_size      # no state for the base
    assert adapter_size < base.num_parameters() / 10
    examples = [sft_example(tiny_tokenizer, c["messages"]) for c in CHATS[:16]]
    stage = SFTStage(tiny_tokenizer, [], SFTConfig(LoopConfig(steps=4, batch_size=4, warmup_steps=1)),
                     examples=examples)
    train(model, stage, stage.cfg.loop, progress=False)
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(b.abs().sum() > 0 for _, b in model.adapter().weights.values())   # B moved off zero


def test_sft_adapter_lowers_loss_publishes_and_serves_as_its_merged_model(tmp_path, tiny_tokenizer, capsys,
                                                                           monkeypatch):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    base_ref = registry.resolve("own:base").ref
    base_files = {p.name: p.read_bytes() for p in registry.resolve(base_ref).path.iterdir() if p.is_file()}
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    common = ["--registry", str(registry.root), "--quiet", "--json", "--preset", "tiny"]
    out = _run(["train", "sft", "--from", "own:base", "--name", "own", "--data", str(chats), "--steps", "30",
                "--lr", "3e-3", "--lora-rank", "8", "--lora-targets", "q,k,v,o,gate,up,down", "--lora-dropout", "0.05",
                "--adapter-name", "adder", "--run-dir", str(tmp_path / "runs"), *common], capsys, monkeypatch)
    assert out["ref"] == "adder@1" and out["stage"] == "sft", out
    assert out["eval_loss_after"] < out["eval_loss_before"] - 0.3, out
    # The base version is untouched; the adapter is an entry of its own naming it.
    assert {p.name: p.read_bytes() for p in registry.resolve(base_ref).path.iterdir() if p.is_file()} == base_files
    version = registry.resolve("adder:sft")
    meta = read_meta(version.path)
    assert meta["kind"] == "adapter" and adapter_base(version.path) == base_ref
    assert meta["lora"]["rank"] == 8 and meta["metrics"]["eval_loss_after"] == out["eval_loss_after"]
    assert json.loads((version.path / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert sorted(p.name for p in version.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                              "meta.json"]

    merged = _run(["models", "merge", "adder", "--name", "adder-merged", "--registry", str(registry.root),
                   "--json"], capsys, monkeypatch)
    base = load_checkpoint(registry.resolve(base_ref).path)
    adapter, _ = load_published_adapter(version.path, registry, base.config, max_rank=16)
    prompts = [tiny_tokenizer.encode(f"What is {a} plus 3?") for a in (2, 5, 7)]
    rows = prompts + prompts[:1]
    refs = [AdapterRef("adder", 1, adapter)] * 3 + [None]
    got = generate(_engine(base.model), rows, GREEDY, adapters=refs)
    want = generate(_engine(load_checkpoint(registry.resolve(merged["ref"]).path).model), prompts, GREEDY)
    plain = generate(_engine(base.model), prompts, GREEDY)
    for g, w in zip(got[:3], want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.choices[0].logprobs == pytest.approx(w.choices[0].logprobs, abs=1e-4)
    assert got[3].token_ids == plain[0].token_ids                     # the base row in the same batch
    assert [g.token_ids for g in got[:3]] != [p.token_ids for p in plain]  # the adapter changes the output


def test_dpo_adapter_lowers_heldout_dpo_loss(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    out = _run(["train", "dpo", "--from", "own:sft", "--name", "own", "--data", str(prefs), "--eval-data",
                str(prefs), "--steps", "15", "--lr", "3e-3", "--lora-rank", "4", "--lora-targets", "q,v,o,down",
                "--run-dir", str(tmp_path / "runs"), "--registry", str(registry.root), "--quiet", "--json",
                "--preset", "tiny"], capsys, monkeypatch)
    assert out["ref"] == "own-dpo-lora@1", out
    assert out["eval_loss_after"] < out["eval_loss_before"] - 0.05, out
    meta = read_meta(registry.resolve(out["ref"]).path)
    assert meta["kind"] == "adapter" and meta["reference"] == meta["parent"] == meta["base"]
    assert meta["lora"]["targets"] == ["q", "v", "o", "down"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--lora-rank", "4", "--lora-targets", "q,wq"], "unknown LoRA target(s) wq"),
    (["--lora-rank", "32"], "above the serving limit of 16"),
    (["--lora-rank", "8", "--max-lora-rank", "4"], "above the serving limit of 4"),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--lora-alpha", "8"], "need --lora-rank"),
])
def test_bad_lora_flags_are_clear_errors_and_publish_nothing(tmp_path, tiny_tokenizer, capsys, monkeypatch,
                                                            flags, message):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    snapshot = registry_snapshot(registry)
    code = run_cli(["train", "sft", "--from", "own:base", "--name", "own", "--data", str(chats), "--steps", "1",
                    "--registry", str(registry.root), "--quiet", "--preset", "tiny", *flags], monkeypatch)
    assert code == 2
    assert message in capsys.readouterr().err
    assert registry_snapshot(registry) == snapshot


def test_an_imported_qwen2_trains_an_adapter_peft_loads_with_the_same_logits(tmp_path, hf_tokenizer_dirs, capsys,
                                                                             monkeypatch):
    pytest.importorskip("transformers")
    from tests.http.test_imported_model_serving import _checkpoint

    directory, hf_model, tok = _checkpoint(tmp_path, hf_tokenizer_dirs["qwen"], "qwen2")
    registry = Registry(tmp_path / "registry")
    assert run_cli(["import-hf", str(directory), "--name", "qwen", "--registry", str(registry.root)],
                   monkeypatch) == 0
    capsys.readouterr()
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = _run(["train", "sft", "--from", "qwen", "--name", "qwen", "--data", str(chats), "--steps", "30",
                "--lr", "1e-2", "--lora-rank", "4", "--lora-targets", "q,v,gate,down", "--run-dir",
                str(tmp_path / "runs"), "--registry", str(registry.root), "--quiet", "--json"], capsys, monkeypatch)
    assert out["ref"] == "qwen-sft-lora@1" and out["eval_loss_after"] < out["eval_loss_before"] - 0.3, out
    path = registry.resolve(out["ref"]).path
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "v_proj", "gate_proj", "down_proj"]
    names = set(load_file(str(path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 2 * 2 * 4                     # layers x (A, B) x targets

    peft = pytest.importorskip("peft")
    ids = torch.tensor([tok.encode("What is 3 plus 4? 3 plus 4 is")])
    with torch.no_grad():
        plain = hf_model(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf_model, str(path)).eval()(ids).logits
    assert (theirs - plain).abs().max() > 1e-3          # the adapter is live in PEFT's model
    merged = _run(["models", "merge", out["ref"], "--name", "qwen-merged", "--registry", str(registry.root),
                   "--json"], capsys, monkeypatch)
    ours = load_checkpoint(registry.resolve(merged["ref"]).path).model
    with torch.no_grad():
        mine = ours(ids).float()
    assert torch.allclose(mine, theirs.float(), atol=1e-4), (mine - theirs).abs().max()


def test_grpo_trains_an_adapter_whose_rollouts_decode_with_it(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    base = registry.resolve("own:sft")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Name a number near {i}."} for i in range(40)])
    out = _run(["train", "rlhf", "--from", "own:sft", "--name", "own", "--prompts", str(prompts), "--reward",
                "python:tests.training.own_data_rewards:has_digit_seven", "--algo", "grpo", "--group", "4",
                "--steps", "4", "--lr", "3e-3", "--lora-rank", "4", "--run-dir", str(tmp_path / "runs"),
                "--registry", str(registry.root), "--quiet", "--json", "--preset", "tiny"], capsys, monkeypatch)
    assert out["ref"] == "own-rlhf-lora@1" and out["metrics"]["algo"] == "grpo", out
    meta = read_meta(registry.resolve(out["ref"]).path)
    assert meta["kind"] == "adapter" and meta["base"] == base.ref and meta["metrics"]["reward_calls"] > 0
    adapter, _ = load_published_adapter(registry.resolve(out["ref"]).path, registry,
                                        load_checkpoint(base.path).config)
    assert any(b.abs().sum() > 0 for _, b in adapter.weights.values())      # the adapter learned something


def test_a_lora_policy_rollout_engine_decodes_as_its_merged_model(tiny_tokenizer):
    """RL rollouts of a LoRA policy run the base in the engine with the adapter in a slot,
    a new version per rollout: the same tokens as the merged model, and after the adapter
    changes, the new weights' tokens (the old version's cached prefix never matches: no reset between)."""
    model = LoraModel(make_tiny_model(tiny_tokenizer, seed=1), LoraSpec(4, 8.0, ("q", "v", "up")))
    gen = torch.Generator().manual_seed(0)
    prompts = [tiny_tokenizer.encode(t) for t in ("Once upon a time", "What is 2 plus 2?")]
    engine = training_engine(model, 64)
    for _ in range(2):
        with torch.no_grad():
            for b in model.lora_b.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5)
        got = generate(engine, prompts, GREEDY, adapters=rollout_adapters(model, len(prompts)))
        want = generate(_engine(as_gpt(model)), prompts, GREEDY)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert model.version == 2
    assert [g.token_ids for g in got] != [p.token_ids for p in generate(_engine(model.base), prompts, GREEDY)]


def test_ppo_and_builtin_sft_train_adapters(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    """PPO with a reward model (the value head trains beside the adapter and is not
    published) and SFT on the built-in tasks (evaluated through the engine on the merged
    adapter) publish adapters too."""
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    common = ["--registry", str(registry.root), "--quiet", "--json", "--preset", "tiny", "--name", "own"]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    rm = _run(["train", "reward", "--from", "own:sft", "--data", str(prefs), "--steps", "2",
               "--run-dir", str(tmp_path / "runs-rm"), *common], capsys, monkeypatch)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say hi to {p}."} for p in "ABCDEFGHIJKL"])
    ppo = _run(["train", "rlhf", "--from", "own:sft", "--prompts", str(prompts), "--reward", f"rm:{rm['ref']}",
                "--steps", "2", "--lora-rank", "4", "--adapter-name", "own-ppo", "--run-dir",
                str(tmp_path / "runs-ppo"), *common], capsys, monkeypatch)
    assert ppo["ref"] == "own-ppo@1" and ppo["metrics"]["algo"] == "ppo", ppo
    assert read_meta(registry.resolve(ppo["ref"]).path)["reward_model"] == rm["ref"]
    sft = _run(["train", "sft", "--from", "own:base", "--steps", "2", "--lora-rank", "4", "--run-dir",
                str(tmp_path / "runs-sft"), *common], capsys, monkeypatch)
    meta = read_meta(registry.resolve(sft["ref"]).path)
    assert sft["ref"] == "own-sft-lora@1" and meta["kind"] == "adapter" and "accuracy" in meta["metrics"]["tasks"]


def test_an_interrupted_lora_run_resumes_from_its_adapter_state(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    registry = Registry(tmp_path / "registry")
    publish_tiny(registry, tiny_tokenizer)
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    argv = ["train", "sft", "--from", "own:base", "--name", "own", "--data", str(chats), "--lora-rank", "4",
            "--registry", str(registry.root), "--quiet", "--json", "--preset", "tiny"]

    def adapter_of(steps: int, run_dir: str, lr: str = "1e-3"):
        out = _run([*argv, "--steps", str(steps), "--lr", lr, "--run-dir", str(tmp_path / run_dir)], capsys,
                   monkeypatch)
        base = load_checkpoint(registry.resolve("own:base").path)
        return load_published_adapter(registry.resolve(out["ref"]).path, registry, base.config)[0].weights

    def same(x, y) -> bool:
        return all(torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1]) for k in x)

    adapter_of(3, "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # Stopped after 3 steps and run again to 6, it continues exactly (the adapter, the
    # optimizer's moments, the data position): bit-identical to 6 steps in one go.
    assert same(adapter_of(6, "a"), adapter_of(6, "fresh"))
    # And it did start from the saved state: continued at another learning rate, the
    # first 3 steps (at 1e-3) are not those of a fresh run at 1e-2.
    assert not same(adapter_of(6, "b", "1e-2"), adapter_of(6, "fresh-hi", "1e-2"))
