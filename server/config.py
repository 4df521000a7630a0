"""The server's settings, in one place: a dataclass whose fields carry their `sol serve`
flag, environment variable and help. The flags are generated from it (`add_flags`), and
the environment is read only here, when a ServerConfig is made, for the fields a flag did
not set. Precedence: flag > environment > default.

The engine's settings are not restated here: `ServerConfig.engine` is the engine's own
`EngineConfig`, and each of its fields that carries `sol serve` metadata (server/engine/
config.py, `served`) gets its flag and environment variable generated the same way.

Adding a setting is one field; README's configuration table lists the public ones."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.registry import default_home, default_registry_root
from gpt.tool_calls import FAMILIES as TOOL_FAMILIES
from server.engine.config import EngineConfig

_NO_DEFAULT: Any = dataclasses.MISSING


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Setting:
    """How one ServerConfig field is set from outside the process."""

    help: str
    env: str | None = None
    flag: str | bool = True              # True: --field-name; False: no flag (environment or code only)
    parse: Callable[[str], Any] = str
    repeat: bool = False                 # a list field: the flag is repeatable
    metavar: str | None = None
    default_text: str = ""               # the default as help shows it


def setting(default: Any = _NO_DEFAULT, *, help: str, env: str | None = None, flag: str | bool = True,
            parse: Callable[[str], Any] | None = None, factory: Callable[[], Any] | None = None,
            repeat: bool = False, metavar: str | None = None, default_text: str | None = None) -> Any:
    """A dataclass field with a flag (`--field-name` unless named; False for none) and,
    with `env`, an environment fallback read when the config is made."""
    if parse is None:
        parse = _parser_for(default)
    if default_text is None:
        default_text = "unset" if default is None or default is _NO_DEFAULT else str(default)
    meta = {"setting": Setting(help, env, flag, parse, repeat, metavar, default_text)}
    fallback = factory if factory is not None else (list if repeat else (lambda: default))
    if env is None:
        return field(default_factory=fallback, metadata=meta) if factory or repeat else \
            field(default=default, metadata=meta)

    def from_env() -> Any:
        return _from_env(env, parse, fallback)
    return field(default_factory=from_env, metadata=meta)


def _from_env(env: str, parse: Callable[[str], Any], fallback: Callable[[], Any]) -> Any:
    raw = os.environ.get(env)
    if raw in (None, ""):
        return fallback()
    try:
        return parse(raw)
    except ValueError as err:
        raise ValueError(f"{env}={raw!r}: {err}") from None


def _parser_for(default: Any) -> Callable[[str], Any]:
    # bool before int: a bool is an int to isinstance.
    return next((p for t, p in ((bool, parse_bool), (int, int), (float, float), (Path, Path))
                 if isinstance(default, t)), str)


def _tool_parser(value: str) -> str:
    if value not in ("auto", *TOOL_FAMILIES):
        raise ValueError(f"tool parser must be auto, {', '.join(TOOL_FAMILIES)} (got {value!r})")
    return value


def engine_settings() -> list[tuple[dataclasses.Field, Setting]]:
    """The EngineConfig fields `sol serve` sets, as Settings made from their metadata."""
    out = []
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata.get("serve")
        if meta is None:
            continue
        default = meta["serve_default"]
        default_text = meta["default_text"] or ("unset" if default is None else str(default))
        out.append((f, Setting(meta["help"], meta["env"], meta["flag"] or True, meta["parse"] or _parser_for(default),
                               default_text=default_text)))
    return out


def engine_config(**given: Any) -> EngineConfig:
    """The engine's settings: `given` (flags, code), else the environment, else the
    engine's defaults."""
    values = dict(given)
    for f, s in engine_settings():
        if f.name not in values:
            serve_default = f.metadata["serve"]["serve_default"]
            values[f.name] = _from_env(s.env, s.parse, lambda d=serve_default: d) if s.env else serve_default
    return EngineConfig(**values)
def _origins(value: str) -> list[str]:
    """A comma-separated allow-list of browser origins (scheme://host[:port], or *)."""
    origins = [o.strip().rstrip("/") for o in value.split(",") if o.strip()]
    for o in origins:
        if o != "*" and not (o.startswith(("http://", "https://")) and "/" not in o.split("://", 1)[1]):
            raise ValueError(f"a CORS origin is scheme://host[:port] or * (got {o!r})")
    return origins


