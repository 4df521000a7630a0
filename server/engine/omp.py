"""OpenMP settings for the engine's stepping thread.

PyTorch's CPU ops run their parallel regions on GNU OpenMP (libgomp), which keeps a team
of worker threads per thread that starts regions. The engine steps on its own thread,
and the process's main thread has usually run torch ops before it (loading the model):
with two teams in the process, the stepping thread's regions ran 20-25% slower than the
same regions on the main thread (a 64 x 384 x 2048 linear: 264 against 216 us, 2
threads), and a whole engine run with 2 threads was no faster than with one. Dynamic
team sizing (`omp_set_dynamic`, the OMP_DYNAMIC setting) lets libgomp size the stepping
thread's teams to the cores that are actually free, which brought it back to 213 us.
The setting is per thread, so it is made on the stepping thread itself.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _loaded_libgomp() -> ctypes.CDLL | None:
    """The libgomp this process already loaded (PyTorch ships its own copy), if any."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libgomp" in Path(path).name:
                return ctypes.CDLL(path)
    except OSError:
        pass
    return None


def prepare_stepping_thread() -> bool:
    """Turn on dynamic OpenMP teams for the calling thread; False where torch does not run
    on libgomp (another OpenMP runtime, or none)."""
    gomp = _loaded_libgomp()
    if gomp is None:
        return False
    try:
        gomp.omp_set_dynamic(1)
        return bool(gomp.omp_get_dynamic())
    except AttributeError:
        log.debug("libgomp without omp_set_dynamic")
        return False
