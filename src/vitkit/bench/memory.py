"""Peak memory of one step: CUDA's peak allocated bytes, or on CPU the peak resident set size (RSS).

On CPU the allocator keeps freed memory, so RSS alone would hide a step's activations. We hand free
memory back to the OS first (glibc ``malloc_trim``) and then sample RSS from a thread while the step
runs; the peak minus the RSS before the step is the step's working memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peak_memory(step: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Bytes a call to ``step`` needs on top of what was allocated before it, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
    _malloc_trim()
    before = _rss_bytes()
    if before is None:
        step()
        return None, "unavailable"
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.0005):
            rss = _rss_bytes() or 0
            peak = max(peak, rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes() or 0)
    return peak - before, "cpu_rss"