def _dtype_name(value: str) -> str:
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
    if value not in names:
        raise ValueError(f"dtype must be float32 or bfloat16 (got {value!r})")
    return names[value]


@dataclass
class ServerConfig:
    host: str = setting("0.0.0.0", env="SOL_HOST", help="address to bind")
    port: int = setting(50051, env="SOL_PORT", help="gRPC port")
    metrics_port: int = setting(9400, env="SOL_METRICS_PORT", help="Prometheus port, 0 = off")
    # The OpenAI-compatible HTTP API and playground: same process, engines, keys and ledger.
    http_port: int = setting(8000, env="SOL_HTTP_PORT", help="OpenAI-compatible HTTP API and playground, 0 = off")
    # Slow or idle HTTP clients must not hold a connection (one fd each) for ever: uvicorn
    # closes idle keep-alive connections itself, the deadlines for a request's header
    # block and body are server/http/server.py's (uvicorn has none).
    http_header_timeout_s: float = setting(10.0, env="SOL_HTTP_HEADER_TIMEOUT", flag="--http-header-timeout",
                                           help="seconds from a connection's first byte (or from its opening) to "
                                                "the end of a request's header block; beyond it 408 and close")
    http_body_timeout_s: float = setting(30.0, env="SOL_HTTP_BODY_TIMEOUT", flag="--http-body-timeout",
                                         help="seconds from the end of a request's headers to the end of its body; "
                                              "beyond it 408 and close")
    http_keepalive_timeout_s: float = setting(30.0, env="SOL_HTTP_KEEPALIVE_TIMEOUT",
                                              flag="--http-keepalive-timeout",
                                              help="seconds an idle keep-alive HTTP connection stays open")
    http_max_header_bytes: int = setting(16384, env="SOL_HTTP_MAX_HEADER_BYTES",
                                         help="largest HTTP request line + header block; beyond it 400 and close")
    # Browsers may call the HTTP API from these other origins (CORS); none by default, so a
    # page elsewhere cannot spend a key a user pasted into it against this server.
    cors_origins: list[str] = setting(env="SOL_CORS_ORIGINS", parse=_origins, factory=list, metavar="ORIGINS",
                                      help="comma-separated origins (https://app.example.com, or *) whose pages "
                                           "may call the HTTP API from a browser",
                                      default_text="none: CORS off")
    registry: Path = setting(env="SOL_REGISTRY", parse=Path, factory=default_registry_root,
                             help="registry directory", default_text="$SOL_HOME/registry")
    models: list[str] = setting(flag="--model", repeat=True, metavar="REF",
                                help="model to serve: NAME, NAME:ALIAS or NAME@VERSION (repeatable)",
                                default_text="every model's latest, base, sft and rlhf")
    redis_url: str | None = setting(None, env="SOL_REDIS_URL",
                                    help="Redis for the ledger, quotas and keys, shared by replicas",
                                    default_text="the embedded SQLite ledger under $SOL_HOME")
    redis_tls_ca: Path | None = setting(None, env="SOL_REDIS_TLS_CA", parse=Path, metavar="FILE",
                                        help="PEM CA bundle that signed the ledger Redis's certificate (a rediss:// "
                                             "URL)", default_text="the system's CAs")
    # TLS for the gRPC port; server/tls.py hands the same files to an HTTP port.
    tls_cert: Path | None = setting(None, env="SOL_TLS_CERT", parse=Path, metavar="FILE",
                                    help="PEM certificate chain: with --tls-key the gRPC port speaks TLS only; "
                                         "replaced files are served from the next connection",
                                    default_text="plain text")
    tls_key: Path | None = setting(None, env="SOL_TLS_KEY", parse=Path, metavar="FILE",
                                   help="PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, env="SOL_TLS_CLIENT_CA", parse=Path, metavar="FILE",
                                         help="PEM CA bundle: clients must present a certificate it signed "
                                              "(mutual TLS)", default_text="no client certificates")
    # Kubernetes' gRPC probes speak plain text only: with TLS on, they ask this port.
    health_port: int = setting(0, env="SOL_HEALTH_PORT",
                               help="plain-text port serving grpc.health.v1 only, for probes that cannot speak "
                                    "TLS; 0 = off")
    admin_key: str | None = setting(None, env="SOL_ADMIN_KEY", flag=False, help="the admin key")
    admin_key_file: Path | None = setting(None, parse=Path, help="file holding the admin key "
                                          "(beats SOL_ADMIN_KEY)", default_text="$SOL_HOME/admin.key, generated")
    # HMAC pepper for stored key hashes; every replica sharing a ledger needs the same one.
    key_pepper: str | None = setting(None, env="SOL_KEY_PEPPER", flag=False, help="HMAC pepper of key hashes")
    home: Path = setting(env="SOL_HOME", flag=False, parse=Path, factory=default_home,
                         help="ledger, spool, admin key and pepper files", default_text="~/.sol")
    grace_period_s: float = setting(30.0, env="SOL_GRACE_PERIOD", flag="--grace-period",
                                    help="seconds running requests get to finish after SIGTERM")
    default_max_tokens: int = setting(256, help="max_tokens when a request sets none (capped by the context)")
    stream_buffer_tokens: int = setting(
        32, env="SOL_STREAM_BUFFER_TOKENS",
        help="backpressure: tokens per choice a request may generate ahead of what its client has read; "
             "beyond it the request pauses until the client reads")
    stream_interval: int = setting(
        1, env="SOL_STREAM_INTERVAL",
        help="tokens per streamed message: a stream's reader is woken once this many new tokens are ready (the "
             "first token and the end at once); more means fewer messages and less server work per token at high "
             "concurrency, in coarser steps; at most --stream-buffer-tokens")
    max_prompt_chars: int = 1 << 20
    # A response_format compiles in a worker thread; one that takes longer is refused
    # (INVALID_ARGUMENT) instead of holding its request, and never holds anyone else's.
    grammar_compile_timeout_s: float = setting(10.0, flag="--grammar-compile-timeout",
                                               help="seconds a response_format (JSON schema, regex, grammar) may "
                                                    "take to compile")
    # A key's share of that worker pool: compiles it may have running at once (a
    # constraint already compiling for anyone is waited for, not compiled again); beyond
    # it, RESOURCE_EXHAUSTED with a retry hint.
    grammar_compiles_per_key: int = setting(2, env="SOL_GRAMMAR_COMPILES_PER_KEY",
                                            help="response_format compiles one API key may have running at once")
    # How tool calls are read from answers and forced: "auto" takes the family the model's
    # chat template shows (sol's own layout: hermes); naming one overrides it for every model.
    tool_parser: str = setting("auto", parse=_tool_parser, metavar="auto|" + "|".join(TOOL_FAMILIES),
                               help="the tool-call format of answers: auto (from each model's chat template) or "
                                    "one family for every model")
    max_messages: int = 1024
    max_cpu_loras: int = setting(8, help="LoRA adapters kept loaded in memory (least recently used out); each "
                                         "engine holds --max-loras of them in its slots")
    # The engine's own settings (device, dtype, KV pool, step limits, threads, kernels):
    # flags and environment variables generated from EngineConfig's metadata.
    engine: EngineConfig = field(default_factory=engine_config)
    # KV memory shared by every loaded model version (hot-load included), and the most
    # one version's pool may take.
    kv_budget_mb: int = setting(1024, env="SOL_KV_BUDGET_MB",
                                help="KV memory shared by every loaded model version, swaps included")
    kv_per_model_mb: int = setting(256, env="SOL_KV_PER_MODEL_MB", help="the most one version's KV pool may take")
    metrics_top_tenants: int = setting(8, help="keys (by id) with their own scheduling gauges on /metrics, the "
                                               "busiest first; 0 = none")
    # Pricing default for models without a price, and the cached prompt token discount.
    cached_discount: float = setting(0.5, help="price discount of cached prompt tokens for models without a "
                                               "SetPrice")
    store_timeout_s: float = 1.0
    # Crash-safe metering: a running request's usage so far is written ahead to the ledger
    # (not billed) every N tokens or T seconds, before the tokens go out, so a server
    # killed at any moment leaves at most N delivered tokens per request unbilled; the
    # next start (or any replica, once the lease lapses) bills them exactly once.
    metering_tokens: int = setting(16, env="SOL_METERING_TOKENS",
                                   help="crash-safe metering: write a running request's usage ahead every this "
                                        "many output tokens (over its n choices); at most this many delivered "
                                        "tokens per request go unbilled if the server is killed")
    metering_interval_s: float = setting(1.0, env="SOL_METERING_INTERVAL", flag="--metering-interval",
                                         help="crash-safe metering: and at least this often (seconds) while a "
                                              "request has unwritten tokens")
    instance_lease_s: float = setting(10.0, env="SOL_INSTANCE_LEASE", flag="--instance-lease",
                                      help="seconds without a heartbeat after which other replicas consider this "
                                           "server dead, bill its running requests and free their request ids "
                                           "and budget reservations (a restart frees them at once)")
    # Key lookups are cached this long: a revocation reaches other replicas within it.
    auth_cache_s: float = 2.0
    warmup: bool = True
    # Hot-load: follow the registry (filesystem events, polling as the fallback).
    watch: bool = setting(True, help="follow the registry: hot-load new versions and moved aliases",
                          default_text="on")
    poll_interval_s: float = setting(2.0, env="SOL_POLL_INTERVAL", flag="--poll-interval",
                                     help="registry rescan period in seconds, the fallback where filesystem "
                                          "events are missing")

    def __post_init__(self) -> None:
        if self.metering_tokens < 1 or self.metering_interval_s <= 0 or self.instance_lease_s <= 0:
            raise ValueError(f"metering_tokens must be >= 1, metering_interval_s and instance_lease_s > 0 (got "
                             f"{self.metering_tokens}, {self.metering_interval_s}, {self.instance_lease_s})")
        for name in ("http_header_timeout_s", "http_body_timeout_s", "http_keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.http_max_header_bytes < 1024:
            raise ValueError(f"http_max_header_bytes must be at least 1024 (got {self.http_max_header_bytes})")
        if not 1 <= self.stream_interval <= self.stream_buffer_tokens:
            raise ValueError(f"stream_interval must be in [1, stream_buffer_tokens = {self.stream_buffer_tokens}] "
                             f"(got {self.stream_interval})")

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.sqlite3"

    @property
    def replica_slot(self) -> str:
        """This replica's place (host and port): a restart takes over its predecessor's
        spool and, in the ledger, frees what the predecessor held."""
        return f"{socket.gethostname()}-{self.port}"

    @property
    def spool_path(self) -> Path:
        # One spool per host and port: replicas sharing a volume never interleave writes.
        return self.home / "spool" / f"{self.replica_slot}.jsonl"


def settings() -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(ServerConfig) if "setting" in f.metadata]


