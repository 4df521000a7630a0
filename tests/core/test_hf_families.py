"""Bring your own model: Hugging Face Llama, Mistral, Qwen2 and Qwen3 checkpoints, built by
`transformers` from small random configs, load into sol's one decoder and give
transformers' logits and greedy tokens; what sol does not implement is refused by name
and leaves nothing in the registry. Token ids only: no tokenizer is involved (the
registry round trips save sol's own tokenizer into the directory)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client.cli import main
from gpt import fused_ops, hf_format, tensor_io
from gpt.checkpoint import load_checkpoint
from gpt.hf import HFImportError, load_model
from gpt.registry import Registry
from server.engine.api import SamplingParams
from server.engine.offline import build_engine, generate, live_config

transformers = pytest.importorskip("transformers")

VOCAB = 512                       # the tiny tokenizer's, so a directory can carry it
FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
# bf16 logits of sol and transformers differ by rounding in different places (measured
# up to 0.055 on logits of magnitude ~3.5); each is held to its own error against an fp32
# computation of the same bf16 weights.
BF16_ATOL = 0.1


def hf_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mistral":
        common["sliding_window"] = None
    if family == "qwen3":
        common["head_dim"] = 32             # not hidden / heads (16)
    if family == "qwen2":
        common["tie_word_embeddings"] = True
    return getattr(transformers, FAMILIES[family])(**{**common, **overrides})


def build_hf(directory: Path, family: str, dtype: torch.dtype = torch.float32, shard: bool = False,
             seed: int = 0, **overrides):
    """A transformers model with every weight random (norms around 1, biases too), saved
    with save_pretrained, and read back as a user loads it (from_pretrained: a model cast
    with .to(bf16) would also have rounded its rotary frequencies to bf16)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(directory, max_shard_size="100KB" if shard else "5GB")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert next(loaded.parameters()).dtype == dtype
    return loaded


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_logits_equal_transformers(family, tmp_path):
    hf = build_hf(tmp_path / "hf", family, shard=family == "llama")
    if family == "llama":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "hf")
    assert ours.config.family == family and next(ours.parameters()).dtype == torch.float32
    assert ours.config.num_parameters() == ours.num_parameters() == hf.num_parameters()
    x = torch.randint(0, VOCAB, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        fast = ours(x)                              # the CPU inference paths (fused, packed)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(x).detach(), want, atol=1e-4, rtol=1e-4)   # autograd on: PyTorch ops


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_match_transformers_and_stay_bf16(family, tmp_path):
    hf = build_hf(tmp_path / "hf", family, torch.bfloat16)
    ours = load_model(tmp_path / "hf")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())      # no fp32 copy
    assert ours.rotary.cos_table.dtype == torch.bfloat16
    x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, got = hf(x).logits.float(), ours(x).float()
        exact = load_model(tmp_path / "hf", dtype=torch.float32)(x)       # the same weights in fp32
    assert (got - theirs).abs().max() <= BF16_ATOL
    assert (got - exact).abs().max() <= 1.5 * (theirs - exact).abs().max() + 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_equals_transformers_generate_and_full_recomputation(family, tmp_path):
    hf = build_hf(tmp_path / "hf", family, seed=3)
    ours = load_model(tmp_path / "hf")
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 40)]
    max_tokens = 16
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = {}
    for attention in ("in-place", "gather"):
        if attention == "in-place" and not _kernel_builds():
            continue
        engine = build_engine(ours, live_config(ours, attention=attention, block_size=4, num_blocks=64),
                              start=False)
        outputs[attention] = [o.token_ids for o in generate(engine, prompts, params)]
    for i, p in enumerate(prompts):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            ids = torch.tensor([p])
            for _ in range(max_tokens):                # no cache: the whole sequence every token
                ids = torch.cat([ids, ours(ids)[0, -1].argmax().view(1, 1)], dim=1)
        for attention, tokens in outputs.items():
            assert tokens[i] == ref[0, len(p):].tolist(), (attention, i)
            assert tokens[i] == ids[0, len(p):].tolist(), (attention, i)


def test_fp16_stays_fp16(tmp_path):
    hf = build_hf(tmp_path / "hf", "qwen2", torch.float16)
    ours = load_model(tmp_path / "hf")
    assert all(p.dtype == torch.float16 for p in ours.parameters())
    x = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        assert (ours(x).float() - hf(x).logits.float()).abs().max() <= 0.02


def _kernel_builds() -> bool:
    from server.engine import paged_attention

    return paged_attention.available()


