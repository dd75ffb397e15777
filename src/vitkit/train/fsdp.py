"""FSDP2 (``distributed.strategy: fsdp``): parameters, gradients and optimizer state sharded across processes.

:func:`shard_model` applies PyTorch's ``torch.distributed.fsdp.fully_shard`` to every transformer block and
then to the root, so each process holds ``1/world`` of every weight and all-gathers one block at a time for
its forward and backward (the root unit holds the embeddings, final norm and head). Parameters become
``DTensor`` shards under the same names; the optimizer is built over them, so its state is sharded too.
bf16/fp16 runs compute in that dtype and reduce gradients in fp32 (a :class:`MixedPrecisionPolicy`); the
parameters and optimizer state can live on the CPU (``distributed.cpu_offload``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vitkit.train.grad_checkpointing import transformer_blocks

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard_model(model: nn.Module, *, precision: str = "fp32", cpu_offload: bool = False,
                device: torch.device | None = None) -> nn.Module:
    """Shard ``model`` in place across the default process group: each transformer block, then the root."""
    if device is not None:
        check_cpu_offload(cpu_offload, device)
    dtype = _DTYPES.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return model


def check_cpu_offload(cpu_offload: bool, device: torch.device) -> None:
    """CPU offload moves GPU memory to the CPU: on any other device it is a mistake, said at once."""
    if cpu_offload and device.type != "cuda":
        raise ValueError(f"distributed.cpu_offload moves GPU memory to the CPU; this run is on {device.type}, where "
                         "the parameters already are in CPU memory: drop distributed.cpu_offload")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_value(t: Tensor) -> Tensor:
    """A plain tensor from a (maybe) ``DTensor``: the gradient norm that clipping returns under FSDP."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def skip_gradient_sync(model: nn.Module) -> Iterator[None]:
    """No gradient reduction inside (accumulation micro-batches): DDP's ``no_sync``, FSDP's
    ``set_requires_gradient_sync(False)``."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every process holds the whole (unsharded) model and forwards without collectives, so ranks may
    run different numbers of batches (a validation shard) or a forward alone (rank 0's figures). Outside, a
    plain model passes through unchanged."""
    units = _fsdp_modules(model)
    if not units:
        yield model
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in reversed(units):  # children first, then the root
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def _local_bytes(t: Tensor | None) -> int:
    if t is None:
        return 0
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by this process (its shards under FSDP)."""
    params = list(model.parameters())
    optim = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values()
                if isinstance(v, Tensor) and v.dim() > 0)
    return {"params": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p.grad) for p in params),
            "optimizer": optim}