def _flag(f: dataclasses.Field, s: Setting) -> str:
    return s.flag if isinstance(s.flag, str) else "--" + f.name.replace("_", "-")


def _help(s: Setting) -> str:
    where = f"{s.env}; " if s.env else ""
    return f"{s.help} ({where}default {s.default_text})"


ENGINE_DEST = "engine."                  # argparse dests of the engine's flags


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`sol serve`'s flags. An absent flag leaves its field to the environment and the
    default (argparse.SUPPRESS keeps it out of the namespace)."""
    for dest_prefix, pairs in (("", settings()), (ENGINE_DEST, engine_settings())):
        for f, s in pairs:
            if not s.flag:
                continue
            kwargs: dict[str, Any] = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS, "help": _help(s)}
            if s.parse is parse_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                metavar = s.metavar or _flag(f, s).removeprefix("--").replace("-", "_").upper()
                kwargs.update(type=s.parse, metavar=metavar, action="append" if s.repeat else "store")
            parser.add_argument(_flag(f, s), **kwargs)


def from_flags(args: argparse.Namespace) -> ServerConfig:
    """The config from parsed `sol serve` flags, the environment filling the rest."""
    given = {f.name: getattr(args, f.name) for f, s in settings() if s.flag and hasattr(args, f.name)}
    engine = {f.name: getattr(args, ENGINE_DEST + f.name) for f, _ in engine_settings()
              if hasattr(args, ENGINE_DEST + f.name)}
    config = ServerConfig(engine=engine_config(**engine), **given)
    if "admin_key_file" in given:
        config.admin_key = None          # an explicit file beats the environment
    return config
