"""Studies: the paper's data-regime and compute claims, measured on your data with one command.

- ``data``: each model on stratified subsets of the training set (``fractions``), evaluated on the full
  test set. Compute rule: **every run sees the same number of training samples** (epochs scaled by
  1/fraction, rounded to whole epochs), so small subsets are repeated more often, not trained less.
- ``compute``: each model for several epoch budgets on one subset; accuracy against training FLOPs.
- ``data`` with ``budget_seconds``: the same subsets at **equal wall-clock budget** instead: each model's
  seconds per training step are measured back to back (the models take turns, round after round, so a
  change of machine load touches all alike), and the budget becomes a fixed step count per model
  (``max_steps``), so load changes during the study do not bias it.

A study is a grid of cells (model x fraction x epochs); each cell is an ordinary ``vitkit train`` run
in ``<out>/runs/<cell>`` with the same pipeline for every model (data, augmentation, optimiser,
logging), so the comparison changes only the model. A finished cell leaves ``<out>/cells/<cell>.json``
and is never run again; an interrupted cell resumes from its last checkpoint. ``results.csv`` and the
plot are rewritten after every cell. Training FLOPs are counted on one forward and backward pass by
the bench's FLOP counter (:mod:`vitkit.bench.flops`), which also counts the kernels PyTorch's plain
counter cannot see: the fused CPU attention and the oneDNN GEMMs of vitkit's fast CPU ``Linear``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vitkit.bench.flops import count_flops
from vitkit.data import build_data
from vitkit.fileio import atomic_write_text, lock_directory, unlock_directory
from vitkit.models.registry import architecture_of, get_model_entry
from vitkit.resolver import load_model
from vitkit.train import resume, train
from vitkit.train.checkpoints import CHECKPOINT_DIR, LAST
from vitkit.train.config import TrainConfig, load_config, merge_configs
from vitkit.train.optim import build_optimizer
from vitkit.train.plots import pyplot
from vitkit.train.rundir import build_run_model

StudyKind = Literal["data", "compute"]
RESULT_FIELDS = ["model", "family", "params", "fraction", "train_size", "epochs", "steps", "samples_seen",
                 "flops_per_sample", "train_flops", "train_seconds", "test_acc", "test_loss", "run_dir"]


@dataclass(frozen=True)
class Cell:
    """One training run of a study."""

    model: str
    fraction: float
    epochs: int
    steps: int | None = None
    """A step budget (equal wall-clock studies): training stops there, within the last epoch."""

    @property
    def key(self) -> str:
        return f"{self.model}-f{self.fraction:g}-e{self.epochs}" + (f"-s{self.steps}" if self.steps else "")


# ------------------------------------------------------------------------------------- planning
def plan_data_study(models: Sequence[str], fractions: Sequence[float], epochs: int,
                    steps_per_epoch: Callable[[float], int]) -> list[Cell]:
    """Cells for the data study: ``epochs`` on the full set, the same number of samples on every subset
    (``steps_per_epoch(fraction)`` gives the optimiser steps of one epoch on that subset)."""
    _check_fractions(fractions)
    budget = epochs * steps_per_epoch(1.0)
    cells = []
    for fraction in sorted(fractions):
        scaled = max(1, round(budget / steps_per_epoch(fraction)))
        cells += [Cell(m, fraction, scaled) for m in models]
    return cells


def plan_compute_study(models: Sequence[str], epochs: Sequence[int], fraction: float = 1.0) -> list[Cell]:
    """Cells for the compute study: every model at every epoch budget."""
    _check_fractions([fraction])
    if not epochs or any(e < 1 for e in epochs):
        raise ValueError(f"--epochs must be positive integers, got {list(epochs)}")
    return [Cell(m, fraction, e) for e in sorted(epochs) for m in models]


def plan_time_study(models: Sequence[str], fractions: Sequence[float], budget_seconds: float,
                    step_seconds: dict[str, float], steps_per_epoch: Callable[[float], int]) -> list[Cell]:
    """Cells for the data study at equal wall-clock budget: ``budget_seconds / step_seconds[model]``
    optimiser steps for every model on every subset (as many epochs as that takes, the last one partial)."""
    _check_fractions(fractions)
    if budget_seconds <= 0:
        raise ValueError(f"--budget-seconds must be positive, got {budget_seconds}")
    cells = []
    for fraction in sorted(fractions):
        for model in models:
            steps = max(1, round(budget_seconds / step_seconds[model]))
            cells.append(Cell(model, fraction, math.ceil(steps / steps_per_epoch(fraction)), steps))
    return cells


def measure_step_seconds(models: Sequence[str], base: Any, *, threads: int, rounds: int = 3, steps: int = 2,
                         log: Callable[[str], None] = print) -> dict[str, float]:
    """Seconds per optimiser step of each model, measured back to back on the base config's data pipeline,
    optimiser and batch size with ``threads`` threads (what each study worker gets).

    The models take turns, ``steps`` steps each, for ``rounds`` rounds after one warm-up round, and each
    keeps its median round: a change of machine load during the measurement touches every model alike.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfgs = {m: TrainConfig.from_dict(merge_configs(base.to_dict(), {"model": {"name": m}})) for m in models}
        data = build_data(cfgs[models[0]].data, device=torch.device("cpu"), seed=base.seed)
        nets = {m: build_run_model(cfgs[m], data).train() for m in models}
        optimizers = {m: build_optimizer(nets[m], cfgs[m].optim) for m in models}
        batches = (batch for epoch in itertools.count() for batch in data.train.batches(epoch))
        times: dict[str, list[float]] = {m: [] for m in models}
        for round_ in range(rounds + 1):  # round 0 warms up (allocations, kernel selection) and is not kept
            for m in models:
                start = time.perf_counter()
                for _ in range(steps):
                    images, targets = next(batches)
                    nn.functional.cross_entropy(nets[m](images).float(), targets).backward()
                    if cfgs[m].optim.clip_grad:
                        nn.utils.clip_grad_norm_(nets[m].parameters(), cfgs[m].optim.clip_grad)
                    optimizers[m].step()
                    optimizers[m].zero_grad(set_to_none=True)
                if round_:
                    times[m].append((time.perf_counter() - start) / steps)
    finally:
        torch.set_num_threads(previous)
    seconds = {m: statistics.median(t) for m, t in times.items()}
    for m in models:
        log(f"  {m:28s} {seconds[m]:.3f} s/step (rounds: {', '.join(f'{t:.3f}' for t in times[m])})")
    return seconds


