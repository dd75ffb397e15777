"""Masked-autoencoder pre-training as a task of the one training loop (``task: mae``), and its recipe.

The loop is ``vitkit train``'s: this module only says what a batch costs (the MAE loss on a fresh random
mask), what an evaluation measures (the loss on the validation images under a fixed mask, so epochs
compare), which pictures to keep (original / masked / reconstruction of validation images) and what
the run exports (the MAE in ``model/``, its encoder as a plain ViT in ``encoder/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.data import Data
from vitkit.models.mae import MAEConfig, MaskedAutoencoder, mae_config_for
from vitkit.models.registry import get_model_entry
from vitkit.runtime import autocast
from vitkit.train.config import (
    GRAD_CHECKPOINTING,
    TrainConfig,
    expand_shortcuts,
    find_config,
    merge_configs,
    parse_overrides,
    read_yaml,
)
from vitkit.train.distributed import World, all_reduce_sum
from vitkit.train.rundir import MODEL_DIR

ENCODER_DIR = "encoder"
RECONSTRUCTION_NAME = "reconstruction"
FIGURE_IMAGES = 8

# The official pre-training recipe (He et al. 2022, Table 8; facebookresearch/mae main_pretrain.py): AdamW
# with betas (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 per 256 images, 40 warmup epochs of 800 then a
# cosine to zero, no gradient clipping, random resized crops of scale (0.2, 1) and flips as the only
# augmentation, no label smoothing, mixup or erasing.
PRETRAIN_RECIPE: dict[str, Any] = {
    "task": "mae",
    "optim": {"name": "adamw", "blr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "min_lr": 0.0,
              "warmup_epochs": 40, "clip_grad": None, "layer_decay": None},
    "data": {"crop": "random_resized_crop", "rrc_scale": [0.2, 1.0], "hflip": True, "auto_augment": None,
             "label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "random_erasing": 0.0},
    "epochs": 800,
}


def mae_model_config(model_section: dict[str, Any], data: Data) -> MAEConfig:
    """The MAE a run's ``model`` section describes: a registered MAE, or any registered plain-patch ViT
    wrapped as one (:func:`vitkit.models.mae.mae_config_for`); the other keys override encoder or decoder
    fields, and the image size and channels default to the data set's."""
    spec = {k: v for k, v in model_section.items() if k != GRAD_CHECKPOINTING}
    name = spec.pop("name")
    base = get_model_entry(name).config
    if isinstance(base, ViTConfig):
        base = mae_config_for(base)
    elif not isinstance(base, MAEConfig):
        raise ValueError(f"model.name={name}: MAE pre-training needs a ViT or an MAE, not a {type(base).__name__}")
    spec.setdefault("in_chans", data.in_chans)
    spec.setdefault("img_size", data.img_size)
    try:
        config = base.replace(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model ({name}): {e}") from e
    if config.in_chans != data.in_chans:
        raise ValueError(f"model.in_chans={config.in_chans} but the data gives {data.in_chans}-channel images; "
                         f"set data.in_chans {config.in_chans} to convert them")
    return config


class MAEPretraining:
    """The MAE objective: mean squared error of the masked patches' pixels; the best checkpoint is the one
    of lowest validation loss."""

    stat_names = ("loss",)
    best_metric = "val_loss"
    higher_is_better = False

    def __init__(self, cfg: TrainConfig, data: Data, *, device: torch.device, world: World) -> None:
        self.cfg, self.data, self.device, self.world = cfg, data, device, world

    def build_model(self) -> nn.Module:
        config = mae_model_config(self.cfg.model, self.data)
        return MaskedAutoencoder(config.replace(preprocess=self.data.preprocessing, name=self.cfg.model["name"]))

    def train_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.cfg.precision, self.device):
            loss, _, _ = model(images)
        loss = loss.float()
        n = float(images.shape[0])
        return loss, torch.stack([loss.detach().double() * n, torch.tensor(n, dtype=torch.float64, device=loss.device)])

    def _fixed_noise(self, model: MaskedAutoencoder, batch: int, generator: torch.Generator) -> Tensor:
        """Noise from a private generator: the same masks at every evaluation, and the training RNG untouched."""
        patches = model.grid_size[0] * model.grid_size[1]
        return torch.rand(batch, patches, generator=generator).to(self.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed + 7919 * (self.world.rank + 1))
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for images, _ in self.data.val.batches():
            images = images.to(self.device, non_blocking=True)
            with autocast(self.cfg.precision, self.device):
                loss, _, _ = model(images, noise=self._fixed_noise(model, images.shape[0], generator))
            sums += torch.stack([loss.double() * images.shape[0],
                                 torch.tensor(float(images.shape[0]), dtype=torch.float64, device=self.device)])
        model.train(was_training)
        sums = all_reduce_sum(sums, self.world)
        if sums[1] == 0:
            raise ValueError("the evaluation set is empty")
        return {"val_loss": float(sums[0] / sums[1])}

    def figures(self, model: nn.Module) -> dict[str, Any]:
        images, _ = next(iter(self.data.val.batches()))
        images = images[:FIGURE_IMAGES].to(self.device)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        was_training = model.training
        model.eval()
        try:
            masked, reconstruction, pasted, hidden = model.reconstruct(
                images, noise=self._fixed_noise(model, images.shape[0], generator))
        finally:
            model.train(was_training)
        return {RECONSTRUCTION_NAME: reconstruction_figure(
            images, masked, reconstruction, pasted, hidden, mean=self.data.mean, std=self.data.std)}

    def export(self, model: nn.Module, run_dir: Path, *, best: float | None, train_seconds: float) -> Path:
        skipped_files = self.data.skipped_files()
        extra = dict(model.config.extra)
        extra["training"] = {"run": str(run_dir), "best_val_loss": best, "train_seconds": round(train_seconds, 1)}
        if skipped_files:
            extra["training"]["skipped_files"] = list(skipped_files)
        model.config = model.config.replace(extra=extra)
        model.export_encoder().save_pretrained(run_dir / ENCODER_DIR)
        return model.save_pretrained(run_dir / MODEL_DIR)


