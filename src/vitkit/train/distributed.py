"""Process groups for ``torchrun``: DistributedDataParallel with NCCL on CUDA and gloo on CPU.

A plain ``vitkit train`` is a world of one process and every helper here is then a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vitkit.train.config import TrainConfig

_DRAIN_SECONDS = 0.1


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device_kind: str) -> World:
    """Join the process group that ``torchrun`` (or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR)
    describes; a single process when there is none."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=30))
    return World(rank=rank, local_rank=local_rank, size=size)


def finish_collectives(world: World) -> None:
    """Wait until every rank has finished every collective, before a clean exit.

    gloo's worker threads outlive ``destroy_process_group`` (the group stays referenced after it in our FSDP
    runs) and drop each finished collective's tensors just after the caller has seen it finish. A drop that
    falls into the interpreter's finalization needs the GIL there and aborts the process ("terminate called
    without an active exception", pytorch/pytorch#190489): a barrier and a moment without the GIL let every
    rank's threads drop their last collective first. Only after a run that ended normally: a rank that failed
    must not wait for the others.
    """
    if world.distributed and dist.is_initialized():
        dist.barrier()
        time.sleep(_DRAIN_SECONDS)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all processes (in place, and returned)."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_process(flag: bool, world: World, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (to stop all ranks at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, world: World) -> Any:
    """The main process's ``obj`` on every process."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def keep_global_batch(cfg: TrainConfig, saved: dict[str, Any], world: World) -> TrainConfig:
    """``cfg`` of a run resumed on a different number of processes, with its per-process batch changed so the
    global batch (batch x processes x accumulation) stays what it was; unchanged on the same number, or when
    the resume itself set another ``data.batch_size``."""
    before = int(saved.get("world_size", world.size))
    saved_batch = int(((saved.get("config") or {}).get("data") or {}).get("batch_size", cfg.data.batch_size))
    if before == world.size or cfg.data.batch_size != saved_batch:
        return cfg
    global_batch = saved_batch * before
    if global_batch % world.size:
        raise ValueError(f"the run's global batch ({saved_batch} x {before} processes) does not split over "
                         f"{world.size} processes; resume on a number of processes that divides {global_batch}, "
                         "or set --batch_size (and --accum_steps) yourself")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=global_batch // world.size))
