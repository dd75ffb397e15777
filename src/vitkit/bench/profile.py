"""Where a step's time goes: the top operators of one profiled call (torch.profiler), as rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def top_operators(step: Callable[[], object], device: torch.device, rows: int = 15) -> list[dict[str, Any]]:
    """Profile one call of ``step``; the ``rows`` operators with the most self time, with their share."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    device_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, device_time, 0) > 0]
    total = sum(getattr(e, device_time) for e in events) or 1
    events.sort(key=lambda e: getattr(e, device_time), reverse=True)
    return [{"op": e.key, "self_ms": getattr(e, device_time) / 1e3, "share": getattr(e, device_time) / total,
             "calls": e.count} for e in events[:rows]]


def format_profile(table: list[dict[str, Any]]) -> str:
    lines = [f"{'operator':60s} {'self ms':>9s} {'share':>6s} {'calls':>6s}"]
    lines += [f"{r['op'][:60]:60s} {r['self_ms']:9.1f} {100 * r['share']:5.1f}% {r['calls']:6d}" for r in table]
    return "\n".join(lines)
