"""Releasing a thread's OpenMP workers: the workers really exit, and ops that run
afterwards (on that thread or another) still compute the same values.

Runs in a fresh interpreter: the test process's own threads (servers of other tests,
their pools) would make the thread counts meaningless."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, threading, torch
    import torch.nn.functional as F
    from gpt.linear import Linear
    from gpt.openmp import release_thread_pool

    def threads():
        return len(os.listdir("/proc/self/task"))

    torch.set_num_threads(2)
    torch.manual_seed(0)
    lin = Linear(96, 80)
    x = torch.randn(64, 96)
    big = torch.ones(1 << 21)
    with torch.no_grad():
        expected = F.linear(x, lin.weight, lin.bias)
    assert release_thread_pool() is True     # the ops above made this thread a team
    before = threads()
    big.mul_(2)                      # a parallel region: this thread gets a worker
    with_team = threads()
    assert release_thread_pool() is True
    released = threads()
    print("counts", before, with_team, released)
    assert with_team == before + 1, (before, with_team)
    assert released == before, (before, released)

    results = {}
    def on_other_thread():
        with torch.inference_mode():
            results["other"] = lin(x).clone()
            results["big"] = float(big.mul(3).sum())
    t = threading.Thread(target=on_other_thread)
    t.start(); t.join()
    with torch.inference_mode():
        results["here"] = lin(x).clone()       # this thread makes a new team
    # The joined thread's own workers exit with it, but libgomp tears them down after the
    # join returns: give them a moment rather than race them.
    import time
    deadline = time.monotonic() + 5.0
    while threads() != before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() == before + 1, (before, threads())
    for name in ("other", "here"):
        assert torch.allclose(results[name], expected, atol=1e-5, rtol=1e-5), name
    assert results["big"] == 6.0 * (1 << 21)
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp pools and /proc are Linux-only")
def test_release_frees_the_calling_threads_workers_and_later_ops_are_unchanged():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


def test_release_without_a_team_is_harmless():
    from gpt.openmp import release_thread_pool

    # This thread may or may not have run a parallel region yet: either way the call
    # returns, and twice in a row is fine.
    release_thread_pool()
    release_thread_pool()
