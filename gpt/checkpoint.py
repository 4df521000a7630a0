"""The checkpoint directory: write it atomically, load it only after verifying it.

Files: model.safetensors, config.json, tokenizer.json, optional heads.safetensors
(reward/value heads), and meta.json (stage, parent, step, data fingerprint, metrics,
created_at and the sha256 of every other file). Nothing is ever unpickled.

An imported Hugging Face model also keeps its tokenizer files as they came
(tokenizer_config.json, special_tokens_map.json, generation_config.json, ...), and one
imported with `--reference` has no model.safetensors: meta.json's `referenced_files`
lists the source safetensors files (absolute paths, Hugging Face tensor names) with their
sha256, verified like the checkpoint's own files at every load.

Weights are loaded tensor by tensor into the module's own storage, in the dtype they were
saved in (gpt/tensor_io.py): a model costs its weights once while it loads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt import hf_format, tensor_io
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.tokenizer import TOKENIZER_FILE, load_tokenizer
from gpt.tokenizers.base import Tokenizer
from gpt.tokenizers.hf_files import HF_TOKENIZER_FILES

MODEL_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE)
REFERENCED = "referenced_files"      # meta.json: {absolute path: sha256} of weights kept in place


class CheckpointError(ValueError):
    """A checkpoint that must not be served: missing, truncated, tampered or incompatible."""


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    meta: dict[str, Any]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors, without the tied LM head (safetensors refuses shared storage)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_checkpoint(directory: Path, model: GPT, tokenizer: Tokenizer, meta: dict[str, Any],
                     heads: dict[str, torch.Tensor] | None = None, *,
                     tokenizer_files: list[Path] | None = None,
                     referenced_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Write every file into `directory` (which must be new or empty), fsync, and return
    the final meta. Callers publish by renaming the directory into place.
    `tokenizer_files`: copied byte for byte instead of saving `tokenizer` (an imported
    model's own). `referenced_files` ({absolute path: sha256}): the weights stay there,
    in Hugging Face names, and no model.safetensors is written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = [CONFIG_FILE]
    if referenced_files is None:
        tensor_io.write_file(directory / MODEL_FILE, model_state_for_saving(model), metadata={"format": "pt"})
        files.append(MODEL_FILE)
    (directory / CONFIG_FILE).write_text(model.config.to_json(), encoding="utf-8")
    if tokenizer_files:
        for path in tokenizer_files:
            shutil.copyfile(path, directory / path.name)
        files += [path.name for path in tokenizer_files if path.name not in files]
    else:
        tokenizer.save(directory)
        # A model's own tokenizer brings its settings files (chat template, eos...): checksum them too.
        files += [name for name in (TOKENIZER_FILE, *HF_TOKENIZER_FILES)
                  if (directory / name).is_file() and name not in files]
    if heads:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, str(directory / HEADS_FILE))
        files.append(HEADS_FILE)
    for name in files:
        _fsync_file(directory / name)
    full_meta = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "num_parameters": model.num_parameters(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **meta,
        "files": {name: sha256_file(directory / name) for name in files},
    }
    if referenced_files is not None:
        full_meta[REFERENCED] = dict(referenced_files)
    (directory / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True), encoding="utf-8")
    _fsync_file(directory / META_FILE)
    fsync_dir(directory)
    return full_meta


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"broken checkpoint: {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"broken checkpoint: {path} is not valid JSON ({err})") from None


def verify_files(directory: Path) -> dict[str, Any]:
    """Check every file against the sha256 recorded in meta.json; return the meta."""
    directory = Path(directory)
    meta = read_meta(directory)
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"broken checkpoint: {directory / META_FILE} lists no file checksums")
    referenced = meta.get(REFERENCED)
    for name in REQUIRED_FILES:
        if name not in recorded and not (name == MODEL_FILE and referenced):
            raise CheckpointError(f"broken checkpoint: {directory / META_FILE} does not list {name}")
    for name, expected in recorded.items():
        path = directory / name
        if Path(name).name != name:
            raise CheckpointError(f"broken checkpoint: meta.json names a file outside the checkpoint: {name!r}")
        if not path.is_file():
            raise CheckpointError(f"broken checkpoint: {path} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"broken checkpoint: {path} fails its sha256 check "
                                  f"(expected {expected[:12]}..., found {actual[:12]}...)")
    for name, expected in (referenced or {}).items():
        path = Path(name)
        if not path.is_absolute() or not path.is_file():
            raise CheckpointError(f"broken checkpoint: {directory} references {path}, which is missing "
                                  "(its weights were recorded in place, not copied: import it again)")
        if sha256_file(path) != expected:
            raise CheckpointError(f"broken checkpoint: {directory} references {path}, which changed since "
                                  "it was imported (sha256 differs; import it again)")
    return meta


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"broken checkpoint: {path}: {err}") from None


def weight_entries(directory: Path, meta: dict[str, Any]) -> dict[str, tensor_io.TensorEntry]:
    """Where each of a checkpoint's tensors is: its model.safetensors, or the referenced
    files (Hugging Face names)."""
    try:
        if meta.get(REFERENCED):
            return hf_entries([Path(p) for p in meta[REFERENCED]])
        return tensor_io.read_header(Path(directory) / MODEL_FILE)
    except tensor_io.TensorFileError as err:
        raise CheckpointError(f"broken checkpoint: {err}") from None


def hf_entries(paths: list[Path]) -> dict[str, tensor_io.TensorEntry]:
    """sol name -> entry for every tensor of Hugging Face safetensors files, without the
    ones sol recomputes; a tensor found twice is refused."""
    entries: dict[str, tensor_io.TensorEntry] = {}
    for path in paths:
        for name, entry in tensor_io.read_header(path).items():
            ours = hf_format.sol_name(name)
            if ours is None:
                continue
            if ours in entries:
                raise tensor_io.TensorFileError(f"tensor {name!r} is in both {entries[ours].path.name} and "
                                                f"{path.name}")
            entries[ours] = entry
    return entries


def build_model(config: ModelConfig, entries: dict[str, tensor_io.TensorEntry], source: Path,
                dtype: torch.dtype | None = None) -> GPT:
    """A model of `config` whose tensors are read from `entries` straight into its own
    storage (no initialisation, no second copy), in `dtype` or else the dtype most of
    the weights were saved in. Refuses missing, unexpected or mis-shaped tensors."""
    with torch.device("meta"):
        model = GPT(config)
    expected = model_state_for_saving_shapes(model)
    if config.tie_embeddings:
        entries = {k: v for k, v in entries.items() if k != "lm_head.weight"}   # the embedding, again
    _check_tensors(expected, {k: e.shape for k, e in entries.items()}, source)
    if dtype is None:
        by_dtype: dict[str, int] = {}
        for e in entries.values():
            by_dtype[e.dtype] = by_dtype.get(e.dtype, 0) + e.nbytes
        name = max(by_dtype, key=by_dtype.__getitem__)
        if name not in tensor_io.DTYPES:
            raise CheckpointError(f"broken checkpoint: {source} holds {name} weights; sol loads "
                                  f"{', '.join(tensor_io.DTYPES)}")
        dtype = tensor_io.DTYPES[name]
    state = {k: torch.empty(shape, dtype=dtype) for k, shape in expected.items()}
    try:
        tensor_io.read_into((entries[k], t) for k, t in state.items())
    except (tensor_io.TensorFileError, OSError) as err:
        raise CheckpointError(f"broken checkpoint: {err}") from None
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.rotary.to_empty(device="cpu").to(dtype)
    model.rotary.rebuild()
    return model


def _check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(found[k]) != expected[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing tensors {missing[:4]}")
        if unexpected:
            details.append(f"unexpected tensors {unexpected[:4]}")
        if wrong:
            k = wrong[0]
            details.append(f"wrong shape for {k}: {tuple(found[k])} != config's {expected[k]}")
        raise CheckpointError(f"broken checkpoint: {source} does not match config.json: " + "; ".join(details))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"broken checkpoint: {path} cannot be read as safetensors ({err})") from None


def model_state_for_saving_shapes(model: GPT) -> dict[str, tuple[int, ...]]:
    names = dict(model.state_dict())
    if model.config.tie_embeddings:
        names.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in names.items()}


def load_checkpoint(directory: Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = torch.float32, verify: bool = True) -> Checkpoint:
    """Verify and load a checkpoint directory, in `dtype` (None: the dtype it was saved
    in). Raises CheckpointError naming the bad file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found: {directory}")
    meta = verify_files(directory) if verify else read_meta(directory)
    config = read_config(directory)
    try:
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"broken checkpoint: {directory / TOKENIZER_FILE}: {err}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"broken checkpoint: {directory / TOKENIZER_FILE} has {tokenizer.vocab_size} "
                              f"tokens but config.json allows {config.vocab_size}")
    source = directory / MODEL_FILE if not meta.get(REFERENCED) else directory / META_FILE
    model = build_model(config, weight_entries(directory, meta), source, dtype)
    heads = _load_tensors(directory / HEADS_FILE) if (directory / HEADS_FILE).is_file() else {}
    model = model.to(device=device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, meta=meta, heads=heads, path=directory)
