"""The server's settings: one dataclass, filled from `sol serve` flags with environment
fallbacks (the same names everywhere: SOL_REDIS_URL, SOL_ADMIN_KEY, ...)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from gpt.registry import default_home, default_registry_root


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


@dataclass
class ServerConfig:
    host: str = field(default_factory=lambda: os.environ.get("SOL_HOST", "0.0.0.0"))
    port: int = field(default_factory=lambda: _env_int("SOL_PORT", 50051))
    metrics_port: int = field(default_factory=lambda: _env_int("SOL_METRICS_PORT", 9400))  # 0 = off
    # OpenAI-compatible HTTP API + playground, same process and engines as gRPC; 0 = off.
    http_port: int = field(default_factory=lambda: _env_int("SOL_HTTP_PORT", 8000))
    registry: Path = field(default_factory=lambda: Path(os.environ.get("SOL_REGISTRY") or default_registry_root()))
    models: list[str] = field(default_factory=list)   # refs; empty = every model's latest
    redis_url: str | None = field(default_factory=lambda: os.environ.get("SOL_REDIS_URL") or None)
    admin_key: str | None = field(default_factory=lambda: os.environ.get("SOL_ADMIN_KEY") or None)
    admin_key_file: Path | None = None
    # HMAC pepper for stored key hashes; every replica sharing a ledger needs the same one.
    key_pepper: str | None = field(default_factory=lambda: os.environ.get("SOL_KEY_PEPPER") or None)
    home: Path = field(default_factory=default_home)
    grace_period_s: float = field(default_factory=lambda: _env_float("SOL_GRACE_PERIOD", 30.0))
    default_max_tokens: int = 256
    max_prompt_chars: int = 1 << 20
    max_messages: int = 1024
    # Engine sizing (None = the engine's defaults).
    device: str | None = None
    kv_blocks: int | None = None                 # an explicit pool per engine; turns the budget off
    # KV memory shared by every loaded model version (hot-load included), and the most
    # one version's pool may take.
    kv_budget_mb: int = field(default_factory=lambda: _env_int("SOL_KV_BUDGET_MB", 1024))
    kv_per_model_mb: int = field(default_factory=lambda: _env_int("SOL_KV_PER_MODEL_MB", 256))
    max_waiting: int | None = None
    # Pricing default for models without a price, and the cached prompt token discount.
    cached_discount: float = 0.5
    store_timeout_s: float = 1.0
    # Key lookups are cached this long: a revocation reaches other replicas within it.
    auth_cache_s: float = 2.0
    warmup: bool = True
    # Hot-load: follow the registry (filesystem events, polling as the fallback).
    watch: bool = True
    poll_interval_s: float = field(default_factory=lambda: _env_float("SOL_POLL_INTERVAL", 2.0))

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.sqlite3"

    @property
    def spool_path(self) -> Path:
        # One spool per host and port: replicas sharing a volume never interleave writes.
        return self.home / "spool" / f"{socket.gethostname()}-{self.port}.jsonl"
