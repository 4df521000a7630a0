"""CLI: `sol serve`. Its flags are generated from ServerConfig (server/config.py), the one
place that also reads their environment fallbacks."""

from __future__ import annotations

import argparse


def register(sub, bench_sub) -> None:
    from server.config import add_flags

    p = sub.add_parser("serve", help="serve models over gRPC (Inference, Admin, health, reflection) with metering",
                       description="Serve registry models over gRPC. Without --redis-url the ledger is an embedded "
                                   "SQLite file under $SOL_HOME; without an admin key one is generated into "
                                   "$SOL_HOME/admin.key (the CLI's admin commands read it from there). Flags "
                                   "beat their environment variables, which beat the defaults.")
    add_flags(p)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from server.app import serve
    from server.config import from_flags

    return serve(from_flags(args))
