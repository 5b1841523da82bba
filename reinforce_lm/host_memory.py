"""Hand the C heap's free pages back to the operating system before a backward pass on the CPU.

glibc serves an allocation below its mmap threshold from one heap, and it raises that threshold (up to
32 MiB) each time a large block is freed, so after the first step nearly every tensor of a small model
lives there. A block freed in the middle of the heap keeps its pages, and the resident set counts them. The
forward pass frees its intermediates between the tensors it keeps (checkpointed layer inputs, logits), so
the backward pass starts with holes of touched memory that it reuses only in part. `malloc_trim(0)` gives
the free pages inside the heap back (madvise), so the backward's peak counts what is in use plus what it
touches again.

Measured on the 36M-parameter bench model (CPU, fp32, micro-batches of 8; `bench/heap.py`, four fresh
processes each): peak RSS 1049-1054 MiB -> 1008-1015 with activation checkpointing (1154-1172 -> 1107-1122
without), for 0-2% more CPU time (the trim itself and the pages the backward faults in again). Not glibc
(macOS, musl, Windows): nothing to do. The loop trims only after a forward that took `MIN_FORWARD_SECONDS`
or more.
"""

from __future__ import annotations

import ctypes

# A trim takes about 1 ms: worth it after a forward this long, not after a tiny model's micro-batch.
MIN_FORWARD_SECONDS = 0.02
_malloc_trim = None  # libc's malloc_trim once looked up, False where there is none


def release_free_heap() -> bool:
    """Return the heap's free pages to the OS where the C library can (glibc). True if any were."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _malloc_trim = fn
        except (OSError, AttributeError, TypeError):  # no such symbol, or no process handle (Windows)
            _malloc_trim = False
    return bool(_malloc_trim and _malloc_trim(0))
