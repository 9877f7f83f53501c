"""How the server process's native (C) memory is allocated: glibc's malloc arenas.

Each call runs native threads (aiortc's decoder, PyAV, onnxruntime, the executors). glibc gives
threads their own arenas, up to 8 per core, and memory freed in one stays with it: over 400 calls
in batches of 10 the server's RSS still moved by tens of MB, with two arenas it levelled off
after ~70 calls (bench/README.md "Native memory"). Fewer arenas share freed memory between
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h
TRIM_DELAY_S = 0.5
TRIM_MAX_WAIT_S = 5.0


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


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MallocTrimmer:
    """Gives the memory that ended calls freed back to the system once calls stop ending for
    ``delay_s`` (at most ``max_wait_s`` after the first of them): glibc's ``malloc_trim``, in a
    thread. When no call is left (``idle()``), Python's cyclic garbage is collected first.

    glibc keeps freed memory in its arenas, so the RSS was a high-water mark that rose with every
    new peak of concurrent calls (a batch of 20 that overlapped a little more than any before)
    and never came down. And a call's peer connection, its codecs and buffers sit in reference
    cycles that only Python's cyclic collector frees, when its allocation counters say so: after
    a burst of calls the RSS said more about the collector's timing than about what was kept.
    Collecting blocks the event loop (tens of ms), so it is only done when no call is there to
    notice; under load the collector runs on its own, as it always did.
    """

    def __init__(
        self,
        idle: Callable[[], bool] = lambda: False,
        delay_s: float = TRIM_DELAY_S,
        max_wait_s: float = TRIM_MAX_WAIT_S,
    ) -> None:
        self.idle = idle
        self.delay_s = delay_s
        self.max_wait_s = max_wait_s
        self._trim = _malloc_trim()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self.trims = 0
        self.last_collect_ms: float | None = None

    def call_ended(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._timer is None:
            self._deadline = now + self.max_wait_s
        else:
            self._timer.cancel()
        self._timer = loop.call_at(min(now + self.delay_s, self._deadline), self._start)

    def _start(self) -> None:
        self._timer = None
        if self.idle():
            started = time.perf_counter()
            gc.collect()
            self.last_collect_ms = round((time.perf_counter() - started) * 1000, 1)
            log.debug("no call left: collected Python's cyclic garbage in %.1f ms", self.last_collect_ms)
        if self._trim is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="malloc-trim")

    async def _run(self) -> None:
        assert self._trim is not None
        await asyncio.to_thread(self._trim, 0)
        self.trims += 1

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
