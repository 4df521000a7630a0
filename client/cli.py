"""The `sol` command line.

The client distribution alone gives the commands that talk to a server
(`client.commands`: chat, complete, served, keys, prices, usage). Every other area adds
its own through the `sol.commands` entry-point group, which the full `sol` distribution
declares in its pyproject.toml: a module with `register(subparsers, bench_subparsers)`.
So installing only the client gives a working `sol` without torch, and the full install
gives everything, with no list of module names here to keep in step.

Handlers import heavy libraries (torch, grpc) lazily so `sol --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from client import commands as remote_commands

ENTRY_POINT_GROUP = "sol.commands"

Register = Callable[[argparse._SubParsersAction, "LazyBench"], None]


class LazyBench:
    """The `sol bench` subcommands, made on first use: a client-only install has no
    benchmark, and then `sol bench` should not appear at all."""

    def __init__(self, commands: argparse._SubParsersAction) -> None:
        self._commands = commands
        self._kinds: argparse._SubParsersAction | None = None

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if self._kinds is None:
            bench = self._commands.add_parser(
                "bench", help="benchmarks that print ratios against a baseline measured in the same run")
            self._kinds = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
        return self._kinds.add_parser(name, **kwargs)


def plugins() -> list[EntryPoint]:
    # Sorted by name so the help lists commands in a stable order whatever the install.
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sol", description="Train small GPT assistants and serve them over gRPC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = LazyBench(sub)
    remote_commands.register(sub, bench)
    for ep in plugins():
        try:
            register: Register = ep.load()
        except ImportError as err:
            # A half-installed environment (e.g. torch missing) keeps the commands that
            # do not need it instead of failing as a whole.
            print(f"sol: warning: commands from {ep.value} unavailable: {err}", file=sys.stderr)
            continue
        register(sub, bench)
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
