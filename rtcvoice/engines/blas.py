"""NumPy's BLAS held to one thread.

The engines' BLAS work is small: Whisper's mel filterbank (80 x 201 by 201 x 1000 for a 10 s
window) and Smart Turn's features. OpenBLAS, which NumPy's wheels bundle, splits it over a thread
per core, and those threads then spin for more work instead of sleeping, on the cores Whisper's
encoder, the LLM and the media need at that moment. Held to one thread, a Whisper tiny.en pass
over a 3 s sentence on 2 cores took 78 ms instead of 123 (median of 12) and half the CPU (125 ms
instead of 250); the server's CPU per call-second fell 15-16% at one and four calls (bench/README.md,
"NumPy's BLAS on one thread").
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def hold_blas_to_one_thread() -> None:
    """For the whole process, as OpenBLAS's thread count is global; a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install without it still serves, only slower
        log.warning("threadpoolctl is not installed: NumPy's BLAS keeps a thread per core")
        return
    threadpool_limits(limits=1, user_api="blas")
