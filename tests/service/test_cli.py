"""The CLI against a real server: keys create|list|revoke, complete --json, chat from a
pipe (keeps the conversation), usage --json."""

from __future__ import annotations

import io
import json

import pytest

from client.cli import main
from tests.service.harness import ADMIN_KEY, RunningServer


@pytest.fixture
def server(tiny_checkpoint, tmp_path, monkeypatch):
    registry, _ = tiny_checkpoint
    s = RunningServer(registry.root, tmp_path / "home").start()
    monkeypatch.setenv("SOL_TARGET", s.target)
    monkeypatch.setenv("SOL_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.delenv("SOL_API_KEY", raising=False)
    yield s
    s.stop()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end(server, capsys, monkeypatch):
    code, out, _ = run(capsys, "keys", "create", "--name", "cli", "--rpm", "100", "--json", "--wait", "10")
    assert code == 0
    created = json.loads(out)
    key = created["key"]
    assert key.startswith("sk-sol-") and created["rpm"] == 100
    code, out, _ = run(capsys, "keys", "create", "--name", "plain")
    assert code == 0 and out.strip().startswith("sk-sol-") and len(out.strip().splitlines()) == 1

    code, out, _ = run(capsys, "prices", "set", "tiny", "--prompt-per-1k", "0.5", "--completion-per-1k", "1.5",
                       "--json")
    assert code == 0 and json.loads(out)["completion_per_1k"] == 1.5

    monkeypatch.setenv("SOL_API_KEY", key)
    code, out, _ = run(capsys, "complete", "What is 1 + 1?", "--model", "tiny", "--max-tokens", "4", "--json",
                       "--wait", "10")
    assert code == 0
    r = json.loads(out)
    u = r["usage"]
    assert u["completion_tokens"] == r["choices"][0]["completion_tokens"] >= 1
    expected = ((u["prompt_tokens"] - u["cached_tokens"]) * 0.5 + u["cached_tokens"] * 0.25
                + u["completion_tokens"] * 1.5) / 1000
    assert abs(u["cost"] - expected) < 1e-9
    assert r["model"] == "tiny" and r["version"] == 1

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n"))
    code, out, err = run(capsys, "chat", "--max-tokens", "3")
    assert code == 0
    usage_lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(usage_lines) == 2
    # The second turn carries the first question and answer: a longer prompt.
    first, second = (int(line.split()[0].strip("[")) for line in usage_lines)
    assert second > first

    code, out, _ = run(capsys, "usage", "--key-id", created["key_id"], "--json")
    assert code == 0
    report = json.loads(out)
    assert report["total"]["requests"] == 3 and report["spooled_records"] == 0

    code, out, _ = run(capsys, "keys", "list")
    assert code == 0 and created["key_id"] in out and "plain" in out
    code, out, _ = run(capsys, "keys", "revoke", created["key_id"], "--json")
    assert code == 0 and json.loads(out)["revoked"] is True

    code, _, err = run(capsys, "complete", "hi", "--model", "tiny")
    assert code == 1 and "unauthenticated" in err and "revoked" in err

    monkeypatch.setenv("SOL_ADMIN_KEY", "wrong")
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "permission denied" in err


def test_cli_wait_for_a_model_that_never_comes(server, capsys, monkeypatch):
    code, out, _ = run(capsys, "keys", "create", "--name", "w")
    monkeypatch.setenv("SOL_API_KEY", out.strip())
    code, _, err = run(capsys, "complete", "hi", "--model", "tiny:rlhf", "--wait", "1")
    assert code == 1 and "not found" in err and "tiny:rlhf" in err
