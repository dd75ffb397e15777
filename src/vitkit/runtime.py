"""Process-wide performance settings for CPU runs: thread count and the C allocator.

PyTorch on CPU allocates and frees every activation each step. glibc returns large blocks to the OS
at once (``mmap``/``munmap`` above 128 KiB by default), so each step pays page faults and zeroing for
memory it just released. Raising the mmap and trim thresholds keeps that memory in the heap for
the next step, the effect jemalloc/tcmalloc give without preloading a library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
"""Arithmetic of a run: float32, or bfloat16/float16 autocast (training, evaluation, benchmarks)."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only); returns whether the setting was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def physical_cores() -> int:
    """CPUs this process may run on (its affinity mask), which is what intra-op threads should use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_cpu(threads: int | None = None, allocator: bool = True) -> dict[str, object]:
    """Set intra-op threads (default: one per available CPU) and the allocator; returns what was set."""
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return {"threads": threads, "allocator_tuned": tune_allocator() if allocator else False}
