"""CLI for LoRA adapters in the local registry: `sol import-adapter` (a PEFT adapter made
elsewhere) and `sol models merge` (an adapter folded into its base, published as a full
model of its own)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.output import add_json_flag, emit


def register(sub, models_sub, add_registry_flag) -> None:
    p = sub.add_parser("import-adapter", help="publish a PEFT LoRA adapter directory (adapter_config.json + "
                       "adapter_model.safetensors) as a registry entry made for a base model")
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("--name", required=True, help="the adapter's registry name (requests name it as their model)")
    p.add_argument("--base", required=True, help="the base model it adapts: NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("--alias", action="append", default=[], help="aliases to point at it (repeatable)")
    add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_import_adapter)

    p = models_sub.add_parser("merge", help="fold an adapter into its base and publish the merged full model")
    p.add_argument("ref", help="the adapter: NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("--name", required=True, help="registry name of the merged model")
    p.add_argument("--alias", action="append", default=[], help="aliases to point at it (repeatable)")
    add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_merge)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _import_adapter(args: argparse.Namespace) -> int:
    from gpt.adapter_store import is_adapter, publish_adapter
    from gpt.checkpoint import CheckpointError, read_config
    from gpt.lora import AdapterError, load_adapter
    from gpt.registry import Registry, RegistryError

    registry = Registry(args.registry)
    try:
        base = registry.resolve(args.base)
        if is_adapter(base.path):
            return _fail(f"{base.ref} is an adapter; name the model it adapts as --base")
        adapter = load_adapter(args.adapter_dir, read_config(base.path))
        resolved = publish_adapter(registry, args.name, adapter, base,
                                   {"stage": "adapter", "source": str(args.adapter_dir.resolve())}, tuple(args.alias))
    except (AdapterError, CheckpointError, RegistryError) as err:
        return _fail(str(err))
    emit({"ref": resolved.ref, "base": base.ref, "rank": adapter.spec.rank, "targets": list(adapter.spec.targets),
          "path": str(resolved.path)}, args.json, f"imported {args.adapter_dir} as {resolved.ref} (on {base.ref})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from gpt.adapter_store import adapter_base, load_published_adapter
    from gpt.checkpoint import CheckpointError, load_checkpoint
    from gpt.lora import AdapterError, merge_into
    from gpt.registry import Registry, RegistryError, publish_checkpoint

    registry = Registry(args.registry)
    try:
        adapter_version = registry.resolve(args.ref)
        base_ckpt = load_checkpoint(registry.resolve(adapter_base(adapter_version.path)).path)
        adapter, base = load_published_adapter(adapter_version.path, registry, base_ckpt.config)
        model = merge_into(base_ckpt.model, adapter)
        resolved = publish_checkpoint(registry, args.name, model, base_ckpt.tokenizer,
                                      {"stage": "merged", "parent": adapter_version.ref, "base": base.ref},
                                      aliases=tuple(args.alias))
    except (AdapterError, CheckpointError, RegistryError) as err:
        return _fail(str(err))
    emit({"ref": resolved.ref, "adapter": adapter_version.ref, "base": base.ref, "path": str(resolved.path)},
         args.json, f"merged {adapter_version.ref} into {base.ref} as {resolved.ref}")
    return 0
