"""Give freed image buffers back to the operating system.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after a few large decodes every later buffer of that size comes from the heap, and the heap
keeps the memory after ``free``: a process that decoded a few big images stays big. Fixing
the threshold at 1 MiB keeps every large buffer an mmap of its own, returned on ``free``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGE = 1 << 20


def return_large_blocks(threshold: int = LARGE) -> bool:
    """Serve blocks of ``threshold`` bytes and more by mmap, always; False where the C library
    has no ``mallopt`` (musl, macOS), which keeps its own behaviour."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                        threshold))
