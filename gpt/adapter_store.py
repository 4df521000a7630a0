"""LoRA adapters as registry entries of their own: `<root>/<adapter>/<version>/` holds the
adapter in PEFT's format and a meta.json that names its base model version.

An adapter is published, versioned, aliased and verified like a model (the same atomic
rename, the same sha256 per file), and its meta records `kind: "adapter"`, the base it
was made for (`base`: NAME@VERSION, and the sha256 of the base's weights, so an adapter is
never applied to other weights that happen to share the name) and its LoRA shape.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from gpt.checkpoint import CheckpointError, fsync_dir, read_meta, sha256_file
from gpt.config import ModelConfig
from gpt.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, LoraAdapter, load_adapter, save_adapter
from gpt.registry import Registry, ResolvedModel

META_FILE = "meta.json"
ADAPTER_KIND = "adapter"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def is_adapter(directory: Path) -> bool:
    """Whether a registry version directory holds an adapter (not a model)."""
    try:
        return read_meta(directory).get("kind") == ADAPTER_KIND
    except CheckpointError:
        return False


def base_fingerprint(base: ResolvedModel) -> str:
    """The sha256 of the base version's weights, as its meta.json records them."""
    files = read_meta(base.path).get("files") or {}
    weights = sorted(v for k, v in files.items() if k.endswith(".safetensors") and not k.startswith("heads"))
    if not weights:
        raise AdapterError(f"{base.ref} records no weight checksums; it cannot be an adapter's base")
    return ",".join(weights)


def publish_adapter(registry: Registry, name: str, adapter: LoraAdapter, base: ResolvedModel,
                    meta: dict[str, Any] | None = None, aliases: tuple[str, ...] = ()) -> ResolvedModel:
    """Write `adapter` as the next version of `name`, made for `base`."""
    if name == base.name:
        raise AdapterError(f"an adapter needs a name of its own, not its base's ({base.name})")
    fingerprint = base_fingerprint(base)

    def write(tmp: Path) -> None:
        paths = save_adapter(adapter, tmp, base_model=base.ref, dropout=float((meta or {}).get("lora_dropout", 0.0)))
        full = {"name": name, "kind": ADAPTER_KIND, "stage": (meta or {}).get("stage", "adapter"),
                "base": base.ref, "base_weights_sha256": fingerprint,
                "lora": {"rank": adapter.spec.rank, "alpha": adapter.spec.alpha,
                         "targets": list(adapter.spec.targets), "use_rslora": adapter.spec.use_rslora},
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **(meta or {}),
                "files": {p.name: sha256_file(p) for p in paths}}
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
        fsync_dir(tmp)

    return registry.publish(name, write, aliases)


def adapter_base(directory: Path) -> str:
    """The NAME@VERSION an adapter version was made for."""
    meta = read_meta(directory)
    if meta.get("kind") != ADAPTER_KIND or not isinstance(meta.get("base"), str):
        raise AdapterError(f"{directory} is not an adapter version (its meta.json has no kind: adapter and base)")
    return meta["base"]


def load_published_adapter(directory: Path, registry: Registry, base_config: ModelConfig,
                           max_rank: int | None = None) -> tuple[LoraAdapter, ResolvedModel]:
    """An adapter version: every file checked against its sha256, its base resolved and
    checked to be the same weights it was made for, its tensors against the base's shapes."""
    directory = Path(directory)
    meta = read_meta(directory)
    recorded = meta.get("files") or {}
    for file in ADAPTER_FILES:
        if file not in recorded:
            raise AdapterError(f"{directory / META_FILE} does not list {file}")
        if sha256_file(directory / file) != recorded[file]:
            raise AdapterError(f"{directory / file} fails its sha256 check")
    base = registry.resolve(adapter_base(directory))
    if base_fingerprint(base) != meta.get("base_weights_sha256"):
        raise AdapterError(f"{directory}: its base {base.ref} no longer holds the weights the adapter was made "
                           "for (their sha256 differs)")
    kwargs = {} if max_rank is None else {"max_rank": max_rank}
    return load_adapter(directory, base_config, **kwargs), base
