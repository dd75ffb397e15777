"""A run directory: its name, its ``config.yaml``, the model it trains and the model it exports."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from vitkit.checkpoint import atomic_write_text
from vitkit.train.config import TrainConfig

CONFIG_NAME = "config.yaml"
MODEL_DIR = "model"


def create_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name``, or ``out_dir/<dataset>-<model>-<date>-<time>``; an existing run is never reused
    by accident (resuming is explicit: ``--resume``)."""
    out_dir = Path(cfg.out_dir)
    if cfg.run_name:
        run_dir = out_dir / cfg.run_name
        if (run_dir / CONFIG_NAME).exists():
            raise ValueError(f"run directory {run_dir} already holds a run; continue it with "
                                  f"`vitkit train --resume {run_dir}` or choose another --run_name")
    else:
        dataset = cfg.data.dataset.removeprefix("folder:").rstrip("/").rsplit("/", 1)[-1]
        base = f"{dataset}-{_model_label(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = out_dir / base, 1
        while run_dir.exists():
            n += 1
            run_dir = out_dir / f"{base}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _model_label(cfg: TrainConfig) -> str:
    """The registry name, or ``ft-<init>`` for a fine-tuning run (named after the run it starts from)."""
    if not cfg.finetune.init:
        return cfg.model["name"]
    init = Path(cfg.finetune.init)
    return "ft-" + (init.parent.name if init.name == MODEL_DIR else init.name or "init")


def write_config(cfg: TrainConfig, run_dir: Path) -> None:
    atomic_write_text(cfg.to_yaml(), run_dir / CONFIG_NAME)


def build_run_model(cfg: TrainConfig, data: Any) -> nn.Module:
    """The registered model ``cfg.model['name']`` with the config's overrides; the number of classes,
    channels, image size and class names default to the data set's, and the data's preprocessing record
    travels in the config so that ``vitkit predict``/``eval``/``fewshot``/``analyze`` reapply it."""
    from vitkit.models.registry import build_model, get_model_entry

    if cfg.finetune.init:
        return _build_finetune_model(cfg, data)
    spec = dict(cfg.model)
    name = spec.pop("name")
    entry = get_model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(f"unknown config key model.{unknown[0]} for {name} "
                         f"({type(entry.config).__name__} has: {', '.join(sorted(fields))})")
    spec.setdefault("num_classes", data.num_classes)
    spec.setdefault("in_chans", data.in_chans)
    spec.setdefault("img_size", data.img_size)
    if spec["num_classes"] == data.num_classes:
        spec.setdefault("class_names", list(data.class_names))
    if spec["num_classes"] != data.num_classes:
        raise ValueError(f"model.num_classes={spec['num_classes']} but {cfg.data.dataset} has {data.num_classes}")
    if spec["in_chans"] != data.in_chans:
        raise ValueError(f"model.in_chans={spec['in_chans']} but the data gives {data.in_chans}-channel images; "
                         f"set data.in_chans {spec['in_chans']} to convert them")
    spec["preprocess"] = data.preprocessing
    try:
        config = entry.config.replace(**spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model ({name}): {e}") from e
    return build_model(config)


def _build_finetune_model(cfg: TrainConfig, data: Any) -> nn.Module:
    """The pre-trained ``finetune.init`` with a new zero head for the data set's classes, at its image size."""
    from vitkit.finetune import build_finetune_model

    model = build_finetune_model(cfg.finetune, num_classes=data.num_classes, class_names=list(data.class_names),
                                 in_chans=data.in_chans, img_size=cfg.model.get("img_size", data.img_size),
                                 model_overrides=cfg.model)
    extra = dict(model.config.extra)
    extra["finetuned_from"] = cfg.finetune.init
    model.config = model.config.replace(extra=extra, preprocess=data.preprocessing)
    return model


def export_model(model: nn.Module, run_dir: Path, *, best_acc: float, total_time: float,
                 skipped_files: Sequence[str] = ()) -> Path:
    """Save the final weights in vitkit's format (``run_dir/model``), readable by ``vitkit.load_model``;
    the run's summary (``extra["training"]``) lists unreadable files left out by ``skip_corrupt``."""
    extra = dict(model.config.extra)
    extra["training"] = {"run": str(run_dir), "best_val_acc": best_acc if best_acc > float("-inf") else None,
                         "train_seconds": round(total_time, 1)}
    if skipped_files:
        extra["training"]["skipped_files"] = list(skipped_files)
    model.config = model.config.replace(extra=extra)
    return model.save_pretrained(run_dir / MODEL_DIR)
