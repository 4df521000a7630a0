"""The images' entry point: `sol` subcommands by default, named programs as given, and
secrets read from *_FILE variables (compose secrets, Kubernetes secret volumes)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "entrypoint.sh"


@pytest.fixture
def fake_sol(tmp_path) -> dict[str, str]:
    """A `sol` on PATH that prints its arguments and the secrets it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sol = bin_dir / "sol"
    sol.write_text('#!/bin/sh\necho "sol $*"\necho "admin=${SOL_ADMIN_KEY:-} pepper=${SOL_KEY_PEPPER:-}"\n'
                   'echo "file=${SOL_ADMIN_KEY_FILE:-unset}"\n')
    sol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOL_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("sh") or "/bin/sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_subcommands_go_to_sol(fake_sol):
    out = run(["serve", "--port", "50051"], fake_sol)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "sol serve --port 50051"


def test_named_programs_run_as_given(fake_sol):
    out = run(["sh", "-c", "echo direct"], fake_sol)
    assert out.stdout.strip() == "direct"


def test_secret_files_become_variables(fake_sol, tmp_path):
    (tmp_path / "admin").write_text("adm-123")
    (tmp_path / "pepper").write_text("pep-456")
    env = dict(fake_sol, SOL_ADMIN_KEY_FILE=str(tmp_path / "admin"), SOL_KEY_PEPPER_FILE=str(tmp_path / "pepper"))
    out = run(["serve"], env)
    assert "admin=adm-123 pepper=pep-456" in out.stdout
    assert "file=unset" in out.stdout          # the path does not leak on to the server


def test_unreadable_secret_file_fails_fast(fake_sol, tmp_path):
    out = run(["serve"], dict(fake_sol, SOL_KEY_PEPPER_FILE=str(tmp_path / "missing")))
    assert out.returncode == 64 and "SOL_KEY_PEPPER_FILE" in out.stderr