def _check_fractions(fractions: Sequence[float]) -> None:
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)}")


# -------------------------------------------------------------------------------------- running
def run_study(kind: StudyKind, cells: Sequence[Cell], base: Any, out_dir: str | Path, *,
              workers: int = 1, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the cells that have no result yet (``workers`` at a time) and write ``results.csv`` and the
    plot. ``base`` is the :class:`vitkit.train.TrainConfig` every cell starts from."""
    out_dir = Path(out_dir)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    # one study per directory: a second one would take the first's unfinished cells for crashed ones and
    # delete them under it
    lock_directory(out_dir, f"vitkit study {kind}", "another vitkit study is running in this --out directory; "
                   "wait for it to finish (a finished study's cells are reused), or choose another --out")
    try:
        return _run_study(kind, cells, base, out_dir, workers, log)
    finally:
        unlock_directory(out_dir)


def _run_study(kind: StudyKind, cells: Sequence[Cell], base: Any, out_dir: Path, workers: int,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    atomic_write_text(json.dumps({"kind": kind, "cells": [asdict(c) for c in cells], "base": base.to_dict()},
                                 indent=2) + "\n", out_dir / "study.json")
    todo = [c for c in cells if not _result_path(out_dir, c).is_file()]
    log(f"study {kind}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
        f"on {workers} process(es) -> {out_dir}")
    base_dict = base.to_dict()
    if workers <= 1:
        for cell in todo:
            _report(log, run_cell(cell, base_dict, out_dir))
            write_outputs(kind, cells, out_dir)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(run_cell, cell, base_dict, out_dir) for cell in todo]
            for future in as_completed(futures):
                _report(log, future.result())
                write_outputs(kind, cells, out_dir)
    return write_outputs(kind, cells, out_dir)


def _report(log: Callable[[str], None], row: dict[str, Any]) -> None:
    log(f"  {row['model']:28s} fraction {row['fraction']:<5g} epochs {row['epochs']:<4d} "
        f"test acc {100 * row['test_acc']:6.2f}%  {row['train_flops'] / 1e12:8.3f} TFLOPs  "
        f"{row['train_seconds']:7.1f}s")


def _result_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / f"{cell.key}.json"


def cell_config(cell: Cell, base: dict[str, Any], out_dir: Path) -> Any:
    """The training config of one cell: the base config with this model, subset and epoch budget,
    evaluated once, at the end, on the full test set.

    The base config's ``optim.warmup_epochs`` counts epochs of the *full* training set, so that every
    cell warms up over the same number of samples (on a 10% subset: 10x as many subset epochs)."""

    changes = {"model": {"name": cell.model}, "epochs": cell.epochs, "eval_every": cell.epochs,
               "out_dir": str(out_dir / "runs"), "run_name": cell.key, "progress": "none",
               "data": {"train_fraction": None if cell.fraction == 1.0 else cell.fraction,
                        "samples_per_class": None}}
    if cell.steps:
        changes["max_steps"] = cell.steps
    cfg = TrainConfig.from_dict(merge_configs(base, changes), source=f"study cell {cell.key}")
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs / cell.fraction, float(cell.epochs))
    return cfg


def run_cell(cell: Cell, base: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Train one cell (or finish it, if a previous attempt was interrupted) and record its result."""

    out_dir = Path(out_dir)
    cfg = cell_config(cell, base, out_dir)
    run_dir = out_dir / "runs" / cell.key
    if (run_dir / CHECKPOINT_DIR / LAST).is_file():
        result = resume(run_dir)
    else:
        if run_dir.exists():  # killed before its first checkpoint: nothing worth keeping
            shutil.rmtree(run_dir)
        result = train(cfg)
    row = _result_of(cell, result)
    atomic_write_text(json.dumps(row, indent=2) + "\n", _result_path(out_dir, cell))
    return row


def _result_of(cell: Cell, result: Any) -> dict[str, Any]:
    """A cell's row, from what the training loop measured (a :class:`vitkit.train.loop.TrainResult`)."""
    model = load_model(result.run_dir / "model")  # the resolver: the one road to a model
    per_sample = training_flops_per_sample(model)
    return {
        "model": cell.model, "family": model_family(model.config),
        "params": sum(p.numel() for p in model.parameters()), "fraction": cell.fraction,
        "train_size": result.train_size, "epochs": cell.epochs, "steps": result.steps,
        "samples_seen": result.samples_seen, "flops_per_sample": per_sample,
        "train_flops": per_sample * result.samples_seen, "train_seconds": result.train_seconds,
        "test_acc": float(result.final["val_acc"]), "test_loss": float(result.final["val_loss"]),
        "run_dir": str(result.run_dir),
    }


def model_family(config: Any) -> str:
    """'resnet', 'hybrid' (a ViT with a CNN stem), 't2t' (Tokens-to-Token ViT) or 'vit'."""

    arch = architecture_of(config)
    if arch == "vit":
        return "hybrid" if config.stem is not None else "vit"
    return arch


def training_flops_per_sample(model: nn.Module) -> float:
    """FLOPs of one training step per image (forward + backward; the optimizer step is not counted),
    by the bench counter, which also sees the CPU attention kernel and vitkit's oneDNN ``Linear``."""
    config = model.config
    h, w = config.image_hw
    images = torch.randn(2, config.in_chans, h, w)
    was_training = model.training
    model.train()
    try:
        flops = count_flops(model, images, train=True, loss_fn=lambda logits: logits.float().logsumexp(dim=-1).sum())
    finally:
        model.train(was_training)
    return flops / len(images)


# -------------------------------------------------------------------------------------- outputs
def read_results(cells: Sequence[Cell], out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        path = _result_path(out_dir, cell)
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def write_outputs(kind: StudyKind, cells: Sequence[Cell], out_dir: str | Path) -> list[dict[str, Any]]:
    """``results.csv`` (one row per finished cell) and the study's plot, rewritten atomically."""
    out_dir = Path(out_dir)
    rows = read_results(cells, out_dir)
    if not rows:
        return rows

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), out_dir / "results.csv")
    plot_study(kind, rows, out_dir / f"accuracy_vs_{'data' if kind == 'data' else 'compute'}.png",
               equal_time=any(c.steps for c in cells))
    return rows


