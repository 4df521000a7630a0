"""`sol serve`'s settings have one source: ServerConfig's fields. Flags beat environment
variables, which beat defaults, and every flag and variable that deployments and the
README use still works."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from server import commands
from server.config import ServerConfig, engine_settings, from_flags, settings

# What README, deploy/ and docker-compose.yml rely on.
FLAGS = ["--host", "--port", "--metrics-port", "--registry", "--model", "--redis-url", "--admin-key-file",
         "--grace-period", "--device", "--kv-blocks", "--kv-budget-mb", "--kv-per-model-mb", "--default-max-tokens",
         "--cached-discount", "--no-watch", "--poll-interval", "--tls-cert", "--tls-key", "--tls-client-ca",
         "--health-port", "--redis-tls-ca", "--dtype", "--max-num-seqs", "--max-num-batched-tokens",
         "--engine-threads", "--kernel-arch", "--max-waiting"]
ENV = ["SOL_HOST", "SOL_PORT", "SOL_METRICS_PORT", "SOL_REGISTRY", "SOL_REDIS_URL", "SOL_ADMIN_KEY", "SOL_KEY_PEPPER",
       "SOL_HOME", "SOL_GRACE_PERIOD", "SOL_POLL_INTERVAL", "SOL_KV_BUDGET_MB", "SOL_KV_PER_MODEL_MB", "SOL_TLS_CERT",
       "SOL_TLS_KEY", "SOL_TLS_CLIENT_CA", "SOL_HEALTH_PORT", "SOL_REDIS_TLS_CA", "SOL_DTYPE", "SOL_ENGINE_THREADS",
       "SOL_KERNEL_ARCH"]


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"), None)
    return parser


def serve(*argv: str) -> ServerConfig:
    return from_flags(serve_parser().parse_args(["serve", *argv]))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_every_flag_and_variable_is_there():
    serve_cmd = serve_parser()._subparsers._group_actions[0].choices["serve"]
    options = {s for a in serve_cmd._actions for s in a.option_strings}
    assert set(FLAGS) <= options
    assert set(ENV) <= {s.env for _, s in settings() + engine_settings()}


def test_flag_beats_environment_beats_default(monkeypatch, tmp_path):
    assert serve().port == 50051 and serve().watch and serve().models == []
    monkeypatch.setenv("SOL_PORT", "6000")
    monkeypatch.setenv("SOL_GRACE_PERIOD", "7.5")
    monkeypatch.setenv("SOL_HOME", str(tmp_path))
    config = serve()
    assert (config.port, config.grace_period_s, config.home) == (6000, 7.5, tmp_path)
    assert config.registry == tmp_path / "registry"          # SOL_HOME moves the registry too
    config = serve("--port", "7000", "--grace-period", "1", "--model", "a:sft", "--model", "b@2", "--no-watch",
                   "--registry", "/r")
    assert (config.port, config.grace_period_s, config.models, config.watch, config.registry) == \
        (7000, 1.0, ["a:sft", "b@2"], False, Path("/r"))
    # Made in code (tests, embedding) the config reads the same environment.
    assert ServerConfig().port == 6000 and ServerConfig(port=1).port == 1


def test_admin_key_file_beats_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SOL_ADMIN_KEY", "sk-from-env")
    assert serve().admin_key == "sk-from-env"
    config = serve("--admin-key-file", str(tmp_path / "key"))
    assert config.admin_key is None and config.admin_key_file == tmp_path / "key"


def test_a_bad_variable_names_itself(monkeypatch):
    monkeypatch.setenv("SOL_KV_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="SOL_KV_BUDGET_MB"):
        serve()


def test_only_config_reads_the_environment():
    server_dir = Path(__file__).resolve().parents[2] / "server"
    readers = sorted(p.relative_to(server_dir).as_posix() for p in server_dir.rglob("*.py")
                     if "os.environ" in p.read_text(encoding="utf-8") or "getenv" in p.read_text(encoding="utf-8"))
    assert readers == ["config.py"]


def test_engine_settings_come_from_the_engine_config(monkeypatch):
    # No mirrored defaults: an unset flag leaves the engine's own default.
    assert serve().engine == ServerConfig().engine
    assert serve().engine.max_num_seqs == 64 and serve().engine.num_blocks is None
    monkeypatch.setenv("SOL_DTYPE", "bf16")
    monkeypatch.setenv("SOL_ENGINE_THREADS", "1")
    config = serve("--kv-blocks", "40", "--max-num-seqs", "8", "--engine-threads", "2", "--device", "cpu")
    engine = config.engine
    assert (engine.num_blocks, engine.max_num_seqs, engine.threads, engine.device, engine.dtype) == \
        (40, 8, 2, "cpu", torch.bfloat16)                    # flag beats SOL_ENGINE_THREADS
    assert ServerConfig().engine.threads == 1 and ServerConfig().engine.dtype is torch.bfloat16
    monkeypatch.setenv("SOL_DTYPE", "float16x")
    with pytest.raises(ValueError, match="SOL_DTYPE"):
        ServerConfig()
