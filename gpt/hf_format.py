"""What a Hugging Face checkpoint's config.json and tensor names mean for sol's one decoder.

Four families map onto `ModelConfig` (gpt/config.py): Llama 1/2/3.x (and the models
built on its architecture: TinyLlama, SmolLM2), Mistral, Qwen2/Qwen2.5 and Qwen3 dense.
Every field of a family's config.json is in one of three lists: mapped onto the config,
ignorable (bookkeeping, token ids, generation defaults, training-only switches that do
not change a forward pass), or accepted only at the value that means "off". Anything
else, and any value sol does not implement, is refused with the field's name: a
checkpoint is never loaded as something it is not.
"""

from __future__ import annotations

from typing import Any

from gpt.config import ModelConfig, RopeScaling

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
FAMILY_ARCHITECTURE = {family: arch for arch, family in ARCHITECTURES.items()}
HF_PREFIX = "model."

# In every family: bookkeeping, the tokenizer's ids, generation defaults (generate()'s,
# not the model's), and switches of transformers' own code paths.
_IGNORED = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "id2label", "label2id", "num_labels", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "use_bfloat16", "tf_legacy_loss", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "is_decoder", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # Feed-forward chunking and Llama's pretraining tensor parallelism compute the same
    # products in pieces.
    "chunk_size_feed_forward", "pretraining_tp",
    # SmolLM2's exporter marks its configs; transformers reads neither.
    "is_llama_config", "transformers.js_config",
})

# Accepted only at the value that leaves the feature off.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
    "tie_encoder_decoder": (False,),
    "cross_attention_hidden_size": (None,),
    "pruned_heads": ({},),
    "rope_interleaved": (False,),
    "partial_rotary_factor": (1, 1.0),
}

_MAPPED_COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
})
_SLIDING = frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"})
FAMILY_FIELDS: dict[str, frozenset[str]] = {
    "llama": _MAPPED_COMMON | {"attention_bias"},
    "mistral": _MAPPED_COMMON | {"sliding_window"},
    "qwen2": _MAPPED_COMMON | _SLIDING,
    "qwen3": _MAPPED_COMMON | _SLIDING | {"attention_bias"},
}
# transformers' defaults for fields a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Keys of a rope scaling dict, per type, beyond rope_type/type and rope_theta.
_ROPE_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
}


class HFConfigError(ValueError):
    """A config.json sol cannot load exactly as transformers would: it says which field."""


def family_of(data: dict[str, Any]) -> str:
    archs = data.get("architectures") or []
    if not isinstance(archs, list) or len(archs) > 1:
        raise HFConfigError(f"config.json field architectures {archs!r}: sol imports one causal-LM "
                            f"architecture of {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES.get(archs[0]) if archs else data.get("model_type")
    if family not in FAMILY_FIELDS:
        raise HFConfigError(f"unsupported architecture {archs[0] if archs else data.get('model_type')!r} "
                            f"(config.json architectures/model_type): sol imports {', '.join(sorted(ARCHITECTURES))}")
    if data.get("model_type", family) != family:
        raise HFConfigError(f"config.json model_type {data['model_type']!r} does not match architectures "
                            f"{archs[0]!r}")
    return family


def _refuse(family: str, field: str, value: Any, why: str) -> HFConfigError:
    return HFConfigError(f"unsupported config.json field {field} = {value!r} ({family} family): {why}; "
                         "refusing rather than loading the checkpoint wrongly")


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """sol's config for a Hugging Face config.json, or HFConfigError naming the first
    field sol does not implement."""
    family = family_of(data)
    known = FAMILY_FIELDS[family]
    for field in sorted(data):
        value = data[field]
        if field in _IGNORED or field in known:
            continue
        if field in _OFF_VALUES:
            if value not in _OFF_VALUES[field] or isinstance(value, bool) != isinstance(_OFF_VALUES[field][0], bool):
                raise _refuse(family, field, value, f"sol implements only {_OFF_VALUES[field][0]!r}")
            continue
        if field == "quantization_config":
            raise _refuse(family, field, (value or {}).get("quant_method", value), "quantized weights are not loaded")
        raise _refuse(family, field, value, "sol does not know this field")
    missing = [f for f in _REQUIRED if f not in data]
    if missing:
        raise HFConfigError(f"config.json lacks {', '.join(missing)}")
    n_heads = data["num_attention_heads"]
    max_positions = data.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[family])
    _check_sliding_window(family, data, max_positions)
    bias = bool(data.get("attention_bias", False))
    if not isinstance(data.get("attention_bias", False), bool):
        raise _refuse(family, "attention_bias", data["attention_bias"], "a boolean is expected")
    theta, scaling = _rope(family, data, max_positions)
    head_dim = data.get("head_dim")
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"], d_model=data["hidden_size"], n_layers=data["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=data.get("num_key_value_heads") or n_heads,
            d_ff=data["intermediate_size"], max_seq_len=max_positions, rope_theta=theta,
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            explicit_head_dim=None if head_dim in (None, data["hidden_size"] // n_heads) else head_dim,
            qkv_bias=family == "qwen2" or bias, o_bias=bias, qk_norm=family == "qwen3",
            rope_scaling=scaling, family=family)
    except ValueError as err:
        raise HFConfigError(f"config.json ({family} family): {err}") from None


