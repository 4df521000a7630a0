"""Give the OpenMP worker threads of the calling thread back, so that one thread's team
is the only one in the process.

PyTorch's CPU ops run on GNU OpenMP (libgomp), which keeps a separate team of worker
threads for every thread that has started a parallel region, for as long as that
thread lives. Once the process holds more OpenMP workers than it has cores, libgomp
stops letting idle workers spin and puts them to sleep after ~100 spins, so every
parallel region pays a futex wake-up per worker. A server loads its model on one thread
and steps its engine on another: with two cores and two teams, an elementwise op on the
stepping thread took 51 µs instead of 27 µs, and the threaded engine (`small`, fp32,
64 x 128 -> 128, 2 threads) made 1128-1194 tok/s against 1242-1308 with the loading
thread's team given back (two runs each, a 2-core AVX2 EPYC).

`omp_pause_resource_all` (OpenMP 5.0) frees the calling thread's pool; the next
parallel region on that thread makes a new one. It must not be replaced by dynamic team
sizes (`omp_set_dynamic`): oneDNN splits a primitive's work for the full team and leaves
part of it undone in a smaller one.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

OMP_PAUSE_SOFT = 1

_lock = threading.Lock()
_pause_functions: list | None = None


def _pause_all_functions() -> list:
    """`omp_pause_resource_all` of every libgomp this process has mapped (torch ships its
    own copy; a second one, from another extension, keeps pools of its own). Opening a
    mapped library's path returns the loaded instance, not a new copy. Cached once torch
    has loaded its runtime; before that there is nothing to free."""
    global _pause_functions
    with _lock:
        if _pause_functions is not None:
            return _pause_functions
        paths: list[str] = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)   # address perms offset dev inode path
                    path = fields[5].strip() if len(fields) == 6 else ""
                    if Path(path).name.startswith("libgomp") and path not in paths:
                        paths.append(path)
        except OSError:
            return []
        found = []
        for path in paths:
            try:
                pause = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):   # unloadable, or a libgomp older than GCC 9
                continue
            pause.argtypes = [ctypes.c_int]
            found.append(pause)
        if paths:
            _pause_functions = found
        return found


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers (Linux with libgomp; elsewhere a no-op).
    Call it on a thread that has run torch ops and now hands the CPU work to another
    thread (the engine's stepping thread). Returns whether a runtime took the call."""
    if not sys.platform.startswith("linux"):
        return False
    # Nonzero inside a parallel region, where there is nothing this thread may free.
    results = [pause(OMP_PAUSE_SOFT) == 0 for pause in _pause_all_functions()]
    return any(results)
