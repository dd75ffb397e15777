"""A run directory: its name, its ``config.yaml``, the model it trains and the model it exports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vitkit.fileio import atomic_write_text, describe_os_error, lock_directory, unlock_directory
from vitkit.models.mae import MaskedAutoencoder
from vitkit.models.registry import build_model, get_model_entry
from vitkit.models.transfer import freeze_backbone, prepare_for_finetuning
from vitkit.resolver import ResolvedModel, load_source
from vitkit.runfiles import CHECKPOINT_DIR, MODEL_DIR
from vitkit.runfiles import RUN_CONFIG_NAME as CONFIG_NAME
from vitkit.train.config import GRAD_CHECKPOINTING, FinetuneConfig, TrainConfig, check_model_section
from vitkit.train.invocation import vitkit_command


class RunDirectoryError(OSError):
    """The run directory cannot be created or written, or it disappeared during the run."""


def create_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name``, or ``out_dir/<dataset>-<model>-<date>-<time>``; an existing run is never reused
    by accident (resuming is explicit: ``--resume``)."""
    out_dir = Path(cfg.out_dir)
    if cfg.run_name:
        run_dir = out_dir / cfg.run_name
        if (run_dir / CONFIG_NAME).exists():
            raise ValueError(f"run directory {run_dir} already holds a run; continue it with "
                             f"`{vitkit_command('train', '--resume', str(run_dir))}` or choose another --run_name")
    else:
        dataset = cfg.data.dataset.removeprefix("folder:").rstrip("/").rsplit("/", 1)[-1]
        base = f"{dataset}-{_model_label(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = out_dir / base, 1
        while run_dir.exists():
            n += 1
            run_dir = out_dir / f"{base}-{n}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirectoryError(f"cannot create the run directory {run_dir} ({describe_os_error(e)}); "
                                "choose a writable --out_dir") from None
    return run_dir


_locked: list[Path] = []


def lock_run_dir(run_dir: Path) -> None:
    """Hold the run directory's lock while this process trains in it: ``--resume`` of a run that is still
    going (or a second run with its --run_name) then says so, instead of deleting the live run's partial
    writes and racing it for its checkpoints."""
    lock_directory(run_dir, "training", f"the run {run_dir} is still going in another process; wait for it to "
                   f"finish or stop it (its last checkpoint is kept), then "
                   f"`{vitkit_command('train', '--resume', str(run_dir))}`")
    _locked.append(run_dir)


