"""Input-pipeline throughput (images/s), for ``benchmarks/bench_data.py`` and the ``vitkit bench`` harness."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from vitkit.data.config import DataConfig
from vitkit.data.pipeline import build_data
from vitkit.data.sources import locate
from vitkit.runtime import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_throughput(cfg: DataConfig, device: torch.device | str = "cpu", *, steps: int = 20,
                        repeats: int = 3, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Training images/s of the pipeline of ``cfg`` on ``device``, one figure per repeat.

    In-memory sets: ``steps`` batches after a warm-up batch, each repeat another epoch. Folder sets:
    whole epochs, worker start-up included (what training pays), after one warm-up epoch that also
    fills the page cache. ``clock`` reads seconds (a test's clock gives known rates).
    """
    device = resolve_device(device)
    data = build_data(cfg, device=device, seed=0)
    folder = locate(cfg.dataset, cfg.data_dir).layout == "folder"
    rates = []
    for epoch in range(repeats + (1 if folder else 0)):
        batches = data.train.batches(epoch)
        if not folder:
            next(batches)
        _sync(device)
        start = clock()
        count = 0
        for step, (images, _) in enumerate(batches):
            count += len(images)
            if step + 1 >= steps and not folder:
                break
        _sync(device)
        if not folder or epoch > 0:
            rates.append(count / (clock() - start))
    return rates