_FAMILY_STYLE = {"vit": ("tab:blue", "o"), "hybrid": ("tab:green", "s"), "resnet": ("tab:red", "^"),
                 "t2t": ("tab:purple", "D")}


def plot_study(kind: StudyKind, rows: Sequence[dict[str, Any]], path: Path, *, equal_time: bool = False) -> Path:
    """Test accuracy against training-set size (data study) or training FLOPs (compute study), one line
    per model, coloured by family (ViT blue, hybrid green, ResNet red, T2T purple) as in the paper's Figures 3-5."""
    plt = pyplot()
    x_key = "train_size" if kind == "data" else "train_flops"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    families: dict[str, int] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r[x_key], 100 * r["test_acc"]) for r in rows if r["model"] == model)
        family = next(r["family"] for r in rows if r["model"] == model)
        color, _ = _FAMILY_STYLE.get(family, ("tab:gray", "o"))
        marker = markers[families.get(family, 0) % len(markers)]
        families[family] = families.get(family, 0) + 1
        ax.plot(*zip(*points), marker=marker, color=color, label=f"{model} ({family})",
                alpha=1.0 - 0.2 * (families[family] - 1))
    ax.set_xscale("log")
    ax.set_xlabel("training images" if kind == "data" else "training FLOPs (forward + backward)")
    ax.set_ylabel("test accuracy (%)")
    budget = "same training time" if equal_time else "same samples seen"
    title = f"Accuracy vs. training-set size ({budget} per run)" if kind == "data" else \
        "Accuracy vs. training compute"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = ["| model | family | params | fraction | train images | epochs | test acc | train TFLOPs | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['family']} | {r['params'] / 1e6:.2f}M | {r['fraction']:g} | "
                     f"{r['train_size']} | {r['epochs']} | {100 * r['test_acc']:.2f}% | "
                     f"{r['train_flops'] / 1e12:.2f} | {r['train_seconds']:.0f}s |")
    return "\n".join(lines)


