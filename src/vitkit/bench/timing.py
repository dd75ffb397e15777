"""Throughput measurement: warm-up, then repeats taken round-robin so that load spikes on a shared
machine hit every candidate alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Min / median / max of a set of measurements."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            raise ValueError("no measurements")
        return cls(min(values), statistics.median(values), max(values))

    def scaled(self, factor: float) -> Stats:
        return Stats(self.min * factor, self.median * factor, self.max * factor)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(candidates: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int,
                     calls_per_repeat: int = 1, device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` times, after ``warmup`` untimed calls each.

    Each repeat runs every candidate once, alternating the order between repeats, so vitkit and its
    reference see the same machine state. ``device`` (default: the CPU) is synchronised around each timing.
    """
    device = device if device is not None else torch.device("cpu")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = candidates[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls_per_repeat):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls_per_repeat)
    return times
