"""LoRA adapters in PEFT's format: read, checked against their base model, written, merged.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`, as
PEFT's `save_pretrained` writes it (so PEFT and vLLM load what sol writes, and sol loads
what they wrote). For a target projection W (out x in) it holds A (r x in) and B (out x r),
and the adapted layer computes W x + scale * B (A x), scale = alpha / r (alpha / sqrt(r)
with rsLoRA). What sol does not implement is refused by name, never ignored: DoRA,
biases, per-layer rank or alpha patterns, `modules_to_save` (adapters that replace the
LM head or embeddings), embedding adapters, fan-in-fan-out weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpt.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The projections an adapter may target, by their short names (the CLI's) and module paths.
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BY_MODULE = {path.rsplit(".", 1)[1]: short for short, path in TARGETS.items()}      # q_proj -> q
_TENSOR_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
MAX_RANK = 256
# adapter_config.json fields sol reads, and those it accepts when they hold their neutral value.
_NEUTRAL = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
            "megatron_config": None, "loftq_config": {}, "layer_replication": None, "trainable_token_indices": None,
            "exclude_modules": None, "target_parameters": None, "lora_bias": False, "alora_invocation_tokens": None}


class AdapterError(ValueError):
    """An adapter sol cannot serve as it is; the message names the file and the field."""


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]            # short names, in TARGETS order
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"LoRA rank must be in [1, {MAX_RANK}] (got {self.rank})")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise AdapterError(f"lora_alpha must be a positive number (got {self.alpha})")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"LoRA targets must be among {', '.join(TARGETS)} (got {', '.join(self.targets) or 'none'})")


def parse_targets(text: str) -> tuple[str, ...]:
    """`q,k,v,o` (the CLI's form) -> targets in canonical order."""
    names = {t.strip() for t in text.split(",") if t.strip()}
    unknown = sorted(names - set(TARGETS))
    if unknown:
        raise AdapterError(f"unknown LoRA target(s) {', '.join(unknown)}; use some of {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def target_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(out, in) of a target projection in a model of `config`."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"q": (q, config.d_model), "k": (kv, config.d_model), "v": (kv, config.d_model), "o": (config.d_model, q),
            "gate": (config.d_ff, config.d_model), "up": (config.d_ff, config.d_model),
            "down": (config.d_model, config.d_ff)}[target]


@dataclass
class LoraAdapter:
    spec: LoraSpec
    # (layer, target) -> (A (r, in), B (out, r)); every layer and target of the spec.
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def zeros_like(cls, spec: LoraSpec, config: ModelConfig, dtype: torch.dtype = torch.float32,
                   init_a: bool = True, seed: int = 0) -> LoraAdapter:
        """A fresh adapter for training: A random (Kaiming-uniform, as PEFT), B zero, so the
        adapted model starts as the base."""
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for layer in range(config.n_layers):
            for target in spec.targets:
                out, inp = target_shape(config, target)
                bound = 1.0 / math.sqrt(inp)
                a = (torch.rand(spec.rank, inp, generator=gen) * 2 - 1) * bound if init_a else \
                    torch.zeros(spec.rank, inp)
                weights[(layer, target)] = (a.to(dtype), torch.zeros(out, spec.rank, dtype=dtype))
        return cls(spec, weights)

    def check(self, config: ModelConfig, source: str = "the adapter") -> None:
        """Every tensor present with its base's shape, finite; AdapterError naming the first
        that is not."""
        for layer in range(config.n_layers):
            for target in self.spec.targets:
                if (layer, target) not in self.weights:
                    raise AdapterError(f"{source}: no weights for layer {layer} {TARGETS[target]} (the adapter "
                                       f"targets {','.join(self.spec.targets)} on every layer)")
                a, b = self.weights[(layer, target)]
                out, inp = target_shape(config, target)
                if tuple(a.shape) != (self.spec.rank, inp) or tuple(b.shape) != (out, self.spec.rank):
                    raise AdapterError(
                        f"{source}: layer {layer} {TARGETS[target]} has lora_A {tuple(a.shape)} and lora_B "
                        f"{tuple(b.shape)}; the base model needs ({self.spec.rank}, {inp}) and ({out}, "
                        f"{self.spec.rank}) — is this adapter made for another base model?")
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise AdapterError(f"{source}: layer {layer} {TARGETS[target]} holds NaN or infinite values")
        extra = sorted({layer for layer, _ in self.weights} - set(range(config.n_layers)))
        if extra:
            raise AdapterError(f"{source}: weights for layer {extra[0]}, but the base model has {config.n_layers} "
                               "layers — is this adapter made for another base model?")

    def delta(self, layer: int, target: str) -> torch.Tensor:
        """scale * B A: what merging adds to the target's weight."""
        a, b = self.weights[(layer, target)]
        return (b.float() @ a.float()) * self.spec.scale

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _module(model: torch.nn.Module, layer: int, target: str) -> torch.nn.Linear:
    return model.get_submodule(f"layers.{layer}.{TARGETS[target]}")  # type: ignore[return-value]


@torch.no_grad()
def merge_into(model: torch.nn.Module, adapter: LoraAdapter) -> torch.nn.Module:
    """Add the adapter's deltas to `model`'s weights in place (a merged model serves as
    the adapted one, with no adapter at run time)."""
    for (layer, target) in adapter.weights:
        linear = _module(model, layer, target)
        linear.weight += adapter.delta(layer, target).to(linear.weight.dtype)
    return model


def spec_from_peft(data: dict[str, Any], path: Path) -> LoraSpec:
    """The adapter's LoraSpec from PEFT's adapter_config.json; AdapterError naming the
    field sol does not implement."""
    where = f"{path}"
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {data.get('peft_type')!r} is not LORA; only LoRA adapters are served")
    for name, neutral in _NEUTRAL.items():
        value = data.get(name, neutral)
        if value not in (neutral, None, {}, [], False):
            raise AdapterError(f"{where}: {name} = {value!r} is not implemented by sol (only {neutral!r}); "
                               "merge the adapter with PEFT and import the merged model instead")
    modules = data.get("target_modules")
    if isinstance(modules, str):
        raise AdapterError(f"{where}: target_modules as a regular expression ({modules!r}) is not implemented; "
                           "list the module names, e.g. [\"q_proj\", \"v_proj\"]")
    unknown = sorted(set(modules or ()) - set(_BY_MODULE))
    if unknown or not modules:
        raise AdapterError(f"{where}: target_modules {modules!r}: sol adapts {', '.join(sorted(_BY_MODULE))} only")
    try:
        rank, alpha = int(data["r"]), float(data["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{where}: r and lora_alpha must be numbers") from None
    targets = tuple(t for t in TARGETS if TARGETS[t].rsplit(".", 1)[1] in set(modules))
    try:
        return LoraSpec(rank, alpha, targets, bool(data.get("use_rslora", False)))
    except AdapterError as err:
        raise AdapterError(f"{where}: {err}") from None


def load_adapter(directory: Path, config: ModelConfig, max_rank: int = MAX_RANK) -> LoraAdapter:
    """A PEFT-format adapter directory, checked against the base model's config."""
    directory = Path(directory)
    cfg_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG} (an adapter directory as PEFT saves it)")
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterError(f"{directory}: adapter_model.bin is a pickle and is refused; save the adapter with "
                               "safe_serialization=True (adapter_model.safetensors)")
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS}")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{cfg_path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{cfg_path}: must hold a JSON object")
    spec = spec_from_peft(data, cfg_path)
    if spec.rank > max_rank:
        raise AdapterError(f"{cfg_path}: rank {spec.rank} is above this server's limit of {max_rank} "
                           "(--max-lora-rank)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({err})") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = _TENSOR_RE.fullmatch(name)
        if m is None or m.group(3) not in _BY_MODULE:
            raise AdapterError(f"{weights_path}: tensor {name!r} is not a LoRA A/B weight of a projection sol "
                               "adapts (embedding and LM-head adapters are not implemented)")
        target = _BY_MODULE[m.group(3)]
        if target not in spec.targets:
            raise AdapterError(f"{weights_path}: tensor {name!r} adapts {m.group(3)}, which target_modules does "
                               "not list")
        pairs.setdefault((int(m.group(1)), target), {})[m.group(4)] = tensor
    weights = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: layer {key[0]} {TARGETS[key[1]]} has lora_{''.join(ab)} only")
        weights[key] = (ab["A"], ab["B"])
    adapter = LoraAdapter(spec, weights)
    adapter.check(config, str(weights_path))
    return adapter


def save_adapter(adapter: LoraAdapter, directory: Path, base_model: str = "", dropout: float = 0.0) -> list[Path]:
    """Write PEFT's format: what `PeftModel.from_pretrained(base, directory)` loads.
    `dropout`: the lora_dropout it was trained with (a record; serving applies none)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = adapter.spec
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
              "target_modules": [TARGETS[t].rsplit(".", 1)[1] for t in spec.targets], "lora_dropout": dropout,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": spec.use_rslora, "use_dora": False,
              "modules_to_save": None, "base_model_name_or_path": base_model, "inference_mode": True}
    tensors = {}
    for (layer, target), (a, b) in sorted(adapter.weights.items()):
        prefix = f"base_model.model.model.layers.{layer}.{TARGETS[target]}"
        tensors[f"{prefix}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().contiguous().cpu()
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    return [directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS]
