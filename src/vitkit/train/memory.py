"""Will a training step fit in memory? Estimated before the first step, so that a run too large for the machine
fails at once with the numbers and a way out, instead of being killed by the kernel an hour in.

The estimate adds what a step holds at its peak: the activations autograd saves for the backward pass
(counted exactly, tensor by tensor, on two probe forwards of 1 and 2 images, so the per-image part and the
fixed part separate), the weights' gradients, and the optimizer state the first step allocates. It is
deterministic, the same on every device, and costs two small forward passes. It knows the two levers of
large models: with activation checkpointing (``model.grad_checkpointing``) a block keeps only its input and one
block's activations exist at a time (recomputed in the backward pass); with FSDP over ``shards`` processes each
holds ``1/shards`` of the weights, gradients and optimizer state, plus one block's weights and gradients
gathered whole at a time. The memory available is what the OS reports (``MemAvailable`` and the cgroup limit
on CPU, free memory on a GPU), or ``VITKIT_MEMORY_LIMIT``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.runtime import autocast
from vitkit.train.grad_checkpointing import transformer_blocks

MEMORY_LIMIT_ENV = "VITKIT_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


class StepMemoryError(ValueError):
    """The estimated memory of one training step exceeds the memory available."""


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step needs on top of the weights: ``batch_size * per_image + fixed``."""

    per_image: int
    """Activations saved for the backward pass, per image."""
    batch_independent: int
    """Saved tensors that do not grow with the batch (e.g. weights cast for autocast)."""
    gradients: int
    optimizer_state: int
    weights: int = 0
    """The weights this process keeps (not part of :meth:`total`: they are allocated before the check)."""
    gathered: int = 0
    """FSDP: the largest block's weights and gradients, all-gathered whole for its forward and backward."""

    @property
    def fixed(self) -> int:
        return self.batch_independent + self.gradients + self.optimizer_state + self.gathered

    def total(self, batch_size: int) -> int:
        return batch_size * self.per_image + self.fixed

    def per_process(self, batch_size: int) -> int:
        """Everything a process holds at the step's peak: :meth:`total` plus its weights."""
        return self.total(batch_size) + self.weights


def saved_activation_bytes(model: nn.Module, images: Tensor, *, precision: str = "fp32",
                           loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
                           grad_checkpointing: bool = False) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward of ``images`` (parameters and
    tensors sharing storage counted once; nothing is run backward). With ``grad_checkpointing``, what it keeps
    when every transformer block is checkpointed: the blocks' inputs instead of their activations, plus the
    largest block's activations (recomputed, one block at a time, in the backward pass)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> the block (index) whose forward saved it; -1: outside any block
    inputs: dict[int, int] = {}  # block -> bytes of its input
    current = [-1]

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            return t
        if storage.data_ptr() not in param_storages and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage.nbytes()
            owner[storage.data_ptr()] = current[0]
        return t

    def enter(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            current[0] = index
            inputs[index] = sum(a.untyped_storage().nbytes() for a in args if isinstance(a, Tensor))
        return hook

    def leave(_module: nn.Module, _args: tuple, _output: object) -> None:
        current[0] = -1

    blocks = transformer_blocks(model) if grad_checkpointing else []
    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(enter(i)),
                                                          b.register_forward_hook(leave))]
    loss_fn = loss_fn or _classification_loss
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, images.device):
            loss = loss_fn(model, images)
        del loss
    finally:
        for handle in handles:
            handle.remove()
    if not blocks:
        return sum(seen.values())
    per_block = [sum(n for ptr, n in seen.items() if owner[ptr] == i) for i in range(len(blocks))]
    outside = sum(n for ptr, n in seen.items() if owner[ptr] == -1)
    return outside + sum(inputs.values()) + max(per_block)