def unlock_run_dirs() -> None:
    """Release the run directory locks this process holds (the end of a training call)."""
    while _locked:
        unlock_directory(_locked.pop())


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files that a kill during an atomic write leaves (``.NAME.XXXX.tmp``, and the
    ``.NAME.link`` of older versions and of sharded checkpoints' links) in the run directory, its checkpoints
    and its exported model, and a sharded checkpoint's unfinished directory (``.step-N.dcp.tmp``)."""
    removed = []
    for directory in (run_dir, run_dir / "checkpoints", run_dir / MODEL_DIR, run_dir / "figures"):
        for path in [*directory.glob(".*.tmp"), *directory.glob(".*.link")]:
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.is_dir() and path.name.endswith(".dcp.tmp"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _model_label(cfg: TrainConfig) -> str:
    """The registry name, or ``ft-<init>`` for a fine-tuning run (named after the run it starts from)."""
    if not cfg.finetune.init:
        return cfg.model["name"]
    init = Path(cfg.finetune.init)
    if init.name == MODEL_DIR or init.parent.name == CHECKPOINT_DIR:  # RUN/model, RUN/checkpoints/best.pt
        init = init.parent if init.name == MODEL_DIR else init.parent.parent
    return "ft-" + (init.name or "init")


def write_config(cfg: TrainConfig, run_dir: Path) -> None:
    atomic_write_text(cfg.to_yaml(), run_dir / CONFIG_NAME)


def build_run_model(cfg: TrainConfig, data: Any) -> nn.Module:
    """The registered model ``cfg.model['name']`` with the config's overrides; the number of classes,
    channels, image size and class names default to the data set's, and the data's preprocessing record
    travels in the config so that ``vitkit predict``/``eval``/``fewshot``/``analyze`` reapply it."""
    if cfg.finetune.init:
        return _build_finetune_model(cfg, data)
    # the section as the engine checks it (a config changed after it was built is checked again, the same way)
    spec = {k: v for k, v in check_model_section(cfg.model, task=cfg.task).items() if k != GRAD_CHECKPOINTING}
    name = spec.pop("name")
    entry = get_model_entry(name)
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
    model = build_finetune_model(cfg.finetune, num_classes=data.num_classes, class_names=list(data.class_names),
                                 in_chans=data.in_chans, img_size=cfg.model.get("img_size", data.img_size),
                                 model_overrides=cfg.model)
    extra = dict(model.config.extra)
    extra["finetuned_from"] = cfg.finetune.init
    model.config = model.config.replace(extra=extra, preprocess=data.preprocessing)
    return model


def build_finetune_model(cfg: FinetuneConfig, *, num_classes: int, class_names: Sequence[str] | None,
                         in_chans: int, img_size: int | tuple[int, int] | None,
                         model_overrides: dict[str, Any] | None = None) -> nn.Module:
    """Load ``cfg.init`` and prepare it for a data set with ``num_classes`` classes at ``img_size``.

    ``model_overrides`` are config fields to change (e.g. ``drop_path_rate``); a ``name`` key (the
    registry name of a from-scratch run) is ignored, since the architecture comes from the SOURCE.
    """
    if not cfg.init:
        raise ValueError("finetune.init is not set: name the pre-trained SOURCE to start from")
    overrides = {k: v for k, v in (model_overrides or {}).items() if k not in ("name", GRAD_CHECKPOINTING)}
    for key in ("num_classes", "class_names", "img_size", "representation_size", "head_init"):
        overrides.pop(key, None)  # decided by the data set and by fine-tuning itself
    if cfg.freeze_backbone:  # a frozen backbone is a fixed feature extractor: no dropout or drop-path in it
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            overrides.setdefault(key, 0.0)
    model = load_source(cfg.init).model
    if isinstance(model, MaskedAutoencoder):
        model = model.export_encoder()  # the official encoder as a plain ViT; the decoder is not fine-tuned
    if model.config.in_chans != in_chans:
        raise ValueError(f"finetune.init {cfg.init} takes {model.config.in_chans}-channel images but the data set "
                         f"has {in_chans} channel(s)")
    model = prepare_for_finetuning(model, num_classes, class_names=class_names, img_size=img_size,
                                   zero_init_head=cfg.zero_init_head, keep_representation=cfg.keep_representation,
                                   pos_embed=cfg.pos_embed, **overrides)
    if cfg.freeze_backbone:
        freeze_backbone(model)
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


def export_run(source: str | Path, *, checkpoint: str | None = None, out_dir: str | Path | None = None,
               ) -> tuple[Path, ResolvedModel]:
    """Write a vitkit model directory (``model.safetensors`` + ``config.json``) from any state of a run,
    finished or not: its best checkpoint by default, or ``checkpoint`` (``last``, ``step-N``, ``model``).
    ``source`` may also be one of a run's checkpoint files. The default ``out_dir`` is ``RUN/export-STATE``.
    Returns the directory and what was exported."""
    resolved = load_source(source, checkpoint=checkpoint)
    run_dir, state = resolved.source.run_dir, resolved.source.state
    if resolved.source.kind not in ("training", "vitkit") or (run_dir is None and out_dir is None):
        raise ValueError(f"{source}: vitkit export writes a state of a training run; this is "
                         f"{resolved.description} (convert other checkpoints with `vitkit convert SRC DST`)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"export-{state or 'checkpoint'}"
    model = resolved.model
    extra = dict(model.config.extra)
    if resolved.progress is not None:
        progress = resolved.progress
        extra["training"] = {"run": str(run_dir) if run_dir else None, "state": state,
                             "epochs_done": progress["epoch"], "global_step": progress["global_step"],
                             "best_val_acc": progress["best_acc"], "ema": progress["ema"]}
    model.config = model.config.replace(extra=extra)
    return model.save_pretrained(out), resolved
