"""Keep freed memory for reuse while training on a CPU.

Every training step allocates and frees the same large tensors: the logits over a 65k-150k vocabulary, their
log-softmax and gradients, the activations saved for backward. glibc's malloc serves each allocation above its mmap
threshold (at most 32 MiB) with a fresh `mmap` and hands it back on `free`, so every step touches hundreds of fresh
pages and pays a page fault (and the kernel's zeroing) for each 4 KiB of them. Measured on the 2-core CI machine, one
thread: writing a fresh 194 MB tensor took 167 ms against 45 ms for reused memory, and a LoRA step of the tiny GLM-4
tool model (docs/tools.md) went from 0.75 s to 0.41 s (peak memory 1.24 GB to 1.61 GB). The usual cure is jemalloc or
tcmalloc preloaded (`torch.backends.xeon.run_cpu` does that); without a preload, glibc's own `mallopt` gets the same
effect from inside the process: no mmap for allocations, and no returning of the heap's free top to the system. The
process then keeps what it freed until it ends, and its peak grows by what the heap cannot reuse (freed blocks a
slightly larger aligned request does not fit): the ~30% above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
"""glibc's `mallopt` parameter: how much free memory at the top of the heap is kept before it is returned."""
M_MMAP_MAX = -4
"""glibc's `mallopt` parameter: how many allocations may be served by their own mmap (0: none)."""
KEEP_BYTES = 2**31 - 1
"""The trim threshold set, the largest `mallopt` takes: the heap's free top is kept up to 2 GiB."""


def keep_freed_memory() -> bool:
    """Serve every allocation of this process from glibc's heap and keep what is freed for the next allocation;
    returns whether it took effect (False off Linux or on a C library without `mallopt`, e.g. musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    if done:
        log.info("CPU training: freed memory is kept for reuse (glibc mallopt: no mmap, no trimming)")
    return done