def reconstruction_figure(images: Tensor, masked: Tensor, reconstruction: Tensor, pasted: Tensor, hidden: Tensor,
                          *, mean: Any, std: Any) -> Any:
    """A grid with one column per image and four rows: original, masked input (hidden patches grey),
    reconstruction, and reconstruction with the visible patches pasted back (as the official demo shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    hidden = hidden.bool()

    def show(x: Tensor, grey: bool = False) -> Tensor:
        x = (x.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
        if grey:
            x = torch.where(hidden.cpu(), torch.full_like(x, 0.5), x)
        return x.permute(0, 2, 3, 1)

    rows = [("original", show(images)), ("masked", show(masked, grey=True)),
            ("reconstruction", show(reconstruction)), ("reconstruction\n+ visible", show(pasted))]
    n = images.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1.2, 1.3 * len(rows)), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = batch[c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return fig


def pretrain_config(config: str | Path | None = None, overrides: Sequence[str] = (), *,
                    method: str = "mae") -> TrainConfig:
    """The training config of ``vitkit pretrain``: the official recipe (:data:`PRETRAIN_RECIPE`), then the
    ``config`` file (a path or a bundled name such as ``mae_cifar10``), then ``--key value`` overrides."""
    if method != "mae":
        raise ValueError(f"--method {method!r}: the pre-training methods are: mae")
    data = merge_configs({}, PRETRAIN_RECIPE)
    source = "MAE pre-training recipe"
    if config is not None:
        path = find_config(config)
        data = merge_configs(data, read_yaml(path))
        source = f"{source} + {path}"
    data = merge_configs(data, expand_shortcuts(parse_overrides(overrides)))
    if data.get("task", method) != method:
        raise ValueError(f"{source}: task {data['task']!r} is not a pre-training task (use `vitkit train`)")
    return TrainConfig.from_dict(data, source=f"{source}{' + overrides' if overrides else ''}")
