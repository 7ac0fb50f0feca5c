"""Host memory: the process's resident set, and what happens to freed tensor memory
(`hardware.host_memory`).

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks below its mmap
threshold from a heap that it grows and rarely gives back, and it raises that threshold (up to
32 MiB) each time a larger mmap-ed block is freed. A training step frees and allocates activations
of a different size at every batch length, so after a few steps nearly every activation lives in
the heap, the freed ones are fragments the next step cannot reuse, and the resident set grows far
beyond what the step holds: measured on the SmolLM2 LoRA chat SFT example, its longest batch
peaked at 15.3 GiB of RSS while the tensors alive at once never passed 9.7 GiB, and 9.6 GiB of
freed heap stayed resident after the step.

`release` (the default) fixes the threshold at 1 MiB, which keeps large blocks on mmap: they go
back to the system when freed, and the resident set follows the tensors alive, as the plan counts
them. The price is speed: every mapped block is new pages, which the kernel faults in and zeroes on
first touch, where the heap would hand back pages already resident, and a packed run spends a third
of its time in the kernel. `reuse` leaves glibc's own policy in place. Measured on that example
over one epoch on 2 cores (`benchmarks/packing_throughput.py chat`, figures in docs/training.md):
under `reuse` the training loop of length-grouped rows runs 1.29x as fast and that of packed
1,408-token rows, whose activations are all above the threshold, 1.40x, while the peak resident
set grows from 10.0 to 12.9 GiB (rows) and from 3.6 to 5.8 GiB (packed). Trimming the heap after
every optimizer step (`malloc_trim`) cost about a fifth of the time and barely lowered the peak, so
`reuse` does not trim. A caching allocator (jemalloc, tcmalloc) would give both speed and an honest
resident set, but none installs with pip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource

GIB = 1024**3
M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
# Blocks from 1 MiB up (activations, gradients, logits of all but the tiniest batches) are mapped
# on their own and unmapped when freed; smaller ones stay in the heap, where they are cheap.
# Setting the threshold also switches off glibc's dynamic raising of it.
MMAP_THRESHOLD_BYTES = 1024**2


HOST_MEMORY_POLICIES = ("release", "reuse")
_in_effect: str | None = None  # set by set_host_memory_policy


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc, else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    needed = ("mallopt", "gnu_get_libc_version")
    return libc if all(hasattr(libc, f) for f in needed) else None


def set_host_memory_policy(policy: str) -> str | None:
    """Apply `hardware.host_memory` to this process, before the model is loaded: `release` makes
    glibc serve blocks of 1 MiB and more from mmap, so freed tensors leave the resident set at once;
    `reuse` keeps glibc's own policy, unless this process already released. Returns the policy in
    effect, None where the C library is not glibc (nothing is changed there)."""
    if policy not in HOST_MEMORY_POLICIES:
        raise ValueError(f"host memory policy {policy!r}: expected one of {', '.join(HOST_MEMORY_POLICIES)}")
    global _in_effect
    libc = _glibc()
    if libc is None:
        return None
    if policy == "release" and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        return None
    if _in_effect == "release":  # glibc cannot go back to raising a threshold once it was fixed
        return _in_effect
    _in_effect = policy
    return policy


def host_memory_policy() -> str | None:
    """The policy this process set, None before set_host_memory_policy (or off glibc)."""
    return _in_effect


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
