"""The KV cache budget shared by every engine of a server.

Each loaded model version gets a KV pool of at most `per_model_bytes`, reserved here
before its engine allocates it and released when that engine closes. A load that would exceed the
total waits for retiring versions to give their pools back, or fails with a clear
error, so the server never commits more KV memory than the budget, also mid-swap.
"""

from __future__ import annotations

import threading
import time


class KVBudgetExhausted(RuntimeError):
    """No room for another model version's KV pool within the budget."""


class KVBudget:
    def __init__(self, total_bytes: int, per_model_bytes: int) -> None:
        if per_model_bytes <= 0 or total_bytes < per_model_bytes:
            raise ValueError(f"KV budget of {total_bytes >> 20} MiB cannot hold one model's pool of "
                             f"{per_model_bytes >> 20} MiB; raise --kv-budget-mb or lower --kv-per-model-mb")
        self.total_bytes = total_bytes
        self.per_model_bytes = per_model_bytes
        self.used_bytes = 0
        self._cond = threading.Condition()

    def reserve(self, nbytes: int, timeout_s: float) -> int:
        """Reserve a pool of `nbytes` (at most `per_model_bytes`), waiting up to
        `timeout_s` for room. Returns the bytes reserved."""
        nbytes = min(nbytes, self.per_model_bytes)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.used_bytes + nbytes > self.total_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KVBudgetExhausted(
                        f"KV budget exhausted: {self.used_bytes >> 20} of {self.total_bytes >> 20} MiB are held by "
                        f"loaded model versions; unload one (Admin.UnloadModel) or raise --kv-budget-mb")
                self._cond.wait(left)
            self.used_bytes += nbytes
            return nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used_bytes = max(0, self.used_bytes - nbytes)
            self._cond.notify_all()
