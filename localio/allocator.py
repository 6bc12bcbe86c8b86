"""glibc's malloc keeps freed buffers of a few MB for reuse, unless the user chose otherwise.

By default glibc serves a request over 128 KiB with a fresh ``mmap`` and unmaps it on ``free``; it raises that
threshold when such a buffer is freed, but then gives the top of the heap back to the system whenever more than
twice the threshold lies free there. A process that allocates and frees buffers of a few MB many times a
second therefore keeps asking the kernel for zeroed pages: each 4 KiB page of each new buffer costs a page
fault on its first write. A simulation actor does exactly that: for every virtual client it serves, an update
of ~1M floats (4 MB) is decoded, flattened, quantized and masked, and serialized, each a fresh buffer
(``tests/test_allocator.py`` counts the faults of such a churn, with and without this module). A warm round
of 100 simulated clients on 2 cores took 0.88-0.93x its time when secure and 0.92-1.00x when plain (two
interleaved runs of ``simulations/bench/secure_round.py``); the peak resident memory of its actors and of
its driver, sampled by hand during that benchmark (it does not record memory), did not change.

:func:`reuse_freed_memory_by_default` fixes the two thresholds where glibc's own dynamic rule tops out on
64-bit (mmap above 32 MiB, trim above 64 MiB): buffers up to 32 MiB come from the heap, and up to 64 MiB of
freed memory at the top of each malloc arena (one per thread that allocates, up to glibc's limit) stays with
the process. The cost is that a process's resident memory stays near its high-water mark. The simulation
calls it in each actor and in the driver, where it lasts for the rest of the process (``run_job`` called from
a notebook or a test run tunes that process); a user who set glibc's malloc tunables keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20
# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# environment variables by which a user tunes glibc's malloc: any one set, and this module leaves malloc alone
CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_done = False


def is_glibc() -> bool:
    """True if this process runs on glibc (the C library whose malloc :func:`reuse_freed_memory_by_default` tunes)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name on this platform
        return False


def user_tuned_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """True if the environment tunes glibc's malloc (its ``MALLOC_*_`` variables or ``glibc.malloc`` tunables)."""
    return any(name in environ for name in CHOICES) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def reuse_freed_memory_by_default(environ: Mapping[str, str] = os.environ) -> bool:
    """Keep freed buffers up to 32 MiB for reuse in this process (glibc only); True if it changed malloc.

    Does nothing (False) on another C library or platform, when the user tuned malloc (:func:`user_tuned_malloc`)
    or when this process already did it. Safe to call at any time: it affects allocations from then on.
    """
    global _done
    if _done or not is_glibc() or user_tuned_malloc(environ):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the trim threshold first: each call fixes glibc's dynamic thresholds, and a lone mmap threshold would
    # leave the trim at its 128 KiB default
    if not (libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and libc.mallopt(_M_MMAP_THRESHOLD,
                                                                                   MMAP_THRESHOLD_BYTES)):
        return False
    _done = True
    return True
