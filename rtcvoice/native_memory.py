"""How the server process's native (C) memory is allocated: glibc's malloc arenas.

Each call runs native threads (aiortc's decoder, PyAV, onnxruntime, the executors). glibc gives
threads their own arenas, up to 8 per core, and memory freed in one stays with it: over 400 calls
in batches of 10 the server's RSS still moved by tens of MB, with two arenas it levelled off
after ~70 calls (bench/README.md "Native memory"). Fewer arenas share freed memory between
threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` for arenas made from now on; False where it is not
    glibc, ``count`` is 0, or the environment already chose (MALLOC_ARENA_MAX, read by glibc at
    start-up). Call it before the engines and calls start their threads."""
    if count <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # musl and others: no mallopt, and their own allocator
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, count) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) failed; glibc's default arenas kept", count)
        return False
    return True
