"""Hugging Face interop: sol checkpoints are Llama checkpoints with renamed tensors.

Export writes what `transformers.AutoModelForCausalLM` / `AutoTokenizer` load as they
are (LlamaConfig config.json, model.safetensors with HF names, generation_config.json,
tokenizer.json + tokenizer_config.json carrying the chat template). Import reads such a
directory back into a sol model and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpt.chat import JINJA_TEMPLATE
from gpt.checkpoint import CheckpointError, load_state_checked, model_state_for_saving
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.tokenizer import END_OF_TURN, ENDOFTEXT, TOKENIZER_FILE, SolTokenizer

HF_PREFIX = "model."


def to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    state = model_state_for_saving(model)
    return {(k if k == "lm_head.weight" else HF_PREFIX + k): v for k, v in state.items()}


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some exporters write; sol recomputes it
        out[k.removeprefix(HF_PREFIX)] = v
    return out


def hf_config(config: ModelConfig, tokenizer: SolTokenizer) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": tokenizer.special(ENDOFTEXT),
        "eos_token_id": [tokenizer.special(END_OF_TURN), tokenizer.special(ENDOFTEXT)],
        "torch_dtype": "float32",
    }


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face Llama config.json to sol's config, refusing what sol's model
    does not implement rather than loading it wrongly."""
    if data.get("model_type") != "llama" and "LlamaForCausalLM" not in data.get("architectures", []):
        raise ValueError(f"unsupported architecture {data.get('architectures') or data.get('model_type')}: "
                         "only Llama-style checkpoints can be imported")
    unsupported = []
    if data.get("attention_bias") or data.get("mlp_bias"):
        unsupported.append("biases")
    if data.get("rope_scaling"):
        rope_type = (data["rope_scaling"] or {}).get("rope_type", (data["rope_scaling"] or {}).get("type"))
        if rope_type not in (None, "default"):
            unsupported.append(f"rope_scaling {rope_type}")
    if data.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {data['hidden_act']}")
    n_heads = data["num_attention_heads"]
    if data.get("head_dim") not in (None, data["hidden_size"] // n_heads):
        unsupported.append("head_dim different from hidden_size / num_attention_heads")
    if unsupported:
        raise ValueError("unsupported Llama variant: " + ", ".join(unsupported))
    rope_theta = data.get("rope_theta") or (data.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=data["vocab_size"], d_model=data["hidden_size"], n_layers=data["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=data.get("num_key_value_heads") or n_heads,
        d_ff=data["intermediate_size"], max_seq_len=data.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta), norm_eps=data.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def export_hf(model: GPT, tokenizer: SolTokenizer, out_dir: Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(model.config, tokenizer))
    _write_json(out / "generation_config.json", {
        "bos_token_id": tokenizer.special(ENDOFTEXT),
        "eos_token_id": [tokenizer.special(END_OF_TURN), tokenizer.special(ENDOFTEXT)],
        "do_sample": False,
    })
    tokenizer.save(out)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": END_OF_TURN,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.max_seq_len,
        "chat_template": JINJA_TEMPLATE,
    })
    return out


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if Path(shard).name != shard:
                raise ValueError(f"refusing shard path outside the directory: {shard!r}")
            state.update(load_file(str(directory / shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors (or index) in {directory}; pickled .bin weights are not loaded")


def import_hf(directory: Path) -> tuple[GPT, SolTokenizer]:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = config_from_hf(json.loads(config_path.read_text()))
    tokenizer = SolTokenizer.load(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, more than the "
                         f"model's vocab_size {config.vocab_size}")
    state = from_hf_state(_read_hf_tensors(directory))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = GPT(config)
    try:
        load_state_checked(model, {k: v.float() for k, v in state.items()}, directory / "model.safetensors")
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    return model.eval(), tokenizer


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