def _classification_loss(model: nn.Module, images: Tensor) -> Tensor:
    logits = model(images).float()
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def estimate_step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, input_shape: tuple[int, ...], *,
                         device: torch.device, precision: str = "fp32",
                         loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
                         grad_checkpointing: bool = False, shards: int = 1) -> StepMemory:
    """Estimate a training step's memory from two probe forwards (1 and 2 images of ``input_shape``) of the
    unsharded, uncheckpointed model; ``grad_checkpointing`` and ``shards`` (FSDP processes) say how it will
    be trained.

    The model's state is left exactly as it was: RNG streams (dropout) are forked and buffers (BatchNorm
    statistics) restored."""
    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        saved = [saved_activation_bytes(model, torch.randn(n, *input_shape, device=device), precision=precision,
                                        loss_fn=loss_fn, grad_checkpointing=grad_checkpointing) for n in (1, 2)]
    with torch.no_grad():
        for live, kept in zip(model.buffers(), buffers):
            live.copy_(kept)
    model.train(was_training)
    per_image = max(saved[1] - saved[0], 0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gathered = 0
    if shards > 1:
        largest = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in transformer_blocks(model)),
                      default=weights)
        gathered = 2 * largest  # its weights and its gradients, whole, while it runs
    optimizer_state = _optimizer_state_bytes(optimizer)
    return StepMemory(per_image=per_image, batch_independent=max(saved[0] - per_image, 0),
                      gradients=-(-gradients // shards), optimizer_state=-(-optimizer_state // shards),
                      weights=-(-weights // shards), gathered=gathered)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """What the first step allocates: two moments per weight for Adam-like optimizers, one buffer with momentum."""
    total = 0
    for group in optimizer.param_groups:
        buffers = 2 if "betas" in group else (1 if group.get("momentum") else 0)
        total += buffers * sum(p.numel() * p.element_size() for p in group["params"]
                               if p.requires_grad and not optimizer.state.get(p))
    return total


# ------------------------------------------------------------------------------ available memory
def parse_size(text: str) -> int:
    """``'6GiB'``, ``'512M'``, ``'2.5gb'`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a size such as 6GiB, 512MiB or 8000000000, "
                         "or 'off'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a training step may still use, and where the number comes from; ``(None, why)`` for no limit."""
    setting = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if setting.lower() in ("off", "none", "0"):
        return None, f"{MEMORY_LIMIT_ENV}={setting}"
    if setting:
        return parse_size(setting), f"{MEMORY_LIMIT_ENV}={setting}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device}"
    limits = [(v, src) for v, src in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not limits:
        return None, "unknown"
    return min(limits)


def _meminfo_available() -> tuple[int | None, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    return None, ""


def _cgroup_available() -> tuple[int | None, str]:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None, ""
            return int(limit) - int(Path(usage_file).read_text().strip()), "the cgroup memory limit"
        except (OSError, ValueError):
            continue
    return None, ""


# ------------------------------------------------------------------------------------- the check
def check_step_memory(estimate: StepMemory, *, batch_size: int, accum_steps: int, available: int | None,
                      source: str) -> None:
    """Raise :class:`StepMemoryError`, with the numbers and a split of the batch that fits, when the step does
    not fit in ``available`` bytes."""
    if available is None or estimate.total(batch_size) <= available:
        return
    need = estimate.total(batch_size)
    message = (f"a training step needs about {_gib(need)} (batch {batch_size} x {_mib(estimate.per_image)} of "
               f"activations per image + {_gib(estimate.fixed)} of gradients and optimizer state) but "
               f"{_gib(available)} is available ({source}); ")
    for split in range(2, batch_size + 1):
        if batch_size % split == 0 and estimate.total(batch_size // split) <= available:
            message += (f"for the same global batch use --batch_size {batch_size // split} --accum_steps "
                        f"{accum_steps * split} (about {_gib(estimate.total(batch_size // split))})")
            break
    else:
        message += "even one image per step does not fit: use a smaller model or image size, or more memory"
    raise StepMemoryError(message + f", or set {MEMORY_LIMIT_ENV} (a size, or 'off' to skip this check)")


def ensure_step_fits(model: nn.Module, optimizer: torch.optim.Optimizer, *, input_shape: tuple[int, ...],
                     batch_size: int, accum_steps: int, device: torch.device, precision: str = "fp32",
                     loss_fn: Callable[[nn.Module, Tensor], Tensor] | None = None, grad_checkpointing: bool = False,
                     shards: int = 1) -> StepMemory:
    """Estimate the step's memory and raise :class:`StepMemoryError` if it exceeds what is available."""
    available, source = available_memory(device)
    estimate = estimate_step_memory(model, optimizer, input_shape, device=device, precision=precision,
                                    loss_fn=loss_fn, grad_checkpointing=grad_checkpointing, shards=shards)
    check_step_memory(estimate, batch_size=batch_size, accum_steps=accum_steps, available=available, source=source)
    return estimate


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / 1024**2:.2f} MiB"
