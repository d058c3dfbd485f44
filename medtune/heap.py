"""Keep a training process's heap from holding freed memory it will not reuse.

glibc serves a large allocation from the heap once a freed one of that size has raised its
"dynamic" mmap threshold (up to 32 MiB). DP training allocates and frees hundreds of MiB of
activations and per-sample gradients every step, in slightly different sizes each step (Poisson
batches), so the heap fragments and its peak climbs with the number of steps (docs/benchmarks.md,
"Memory at a large site"). Setting the trim threshold fixes the mmap threshold at glibc's default
(128 KiB): large tensors are then mapped and returned to the system when freed, and freed heap
above 64 KiB is given back at once. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter number
TRIM_THRESHOLD_BYTES = 64 * 1024


@functools.cache
def keep_heap_compact() -> bool:
    """Once per process: whether glibc accepted the setting (False where there is no glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    # no C library by that name, or one without mallopt (musl, macOS)
    except (OSError, AttributeError):
        return False