def data_steps_per_epoch(base: Any) -> Callable[[float], int]:
    """``fraction -> optimiser steps per epoch`` for the base config's data set, read from the data
    pipeline itself (so the samples-matched rule uses the real subset sizes)."""

    cache: dict[float, int] = {}

    def steps(fraction: float) -> int:
        if fraction not in cache:
            cfg = TrainConfig.from_dict(merge_configs(base.to_dict(), {"data": {
                "train_fraction": None if fraction == 1.0 else fraction, "samples_per_class": None}}))
            data = build_data(cfg.data, device=torch.device("cpu"), seed=cfg.seed)
            cache[fraction] = max(1, len(data.train) // cfg.optim.accum_steps)
        return cache[fraction]

    return steps



def study(kind: StudyKind, *, models: Sequence[str], dataset: str | None = None, fractions: Sequence[float] = (),
          epochs: Sequence[int] = (), fraction: float = 1.0, out_dir: str | Path | None = None, workers: int = 1,
          config: str | Path | None = None, overrides: Sequence[str] = (), budget_seconds: float | None = None,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Plan and run a study from a base training config (``config`` + ``--key value`` ``overrides``).

    ``data``: ``epochs`` is one number, the epochs of a full-data run; or, with ``budget_seconds``, every
    cell trains for that many seconds' worth of steps of its model (measured first, and kept in
    ``<out>/step_seconds.json`` so that a resumed study plans the same cells); ``compute``: a list of budgets.
    """

    if not models:
        raise ValueError("--models: give at least one registered model name")
    for name in models:
        get_model_entry(name)  # unknown names fail now, not an hour into the study
    base = load_config(config, [*overrides, *(["--data.dataset", dataset] if dataset else [])])
    out_dir = Path(out_dir or Path("studies") / f"{kind}-{base.data.dataset.rsplit('/', 1)[-1]}")
    if kind == "data" and budget_seconds is not None:
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
        step_seconds = _step_seconds(models, base, out_dir, threads, log)
        cells = plan_time_study(models, fractions, budget_seconds, step_seconds, data_steps_per_epoch(base))
    elif kind == "data":
        if len(epochs) != 1:
            raise ValueError(f"--epochs: the data study takes one number (epochs on the full set), got {list(epochs)}")
        cells = plan_data_study(models, fractions, epochs[0], data_steps_per_epoch(base))
    elif kind == "compute":
        cells = plan_compute_study(models, epochs, fraction)
    else:
        raise ValueError(f"study kind must be 'data' or 'compute', got {kind!r}")
    rows = run_study(kind, cells, base, out_dir, workers=workers, log=log)
    log(format_table(rows))
    log(f"results: {out_dir / 'results.csv'}")
    return rows


def _step_seconds(models: Sequence[str], base: Any, out_dir: Path, threads: int,
                  log: Callable[[str], None]) -> dict[str, float]:
    """The measured seconds per step of ``models``: read back from ``out_dir`` when a previous attempt of
    the study measured them (its cells must stay the same), else measured now and written there."""
    path = out_dir / "step_seconds.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = [m for m in models if m not in known.get("seconds", {})]
    if missing:
        log(f"timing {len(missing)} model(s) back to back ({threads} thread(s) each, as every study worker)")
        measured = measure_step_seconds(missing, base, threads=threads, log=log)
        known = {"threads": threads, "batch_size": base.data.batch_size,
                 "seconds": {**known.get("seconds", {}), **measured}}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(known, indent=2) + "\n", path)
    else:
        log(f"step times from {path}: " + ", ".join(f"{m} {known['seconds'][m]:.3f}s" for m in models))
    return {m: float(known["seconds"][m]) for m in models}