def test_qwen3_norms_then_rotary_with_and_without_the_fused_kernels(tmp_path):
    build_hf(tmp_path / "hf", "qwen3")
    ours = load_model(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (2, 19))
    with torch.inference_mode():
        fast = ours(x)
        previous = fused_ops.set_enabled(False)
        try:
            plain = ours(x)
        finally:
            fused_ops.set_enabled(previous)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rope_scaling_gives_transformers_logits(form, scaling, tmp_path):
    hf = build_hf(tmp_path / "hf", "llama", rope_parameters={**scaling, "rope_theta": 10000.0})
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    assert config["rope_parameters"]["rope_type"] == scaling["rope_type"]     # what transformers 5 writes
    if form == "rope_scaling":                                                # what transformers 4 wrote
        del config["rope_parameters"]
        config |= {"rope_theta": 10000.0, "rope_scaling": scaling}
        path.write_text(json.dumps(config))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "hf")
    assert ours.config.rope_scaling.rope_type == scaling["rope_type"]
    assert type(ours.config).from_dict(json.loads(ours.config.to_json())) == ours.config   # as checkpoints store it
    x = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(5))    # past 64 positions
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=1e-4)
        # The scaling matters at these positions: the same weights unscaled are far off.
        config.pop("rope_scaling", None)
        config.pop("rope_parameters", None)
        path.write_text(json.dumps(config))
        assert (load_model(tmp_path / "hf")(x) - want).abs().max() > 1e-2


def _base_config(family: str = "llama") -> dict:
    return hf_config(family).to_dict() | {"architectures": [hf_format.FAMILY_ARCHITECTURE[family]]}


