"""Freed host memory goes back to the operating system.

glibc serves allocations from 128 KiB up with their own mmap, but raises that threshold
(up to 32 MiB) every time such a block is freed, and keeps smaller freed blocks resident in
its heap. A growth transition frees many tensors of a few MiB (slices read from the
checkpoint, DeepSpeed's copies while it flattens the parameters): with the default they
would stay in the rank's resident memory, and the next allocations would add to them.
A fixed threshold of 4 MiB gives every tensor that size and larger its own mapping,
returned on free; small tensors (activations at CPU-test sizes) keep the fast heap.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 4 << 20


def return_freed_tensors_to_the_os() -> bool:
    """Set the threshold (once per process is enough); False where the C library is not
    glibc (then nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
