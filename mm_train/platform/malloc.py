"""Host memory that does not fault every step: glibc malloc keeps what the trainer frees.

With glibc's defaults, an allocation above the dynamic mmap threshold (128 KiB, rising to at most
32 MiB) gets its own mapping, unmapped again when freed, and the free top of the heap is given back
to the system beyond 128 KiB. A training step allocates and frees the same large activation, cast and
gradient buffers every time, so each step maps them afresh and first-touches them page by page: a
minor page fault per 4 KiB (hundreds of thousands per step for a small GPT on CPU).

:func:`tune_malloc` sets, through ``mallopt``, before the first large allocation: ``M_MMAP_MAX`` 0
(every block comes from the heap; blocks too large for a thread's arena are retried in the main
arena) and ``M_TRIM_THRESHOLD`` -1 (freed memory is kept for reuse). After the first steps the heap
holds the step's peak and a step touches no new page. The cost: the process keeps its peak resident
set until it exits, as a caching allocator does. It changes nothing but the C allocator of this
process, so it needs no preloaded library, no re-exec and nothing from torchrun; other C libraries
(musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import platform
import resource

# mallopt parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_malloc() -> bool:
    """Sets glibc malloc to keep freed memory (see the module doc); False (nothing changed) when the C
    library is not glibc or refuses a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def minor_faults() -> int:
    """Minor page faults of this process so far (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
