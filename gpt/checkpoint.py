"""The checkpoint directory: write it atomically, load it only after verifying it.

Files: model.safetensors, config.json, tokenizer.json, optional heads.safetensors
(reward/value heads), and meta.json (stage, parent, step, data fingerprint, metrics,
created_at and the sha256 of every other file). Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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
                     heads: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write every file into `directory` (which must be new or empty), fsync, and return
    the final meta. Callers publish by renaming the directory into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state_for_saving(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(model.config.to_json(), encoding="utf-8")
    tokenizer.save(directory)
    # A model's own tokenizer brings its settings files (chat template, eos...): checksum them too.
    files = list(REQUIRED_FILES) + [name for name in HF_TOKENIZER_FILES if (directory / name).is_file()]
    if heads:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in heads.items()}, str(directory / HEADS_FILE))
        files.append(HEADS_FILE)
    for name in files:
        _fsync_file(directory / name)
    full_meta = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "num_parameters": model.num_parameters(),
        **meta,
        "files": {name: sha256_file(directory / name) for name in files},
    }
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
    for name in REQUIRED_FILES:
        if name not in recorded:
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
    return meta


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise CheckpointError(f"broken checkpoint: {path}: {err}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"broken checkpoint: {path} cannot be read as safetensors ({err})") from None


def load_state_checked(model: GPT, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`, refusing missing, unexpected or mis-shaped tensors."""
    expected = model_state_for_saving_shapes(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing tensors {missing[:4]}")
        if unexpected:
            details.append(f"unexpected tensors {unexpected[:4]}")
        if wrong:
            k = wrong[0]
            details.append(f"wrong shape for {k}: {tuple(state[k].shape)} != config's {expected[k]}")
        raise CheckpointError(f"broken checkpoint: {source} does not match config.json: " + "; ".join(details))
    model.load_state_dict(state, strict=False)


def model_state_for_saving_shapes(model: GPT) -> dict[str, tuple[int, ...]]:
    names = dict(model.state_dict())
    if model.config.tie_embeddings:
        names.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in names.items()}


def load_checkpoint(directory: Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, verify: bool = True) -> Checkpoint:
    """Verify and load a checkpoint directory. Raises CheckpointError naming the bad file."""
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
    model = GPT(config)
    load_state_checked(model, _load_tensors(directory / MODEL_FILE), directory / MODEL_FILE)
    heads = _load_tensors(directory / HEADS_FILE) if (directory / HEADS_FILE).is_file() else {}
    model = model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, meta=meta, heads=heads, path=directory)
