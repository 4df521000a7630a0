"""CLI over the local checkpoint registry: `sol models list|show|gc|alias`, `sol tokenizer
stats`, `sol export-hf`, `sol import-hf`. (`sol served` asks a running server instead.)

It lives in training/, not in the shared core: the core imports nothing of the CLI's
client package, and `tokenizer stats` measures on the training corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from client.output import add_json_flag, emit, table


def _add_registry_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, default=None,
                        help="registry directory (default: $SOL_HOME/registry, SOL_HOME defaults to ~/.sol)")


def register(sub, bench_sub) -> None:
    models = sub.add_parser("models", help="the local checkpoint registry (`sol served`: what a server serves)")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    p = models_sub.add_parser("list", help="every model with its versions and aliases")
    _add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_models_list)

    p = models_sub.add_parser("show", help="one model reference: NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("ref")
    _add_registry_flag(p)
    add_json_flag(p)
    p.add_argument("--verify", action="store_true", help="also load it and check every file's sha256 and shapes")
    p.set_defaults(handler=_models_show)

    p = models_sub.add_parser("gc", help="delete old versions that no alias points to")
    p.add_argument("name")
    p.add_argument("--keep", type=int, default=3, help="newest versions to keep regardless (default 3)")
    _add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_models_gc)

    p = models_sub.add_parser("alias", help="point NAME:ALIAS at a version (promote / roll back); servers "
                              "following the registry switch on their next scan")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    _add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_models_alias)

    tok = sub.add_parser("tokenizer", help="inspect a model's tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok_sub.add_parser("stats", help="vocabulary and compression (bytes per token) on the local held-out "
                           "corpus, and agreement of the trainer's encoder with tiktoken's")
    p.add_argument("ref", help="NAME, NAME:ALIAS or NAME@VERSION, or a directory with a tokenizer.json")
    _add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_tokenizer_stats)

    p = sub.add_parser("export-hf", help="write a model as a Hugging Face Llama directory")
    p.add_argument("ref", help="NAME, NAME:ALIAS or NAME@VERSION")
    p.add_argument("out_dir", type=Path)
    _add_registry_flag(p)
    p.set_defaults(handler=_export_hf)

    p = sub.add_parser("import-hf", help="publish a Hugging Face Llama directory into the registry")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--alias", action="append", default=[], help="aliases to point at it (repeatable)")
    _add_registry_flag(p)
    add_json_flag(p)
    p.set_defaults(handler=_import_hf)

    from training import adapter_commands

    adapter_commands.register(sub, models_sub, _add_registry_flag)


def _registry(args):
    from gpt.registry import Registry

    return Registry(args.registry)


def _models_list(args) -> int:
    reg = _registry(args)
    data = [reg.describe(name) for name in reg.models()]
    rows = []
    for model in data:
        for v in model["versions"]:
            rows.append([model["name"], v["version"], ",".join(v["aliases"]) or "-", v.get("stage", "-"),
                         v.get("created_at", "-")])
    human = table(rows, ["MODEL", "VERSION", "ALIASES", "STAGE", "CREATED"]) if rows else \
        f"no models in {reg.root}"
    emit({"registry": str(reg.root), "models": data}, args.json, human)
    return 0


def _models_show(args) -> int:
    from gpt.checkpoint import load_checkpoint, read_config, read_meta

    reg = _registry(args)
    resolved = reg.resolve(args.ref)
    meta = read_meta(resolved.path)
    if args.verify:
        load_checkpoint(resolved.path)
    config = read_config(resolved.path)
    data = {"ref": resolved.ref, "path": str(resolved.path), "config": config.to_dict(), "meta": meta,
            "aliases": sorted(a for a, v in reg.aliases(resolved.name).items() if v == resolved.version),
            "verified": bool(args.verify)}
    lines = [f"{resolved.ref}  ({resolved.path})",
             f"  aliases:    {', '.join(data['aliases']) or '-'}",
             f"  stage:      {meta.get('stage', '-')}   parent: {meta.get('parent') or '-'}   step: {meta.get('step', '-')}",
             f"  parameters: {meta.get('num_parameters', '-'):,}" if isinstance(meta.get("num_parameters"), int)
             else "  parameters: -",
             f"  model:      {config.n_layers} layers, d_model {config.d_model}, heads {config.n_heads}/"
             f"{config.n_kv_heads} kv, vocab {config.vocab_size}, context {config.max_seq_len}",
             f"  created:    {meta.get('created_at', '-')}   data: {meta.get('data_fingerprint', '-')}"]
    if meta.get("metrics"):
        lines.append("  metrics:    " + ", ".join(f"{k}={v}" for k, v in sorted(meta["metrics"].items())))
    if args.verify:
        lines.append("  verified:   every sha256, the config and the tensor shapes")
    emit(data, args.json, "\n".join(lines))
    return 0


def _models_gc(args) -> int:
    removed = _registry(args).gc(args.name, keep_last=args.keep)
    emit({"removed": removed}, args.json, f"removed versions: {removed or 'none'}")
    return 0


def _models_alias(args) -> int:
    reg = _registry(args)
    before = reg.aliases(args.name).get(args.alias)
    reg.set_alias(args.name, args.alias, args.version)
    emit({"model": args.name, "alias": args.alias, "version": args.version, "previous": before}, args.json,
         f"{args.name}:{args.alias} -> {args.version} (was {before if before is not None else 'unset'})")
    return 0


def _tokenizer_stats(args) -> int:
    from gpt.tokenizer import SPECIAL_TOKENS, SolTokenizer
    from training.data.corpus import build_corpus

    path = Path(args.ref)
    tokenizer = SolTokenizer.load(path if path.is_dir() else _registry(args).resolve(args.ref).path)
    corpus = build_corpus()
    # Texts that spell a special token encode differently by design (sol: plain text).
    heldout = [t for t in corpus.heldout if not any(s in t for s in SPECIAL_TOKENS)]
    hf = tokenizer.hf_tokenizer()
    agree = sum(tokenizer.encode(t) == hf.encode(t, add_special_tokens=False).ids for t in heldout)
    data = {"vocab_size": tokenizer.vocab_size, "heldout_documents": len(heldout),
            "heldout_bytes": sum(len(t.encode()) for t in heldout),
            "bytes_per_token": round(tokenizer.bytes_per_token(heldout), 3),
            "tiktoken_matches_trainer": f"{agree}/{len(heldout)}"}
    emit(data, args.json, "\n".join(f"{k:26} {v}" for k, v in data.items()))
    return 0 if agree == len(heldout) else 1


def _export_hf(args) -> int:
    from gpt.checkpoint import load_checkpoint
    from gpt.hf import export_hf

    resolved = _registry(args).resolve(args.ref)
    ckpt = load_checkpoint(resolved.path)
    export_hf(ckpt.model, ckpt.tokenizer, args.out_dir)
    print(f"exported {resolved.ref} to {args.out_dir} (load with transformers.AutoModelForCausalLM)")
    return 0


def _import_hf(args) -> int:
    from gpt.hf import import_hf
    from gpt.registry import publish_checkpoint

    model, tokenizer = import_hf(args.hf_dir)
    resolved = publish_checkpoint(_registry(args), args.name, model, tokenizer,
                                  {"stage": "imported", "source": str(args.hf_dir.resolve())},
                                  aliases=tuple(args.alias))
    emit({"ref": resolved.ref, "path": str(resolved.path)}, args.json, f"imported {args.hf_dir} as {resolved.ref}")
    return 0
