"""Dynamic batching: requests that arrive within ``max_wait`` of the first one of a batch, up to ``max_batch``,
share one forward pass. Only decoded, valid images enter the queue, so a bad request never touches a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    """How many batches had each size."""

    def add(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1

    def to_dict(self) -> dict:
        mean = self.requests / self.batches if self.batches else 0.0
        return {"images": self.requests, "batches": self.batches, "mean_batch": round(mean, 3),
                "largest_batch": self.largest, "batch_sizes": dict(sorted(self.sizes.items()))}


class DynamicBatcher:
    """Collects (C, H, W) inputs into batches and runs ``run`` (a stacked batch -> one output row per input)
    on ``executor``, one batch at a time."""

    def __init__(self, run: Callable[[list[Tensor]], Tensor], executor: Executor, *, max_batch: int = 32,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[Tensor, asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, item: Tensor) -> Tensor:
        """The model's output row for one input, computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[Tensor, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while len(batch) < self.max_batch:
            try:  # whatever is queued already joins without waiting
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(x, f) for x, f in batch if not f.done()]  # a client that left is not computed for
            if not live:
                continue
            try:
                out = await loop.run_in_executor(self.executor, self.run, [x for x, _ in live])
            except Exception as e:  # the model failed: every request of this batch hears why
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.stats.add(len(live))
            for (_, f), row in zip(live, out):
                if not f.done():
                    f.set_result(row)