@pytest.mark.parametrize(("family", "change", "named"), [
    ("llama", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture 'GPT2LMHeadModel'"),
    ("llama", {"mlp_bias": True}, "mlp_bias = True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout = 0.1"),
    ("llama", {"some_new_switch": 1}, "some_new_switch = 1"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config = 'gptq'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type = 'yarn'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type = 'dynamic'"),
    ("llama", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 2.0}},
     "rope_scaling.rope_type = 'yarn'"),
    ("llama", {"rope_parameters": {**LLAMA3, "rope_theta": 1e4, "beta_fast": 32}}, "rope_parameters.beta_fast"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor = 0.5"),
    ("mistral", {"sliding_window": 128}, "sliding_window = 128"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "sliding_window = 64"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen2", {"attention_bias": True}, "attention_bias = True"),   # Qwen2's biases are fixed, not a field
])
def test_unimplemented_config_is_refused_naming_the_field(family, change, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("(", r"\(")):
        hf_format.config_from_hf(_base_config(family) | change)


def test_understood_fields_and_windows_covering_the_context_are_accepted():
    config = hf_format.config_from_hf(_base_config("mistral") | {"sliding_window": 256, "attention_dropout": 0.0})
    assert config.family == "mistral" and config.max_seq_len == 256
    qwen = hf_format.config_from_hf(_base_config("qwen2") | {"use_sliding_window": False, "sliding_window": 64})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_embeddings
    qwen3 = hf_format.config_from_hf(_base_config("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.d_model // qwen3.n_heads == 16


# --- the registry: refused imports leave nothing ---------------------------------------

def _import(tmp_path, hf_dir, *extra) -> int:
    return main(["import-hf", str(hf_dir), "--name", "byo", "--registry", str(tmp_path / "registry"), *extra])


def _assert_refused(tmp_path, hf_dir, capsys, message: str) -> None:
    assert _import(tmp_path, hf_dir) == 2
    assert message in capsys.readouterr().err
    assert Registry(tmp_path / "registry").models() == []
    assert not (tmp_path / "registry" / "byo").exists()


def test_bad_config_is_refused_and_leaves_nothing(tmp_path, capsys):
    build_hf(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}))
    _assert_refused(tmp_path, tmp_path / "hf", capsys, "unsupported architecture 'GemmaForCausalLM'")
    path.write_text(json.dumps(config | {"mlp_bias": True}))
    _assert_refused(tmp_path, tmp_path / "hf", capsys, "unsupported config.json field mlp_bias = True")


def test_shard_missing_from_the_index_is_refused(tmp_path, capsys):
    build_hf(tmp_path / "hf", "llama", shard=True)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / shard).unlink()
    _assert_refused(tmp_path, tmp_path / "hf", capsys, f"{shard} is missing")


def test_tensor_of_the_wrong_shape_and_missing_or_unexpected_tensors_are_refused(tmp_path, capsys):
    build_hf(tmp_path / "hf", "mistral")
    path = tmp_path / "hf" / "model.safetensors"
    good = load_file(str(path))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({**good, name: good[name][:-1]}, str(path))
    _assert_refused(tmp_path, tmp_path / "hf", capsys, f"wrong shape for {name.removeprefix('model.')}")
    save_file({k: v for k, v in good.items() if k != name}, str(path))
    _assert_refused(tmp_path, tmp_path / "hf", capsys, "missing tensors ['layers.1.self_attn.k_proj.weight']")
    save_file({**good, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(path))
    _assert_refused(tmp_path, tmp_path / "hf", capsys, "unexpected tensors ['layers.0.self_attn.q_proj.bias']")


def test_pickled_weights_only_are_refused(tmp_path, capsys):
    build_hf(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    _assert_refused(tmp_path, tmp_path / "hf", capsys, "only pickled weights (pytorch_model.bin)")


# --- the registry: imports that succeed, copied or referenced, and export back ---------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_import_keeps_dtype_and_tokenizer_files_and_exports_back(family, dtype, tmp_path, capsys, tiny_tokenizer):
    hf = build_hf(tmp_path / "hf", family, dtype, shard=True)
    tiny_tokenizer.save(tmp_path / "hf")
    (tmp_path / "hf" / "special_tokens_map.json").write_text('{"eos_token": "<|end|>"}')
    assert _import(tmp_path, tmp_path / "hf", "--json") == 0
    resolved = Registry(tmp_path / "registry").resolve("byo")
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert (resolved.path / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    header = tensor_io.read_header(resolved.path / "model.safetensors")
    assert {e.dtype for e in header.values()} == {tensor_io.NAMES[dtype]}
    ckpt = load_checkpoint(resolved.path, dtype=None)
    assert next(ckpt.model.parameters()).dtype == dtype and ckpt.meta["dtype"] == str(dtype)[6:]
    x = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        want = hf(x).logits.float()
        atol = 1e-4 if dtype == torch.float32 else BF16_ATOL
        torch.testing.assert_close(ckpt.model(x).float(), want, atol=atol, rtol=1e-4)
        assert main(["export-hf", "byo", str(tmp_path / "out"), "--registry", str(tmp_path / "registry")]) == 0
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["architectures"] == [hf_format.FAMILY_ARCHITECTURE[family]]
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert type(again) is type(hf) and next(again.parameters()).dtype == dtype
        torch.testing.assert_close(again(x).logits.float(), want, atol=1e-6, rtol=0)   # the same weights
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_reference_import_records_the_files_in_place_and_verifies_them(tmp_path, capsys, tiny_tokenizer):
    hf = build_hf(tmp_path / "hf", "llama", torch.bfloat16, shard=True)
    tiny_tokenizer.save(tmp_path / "hf")
    assert _import(tmp_path, tmp_path / "hf", "--reference") == 0
    assert "weights referenced in place" in capsys.readouterr().out
    resolved = Registry(tmp_path / "registry").resolve("byo")
    assert not (resolved.path / "model.safetensors").exists()
    meta = json.loads((resolved.path / "meta.json").read_text())
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert sorted(meta["referenced_files"]) == [str(p.resolve()) for p in shards]
    ckpt = load_checkpoint(resolved.path, dtype=None)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x).float(), hf(x).logits.float(), atol=BF16_ATOL, rtol=0)
    assert main(["models", "show", "byo", "--registry", str(tmp_path / "registry")]) == 0
    assert "referenced in place, not copied" in capsys.readouterr().out
    with open(shards[0], "r+b") as f:           # the source changes after the import
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(ValueError, match="changed since it was imported"):
        load_checkpoint(resolved.path)
    shards[0].unlink()
    with pytest.raises(ValueError, match="which is missing"):
        load_checkpoint(resolved.path)


def test_load_model_refuses_with_hf_import_error(tmp_path):
    with pytest.raises(HFImportError, match="config.json not found"):
        load_model(tmp_path)


# --- memory: one copy of the weights ------------------------------------------------------

# The peak RSS of this process's own memory (VmHWM): getrusage's ru_maxrss would also
# carry the parent's peak, which Linux keeps across fork and exec.
RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from gpt.config import preset
    from gpt.hf import load_model
    from gpt.model import GPT

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    start = peak()
    with torch.device("meta"):     # PyTorch loads its meta-device kernels (~75 MB of code) once
        GPT(preset("tiny"))
    before = peak()
    model = load_model(sys.argv[1])
    after = peak()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"start": start, "before": before, "after": after, "weights": weights,
                      "dtype": str(next(model.parameters()).dtype)}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from Linux's /proc")
def test_loading_a_bf16_model_holds_its_weights_once(tmp_path):
    """Peak RSS of loading ~130 MB of bf16 weights, measured in a fresh process: the
    growth is the weights (plus the rotary tables and allocator slack), not two copies."""
    config = hf_config("llama", vocab_size=32768, hidden_size=1024, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config.to_dict() | {"architectures": ["LlamaForCausalLM"]}))
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (32768, 1024), "lm_head.weight": (32768, 1024), "model.norm.weight": (1024,),
              "model.layers.0.input_layernorm.weight": (1024,), "model.layers.0.post_attention_layernorm.weight": (1024,),
              "model.layers.0.self_attn.q_proj.weight": (1024, 1024), "model.layers.0.self_attn.k_proj.weight": (256, 1024),
              "model.layers.0.self_attn.v_proj.weight": (256, 1024), "model.layers.0.self_attn.o_proj.weight": (1024, 1024),
              "model.layers.0.mlp.gate_proj.weight": (256, 1024), "model.layers.0.mlp.up_proj.weight": (256, 1024),
              "model.layers.0.mlp.down_proj.weight": (1024, 256)}
    tensor_io.write_file(d / "model.safetensors",
                         {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()})
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(d)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], timeout=300)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["after"] - m["before"]
    print(f"bf16 weights {m['weights'] / 2**20:.1f} MiB, peak RSS grew {growth / 2**20:.1f} MiB while loading "
          f"(the meta-device warm-up before it: {(m['before'] - m['start']) / 2**20:.1f} MiB)")
    assert m["dtype"] == "torch.bfloat16"
    assert growth < 1.15 * m["weights"], m
