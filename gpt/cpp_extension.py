"""Building sol's C++ CPU kernels on first use, with PyTorch's extension builder.

Each kernel library (the model's fused elementwise ops in gpt/csrc/, the engine's paged
attention in server/engine/csrc/) is compiled once per machine and flags (a C++ compiler
and `ninja`, about 30 s, then cached under `$TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions) and registers its ops under `torch.ops.<namespace>`. Where a
library cannot be built its caller keeps a pure-PyTorch path and says so once in the log.

They are compiled for the machine they run on (`-march=native`). An image built on one
machine and run on others prebuilds them for a common target (e.g. `x86-64-v3`;
`sol serve --kernel-arch`, env SOL_KERNEL_ARCH; deploy/docker/Dockerfile does).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Headers every kernel may include (scalar_math.h).
INCLUDE_DIR = Path(__file__).parent / "csrc"


def cflags(arch: str = "native") -> list[str]:
    # -march=native: the loops vectorise to the machine's widest units (AVX-512 where
    # present); a native build's name carries the CPU's flags, so a cache shared between
    # different machines never loads one built for another.
    # -fopenmp: at::parallel_for is a header template whose OpenMP pragma is compiled into
    # the kernel itself; without the flag it ran every item on the calling thread (2.52 ms
    # a layer at 2 threads against 2.58 at 1, `small`, 64 decodes).
    return ["-O3", f"-march={arch}", "-fopenmp"]


# Links libgomp.so.1, which resolves to the copy torch has already loaded (the same
# soname), so the kernels and torch's ops share one OpenMP runtime and its thread pools.
LDFLAGS = ["-fopenmp"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


# torch's builder guards a build directory with a lock *file* that it removes when done; a
# process killed while holding it (SIGKILL or OOM during a server's start) leaves it, and
# every later load of that library waits on it forever. sol's loads take an flock (the
# kernel drops it with the process) around torch's, and a torch lock file found while
# holding the flock that is older than this is a dead loader's: removed. (The age spares
# a loader without the flock: another program, or an older sol.)
STALE_LOCK_S = 120.0


@contextlib.contextmanager
def build_lock(name: str):
    """Hold sol's lock of library `name`'s build directory; clear a stale torch lock."""
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory(name, verbose=False))        # made if missing, as load() does
    fd = os.open(build.parent / f".{name}.sol-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stale = build / "lock"
        # Waited out here rather than in torch's loop, which would wait on a dead one forever.
        while True:
            try:
                age = time.time() - stale.stat().st_mtime
            except FileNotFoundError:
                break
            if age > STALE_LOCK_S:
                log.warning("removing %s, left %.0f s ago by a kernel build that did not finish (a killed "
                            "process)", stale, age)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                break
            time.sleep(0.2)
        yield
    finally:
        os.close(fd)


class KernelLibrary:
    """One C++ source file built into a library of ops in `torch.ops.<namespace>`, once
    per process, for the first target architecture asked for."""

    def __init__(self, name: str, source: Path, namespace: str, probe_op: str) -> None:
        self.name = name
        self.source = source
        self.namespace = namespace
        self.probe_op = probe_op
        self._lock = threading.Lock()
        self._ok: bool | None = None

    def available(self, arch: str = "native") -> bool:
        """Build or load the library (for the first `arch` asked); False, logged once, if
        that fails."""
        if self._ok is None:
            with self._lock:
                if self._ok is None:
                    self._ok = self._load(arch)
        return self._ok

    def _load(self, arch: str) -> bool:
        try:
            from torch.utils.cpp_extension import load

            flags = cflags(arch)
            # A native build is this CPU's; one for a named target (an image's) serves any.
            machine = _cpu_flags() if arch == "native" else ""
            tag = hashlib.sha256((machine + " ".join(flags + LDFLAGS)).encode()).hexdigest()[:10]
            with build_lock(f"{self.name}_{tag}"):
                load(name=f"{self.name}_{tag}", sources=[str(self.source)], extra_cflags=flags,
                     extra_ldflags=LDFLAGS, extra_include_paths=[str(INCLUDE_DIR)], is_python_module=False,
                     verbose=False)
            return hasattr(getattr(torch.ops, self.namespace), self.probe_op)
        except Exception as exc:  # no compiler, no ninja, a read-only cache: keep serving
            log.warning("the %s kernels could not be built (%s); using the PyTorch path", self.name, exc)
            return False
