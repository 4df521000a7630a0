"""CLI: `sol chat`, `sol complete`, `sol served`, `sol keys create|revoke|list`, `sol prices set`,
`sol usage`: the commands that talk to a server, the ones the client distribution ships.

Every command talks to a server: --target (SOL_TARGET, default localhost:50051).
Inference commands take --api-key (SOL_API_KEY); admin commands --admin-key
(SOL_ADMIN_KEY, else $SOL_HOME/admin.key, which a local `sol serve` generates)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from client.output import add_json_flag, emit, table
from client.params import add_flags, add_format_flags, from_args


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="server address (SOL_TARGET; default localhost:50051)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds (default 120)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for the server to be up (and, for chat/complete, to have a "
                        "model loaded), e.g. right after starting `sol serve`")
    tls = p.add_argument_group("TLS (default: plain text; any of these turns TLS on)")
    tls.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                     help="TLS with the public CAs grpc bundles (SOL_TLS)")
    tls.add_argument("--tls-ca", metavar="FILE", help="PEM CA bundle that signed the server's certificate (SOL_TLS_CA)")
    tls.add_argument("--tls-cert", metavar="FILE",
                     help="PEM client certificate, for a server that asks for one (SOL_TLS_CLIENT_CERT)")
    tls.add_argument("--tls-key", metavar="FILE", help="PEM key of --tls-cert (SOL_TLS_CLIENT_KEY)")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="name to expect in the server's certificate, when --target is an IP or a port-forward "
                          "(SOL_TLS_SERVER_NAME)")


def _add_api_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, help="API key (SOL_API_KEY)")


def _add_admin_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-key", default=None,
                   help="admin key (SOL_ADMIN_KEY; default: $SOL_HOME/admin.key written by a local `sol serve`)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("SOL_MODEL"),
                   help="NAME, NAME:ALIAS or NAME@VERSION (SOL_MODEL; default: the server's first model)")


def register(sub, bench_sub) -> None:
    p = sub.add_parser("chat", help="talk to a served model: streams answers, keeps the conversation")
    _add_target(p)
    _add_api_key(p)
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-usage", action="store_true", help="do not print token usage after each answer")
    add_flags(p)
    add_format_flags(p)
    p.set_defaults(handler=_chat)

    p = sub.add_parser("complete", help="one answer to one prompt (a chat turn; --raw for a base-model completion)")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    _add_target(p)
    _add_api_key(p)
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt (chat only)")
    p.add_argument("--raw", action="store_true", help="raw completion of the prompt, no chat template")
    p.add_argument("--request-id", default=None, help="idempotency key (default: a new one)")
    add_json_flag(p)
    add_flags(p)
    add_format_flags(p)
    p.set_defaults(handler=_complete)

    p = sub.add_parser("served", help="the models the server at --target serves now (ListModels); "
                       "`sol models` is the local registry")
    _add_target(p)
    _add_api_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_served)

    keys = sub.add_parser("keys", help="API keys (admin)")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser("create", help="create a key; prints it in clear this once")
    p.add_argument("--name", required=True)
    p.add_argument("--token-budget", type=int, default=None, help="total tokens the key may use")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    _add_scheduling_flags(p)
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_keys_create)
    p = keys_sub.add_parser("update", help="change a key's share or band")
    p.add_argument("key_id")
    _add_scheduling_flags(p)
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_keys_update)
    p = keys_sub.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_keys_revoke)
    p = keys_sub.add_parser("list", help="keys with their limits and tokens used")
    p.add_argument("--all", action="store_true", help="include revoked keys")
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_keys_list)

    prices = sub.add_parser("prices", help="model prices (admin)")
    prices_sub = prices.add_subparsers(dest="prices_command", metavar="ACTION", required=True)
    p = prices_sub.add_parser("set", help="price a model per 1K prompt and completion tokens")
    p.add_argument("model", help="model name")
    p.add_argument("--prompt-per-1k", type=float, required=True)
    p.add_argument("--completion-per-1k", type=float, required=True)
    p.add_argument("--cached-discount", type=float, default=0.5,
                   help="fraction taken off the price of prompt tokens served from the prefix cache (default 0.5)")
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_prices_set)

    p = sub.add_parser("usage", help="metered usage per key, model and day (admin)")
    p.add_argument("--key-id", default="")
    p.add_argument("--model", default="")
    p.add_argument("--from-day", default="", help="YYYY-MM-DD")
    p.add_argument("--to-day", default="", help="YYYY-MM-DD")
    _add_target(p)
    _add_admin_key(p)
    add_json_flag(p)
    p.set_defaults(handler=_usage)


# --- helpers ------------------------------------------------------------------------------

def _admin_key(args) -> str | None:
    if args.admin_key or os.environ.get("SOL_ADMIN_KEY"):
        return args.admin_key or os.environ["SOL_ADMIN_KEY"]
    # $SOL_HOME as gpt.registry.default_home reads it, restated here: the client installs
    # without the shared core (and torch).
    path = Path(os.environ.get("SOL_HOME") or Path.home() / ".sol") / "admin.key"
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _client(args, admin: bool = False):
    from client.client import Client

    c = Client(args.target, api_key=getattr(args, "api_key", None), timeout=args.timeout, tls=args.tls,
               tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_server_name=args.tls_server_name)
    if args.wait > 0 and not c.wait_ready(args.wait, service="liveness" if admin else ""):
        c.close()
        what = "answer" if admin else "have a model loaded"
        raise TimeoutError(f"the server at {c.target} did not {what} within {args.wait:.0f} s")
    if admin:
        # Read after the wait: a local `sol serve` writes $SOL_HOME/admin.key as it starts.
        c.admin_key = _admin_key(args)
    return c


def _model(client, args) -> str:
    if args.model:
        if args.wait > 0:
            _wait_for_model(client, args.model, args.wait)
        return args.model
    models = client.list_models()
    if not models:
        raise LookupError("the server has no model loaded yet; pass --model once one is")
    m = models[-1]
    return f"{m.name}@{m.version}"


def _wait_for_model(client, model: str, seconds: float) -> None:
    """With --wait, also wait until `model` itself is served: a server that is ready may
    still be loading the version an alias names (hot-load loads in the background)."""
    import time

    import grpc

    from client.types import SolError

    deadline = time.monotonic() + seconds
    while True:
        try:
            client.count_tokens(model, prompt=".")
            return
        except SolError as err:
            if err.code != grpc.StatusCode.NOT_FOUND or time.monotonic() >= deadline:
                raise
        time.sleep(0.5)


def _run(fn):
    """Server errors become one line on stderr and exit status 1."""
    from client.types import SolError

    try:
        return fn()
    except SolError as err:
        print(f"sol: {err.code.name.lower().replace('_', ' ')}: {err.message}", file=sys.stderr)
        return 1


def _usage_line(u) -> str:
    return (f"[{u.prompt_tokens} prompt ({u.cached_tokens} cached) + {u.completion_tokens} completion = "
            f"{u.total_tokens} tokens, cost {u.cost:.6f}]")


# --- handlers -----------------------------------------------------------------------------

def _chat(args) -> int:
    def go() -> int:
        with _client(args) as c:
            model = _model(c, args)
            messages = [{"role": "system", "content": args.system}] if args.system else []
            interactive = sys.stdin.isatty()
            if interactive:
                print(f"chatting with {model}; an empty line or Ctrl-D ends", file=sys.stderr)
            while True:
                if interactive:
                    print("> ", end="", flush=True, file=sys.stderr)
                line = sys.stdin.readline()
                if not line or (interactive and not line.strip()):
                    return 0
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line.rstrip("\n")})
                stream = c.chat_stream(messages, model=model, **from_args(args))
                try:
                    for chunk in stream:
                        print(chunk.text, end="", flush=True)
                except KeyboardInterrupt:
                    stream.cancel()
                    for _ in stream:
                        pass
                print()
                messages.append({"role": "assistant", "content": stream.text})
                if not args.no_usage and stream.usage is not None:
                    print(_usage_line(stream.usage) + f" {stream.model}@{stream.version}", file=sys.stderr)
    return _run(go)


def _complete(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    def go() -> int:
        with _client(args) as c:
            model = _model(c, args)
            if args.raw:
                r = c.complete(prompt, model=model, request_id=args.request_id, **from_args(args))
            else:
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": prompt}]
                r = c.chat(messages, model=model, request_id=args.request_id, **from_args(args))
        if args.json:
            emit(dataclasses.asdict(r), True)
        else:
            for ch in r.choices:
                print(ch.text)
            print(_usage_line(r.usage) + f" {r.model}@{r.version}", file=sys.stderr)
        return 0
    return _run(go)


def _served(args) -> int:
    def go() -> int:
        with _client(args) as c:
            models = c.list_models()
        rows = [[m.name, m.version, ",".join(m.aliases) or "-", m.stage or "-", m.max_context,
                 f"{m.num_parameters / 1e6:.2f}M", m.scheduling or "-", m.loaded_at or "-"] for m in models]
        human = table(rows, ["MODEL", "VERSION", "ALIASES", "STAGE", "CONTEXT", "PARAMETERS", "SCHEDULING",
                             "LOADED"]) \
            if rows else f"{c.target} serves no model yet"
        emit([dataclasses.asdict(m) for m in models], args.json, human=human)
        return 0
    return _run(go)


def _add_scheduling_flags(p) -> None:
    p.add_argument("--share", type=float, default=None,
                   help="fair-share weight against other keys when the server is busy (default 1; 2 = twice the "
                        "tokens of a weight-1 key)")
    p.add_argument("--band", choices=("interactive", "batch"), default=None,
                   help="interactive keys are served before batch keys (default interactive)")


def _key_row(k) -> list:
    limits = lambda v: "-" if v is None else v  # noqa: E731
    return [k.key_id, k.name, k.prefix + "...", limits(k.token_budget), limits(k.rpm), limits(k.tpm), k.tokens_used,
            f"{k.share:g}", k.band, "revoked" if k.revoked else "active"]


KEY_HEADER = ["KEY ID", "NAME", "PREFIX", "BUDGET", "RPM", "TPM", "USED", "SHARE", "BAND", "STATE"]


def _keys_create(args) -> int:
    def go() -> int:
        with _client(args, admin=True) as c:
            key, info = c.create_key(args.name, args.token_budget, args.rpm, args.tpm, args.share, args.band)
        data = {"key": key, **dataclasses.asdict(info)}
        if args.json:
            emit(data, True)
        else:
            # The key alone on stdout, so `export SOL_API_KEY=$(sol keys create --name me)` works.
            print(key)
            print(f"sol: key id {info.key_id}; the key is shown this once: store it now", file=sys.stderr)
        return 0
    return _run(go)


def _keys_update(args) -> int:
    def go() -> int:
        if args.share is None and args.band is None:
            raise SystemExit("sol keys update: nothing to change; give --share and/or --band")
        with _client(args, admin=True) as c:
            info = c.update_key(args.key_id, args.share, args.band)
        emit(dataclasses.asdict(info), args.json, human=table([_key_row(info)], KEY_HEADER))
        return 0
    return _run(go)


def _keys_revoke(args) -> int:
    def go() -> int:
        with _client(args, admin=True) as c:
            revoked = c.revoke_key(args.key_id)
        emit({"key_id": args.key_id, "revoked": revoked}, args.json,
             human=f"revoked {args.key_id}" if revoked else f"{args.key_id} was already revoked")
        return 0
    return _run(go)


def _keys_list(args) -> int:
    def go() -> int:
        with _client(args, admin=True) as c:
            keys = c.list_keys(include_revoked=args.all)
        emit([dataclasses.asdict(k) for k in keys], args.json, human=table([_key_row(k) for k in keys], KEY_HEADER))
        return 0
    return _run(go)


def _prices_set(args) -> int:
    def go() -> int:
        with _client(args, admin=True) as c:
            c.set_price(args.model, args.prompt_per_1k, args.completion_per_1k, args.cached_discount)
        emit({"model": args.model, "prompt_per_1k": args.prompt_per_1k, "completion_per_1k": args.completion_per_1k,
              "cached_discount": args.cached_discount}, args.json,
             human=f"{args.model}: {args.prompt_per_1k} per 1K prompt tokens, {args.completion_per_1k} per 1K "
                   f"completion tokens, cached prompt tokens {args.cached_discount:.0%} off")
        return 0
    return _run(go)


def _usage(args) -> int:
    def go() -> int:
        with _client(args, admin=True) as c:
            report = c.usage(args.key_id, args.model, args.from_day, args.to_day)
        rows = [[r.day, r.key_id, r.model, r.requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
                 r.total_tokens, f"{r.cost:.6f}"] for r in report.rows]
        t = report.total
        rows.append(["total", "", "", t.requests, t.prompt_tokens, t.cached_tokens, t.completion_tokens,
                     t.total_tokens, f"{t.cost:.6f}"])
        human = table(rows, ["DAY", "KEY ID", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "TOTAL", "COST"])
        if report.spooled_records:
            human += f"\n({report.spooled_records} records spooled on this replica, not yet in the ledger)"
        emit(dataclasses.asdict(report), args.json, human=human)
        return 0
    return _run(go)
