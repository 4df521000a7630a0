"""Fixtures shared by every test: a real tokenizer trained on the local corpus, a tiny
model, a registry in a temporary directory, and a real redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt.config import preset
from gpt.model import GPT
from gpt.registry import Registry, publish_checkpoint
from gpt.tokenizer import SolTokenizer, train_tokenizer
from training.data.corpus import build_corpus

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_sessionstart(session):
    # Build (or load) the CPU kernels before any test, or any server subprocess a test
    # starts, makes an engine and waits for the build inside its deadline.
    from gpt import fused_ops
    from server.engine import paged_attention

    paged_attention.available()
    fused_ops.available()


@pytest.fixture(scope="session")
def corpus():
    return build_corpus(max_bytes=1 << 20)


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus) -> SolTokenizer:
    return train_tokenizer(corpus.train, vocab_size=preset("tiny").vocab_size, show_progress=False)


@pytest.fixture(scope="session")
def hf_tokenizer_dirs(tmp_path_factory, corpus) -> dict:
    """Hugging Face tokenizer directories (qwen, llama3, llama2, mistral) built and saved
    as users' checkpoints hold them (tests/hf_tokenizers.py)."""
    from tests.hf_tokenizers import build_all

    return build_all(tmp_path_factory.mktemp("hf-tokenizers"), corpus.train)


def make_tiny_model(tokenizer: SolTokenizer, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = preset("tiny").replace(vocab_size=tokenizer.vocab_size, **overrides)
    return GPT(config).eval()


@pytest.fixture
def tiny_model(tiny_tokenizer) -> GPT:
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def tiny_checkpoint(registry, tiny_model, tiny_tokenizer):
    """A published tiny model: returns (registry, resolved version)."""
    resolved = publish_checkpoint(registry, "tiny", tiny_model, tiny_tokenizer,
                                  {"stage": "base", "step": 0}, aliases=("base",))
    return registry, resolved


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free loopback port; can be stopped and restarted
    on the same port to test outages."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
