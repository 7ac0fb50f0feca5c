"""Host memory: the process's resident set, and how freed tensor memory goes back to the system.

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks below its mmap
threshold from a heap that it grows and rarely gives back, and it raises that threshold (up to
32 MiB) each time a larger mmap-ed block is freed. A training step frees and allocates activations
of a different size at every batch length, so after a few steps nearly every activation lives in
the heap, the freed ones are fragments the next step cannot reuse, and the resident set grows far
beyond what the step holds: measured on the SmolLM2 LoRA chat SFT example, its longest batch
peaked at 15.3 GiB of RSS while the tensors alive at once never passed 9.7 GiB, and 9.6 GiB of
freed heap stayed resident after the step. A fixed threshold keeps large blocks on mmap, which
returns them to the system when they are freed.

The price is speed: every mapped block is new pages, which the kernel faults in and zeroes on first
touch, where the heap would hand back pages already resident. On the same example's 1,408-token
packed rows, whose activations are all above the threshold, one forward and backward takes about
1.3x as long as under glibc's default policy, and the process spends a third of its time in the
kernel; row batches of a few short sequences stay below the threshold and barely notice. Raising
the threshold to 4 MiB, or keeping the heap and trimming it after every step (`malloc_trim`), wins
that time back but lets the peak resident set run about 35% above what the step holds, the
overshoot this module exists to prevent; a caching allocator (jemalloc, tcmalloc) would give both,
but none installs with pip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

GIB = 1024**3
M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
# Blocks from 1 MiB up (activations, gradients, logits of all but the tiniest batches) are mapped
# on their own and unmapped when freed; smaller ones stay in the heap, where they are cheap.
# Setting the threshold also switches off glibc's dynamic raising of it.
MMAP_THRESHOLD_BYTES = 1024**2


def return_freed_blocks_to_system() -> bool:
    """Make glibc serve large blocks from mmap, so freed tensors leave the resident set at once.
    Returns False where the C library is not glibc (nothing is changed there)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def current_rss_gib() -> float:
    """The resident set now (not the high-water mark), from /proc/self/statm; 0.0 where there is none."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    """The highest resident set so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
