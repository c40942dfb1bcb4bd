"""Give the C heap's free pages back to the kernel after the start's burst (glibc's malloc_trim).

A start with many peers allocates and frees a lot at once: the listing's text, netlink buffers and
kernel dumps, and the tables of dicts that doubled as the peer set grew (dict tables over 512 bytes
come from malloc, not Python's own allocator).  glibc keeps the freed pages unless they are at the
top of its heap, so they stay in the agent's RSS for good: ~0.15 MB after a 1000-peer start here
(bench/README.md).  malloc_trim(0) returns every whole free page, wherever it lies.
"""

from __future__ import annotations

import ctypes


def release_free_memory() -> bool:
    """Ask the C library to return its free heap pages; False where it has no malloc_trim
    (musl, for one), which is harmless."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
