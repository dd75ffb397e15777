"""Preparing a pre-trained ViT for fine-tuning (paper Sec. 3.2) and the optimizer's view of it.

- :func:`prepare_for_finetuning`: remove the pre-training head and representation layer, attach a
  zero-initialised D x K head for the new classes, and rebuild the model at a new resolution: the
  patch size stays, the sequence grows, and the position embeddings are resampled in 2-D (the
  class token's entry kept apart; non-square grids work).
- :func:`param_groups`: weight decay only on weight matrices, and optional layer-wise
  learning-rate decay (each group carries an ``lr_scale`` that the scheduler multiplies in).
- :func:`freeze_backbone`: train the head alone, i.e. a linear probe by gradient descent.
- :class:`FinetuneConfig` and :func:`build_finetune_model`: the hook through which the training loop
  starts from a pre-trained SOURCE instead of a fresh registry model (``vitkit finetune``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from vitkit.checkpoint import load_weights
from vitkit.hub import fetch_source
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.registry import build_model

PosEmbedInit = Literal["interpolate", "reinit"]

_HEAD_PREFIXES = ("head.", "pre_logits.")
_EMBEDDING_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "reg_token")


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
    if not keep_representation:
        changes["representation_size"] = None
    new_model = build_model(old.replace(**changes))

    fresh = new_model.state_dict()
    dropped = _HEAD_PREFIXES if not keep_representation else ("head.",)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    state.update({k: v for k, v in fresh.items() if k.startswith(dropped)})  # the new (zero) head
    if "pos_embed" in state:
        if pos_embed == "reinit":
            state["pos_embed"] = fresh["pos_embed"]
        else:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], new_model.grid_size, old_grid=model.grid_size,
                                                    num_prefix_tokens=model.num_prefix_tokens,
                                                    mode=new_model.config.pos_embed_interpolation)
    load_weights(new_model, state, source="pre-trained model")
    return new_model.to(next(model.parameters()).device)


@dataclass
class FinetuneConfig:
    """The ``finetune`` section of a training config. With ``init`` unset, training starts from scratch."""

    init: Optional[str] = None
    """SOURCE of the pre-trained weights: a vitkit model or run directory, or anything
    ``vitkit.from_pretrained`` reads."""
    pos_embed: PosEmbedInit = "interpolate"
    """At a new resolution: ``interpolate`` the pre-trained position embeddings in 2-D, or ``reinit`` them."""
    freeze_backbone: bool = False
    """Train the new head only (a linear probe)."""
    zero_init_head: bool = True
    keep_representation: bool = False
    """Keep the pre-training representation (pre-logits) layer; the paper removes it."""

    def __post_init__(self) -> None:
        if self.pos_embed not in ("interpolate", "reinit"):
            raise ValueError(f"finetune.pos_embed must be 'interpolate' or 'reinit', got {self.pos_embed!r}")


def build_finetune_model(cfg: FinetuneConfig, *, num_classes: int, class_names: Sequence[str] | None,
                         in_chans: int, img_size: int | tuple[int, int] | None,
                         model_overrides: dict[str, Any] | None = None) -> nn.Module:
    """Load ``cfg.init`` and prepare it for a data set with ``num_classes`` classes at ``img_size``.

    ``model_overrides`` are config fields to change (e.g. ``drop_path_rate``); a ``name`` key (the
    registry name of a from-scratch run) is ignored, since the architecture comes from the SOURCE.
    """
    from vitkit.sources import load_source

    if not cfg.init:
        raise ValueError("finetune.init is not set: name the pre-trained SOURCE to start from")
    overrides = {k: v for k, v in (model_overrides or {}).items() if k != "name"}
    for key in ("num_classes", "class_names", "img_size", "representation_size", "head_init"):
        overrides.pop(key, None)  # decided by the data set and by fine-tuning itself
    if cfg.freeze_backbone:  # a frozen backbone is a fixed feature extractor: no dropout or drop-path in it
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            overrides.setdefault(key, 0.0)
    model = load_source(cfg.init)
    if model.config.in_chans != in_chans:
        raise ValueError(f"finetune.init {cfg.init} takes {model.config.in_chans}-channel images but the data set "
                         f"has {in_chans} channel(s)")
    model = prepare_for_finetuning(model, num_classes, class_names=class_names, img_size=img_size,
                                   zero_init_head=cfg.zero_init_head, keep_representation=cfg.keep_representation,
                                   pos_embed=cfg.pos_embed, **overrides)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


# The paper's fine-tuning recipe (Sec. 4.1, Appendix B.1.1): SGD with momentum 0.9, no weight decay,
# gradient clipping at global norm 1, a short linear warmup, then cosine decay to zero.
FINETUNE_RECIPE: dict[str, Any] = {
    "optim": {"name": "sgd", "lr": 0.01, "min_lr": 0.0, "momentum": 0.9, "weight_decay": 0.0,
              "warmup_epochs": 1.0, "clip_grad": 1.0},
    "epochs": 10,
}


def finetune_config(init: str, dataset: str, *, img_size: int | None = None, config: str | None = None,
                    overrides: Sequence[str] = ()) -> Any:
    """The training config of ``vitkit finetune``: the fine-tuning recipe, then the ``config`` file, then
    ``init``/``dataset``/``img_size``, then ``--key value`` overrides (later ones win)."""
    from vitkit.train.config import TrainConfig, _merge, expand_shortcuts, find_config, parse_overrides, read_yaml

    data: dict[str, Any] = _merge({}, FINETUNE_RECIPE)
    source = "fine-tuning recipe"
    if config is not None:
        path = find_config(config)
        data = _merge(data, read_yaml(path))
        source = f"{source} + {path}"
    init_config = _vitkit_config(init)
    # The architecture comes from the SOURCE; the model section only names it and holds overrides
    # such as drop_path_rate (a from-scratch default section would describe another model).
    named: dict[str, Any] = {"finetune": {"init": str(init)}, "data": {"dataset": dataset},
                             "model": {"name": getattr(init_config, "name", None) or "pretrained"}}
    if img_size is not None:
        named["data"]["img_size"] = img_size
    data = _merge(_merge(data, named), expand_shortcuts(parse_overrides(overrides)))
    recorded = (getattr(init_config, "extra", None) or {}).get("preprocess") or {}
    if init_config is None and not Path(init).exists():  # pretrained weights: their publisher's normalisation
        fetched = fetch_source(str(init))
        recorded = fetched.preprocessing.as_dict() if fetched is not None and fetched.preprocessing else {}
    if data["data"].get("mean") is None and data["data"].get("std") is None and "mean" in recorded:
        # Normalise the new images as the pre-training images were.
        data["data"]["mean"], data["data"]["std"] = list(recorded["mean"]), list(recorded["std"])
    return TrainConfig.from_dict(data, source=f"{source}{' + overrides' if overrides else ''}")


def _vitkit_config(init: str) -> Any:
    """The config of a vitkit model or run directory (read without the weights), else None."""
    from vitkit.checkpoint import read_config
    from vitkit.sources import find_model_dir

    model_dir = find_model_dir(init)
    return read_config(model_dir) if model_dir is not None else None


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


def layer_id(name: str, depth: int) -> int:
    """The depth of a parameter for layer-wise decay: embeddings 0, block i is i + 1, the rest depth + 1."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, *, weight_decay: float = 0.0,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters.

    Weight decay applies to weight matrices only: never to biases, norms, the class token or the
    position embeddings. With ``layer_decay`` (e.g. 0.65-0.75 for fine-tuning, as in BEiT/MAE), the
    learning rate of layer ``l`` of ``L + 1`` is scaled by ``layer_decay ** (L + 1 - l)``: the head
    trains at the full rate, the embeddings at the smallest. Every group has ``lr_scale``, which a
    scheduler must multiply into the learning rate it sets.
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depth = len(getattr(model, "blocks", ()))
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = weight_decay > 0 and param.ndim > 1 and name not in skip and name.rsplit(".", 1)[-1] not in skip
        layer = layer_id(name, depth) if layer_decay is not None else depth + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, decay), {"params": [], "param_names": [], "lr_scale": scale,
                                                   "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # per layer: decayed first


def build_optimizer(model: nn.Module, name: Literal["sgd", "adamw"], lr: float, *, weight_decay: float = 0.0,
                    layer_decay: float | None = None, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's fine-tuning optimizer) or AdamW over :func:`param_groups`; each
    group's initial ``lr`` is ``lr * lr_scale``."""
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
