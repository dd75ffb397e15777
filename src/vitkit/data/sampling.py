"""Which samples, in which order, on which rank: pure functions of seeds, so runs resume exactly.

Every random choice of the pipeline is drawn from a generator seeded by a tuple such as
``(seed, epoch)`` or ``(seed, epoch, step)`` through ``numpy.random.SeedSequence``, never from a global
RNG. Nothing needs to be saved to resume: batch ``k`` of epoch ``e`` is recomputed from its indices.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream tags keep the generators of different purposes independent even for equal tuples.
ORDER, SUBSET, AUGMENT, SAMPLE, LOADER = 0, 1, 2, 3, 4


def rng(*key: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative integers (a hash, not a sum)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key])))


def seed_int(*key: int) -> int:
    """A 63-bit integer seed derived from a tuple (for torch generators and worker processes)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)`` seeded by ``(seed, epoch)``."""
    return rng(ORDER, seed, epoch).permutation(num_samples)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped, as is usual in training)."""
    return num_samples // (batch_size * world_size)


def batch_positions(step: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Positions in the epoch order that ``rank`` reads at ``step``.

    Step ``s`` covers the global batch ``order[s*B*W : (s+1)*B*W]`` and rank ``r`` takes the ``r``-th
    slice of it, so W ranks with batch B see exactly the samples of one process with batch B*W.
    """
    start = (step * world_size + rank) * batch_size
    return np.arange(start, start + batch_size)


def eval_shard(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous, nearly equal shard of ``range(num_samples)`` for ``rank``; shards cover it exactly once."""
    bounds = np.linspace(0, num_samples, world_size + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1])


def stratified_subset(labels: np.ndarray, *, fraction: float | None = None, per_class: int | None = None,
                      seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of ``labels``.

    ``fraction`` keeps ``round(fraction * n_c)`` (at least 1) of each class ``c``; ``per_class`` keeps
    ``min(per_class, n_c)``. The choice within each class is seeded by ``(seed, class)`` so growing
    ``per_class`` only adds samples (nested subsets, handy for data-regime studies).
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction or per_class")
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(per_class, len(members)) if per_class is not None else max(1, round(fraction * len(members)))
        keep.append(members[rng(SUBSET, seed, int(c)).permutation(len(members))[:n]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host array (indices, augmentation parameters) on ``device``, without waiting for the
    device work already queued (a blocking copy would stall the pipeline behind the training step)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype, non_blocking=True)
