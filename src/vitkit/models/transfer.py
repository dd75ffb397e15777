"""Head and position-embedding surgery for fine-tuning a pre-trained ViT (paper Sec. 3.2).

- :func:`prepare_for_finetuning`: remove the pre-training head and representation layer, attach a
  zero-initialised D x K head for the new classes, and rebuild the model at a new resolution: the
  patch size stays, the sequence grows, and the position embeddings are resampled in 2-D (the
  class token's entry kept apart; non-square grids work).
- :func:`freeze_backbone`: train the head alone, i.e. a linear probe by gradient descent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.registry import build_model

PosEmbedInit = Literal["interpolate", "reinit"]

_HEAD_PREFIXES = ("head.", "pre_logits.")


def prepare_for_finetuning(model: nn.Module, num_classes: int, *, class_names: Sequence[str] | None = None,
                           img_size: int | tuple[int, int] | None = None, zero_init_head: bool = True,
                           keep_representation: bool = False, pos_embed: PosEmbedInit = "interpolate",
                           **config_overrides: Any) -> nn.Module:
    """A new model holding ``model``'s backbone, a fresh ``num_classes`` head and, at ``img_size``,
    resampled position embeddings. ``model`` itself is not changed.

    ``pos_embed="reinit"`` draws fresh position embeddings instead of resampling them (an ablation).
    ``config_overrides`` change other config fields, e.g. ``drop_path_rate=0.1``.
    """
    if pos_embed not in ("interpolate", "reinit"):
        raise ValueError(f"pos_embed must be 'interpolate' or 'reinit', got {pos_embed!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    old = model.config
    changes = dict(num_classes=num_classes, class_names=list(class_names) if class_names is not None else None,
                   head_init="zeros" if zero_init_head else "xavier", **config_overrides)
    if img_size is not None:
        changes["img_size"] = img_size
    if not keep_representation and getattr(old, "representation_size", None) is not None:
        changes["representation_size"] = None
    new_model = build_model(old.replace(**changes))

    fresh = new_model.state_dict()
    dropped = _HEAD_PREFIXES if not keep_representation else ("head.",)
    if new_model.config.fc_norm and not old.fc_norm:
        # Average pooling with its own norm (MAE's fine-tuning): the pre-trained final norm goes and a fresh
        # fc_norm comes, as the official main_finetune.py does.
        dropped = dropped + ("norm.", "fc_norm.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    state.update({k: v for k, v in fresh.items() if k.startswith(dropped)})  # the new (zero) head
    if "pos_embed" in state:
        if pos_embed == "reinit" or getattr(new_model, "pos_embed_is_fixed", False):  # T2T: a fixed sinusoid
            state["pos_embed"] = fresh["pos_embed"]
        else:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_model.grid_size, old_grid=model.grid_size,
                                                    num_prefix_tokens=model.num_prefix_tokens,
                                                    mode=new_model.config.pos_embed_interpolation)
    new_model.load_state_dict(state)  # strict: the backbone's keys and shapes are the old model's
    return new_model.to(next(model.parameters()).device)


def freeze_backbone(model: nn.Module, trainable: Sequence[str] = ("head.",)) -> int:
    """Freeze every parameter whose name does not start with one of ``trainable``; returns how many
    parameter values remain trainable."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(tuple(trainable)))
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise ValueError(f"no parameter name starts with {list(trainable)}: nothing would be trained")
    return count
