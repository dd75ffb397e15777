"""The practical FLOP/s limit of this machine: a large square matrix multiply, in the run's dtype.

On CPU we also try oneDNN's fp32 GEMM next to the BLAS that ``torch.mm`` calls (MKL), and keep the
faster: on AMD processors MKL does not take its AVX-512 path and oneDNN is markedly faster, and the
peak must be the best the hardware gives, not what one library gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _matmul_candidates(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Callable[[], object]]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    candidates: dict[str, Callable[[], object]] = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops, "mkldnn"):
        linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if linear is not None:
            bt = b.t().contiguous()
            candidates["onednn"] = lambda: linear(a, bt, None, "none", [], "")
    return candidates


def default_matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


class MatmulPeak:
    """Measures n x n x n matmuls; call :meth:`sample` once per benchmark round, read :attr:`samples`.

    Every backend is tried in every sample and the faster kept, so a backend that is slow on this
    processor does not lower the peak.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int | None = None, warmup: int = 2) -> None:
        self.device, self.dtype = device, dtype
        self.n = n or default_matmul_size(device)
        self.flops = 2 * self.n ** 3
        self.candidates = _matmul_candidates(self.n, dtype, device)
        self.best_backend: str | None = None
        self.samples: list[float] = []
        for fn in self.candidates.values():
            for _ in range(warmup):
                fn()

    def _time(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def sample(self) -> float:
        rates = {name: self.flops / self._time(fn) for name, fn in self.candidates.items()}
        self.best_backend = max(rates, key=rates.get)
        self.samples.append(rates[self.best_backend])
        return rates[self.best_backend]
