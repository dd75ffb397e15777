"""Activation checkpointing per transformer block (``model.grad_checkpointing: true``).

A checkpointed block keeps only its input for the backward pass and recomputes its activations there:
activation memory drops from ``depth`` blocks' worth to one block's plus the blocks' inputs, for about
one more forward pass of compute. It is PyTorch's composable :func:`torch.distributed._composable.checkpoint`
(non-reentrant, RNG-preserving, so dropout masks are the same in the recomputation), applied by hooks:
the modules, their names and their state-dict keys do not change, so checkpoints, PEFT and FSDP see the
same model. Works with or without FSDP and DDP.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint as _checkpoint_module


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units of a model, in forward order: a T2T model's two token transformers, the encoder's
    ``blocks`` and an MAE's ``decoder_blocks``. Empty for models without blocks (a ResNet)."""
    blocks: list[nn.Module] = []
    t2t = getattr(model, "tokens_to_token", None)
    if t2t is not None:
        blocks += [m for m in (getattr(t2t, "attention1", None), getattr(t2t, "attention2", None)) if m is not None]
    for name in ("blocks", "decoder_blocks"):
        stack = getattr(model, name, None)
        if isinstance(stack, (nn.Sequential, nn.ModuleList)):
            blocks += list(stack)
    return blocks


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model`` (in place); returns how many blocks."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"model.grad_checkpointing: {type(model).__name__} has no transformer blocks to checkpoint")
    for block in blocks:
        _checkpoint_module(block)
    return len(blocks)
