"""Hugging Face interop: import a model directory as users have it, export one back.

Import reads config.json (gpt/hf_format.py maps it onto sol's config for the Llama,
Mistral, Qwen2 and Qwen3 families, refusing what sol does not implement), the weights
from model.safetensors or the shards that model.safetensors.index.json names (in their
own dtype, tensor by tensor into the model: gpt/checkpoint.py build_model), and the
tokenizer through `gpt.tokenizer.load_tokenizer`. Its tokenizer files are kept byte for
byte. Pickled weights (`*.bin`) are never loaded.

Export writes what `transformers.AutoModelForCausalLM` loads as it is: the family's
config.json, model.safetensors with Hugging Face names in the model's dtype, and the
tokenizer files (the imported ones as they came, or sol's with its chat template).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gpt import hf_format, tensor_io
from gpt.chat import JINJA_TEMPLATE
from gpt.checkpoint import CheckpointError, build_model, hf_entries, model_state_for_saving, sha256_file
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.tokenizer import END_OF_TURN, ENDOFTEXT, TOKENIZER_FILE, SolTokenizer, load_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The tokenizer's files a Hugging Face directory may hold, copied verbatim on import.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "added_tokens.json")


class HFImportError(ValueError):
    """A Hugging Face directory sol will not import, with what is wrong in it."""


def to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    return {hf_format.hf_name(k): v for k, v in model_state_for_saving(model).items()}


def hf_config(config: ModelConfig, tokenizer: Any = None, dtype: str = "float32") -> dict[str, Any]:
    """config.json of `config`'s family, with sol's tokenizer's bos/eos ids."""
    return {**hf_format.hf_config(config, dtype), **_token_ids(tokenizer)}


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path} not found: not a Hugging Face model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFImportError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path} is not a JSON object")
    try:
        return hf_format.config_from_hf(data)
    except ValueError as err:
        raise HFImportError(f"{path}: {err}") from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or every shard the
    index names, each checked to exist and to hold what the index says it holds."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        if pickles:
            raise HFImportError(f"{directory} has only pickled weights ({', '.join(pickles[:3])}): sol never "
                                "unpickles; convert them to safetensors (e.g. save_pretrained(..., "
                                "safe_serialization=True))")
        raise HFImportError(f"{directory} has no {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise HFImportError(f"{index_path} is not a safetensors index ({err})") from None
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise HFImportError(f"{index_path} names {shard!r} for {tensor!r}: shards must be .safetensors files "
                                "in the same directory")
        shards.setdefault(shard, []).append(tensor)
    for shard, tensors in sorted(shards.items()):
        path = directory / shard
        if not path.is_file():
            raise HFImportError(f"{path} is missing: {index_path.name} names it for {len(tensors)} tensors "
                                f"(e.g. {tensors[0]!r})")
        try:
            held = tensor_io.read_header(path)
        except tensor_io.TensorFileError as err:
            raise HFImportError(str(err)) from None
        absent = sorted(set(tensors) - set(held))
        stray = sorted(set(held) - set(weight_map))
        if absent:
            raise HFImportError(f"{path} lacks {absent[:3]}, which {index_path.name} says it holds")
        if stray:
            raise HFImportError(f"{path} holds {stray[:3]}, which {index_path.name} does not list")
    return [directory / shard for shard in sorted(shards)]


def load_model(directory: Path, dtype: torch.dtype | None = None) -> GPT:
    """The model of a Hugging Face directory, in the dtype its weights are stored in
    (or `dtype`), without its tokenizer."""
    directory = Path(directory)
    config = read_config(directory)
    files = weight_files(directory)
    try:
        return build_model(config, hf_entries(files), files[0] if len(files) == 1 else directory / INDEX_FILE,
                           dtype).eval()
    except (CheckpointError, tensor_io.TensorFileError) as err:
        raise HFImportError(str(err).removeprefix("broken checkpoint: ")) from None


def tokenizer_files(directory: Path) -> list[Path]:
    return [Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()]


def import_hf(directory: Path, dtype: torch.dtype | None = None) -> tuple[GPT, SolTokenizer]:
    """Model and tokenizer of a Hugging Face directory (refused with HFImportError)."""
    directory = Path(directory)
    model = load_model(directory, dtype)
    try:
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError, KeyError) as err:
        raise HFImportError(f"{directory}: the tokenizer cannot be loaded ({err})") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise HFImportError(f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, more than the "
                            f"model's vocab_size {model.config.vocab_size}")
    return model, tokenizer


def reference_files(directory: Path) -> dict[str, str]:
    """{absolute path: sha256} of the weight files, for an import that keeps them in place."""
    return {str(path.resolve()): sha256_file(path) for path in weight_files(directory)}


def export_hf(model: GPT, tokenizer: SolTokenizer, out_dir: Path, source_dir: Path | None = None) -> Path:
    """Write `model` as its family's Hugging Face directory. The tokenizer files of
    `source_dir` (a checkpoint imported from Hugging Face) are copied as they are;
    without them sol's tokenizer is written with its chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    tensor_io.write_file(out / SINGLE_FILE, to_hf_state(model), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(model.config, tokenizer, str(dtype).removeprefix("torch.")))
    # sol's own checkpoints hold tokenizer.json alone; an imported one kept the rest of its
    # tokenizer's files, and they all go back as they came.
    kept = tokenizer_files(source_dir) if source_dir else []
    if any(p.name != TOKENIZER_FILE for p in kept):
        for path in kept:
            shutil.copyfile(path, out / path.name)
        return out
    _write_json(out / "generation_config.json", {**_token_ids(tokenizer), "do_sample": False})
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


def _token_ids(tokenizer: Any) -> dict[str, Any]:
    """bos/eos ids of sol's tokenizer (an imported one's are in its own files)."""
    if not isinstance(tokenizer, SolTokenizer):
        return {}
    return {"bos_token_id": tokenizer.special(ENDOFTEXT),
            "eos_token_id": [tokenizer.special(END_OF_TURN), tokenizer.special(ENDOFTEXT)]}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
