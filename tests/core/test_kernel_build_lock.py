"""A kernel build killed mid-way (a server SIGKILLed while starting) leaves torch's lock
file behind; sol's next load must not wait on it forever."""

from __future__ import annotations

import os
import time

from gpt import cpp_extension


def test_a_dead_builders_lock_file_is_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = "sol_lock_probe"
    with cpp_extension.build_lock(name):
        build = next(p for p in tmp_path.rglob(name) if p.is_dir())
    lock = build / "lock"
    lock.touch()
    old = time.time() - cpp_extension.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with cpp_extension.build_lock(name):
        assert not lock.exists()
    # A fresh one may be a live builder without sol's flock: waited for, until it is gone
    # or old enough to be a dead one's.
    monkeypatch.setattr(cpp_extension, "STALE_LOCK_S", 0.5)
    lock.touch()
    t0 = time.monotonic()
    with cpp_extension.build_lock(name):
        assert not lock.exists() and time.monotonic() - t0 >= 0.4
