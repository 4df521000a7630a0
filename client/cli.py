"""The `sol` command line. Each area of the product contributes its own subcommands:
a module listed in COMMAND_MODULES defines `register(subparsers, bench_subparsers)`.
Handlers import heavy libraries (torch, grpc) lazily so `sol --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = (
    "gpt.commands",            # models list|show, export-hf, import-hf
    "training.commands",       # train <stage>, pipeline, bench train
    "server.commands",         # serve, bench engine|serve|hotload
    "client.commands",         # chat, complete, keys, usage
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sol", description="Train small GPT assistants and serve them over gRPC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print ratios against a baseline measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub, bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, OSError) as err:
        # User-facing failures (bad reference, broken checkpoint, missing file) get one
        # line, not a traceback.
        print(f"sol: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
