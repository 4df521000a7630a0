import json
import os

import pytest
import torch

from gpt.checkpoint import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    sha256_file,
    write_checkpoint,
)
from gpt.tokenizer import TOKENIZER_FILE


@pytest.fixture
def ckpt_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "ckpt"
    write_checkpoint(d, tiny_model, tiny_tokenizer, {"stage": "base", "step": 7},
                     heads={"score.weight": torch.ones(1, tiny_model.config.d_model)})
    return d


def test_roundtrip_gives_identical_weights_and_meta(ckpt_dir, tiny_model):
    ckpt = load_checkpoint(ckpt_dir)
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), ckpt.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert ckpt.meta["stage"] == "base" and ckpt.meta["step"] == 7
    assert set(ckpt.meta["files"]) == {MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, "heads.safetensors"}
    assert torch.equal(ckpt.heads["score.weight"], torch.ones(1, tiny_model.config.d_model))
    # tied embeddings stay tied after loading
    assert ckpt.model.lm_head.weight.data_ptr() == ckpt.model.embed_tokens.weight.data_ptr()


def test_tampered_file_is_refused_naming_it(ckpt_dir):
    path = ckpt_dir / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors fails its sha256"):
        load_checkpoint(ckpt_dir)


def test_truncated_file_is_refused_naming_it(ckpt_dir):
    path = ckpt_dir / MODEL_FILE
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(ckpt_dir)


def test_truncated_safetensors_with_matching_checksum_is_refused(ckpt_dir):
    """Even a consistent meta.json cannot make a truncated tensor file load."""
    path = ckpt_dir / MODEL_FILE
    os.truncate(path, path.stat().st_size // 2)
    _rewrite_checksums(ckpt_dir)
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
        load_checkpoint(ckpt_dir)


def test_missing_tokenizer_is_refused(ckpt_dir):
    (ckpt_dir / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing"):
        load_checkpoint(ckpt_dir)


def test_wrong_shapes_are_refused(ckpt_dir):
    config = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    config["d_ff"] += 8
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(config))
    _rewrite_checksums(ckpt_dir)
    with pytest.raises(CheckpointError, match="wrong shape for layers.0.mlp"):
        load_checkpoint(ckpt_dir)


def test_unsupported_config_is_refused(ckpt_dir):
    config = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    config["sliding_window"] = 128
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps(config))
    _rewrite_checksums(ckpt_dir)
    with pytest.raises(CheckpointError, match="unknown fields"):
        load_checkpoint(ckpt_dir)


def test_meta_cannot_point_outside_the_checkpoint(ckpt_dir):
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    meta["files"]["../../etc/passwd"] = "0" * 64
    (ckpt_dir / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_checkpoint(ckpt_dir)


def _rewrite_checksums(directory):
    meta = json.loads((directory / META_FILE).read_text())
    meta["files"] = {name: sha256_file(directory / name) for name in meta["files"]}
    (directory / META_FILE).write_text(json.dumps(meta))
