"""A real sol server on loopback, run by the test in a background thread with its own
event loop, and helpers to wait for conditions instead of sleeping."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from server.app import App
from server.config import ServerConfig
from tests.conftest import free_port

ADMIN_KEY = "sk-sol-admin-test"


def publish_tiny(root: Path, tokenizer, aliases: tuple[str, ...] = ("base",), **overrides) -> Path:
    """A tiny random model published as tiny@1 in a registry under `root`; returns the
    registry's root, for RunningServer."""
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    registry = Registry(root / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tokenizer, **overrides), tokenizer, {"stage": "base"},
                       aliases=aliases)
    return registry.root


class RunningServer:
    def __init__(self, registry_root: Path, home: Path, redis_url: str | None = None, **overrides) -> None:
        # HTTP is off unless a test asks for it (http_port=free_port()): most tests are gRPC's.
        settings = {"host": "127.0.0.1", "port": free_port(), "metrics_port": 0, "http_port": 0,
                    "registry": registry_root,
                    "redis_url": redis_url, "admin_key": ADMIN_KEY, "key_pepper": "test-pepper", "home": home,
                    "grace_period_s": 10.0,
                    # Following the registry is hot-load's subject (tests/hotload); these tests
                    # publish nothing while serving, and `sol serve` in test_shutdown keeps it on.
                    "watch": False, **overrides}
        self.config = ServerConfig(**settings)
        self.app = App(self.config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sol-test-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (what the openai SDK takes as base_url)."""
        return f"http://127.0.0.1:{self.app.http_port}/v1"

    def call(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningServer:
        self._thread.start()
        self.call(self.app.start())
        self.call(self.app.load_models())
        return self

    def stop(self) -> None:
        if not self.app._stopped.is_set():
            self.call(self.app.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def serve_tiny(root: Path, tokenizer, key_name: str) -> RunningServer:
    """A running server with an untrained tiny model published as "tiny", and an API key
    for it in `.key` (the caller stops the server)."""
    from client.client import Client
    from gpt.registry import Registry, publish_checkpoint
    from tests.conftest import make_tiny_model

    registry = Registry(root / "registry")
    publish_checkpoint(registry, "tiny", make_tiny_model(tokenizer), tokenizer, {"stage": "base"})
    server = RunningServer(registry.root, root / "home").start()
    with Client(server.target, admin_key=ADMIN_KEY, retries=0) as admin:
        server.key, _ = admin.create_key(key_name)
    return server


def wait_for(condition, timeout: float = 30.0, interval: float = 0.02, message: str = "condition"):
    """Poll `condition()` until it returns a truthy value; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)
