"""LoRA adapters: PEFT's format both ways, merged weights equal PEFT's adapted model, the
batched application equals each token's own adapter, and what sol does not implement is
refused by name. Checkpoints are built with transformers and PEFT from random weights."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from gpt.config import ModelConfig
from gpt.hf import _read_hf_tensors, config_from_hf, from_hf_state
from gpt.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraAdapter,
    LoraSpec,
    load_adapter,
    merge_into,
    parse_targets,
    save_adapter,
)
from gpt.lora_batch import LoraBatch, LoraStack
from gpt.model import GPT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_base(path, hidden=64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def _sol_model(path) -> GPT:
    config = config_from_hf(json.loads((path / "config.json").read_text()))
    model = GPT(config)
    model.load_state_dict(from_hf_state(_read_hf_tensors(path)), strict=False)
    return model.eval()


def _peft_adapter(base, path, targets=ALL, r=4, alpha=8.0, **extra):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **extra)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    return path, _hf_base(path)


IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 3, 8]])


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (["q_proj", "v_proj"], True)])
def test_a_peft_adapter_merged_gives_peft_logits(base, tmp_path, targets, rslora):
    base_dir, hf = base
    adapted = _peft_adapter(hf, tmp_path / "adapter", targets, use_rslora=rslora)
    sol = _sol_model(base_dir)
    adapter = load_adapter(tmp_path / "adapter", sol.config)
    assert adapter.spec.use_rslora == rslora and adapter.spec.rank == 4
    assert math.isclose(adapter.spec.scale, 8.0 / (2.0 if rslora else 4.0))
    with torch.no_grad():
        expected = adapted(IDS).logits
        got = merge_into(sol, adapter)(IDS)
        assert not torch.allclose(_sol_model(base_dir)(IDS), expected, atol=1e-3)   # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_adapter_sol_writes_loads_in_peft(base, tmp_path):
    base_dir, hf = base
    sol = _sol_model(base_dir)
    adapter = LoraAdapter.zeros_like(LoraSpec(4, 16.0, parse_targets("q,k,o,down")), sol.config, seed=3)
    for _, b in adapter.weights.values():
        torch.nn.init.normal_(b, std=0.05)
    save_adapter(adapter, tmp_path / "mine", base_model="base")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "mine").eval()
    with torch.no_grad():
        torch.testing.assert_close(merge_into(sol, adapter)(IDS), loaded(IDS).logits, atol=1e-4, rtol=1e-4)
    again = load_adapter(tmp_path / "mine", sol.config)
    assert again.spec == adapter.spec
    assert all(torch.equal(again.weights[k][1], adapter.weights[k][1]) for k in adapter.weights)


def _random_adapter(config: ModelConfig, rank: int, targets: str, seed: int) -> LoraAdapter:
    adapter = LoraAdapter.zeros_like(LoraSpec(rank, 2.0 * rank, parse_targets(targets)), config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for _, b in adapter.weights.values():
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return adapter


def test_the_batched_deltas_equal_each_tokens_own_adapter():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    adapters = [_random_adapter(config, 2, "q,v,down", 1), _random_adapter(config, 4, "q,k,v,o,gate,up,down", 2),
                _random_adapter(config, 3, "up", 3)]
    stack = LoraStack(config, slots=4, max_rank=4, dtype=torch.float32)
    for slot, adapter in zip((0, 1, 3), adapters, strict=True):
        stack.load(slot, adapter)
    token_slots = torch.tensor([-1, 1, 1, 0, -1, 3, 1, 0, 0, 3])
    batch = LoraBatch.build(stack, token_slots)
    assert batch is not None and batch.slots.tolist() == [0, 1, 3]
    slot_adapter = {0: adapters[0], 1: adapters[1], 3: adapters[2]}
    for layer in range(config.n_layers):
        for target, (out, inp) in (("q", (32, 32)), ("k", (16, 32)), ("up", (48, 32)), ("down", (32, 48))):
            x = torch.randn(len(token_slots), inp)
            y = torch.randn(len(token_slots), out)
            expected = y.clone()
            for t, slot in enumerate(token_slots.tolist()):
                adapter = slot_adapter.get(slot)
                if adapter is not None and (layer, target) in adapter.weights:
                    expected[t] += adapter.delta(layer, target) @ x[t]
            batch.apply(layer, target, x, y)
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_no_adapter_in_the_step_costs_nothing():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    assert LoraBatch.build(LoraStack(config, 2, 4, torch.float32), torch.tensor([-1, -1, -1])) is None


def _edit_config(path, **changes):
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ".*proj"}, "regular expression"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "all"}, "bias"),
    ({"r": 512}, "rank"),
])
def test_what_sol_does_not_implement_is_refused_by_name(base, tmp_path, changes, message):
    base_dir, hf = base
    _peft_adapter(hf, tmp_path / "a", ["q_proj", "v_proj"])
    _edit_config(tmp_path / "a", **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(tmp_path / "a", _sol_model(base_dir).config)


def test_an_adapter_for_another_base_or_in_a_pickle_is_refused(base, tmp_path):
    base_dir, hf = base
    other_dir = tmp_path / "other"
    other = _hf_base(other_dir, hidden=32)
    _peft_adapter(other, tmp_path / "a", ["q_proj"])
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(tmp_path / "a", _sol_model(base_dir).config)
    with pytest.raises(AdapterError, match="limit of 2"):
        load_adapter(tmp_path / "a", _sol_model(other_dir).config, max_rank=2)
    (tmp_path / "a" / ADAPTER_WEIGHTS).rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(tmp_path / "a", _sol_model(other_dir).config)


# --- adapters in the registry -----------------------------------------------------------------
def test_an_adapter_is_a_registry_entry_that_names_its_base(tiny_checkpoint):
    from gpt.adapter_store import is_adapter, load_published_adapter, publish_adapter
    from gpt.checkpoint import load_checkpoint

    registry, base = tiny_checkpoint
    ckpt = load_checkpoint(base.path)
    adapter = _random_adapter(ckpt.model.config, 2, "q,v", 7)
    published = publish_adapter(registry, "tenant-a", adapter, base, aliases=("prod",))
    assert is_adapter(published.path) and not is_adapter(base.path)
    assert registry.resolve("tenant-a:prod").version == 1 and registry.resolve("tenant-a").version == 1
    loaded, resolved_base = load_published_adapter(published.path, registry, ckpt.model.config)
    assert resolved_base.ref == base.ref and loaded.spec == adapter.spec
    # A second version is another entry; the first stays as it was.
    second = publish_adapter(registry, "tenant-a", _random_adapter(ckpt.model.config, 2, "q,v", 8), base)
    assert second.version == 2 and registry.resolve("tenant-a:prod").version == 1


def test_a_tampered_adapter_or_a_changed_base_is_refused(tiny_checkpoint):
    from gpt.adapter_store import load_published_adapter, publish_adapter
    from gpt.checkpoint import load_checkpoint

    registry, base = tiny_checkpoint
    config = load_checkpoint(base.path).model.config
    published = publish_adapter(registry, "tenant-b", _random_adapter(config, 2, "q", 9), base)
    weights = published.path / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256"):
        load_published_adapter(published.path, registry, config)
    with pytest.raises(AdapterError, match="own"):
        publish_adapter(registry, base.name, _random_adapter(config, 2, "q", 9), base)


def test_import_adapter_and_merge_from_the_command_line(tiny_checkpoint, tmp_path, capsys):
    # A PEFT adapter made on the exported base is imported as its own entry; merging it
    # publishes a full model whose logits are PEFT's adapted model's.
    from client.cli import main
    from gpt.checkpoint import load_checkpoint

    registry, base = tiny_checkpoint
    assert main(["export-hf", "tiny@1", str(tmp_path / "hf"), "--registry", str(registry.root)]) == 0
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    adapted = _peft_adapter(hf, tmp_path / "peft", ["q_proj", "v_proj", "down_proj"])
    common = ["--registry", str(registry.root), "--json"]
    assert main(["import-adapter", str(tmp_path / "peft"), "--name", "tenant", "--base", "tiny:base", *common]) == 0
    assert json.loads(capsys.readouterr().out)["ref"] == "tenant@1"
    assert main(["models", "merge", "tenant", "--name", "tenant-merged", *common]) == 0
    merged = load_checkpoint(registry.resolve("tenant-merged").path).model
    ids = torch.tensor([[3, 17, 40, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids).logits, atol=1e-4, rtol=1e-4)
    # A wrong base is refused with the reason and nothing is published.
    assert main(["import-adapter", str(tmp_path / "peft"), "--name", "x", "--base", "tenant", *common]) == 2
    assert "is an adapter" in capsys.readouterr().err and "x" not in registry.models()
