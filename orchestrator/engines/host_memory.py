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


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_tensors_to_the_os() -> bool:
    """Set the threshold (once per process is enough); False where the C library is not
    glibc (then nothing changes)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))


def release_free_heap() -> bool:
    """Hand the heap's free pages back now (glibc's malloc_trim). What was freed below the
    threshold (Megatron's and DeepSpeed's small copies while a model is built and
    flattened) stays resident otherwise, and the big allocations that follow (the optimizer
    state) get mappings of their own rather than reuse it: a rank would hold both. Measured
    on a 0.15B model over 4 ranks: 0.09 GiB per rank, 0.6 of its slice of the weights."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))
