"""The process a run lives in: device, precision, seeds and determinism, and stop signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from contextlib import AbstractContextManager as ContextManager
from typing import Optional

import numpy as np
import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local GPU under torchrun), then MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, allow deterministic kernels only."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Mixed-precision autocast for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 on CUDA (bf16 has fp32's range and needs none); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next optimizer step (the loop then saves
    ``last`` and exits); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt("interrupted at once by a second Ctrl-C; nothing was saved after the last "
                                    "checkpoint")
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
