"""A per-key share of the structured-output compile pool.

A response_format that misses the cache is compiled in a small worker pool shared by
every key; without a share, one key sending distinct constraints (each a little costly)
keeps the pool busy and every other key's first request with a new schema waits behind
them. A key holds a slot from the moment its compile is submitted until the compile
ends in its thread, also when its request stopped waiting (the compile timeout): the
work it started is what it is charged for. Thread-safe (released from worker threads).
"""

from __future__ import annotations

import threading


class CompileSlots:
    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str) -> bool:
        """One slot for `key_id`, or False when it holds `per_key` already."""
        with self._lock:
            held = self._held.get(key_id, 0)
            if held >= self.per_key:
                return False
            self._held[key_id] = held + 1
            return True

    def give(self, key_id: str) -> None:
        with self._lock:
            held = self._held.get(key_id, 0) - 1
            if held > 0:
                self._held[key_id] = held
            else:
                self._held.pop(key_id, None)

    def held(self, key_id: str) -> int:
        with self._lock:
            return self._held.get(key_id, 0)
