"""Where and how every command computes: the device (``--device``, one default for all commands), the
precision's autocast, and the process-wide CPU settings (thread count and the C allocator).

PyTorch on CPU allocates and frees every activation each step. glibc returns large blocks to the OS
at once (``mmap``/``munmap`` above 128 KiB by default), so each step pays page faults and zeroing for
memory it just released. Raising the mmap and trim thresholds keeps that memory in the heap for
the next step, the effect jemalloc/tcmalloc give without preloading a library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from contextlib import AbstractContextManager as ContextManager
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
"""Arithmetic of a run: float32, or bfloat16/float16 autocast (training, evaluation, benchmarks)."""

DEFAULT_DEVICE = "auto"
"""Every command's ``--device`` default: the GPU when there is one, else the CPU."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = DEFAULT_DEVICE, local_rank: int = 0) -> torch.device:
    """``auto`` (or None) picks CUDA (this process's local GPU under torchrun), then MPS, then the CPU; any
    other name is checked here, so that a bad or unavailable device is a ``ValueError`` naming it."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    return device


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Mixed-precision autocast for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 on CUDA (bf16 has fp32's range and needs none); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")

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
