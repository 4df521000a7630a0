"""The client installs alone: `pip install ./client` (not editable) into a fresh virtual
environment, from the repository's tracked files only (what a fresh clone has), gives a
`sol` with the remote commands and no torch, and that installed CLI and library talk to a
real server on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.service.harness import ADMIN_KEY, RunningServer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def copy_tracked(dest: Path) -> Path:
    """client/ and proto/ as a fresh clone has them: tracked files only, so a build
    artifact or an untracked file in this checkout cannot make the install pass."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "client", "proto"], cwd=ROOT, check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = []
    files = [f for f in listed if f]
    if not files:          # not a git checkout (e.g. a source archive): everything but build output
        skip = {"__pycache__", "build"}
        files = [p.relative_to(ROOT).as_posix() for top in ("client", "proto") for p in (ROOT / top).rglob("*")
                 if p.is_file() and not skip & set(p.parts) and ".egg-info" not in str(p)]
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("client-alone")
    source = copy_tracked(work / "src")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    # Non-editable, with the pip configuration of this machine (its cache and indexes).
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input",
                    "--disable-pip-version-check", str(source / "client")], check=True, timeout=600,
                   env=clean_env())
    return env_dir


def clean_env(**extra: str) -> dict[str, str]:
    # No PYTHONPATH and a working directory outside the repository: the venv must find
    # `client` and `proto` in its own site-packages, not in this checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SOL_")}
    return {**env, **extra}


def run(env_dir: Path, argv: list[str], cwd: Path, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120,
                          env=clean_env(**env))


def test_the_client_installs_without_torch(client_venv, tmp_path):
    py = str(client_venv / "bin" / "python")
    r = run(client_venv, [py, "-c", "import torch"], tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = run(client_venv, [py, "-c", "import client, proto.sol.v1.sol_pb2_grpc, sys; print(client.__file__)"],
            tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(client_venv), "client imported from outside the venv"
    for absent in ("gpt", "server", "training", "bench", "numpy"):
        r = run(client_venv, [py, "-c", f"import {absent}"], tmp_path)
        assert r.returncode != 0, f"{absent} is importable in the client-only venv"

    r = run(client_venv, [str(client_venv / "bin" / "sol"), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""        # no warning about commands it cannot load
    for command in ("chat", "complete", "served", "keys", "prices", "usage"):
        assert run(client_venv, [str(client_venv / "bin" / "sol"), command, "--help"], tmp_path).returncode == 0
    for full_only in ("serve", "pipeline", "train", "bench", "models", "export-hf"):
        r = run(client_venv, [str(client_venv / "bin" / "sol"), full_only, "--help"], tmp_path)
        assert r.returncode == 2 and "invalid choice" in r.stderr, full_only


def test_the_installed_client_talks_to_a_server(client_venv, tiny_checkpoint, tmp_path):
    registry, _ = tiny_checkpoint
    server = RunningServer(registry.root, tmp_path / "home").start()
    sol = str(client_venv / "bin" / "sol")
    try:
        base = {"SOL_TARGET": server.target}
        r = run(client_venv, [sol, "keys", "create", "--name", "alone", "--wait", "30"], tmp_path,
                SOL_ADMIN_KEY=ADMIN_KEY, **base)
        assert r.returncode == 0, r.stderr
        key = r.stdout.strip()
        assert key.startswith("sk-sol-")
        user = {**base, "SOL_API_KEY": key}

        r = run(client_venv, [sol, "served", "--json"], tmp_path, **user)
        assert r.returncode == 0, r.stderr
        assert [(m["name"], m["version"]) for m in json.loads(r.stdout)] == [("tiny", 1)]

        # Sampling flags generated from the installed stubs' descriptor reach the server.
        r = run(client_venv, [sol, "complete", "What is 1 + 1?", "--model", "tiny", "--max-tokens", "4",
                              "--temperature", "0", "--stop", "zzz", "--json"], tmp_path, **user)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["model"] == "tiny" and 1 <= answer["usage"]["completion_tokens"] <= 4

        r = run(client_venv, [sol, "chat", "--model", "tiny", "--max-tokens", "3"], tmp_path,
                stdin="hello\nagain\n", **user)
        assert r.returncode == 0, r.stderr
        assert sum(line.startswith("[") for line in r.stderr.splitlines()) == 2   # usage after each answer

        # The library, imported from the venv.
        program = ("from client import Client\n"
                   "with Client() as c:\n"
                   "    s = c.chat_stream([('user', 'hi')], model='tiny', max_tokens=3, seed=1)\n"
                   "    print(sum(1 for _ in s), s.usage.completion_tokens)\n")
        r = run(client_venv, [str(client_venv / "bin" / "python"), "-c", program], tmp_path, **user)
        assert r.returncode == 0, r.stderr
        chunks, tokens = map(int, r.stdout.split())
        assert chunks >= 1 and 1 <= tokens <= 3
    finally:
        server.stop()