def _check_sliding_window(family: str, data: dict[str, Any], max_positions: int) -> None:
    """sol's attention is full; a window that covers the whole context is the same."""
    window = data.get("sliding_window", 4096 if family == "mistral" else None)
    if family in ("qwen2", "qwen3"):
        layer_types = data.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise _refuse(family, "layer_types", sorted(set(layer_types)), "sol implements full attention only")
        if not data.get("use_sliding_window", False):
            return
    if window is not None and window < max_positions:
        raise _refuse(family, "sliding_window", window,
                      f"sliding-window attention below the model's context ({max_positions} positions) is not "
                      "implemented by sol's engine")


def _rope(family: str, data: dict[str, Any], max_positions: int) -> tuple[float, RopeScaling]:
    """rope_theta and the scaling, from transformers 4's rope_theta + rope_scaling or
    transformers 5's rope_parameters (which holds both)."""
    params = data.get("rope_parameters") or {}
    legacy = data.get("rope_scaling") or {}
    for field, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        if not isinstance(d, dict) or any(isinstance(v, dict) for v in d.values()):
            raise _refuse(family, field, d, "one rope setting for every layer is expected")
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    if "rope_theta" in params and "rope_theta" in data and params["rope_theta"] != data["rope_theta"]:
        raise _refuse(family, "rope_parameters.rope_theta", params["rope_theta"],
                      f"it differs from rope_theta {data['rope_theta']!r}")
    chosen: dict[str, Any] = {}
    chosen_field = "rope_parameters"
    for field, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            continue
        rest = {k: v for k, v in d.items() if k not in ("rope_theta", "type")} | {"rope_type": rope_type}
        if chosen and rest != chosen:
            raise _refuse(family, field, d, f"it disagrees with {chosen_field}")
        chosen, chosen_field = rest, field
    rope_type = chosen.get("rope_type", "default")
    if rope_type not in _ROPE_KEYS:
        raise _refuse(family, f"{chosen_field}.rope_type", rope_type,
                      f"sol implements rope types {', '.join(_ROPE_KEYS)}")
    for field, d in (("rope_parameters", params), ("rope_scaling", legacy)):
        for key in d:
            if key not in _ROPE_KEYS[rope_type] | {"rope_type", "type", "rope_theta", "partial_rotary_factor"}:
                raise _refuse(family, f"{field}.{key}", d[key], f"sol does not implement it for rope type {rope_type}")
            if key == "partial_rotary_factor" and d[key] not in (1, 1.0):
                raise _refuse(family, f"{field}.{key}", d[key], "sol rotates every dimension of a head")
    try:
        if rope_type == "default":
            return float(theta), RopeScaling()
        if rope_type == "linear":
            return float(theta), RopeScaling("linear", factor=float(chosen["factor"]))
        return float(theta), RopeScaling(
            "llama3", factor=float(chosen["factor"]), low_freq_factor=float(chosen["low_freq_factor"]),
            high_freq_factor=float(chosen["high_freq_factor"]),
            original_max_positions=int(chosen.get("original_max_position_embeddings", max_positions)))
    except KeyError as err:
        raise _refuse(family, chosen_field, chosen, f"rope type {rope_type} needs {err.args[0]}") from None
    except ValueError as err:
        raise HFConfigError(f"config.json {chosen_field} ({family} family): {err}") from None


def hf_config(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json for `config` in its family's format (transformers 4 and 5 read it:
    rope as rope_theta + rope_scaling, which transformers 5 converts itself)."""
    family = config.family
    _check_exportable(config)
    out: dict[str, Any] = {
        "architectures": [FAMILY_ARCHITECTURE[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_json(config.rope_scaling),
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,
    }
    if family in ("llama", "qwen3"):
        out["attention_bias"] = config.o_bias
    if family == "llama":
        out["mlp_bias"] = False
    if family == "mistral":
        out["sliding_window"] = None
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return out


def _check_exportable(config: ModelConfig) -> None:
    """A config that its family's transformers class can express."""
    family = config.family
    problems = []
    if config.qk_norm != (family == "qwen3"):
        problems.append("q/k norms" + (" missing" if family == "qwen3" else ""))
    if family == "qwen2" and not (config.qkv_bias and not config.o_bias):
        problems.append("Qwen2 has query/key/value biases and no output bias")
    if family in ("llama", "qwen3") and config.qkv_bias != config.o_bias:
        problems.append("attention_bias covers the query/key/value and output projections together")
    if family == "mistral" and (config.qkv_bias or config.o_bias):
        problems.append("Mistral has no attention biases")
    if problems:
        raise ValueError(f"cannot export as {family}: " + "; ".join(problems))


def _rope_scaling_json(s: RopeScaling) -> dict[str, Any] | None:
    if s.rope_type == "default":
        return None
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_positions}


def sol_name(hf_name: str) -> str | None:
    """sol's parameter name for a Hugging Face tensor name; None for a tensor sol
    recomputes (the rotary inverse frequencies some exporters write)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    return hf_name.removeprefix(HF_PREFIX) if hf_name != "lm_head.weight" else hf_name


def hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else HF_PREFIX + name
