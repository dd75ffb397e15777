"""The training loop, read top to bottom: set up, then for each epoch, for each batch, step; evaluate
and checkpoint at the end of every epoch. :func:`_train` is that loop in a dozen lines; each stage it calls
(one step, its log line and checkpoint, the end of an epoch, the stop on a signal) is a method of
:class:`_Run`, which holds what the set-up built.

``train(cfg)`` starts a run, ``resume(run_dir)`` continues one exactly where its last checkpoint left
it; both return a :class:`TrainResult`. What is trained for (the loss of a batch, the evaluation) is a
:class:`~vitkit.train.task.Task`, classification by default. Everything the loop changes lives in one
:class:`LoopState`, which a checkpoint saves whole. Under ``torchrun`` every process runs this same code
on its own shard of each global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vitkit.checkpoint import CheckpointError, describe_nonfinite, load_weights, nonfinite_keys
from vitkit.data import CorruptImageError, Data, build_data
from vitkit.errors import WorkStopped
from vitkit.models.registry import architecture_of
from vitkit.runtime import grad_scaler, resolve_device
from vitkit.train.budget import (
    EVAL_COST,
    MEASURE_STEPS,
    REPLAN_CHECKS,
    REPLAN_TOLERANCE,
    RESERVE,
    Cadence,
    Pace,
    format_budget,
    parse_duration,
    steps_that_fit,
)
from vitkit.train.checkpoints import (
    CheckpointWriter,
    capture_rng,
    check_run_identity,
    load_checkpoint,
    new_run_id,
    resolve_checkpoint,
    restore_rng,
)
from vitkit.train.config import GRAD_CHECKPOINTING, TrainConfig, expand_shortcuts, merge_configs, parse_overrides
from vitkit.train.distributed import (
    World,
    all_reduce_sum,
    any_process,
    broadcast_object,
    finish_collectives,
    gather_objects,
    init_world,
    keep_global_batch,
    shutdown,
)
from vitkit.train.ema import ModelEMA
from vitkit.train.evaluate import num_tta_views
from vitkit.train.fsdp import (
    check_cpu_offload,
    full_value,
    gathered,
    is_sharded,
    resident_bytes,
    shard_model,
    skip_gradient_sync,
)
from vitkit.train.grad_checkpointing import enable_grad_checkpointing
from vitkit.train.invocation import vitkit_command
from vitkit.train.memory import ensure_step_fits
from vitkit.train.monitor import Progress, RunLog, format_duration
from vitkit.train.optim import build_optimizer, lr_at, peak_lr, set_lr
from vitkit.train.plots import plot_curves
from vitkit.train.rundir import create_run_dir, lock_run_dir, remove_partial_writes, unlock_run_dirs, write_config
from vitkit.train.runtime import StopSignals, seed_everything
from vitkit.train.sharded_checkpoint import ShardedCheckpointWriter, full_state_dict, restore_sharded
from vitkit.train.task import Task, build_task, format_metric

_now = time.perf_counter
"""The clock of a run's training seconds (a test replaces it to play a host of a given speed)."""


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; nothing was saved after it."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving its ``last`` checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Schedule:
    """How long a run is and its learning rate at every optimizer step, from the config and the number of
    batches an epoch gives. Leftover batches of an epoch (fewer than ``accum``) are skipped."""

    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    replans: tuple[tuple[int, int], ...] = ()
    """A time budget's re-plans (``budget_replans``): from each ``step`` on, the decay left ends at its total
    (the last one is ``total_steps``)."""
    planned_steps: Optional[int] = None
    """With re-plans: the total they started from (``max_steps``)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, batches_per_epoch: int, world_size: int) -> Schedule:
        """``epochs`` epochs, or ``max_steps`` steps if that is fewer (or the last re-plan's total); the peak
        learning rate is ``optim.lr`` or ``optim.blr`` scaled by the global batch."""
        accum = cfg.optim.accum_steps
        steps = batches_per_epoch // accum
        if steps == 0:
            raise ValueError(f"the training set gives {batches_per_epoch} batch(es) per epoch, fewer than "
                             f"optim.accum_steps={accum}; lower data.batch_size or optim.accum_steps")
        total = cfg.epochs * steps if cfg.max_steps is None else min(cfg.epochs * steps, cfg.max_steps)
        replans = tuple((int(at), int(new)) for at, new in cfg.budget_replans)
        lr = peak_lr(cfg.optim, cfg.data.batch_size * world_size * accum)
        warmup = round(cfg.optim.warmup_epochs * steps)
        if replans:
            return cls(accum, steps, replans[-1][1], warmup, lr, cfg.optim.min_lr, replans, cfg.max_steps)
        return cls(accum, steps, total, warmup, lr, cfg.optim.min_lr)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def lr_at(self, step: int) -> float:
        if not self.replans or step < self.warmup_steps:
            return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=self.lr,
                         min_lr=self.min_lr)
        # The cosine's progress runs from 0 at the end of warmup to 1 at the last step; a re-plan at step a
        # keeps the progress reached at a and spreads what is left over the steps to its new total.
        anchor, done, total = self.warmup_steps, 0.0, self.planned_steps
        for at, new_total in self.replans:
            if at > step:
                break
            if at > anchor:
                done, anchor = _progress(at, anchor, done, total), at
            total = new_total
        progress = min(1.0, _progress(step, anchor, done, total))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def _progress(step: int, anchor: int, done: float, total: int) -> float:
    return done + (1.0 - done) * (step - anchor) / max(1, total - 1 - anchor)


@dataclass
class LoopState:
    """Where a run is: every number the loop changes besides the weights, optimizer, scaler and EMA.
    A checkpoint saves it whole, so a resumed run continues (and logs) as if it had never stopped."""

    epoch: int = 0
    batch: int = 0
    """The next micro-batch of ``epoch``."""
    step: int = 0
    """Optimizer steps taken."""
    best: Optional[float] = None
    """The best value of the task's ``best_metric`` so far."""
    elapsed: float = 0.0
    """Training seconds before this process started (earlier processes of the same run)."""
    epoch_sums: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    """The task's training sums over this epoch so far (this process's share)."""
    window_sums: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    """The same over the steps since the last ``log_every`` line."""
    window_seconds: float = 0.0
    """Seconds the current log window had run when the state was saved."""
    last_record: dict[str, Any] = field(default_factory=dict)
    """The last epoch's record (what metrics.jsonl got), so a finished run's result can be given again."""

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.step, "best_score": self.best,
                "elapsed": self.elapsed, "epoch_sums": self.epoch_sums.cpu(), "window_sums": self.window_sums.cpu(),
                "window_seconds": self.window_seconds, "last_record": self.last_record}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], device: torch.device) -> LoopState:
        best = saved.get("best_score", saved.get("best_acc"))  # best_acc: checkpoints before tasks existed
        epoch_sums = saved["epoch_sums"].to(device)
        return cls(saved["epoch"], saved["batch"], saved["global_step"], None if best in (None, -math.inf) else best,
                   saved["elapsed"], epoch_sums, saved.get("window_sums", torch.zeros_like(epoch_sums)).to(device),
                   saved.get("window_seconds", 0.0), dict(saved.get("last_record") or {}))


@dataclass
class TrainResult:
    """What a finished run measured: its last evaluation, its best score and its cost."""

    run_dir: Path
    final: dict[str, Any]
    """The last epoch's record: ``train_loss``, ``val_acc``, ``val_loss`` ... (``*_ema`` with EMA)."""
    best: Optional[float]
    """The best ``best_metric`` of the task (val_acc for classification), or None if never evaluated."""
    best_metric: str
    steps: int
    samples_seen: int
    """Training samples of all optimizer steps (global batch x steps)."""
    train_seconds: float
    train_size: int
    val_size: int


@dataclass
class Trained:
    """The things a step changes besides the loop state: the model (as called: DDP- or compile-wrapped),
    the model itself, and its optimizer, gradient scaler and EMA."""

    model: nn.Module
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Optional[ModelEMA]


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model as ``cfg`` says, in a new run directory."""
    return _run(cfg)


def resume(run_or_checkpoint: str | Path, overrides: Sequence[str] = ()) -> TrainResult:
    """Continue a run from its ``last`` checkpoint (or the given checkpoint file), exactly: same weights,
    optimizer, schedule, EMA, RNG states, data order and logged metrics as if it had never stopped."""
    path = resolve_checkpoint(run_or_checkpoint)
    saved = load_checkpoint(path, weights=False)
    saved["run_id"] = check_run_identity(path, saved, Path(path).absolute().parent.parent)
    changes = expand_shortcuts(parse_overrides(overrides))
    cfg = TrainConfig.from_dict(merge_configs(saved["config"], changes), source=f"{path} (its config)")
    return _run(cfg, run_dir=Path(path).absolute().parent.parent, saved=saved)


def _run(cfg: TrainConfig, run_dir: Optional[Path] = None, saved: Optional[dict[str, Any]] = None) -> TrainResult:
    world = init_world(resolve_device(cfg.device).type)
    try:
        with StopSignals() as signals:
            result = _train(cfg, world, run_dir, saved, signals)
        finish_collectives(world)
        return result
    finally:
        unlock_run_dirs()
        shutdown(world)


def _train(cfg: TrainConfig, world: World, run_dir: Optional[Path], saved: Optional[dict[str, Any]],
           signals: StopSignals) -> TrainResult:
    run = _Run(cfg, world, run_dir, saved, signals)
    while run.state.epoch < run.cfg.epochs and run.state.step < run.schedule.total_steps:
        run.start_epoch()
        for images, targets in run.epoch_batches():
            if not run.step(images, targets):  # a micro-batch short of an optimizer step (accumulation)
                continue
            stop = run.signalled()  # one collective per step: every process stops at the same step
            run.fit_budget()  # a time budget fixes (or re-plans) the length before a checkpoint records it
            run.log_and_checkpoint(save=stop)
            if stop:
                run.stop(f"at epoch {run.state.epoch + 1}, optimizer step {run.state.step}")
        run.end_epoch()
        if run.signalled():  # the signal came during the evaluation; the epoch's checkpoint is written
            run.stop(f"after epoch {run.state.epoch} (optimizer step {run.state.step})")
    return run.finish()


class _Run:
    """One process's part of a run: what the loop set up, and the steps it takes. The methods are the loop's
    stages, called by :func:`_train` in order; everything they change lives in ``state`` (checkpointed),
    the model parts, or the per-process counters below (timings, the non-finite count)."""

    def __init__(self, cfg: TrainConfig, world: World, run_dir: Optional[Path], saved: Optional[dict[str, Any]],
                 signals: StopSignals) -> None:
        self.cfg, self.world, self.signals = cfg, world, signals
        self.device = resolve_device(cfg.device, world.local_rank)
        if saved is not None:  # on another number of processes: the same global batch
            self.cfg = cfg = keep_global_batch(cfg, saved, world)
        seed_everything(cfg.seed, cfg.deterministic)  # same seed on every rank: identical initial weights
        self._build(saved)
        self._open_run_dir(run_dir, saved)
        if saved is not None and len(saved["rng"]) == world.size:
            restore_rng(saved["rng"][world.rank])
        else:  # dropout and drop-path draw different masks on each rank
            seed_everything(cfg.seed + 1_000_003 * world.rank + self.state.step, cfg.deterministic)
        self._start_clocks(saved)

    # --------------------------------------------------------------------------------------- set-up
    def _build(self, saved: Optional[dict[str, Any]]) -> None:
        """Data, task, model, optimizer and schedule; the memory check; the loop state (restored when resuming)."""
        cfg, world, device = self.cfg, self.world, self.device
        self.data = data = build_data(cfg.data, device=device, seed=cfg.seed, rank=world.rank, world_size=world.size)
        self.task = task = build_task(cfg, data, device=device, world=world)
        self.parts = parts = _build_parts(task.build_model().to(device), cfg, device)
        self.schedule = schedule = Schedule.from_config(cfg, len(data.train), world.size)
        size = data.img_size if isinstance(data.img_size, (tuple, list)) else (data.img_size, data.img_size)
        no_labels = lambda n: torch.zeros(n, dtype=torch.long, device=device)  # noqa: E731
        self.fsdp = fsdp = cfg.distributed.strategy == "fsdp"
        check_cpu_offload(cfg.distributed.cpu_offload, device)
        ensure_step_fits(parts.raw, parts.optimizer, input_shape=(data.in_chans, *size),
                         batch_size=cfg.data.batch_size, accum_steps=schedule.accum, device=device,
                         precision=cfg.precision,  # before an out-of-memory kill can take the run down
                         loss_fn=lambda model, images: task.train_step(model, images, no_labels(len(images)))[0],
                         grad_checkpointing=bool(cfg.model.get(GRAD_CHECKPOINTING)), shards=world.size if fsdp else 1)
        if cfg.model.get(GRAD_CHECKPOINTING):
            enable_grad_checkpointing(parts.raw)
        if fsdp and world.distributed:  # in place; the optimizer then holds (and steps) the shards
            shard_model(parts.raw, precision=cfg.precision, cpu_offload=cfg.distributed.cpu_offload, device=device)
            parts.optimizer = build_optimizer(parts.raw, cfg.optim)
        stats = len(task.stat_names) + 1
        self.state = LoopState(epoch_sums=torch.zeros(stats, dtype=torch.float64, device=device),
                               window_sums=torch.zeros(stats, dtype=torch.float64, device=device))
        if saved is not None:
            _restore(parts, saved, world)
            self.state = LoopState.from_checkpoint(saved, device)
            if "sharded" in saved and not world.is_main:  # its sums are of all processes: counted once, on rank 0
                self.state.epoch_sums.zero_()
                self.state.window_sums.zero_()
        parts.model = _wrap(parts.raw, cfg, world, device)

    def _open_run_dir(self, run_dir: Optional[Path], saved: Optional[dict[str, Any]]) -> None:
        """The run directory (new, or the resumed run's), its lock, log, checkpoints and config; the first lines."""
        cfg, world, resumed = self.cfg, self.world, saved is not None
        self.run_dir = broadcast_object(run_dir or (create_run_dir(cfg) if world.is_main else None), world)
        if world.is_main:  # before anything in it changes: a second process must not resume a live run
            lock_run_dir(self.run_dir)
        self.log = RunLog(self.run_dir, resume_step=self.state.step if resumed else None, enabled=world.is_main)
        run_id = broadcast_object((saved or {}).get("run_id") or new_run_id(), world)  # one id on every process
        self.checkpoints = ShardedCheckpointWriter(self.run_dir, cfg.keep_last_k, world, run_id) if self.fsdp else \
            CheckpointWriter(self.run_dir, cfg.keep_last_k, run_id)
        self.progress = Progress(cfg.progress, enabled=world.is_main)
        if world.is_main:
            tidied = self._tidy_for_resume() if resumed else []
            write_config(cfg, self.run_dir)
            self.checkpoints.write_run_id()
            _announce(self.progress, cfg, self.parts.raw, self.run_dir, self.state, self.schedule, world,
                      self.device, resumed=resumed)
            for line in tidied:
                self.progress.print(line)
        self.reported_skips: set[str] = set()
        _report_skipped(self.data, self.reported_skips, world, self.log, self.state.step)

    def _tidy_for_resume(self) -> list[str]:
        """Remove what a killed process left half-written, and move the step checkpoints newer than the
        resumed one (another branch, which would outrank and so delete every checkpoint this one writes) out
        of the rotation; what was done, as lines to print."""
        lines = []
        partial = remove_partial_writes(self.run_dir)
        if partial:
            lines.append(f"removed {len(partial)} partial file(s) of an interrupted write: "
                         + ", ".join(p.name for p in partial))
        retired = self.checkpoints.retire_newer_than(self.state.step)
        if retired:
            lines.append(f"moved {len(retired)} step checkpoint(s) newer than step {self.state.step} (the branch "
                         f"this resumption abandons) out of the rotation, to {retired[0].parent}: "
                         + ", ".join(p.name for p in retired))
        return lines

    def _start_clocks(self, saved: Optional[dict[str, Any]]) -> None:
        """The run's clock and pace, the time budget's first plan, and the per-process counters."""
        self.started = _now()
        self.pace = Pace(_now)  # not self.clock: a reference cycle would keep the DataLoader workers alive
        self.budget = parse_duration(self.cfg.time_budget) if self.cfg.time_budget else None
        self.plan_at = None if self.budget is None or self.cfg.max_steps is not None else min(
            MEASURE_STEPS + 1, self.schedule.warmup_steps + 1, self.schedule.steps_per_epoch)
        """The step after which a budget fixes the run's length: the steps before it do not depend on the length
        (warmup's learning rate does not), so a re-run with the chosen ``max_steps`` repeats them exactly."""
        if self.plan_at is not None:
            self._say(f"budget {format_budget(self.budget)}: timing the first {self.plan_at} steps")
        self.nonfinite = torch.zeros((), device=self.device)
        """NaN/inf losses (or gradient norms) since the last check: counted on the device, read (a sync) only
        when a log line or a checkpoint needs it."""
        self.epoch_times: list[float] = []
        self.epoch_start = self.epoch_cpu = self.window_start = 0.0
        self.lr = self.schedule.lr_at(self.state.step)
        self.grad_norm: Optional[Tensor] = None
        new_layout = saved is None or int(saved.get("world_size", self.world.size)) != self.world.size
        self.memory_step = self.state.step + 1 if new_layout else None
        """The step before which the resident bytes per process are logged: a run's first, and a resumption's on
        another number of processes (a resumption on the same number logs what the run logged)."""

    def clock(self) -> float:
        """Training seconds of the run: this process's, plus those of the processes it resumes."""
        return self.state.elapsed + _now() - self.started

    # ------------------------------------------------------------------------------ the loop's stages
    def start_epoch(self) -> None:
        state = self.state
        self.parts.model.train()
        self.progress.start_epoch(state.epoch, self.cfg.epochs, self.schedule.steps_per_epoch,
                                  state.batch // self.schedule.accum)
        self.epoch_start, self.epoch_cpu = time.perf_counter(), time.process_time()
        self.window_start = time.perf_counter() - state.window_seconds  # a resumed window keeps its seconds
        self.grad_norm = None
        self.pace.start()

    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's remaining micro-batches, up to the last full optimizer step or the run's last step.
        An unreadable image first saves the finished steps, then ends the run with one line naming it."""
        state = self.state
        batches = self.data.train.batches(state.epoch, state.batch)
        for images, targets in _saving_on_corrupt(batches, self.save_finished_steps, self.world, self.checkpoints,
                                                  self.run_dir):
            # self.schedule, not a copy: a time budget's re-plan may shorten the run within the epoch
            if state.batch >= self.schedule.batches_per_epoch or state.step >= self.schedule.total_steps:
                return
            yield images, targets

    def step(self, images: Tensor, targets: Tensor) -> bool:
        """Forward and backward one micro-batch; on the last micro-batch of ``accum``, an optimizer step.
        Says whether the step was taken."""
        state, schedule = self.state, self.schedule
        boundary = (state.batch + 1) % schedule.accum == 0
        loss = _forward_backward(self.task, self.parts, images, targets, state, self.world, boundary, schedule.accum)
        self.nonfinite += ~torch.isfinite(loss)
        state.batch += 1
        if not boundary:
            return False
        self.lr = schedule.lr_at(state.step)
        if state.step == self.memory_step:  # gradients and optimizer state both exist now
            _log_resident_memory(self.parts, self.world, self.log, state.step)
        self.grad_norm = _optimizer_step(self.parts, self.cfg, self.lr, self.nonfinite)
        state.step += 1
        self.progress.step()
        self.pace.step()
        return True

    def fit_budget(self) -> None:
        """With a time budget, after the first steps: fix ``max_steps`` (and ``epochs``) to what fits, in the
        config the run writes and checkpoints (so a resumption keeps it), and say so; then at every tenth of
        the run's steps (and after each evaluation, see :meth:`end_epoch`), re-plan to the pace since."""
        if self.budget is None:
            return
        if self.plan_at is None:
            # A check after every tenth of the run's steps; every process counts the same steps, and checks
            # together (a re-plan is a collective).
            if self.pace.window_steps >= max(1, self.schedule.total_steps // REPLAN_CHECKS):
                self._replan()
            return
        if self.state.step < self.plan_at:
            return
        self.plan_at = None
        per_step = self.pace.seconds_per_step() or self.clock() / max(1, self.state.step)
        # The main process's clock decides for all: a collective, so every process has the same schedule.
        total, per_step = broadcast_object((self._steps_that_fit(per_step, self.state.epoch), per_step), self.world)
        self._set_length(total, replans=list(self.cfg.budget_replans))
        self.pace.new_window()
        self._say(f"budget {format_budget(self.budget)}: {total:,} steps = "
                  f"{total / self.schedule.steps_per_epoch:.1f} epochs at {per_step:.3g} s/step measured")
        if total <= self.schedule.warmup_steps:  # warmup is not shortened: the steps taken so far assumed it
            self._say(f"budget {format_budget(self.budget)}: the {self.schedule.warmup_steps:,} warmup steps "
                      f"(optim.warmup_epochs {self.cfg.optim.warmup_epochs:g}) do not fit, so the run ends in "
                      "warmup, before any decay; a shorter optim.warmup_epochs fits the budget better")

    def log_and_checkpoint(self, *, save: bool) -> None:
        """Every ``log_every`` steps a ``train`` line (and the finite check); every ``ckpt_every_steps`` steps,
        or when ``save``, the ``last`` checkpoint."""
        state, cfg = self.state, self.cfg
        if state.step % cfg.log_every == 0:
            _check_finite(self.nonfinite, state, self.world, self.device, self.checkpoints)
            metrics = _window_metrics(self.task, state, self.world, self.lr, self.grad_norm,
                                      time.perf_counter() - self.window_start)
            self.log.log("train", state.step, epoch=round(state.epoch + state.batch / self.schedule.batches_per_epoch,
                                                          4), **metrics)
            self.progress.show(state.batch // self.schedule.accum, metrics, eta=self.eta())
            state.window_sums.zero_()
            self.window_start = time.perf_counter()
        elif self.progress.due():  # numbers on the bar from the first step; a plain log's heartbeat
            metrics = _means(self.task, state.window_sums) | dict(lr=self.lr)
            self.progress.show(state.batch // self.schedule.accum, metrics, eta=self.eta())
        if save or (cfg.ckpt_every_steps and state.step % cfg.ckpt_every_steps == 0):
            self.save()

    def end_epoch(self) -> None:
        """Evaluate (every ``eval_every`` epochs and after the last), log the epoch's record, draw the curves,
        print the summary line and checkpoint, ``best`` too when the evaluation is the best so far."""
        state, cfg = self.state, self.cfg
        self.progress.end_epoch()
        _check_finite(self.nonfinite, state, self.world, self.device, self.checkpoints)
        epoch_sums = all_reduce_sum(state.epoch_sums.clone(), self.world)
        record: dict[str, Any] = dict(epoch=state.epoch + 1)
        record |= {f"train_{name}": value for name, value in _means(self.task, epoch_sums).items()}
        record["lr"] = self.schedule.lr_at(state.step - 1)
        last = state.epoch + 1 == cfg.epochs or state.step >= self.schedule.total_steps
        evaluated = (state.epoch + 1) % cfg.eval_every == 0 or last
        is_best = self._evaluate(record) if evaluated else False
        self._log_epoch(record, last)
        state.last_record = record
        state.epoch, state.batch, state.window_seconds = state.epoch + 1, 0, 0.0
        state.epoch_sums.zero_()
        state.window_sums.zero_()  # a log window does not span epochs
        if evaluated and not last and self.budget is not None and self.plan_at is None:
            self._replan()
        self.save(is_best)

    def _evaluate(self, record: dict[str, Any]) -> bool:
        """Evaluate into ``record`` (timed, for the budget) and keep the figures; whether it is the best so far.
        An unreadable image here saves the finished epoch first."""
        started = self.clock()
        with _saving_on_corrupt_in(self.save_finished_epoch, self.world, self.checkpoints, self.run_dir), \
                gathered(self.parts.raw):  # under FSDP the ranks' validation shards may differ in batches
            is_best = _evaluate(self.task, self.parts, self.state, record)
            if self.world.is_main:
                self.log.figures(self.task.figures(self._exported_model()), self.state.step, self.state.epoch + 1)
        self.pace.evaluation(self.clock() - started)
        return is_best

    def _log_epoch(self, record: dict[str, Any], last: bool) -> None:
        """The epoch's times (and skipped files) into ``record``, its ``epoch`` line, the curves, the summary."""
        state, cfg, task, world = self.state, self.cfg, self.task, self.world
        self.epoch_times.append(time.perf_counter() - self.epoch_start)
        record["epoch_time"] = self.epoch_times[-1]
        record["epoch_cpu_time"] = time.process_time() - self.epoch_cpu  # this process, all threads
        if cfg.data.skip_corrupt:
            record["skipped_files"] = _report_skipped(self.data, self.reported_skips, world, self.log, state.step)
        self.log.log("epoch", state.step, **record)
        if world.is_main and f"best_{task.best_metric.removeprefix('val_')}" in record:
            plot_curves(self.run_dir)  # redrawn at each evaluation, so a stopped run has its curves too
        eta = 0.0 if last else self.eta(first_epoch=state.epoch + 1)
        if eta is None:
            eta = sum(self.epoch_times) / len(self.epoch_times) * (cfg.epochs - state.epoch - 1)
        self.progress.print(_summary_line(task, record, cfg.epochs, eta, self.parts.ema is not None))

    def eta(self, first_epoch: Optional[int] = None) -> Optional[float]:
        """Seconds to the end of the run at the pace measured so far: its steps left and the evaluations at
        the ends of epochs ``first_epoch`` (default: the current one) onwards; None before a step was timed.
        While a time budget is still timing the first steps: what is left of the budget."""
        if self.budget is not None and self.plan_at is not None:
            return max(0.0, self.budget - self.clock())
        cadence = Cadence(self.schedule.steps_per_epoch, self.cfg.eval_every)
        evaluations = cadence.evaluations(self.schedule.total_steps,
                                          self.state.epoch if first_epoch is None else first_epoch)
        return self.pace.eta(self.schedule.total_steps - self.state.step, evaluations, self._eval_estimate())

    def signalled(self) -> bool:
        """Whether SIGTERM or SIGINT reached any process (a collective: every process calls it together)."""
        return any_process(self.signals.received is not None, self.world, self.device)

    def stop(self, where: str) -> None:
        """End the run on a signal, its state saved: the exception says where and how to continue."""
        self.progress.end_epoch()
        self.log.close()
        raise TrainingInterrupted(
            f"stopped by {self.signals.name or 'a signal on another process'} {where}; saved {self.checkpoints.last}; "
            f"continue with: {vitkit_command('train', '--resume', str(self.run_dir))}", self.signals.received or 15)

    def finish(self) -> TrainResult:
        """Export the model (the EMA model when there is one) and say what the run measured."""
        state, world = self.state, self.world
        train_seconds = round(self.clock(), 1)
        final = _whole_model(self.task, self.parts)  # every process: under FSDP it gathers the weights
        if world.is_main:
            self.task.export(final, self.run_dir, best=state.best, train_seconds=train_seconds)
            self.log.close()
            best = "never evaluated" if state.best is None else format_metric(
                self.task.best_metric, state.best, "best " + self.task.best_metric.replace("_", " "))
            self.progress.print(f"done in {format_duration(train_seconds)}: {best}; model in {self.run_dir / 'model'}")
        val_size = int(all_reduce_sum(torch.tensor([float(self.data.val.num_samples)], device=self.device),
                                      world).item())
        return TrainResult(self.run_dir, dict(state.last_record), state.best, self.task.best_metric, state.step,
                           state.step * self.cfg.data.batch_size * world.size * self.schedule.accum, train_seconds,
                           self.data.train.num_samples, val_size)

    # ------------------------------------------------------------------------------------ saving
    def save(self, is_best: bool = False, at: Optional[LoopState] = None) -> None:
        """Write ``last`` (and ``best``) of ``at`` (default: now); never after a non-finite step."""
        _check_finite(self.nonfinite, self.state, self.world, self.device, self.checkpoints)
        _save_checkpoint(self.checkpoints, self.parts, at or self.state, self.cfg, self.world, self.clock(),
                         self.window_start, is_best)
        self.log.flush()

    def save_finished_steps(self) -> None:
        """An unreadable image mid-epoch: keep every finished optimizer step (not a partial accumulation)."""
        state = self.state
        self.save(at=dataclasses.replace(state, batch=state.batch - state.batch % self.schedule.accum))

    def save_finished_epoch(self) -> None:
        """An unreadable image in the evaluation: the epoch's training is done, so resume at the next one."""
        self.save(at=dataclasses.replace(self.state, epoch=self.state.epoch + 1, batch=0))

    # ---------------------------------------------------------------------------------- time budget
    def _replan(self) -> None:
        """If the pace since the previous check (steps, and the last evaluation) makes a different number of
        steps fit the budget, spread the decay left over the steps to the new total."""
        state, planned = self.state, self.schedule.total_steps
        per_step = self.pace.seconds_per_step(recent=True)
        self.pace.new_window()
        decision = None
        if per_step is not None:
            total = self._steps_that_fit(per_step, first_epoch=state.epoch)
            if abs(total - planned) * per_step > REPLAN_TOLERANCE * self.budget:
                decision = (total, per_step)
        decision = broadcast_object(decision, self.world)  # the main process decides for all (a collective)
        if decision is None:
            return
        total, per_step = decision
        self._set_length(self.cfg.max_steps, replans=[*self.cfg.budget_replans, (state.step, total)])
        evaluation = (f"{self.pace.eval_seconds[-1]:.3g} s/evaluation" if self.pace.eval_seconds else
                      f"an evaluation estimated at {self._eval_estimate(per_step):.3g} s")
        self._say(f"budget {format_budget(self.budget)}: {per_step:.3g} s/step since the last check and {evaluation}: "
                  f"re-planned from {planned:,} to {total:,} steps ({total / self.schedule.steps_per_epoch:.1f} "
                  f"epochs), the decay left now spread over steps {state.step:,}-{total:,}")

    def _steps_that_fit(self, per_step: float, first_epoch: int) -> int:
        """The run's total steps that fit what is left of the budget at ``per_step`` seconds a step."""
        left = self.budget * (1 - RESERVE) - self.clock()
        total = steps_that_fit(left, step=self.state.step, seconds_per_step=per_step,
                               seconds_per_evaluation=self.pace.seconds_per_evaluation(self._eval_estimate(per_step)),
                               cadence=Cadence(self.schedule.steps_per_epoch, self.cfg.eval_every),
                               first_epoch=first_epoch)
        return total

    def _set_length(self, max_steps: int, replans: list[tuple[int, int]]) -> None:
        """Make the run ``max_steps`` long (or as the last re-plan says) in its config, schedule and run
        directory's config.yaml; the checkpoints that follow carry it."""
        total = replans[-1][1] if replans else max_steps
        self.cfg = dataclasses.replace(self.cfg, max_steps=max_steps, budget_replans=replans,
                                       epochs=max(1, math.ceil(total / self.schedule.steps_per_epoch)))
        self.schedule = Schedule.from_config(self.cfg, len(self.data.train), self.world.size)
        if self.world.is_main:
            write_config(self.cfg, self.run_dir)

    def _eval_estimate(self, per_step: Optional[float] = None) -> float:
        """Seconds of one evaluation before one was timed: its images (views: TTA, the EMA model) at
        ``EVAL_COST`` of a trained image's time."""
        per_step = per_step or self.pace.seconds_per_step() or 0.0
        views = num_tta_views(hflip=self.cfg.eval_hflip_tta, translate=self.cfg.eval_translate_tta)
        views *= 2 if self.parts.ema is not None else 1
        images_per_step = self.cfg.data.batch_size * self.schedule.accum
        return views * self.data.val.num_samples / images_per_step * per_step * EVAL_COST

    def _say(self, line: str) -> None:
        if self.world.is_main:
            self.progress.print(line)

    def _exported_model(self) -> nn.Module:
        return self.parts.ema.module if self.parts.ema is not None else self.parts.raw


# ------------------------------------------------------------------------------------ the steps
def _forward_backward(task: Task, parts: Trained, images: Tensor, targets: Tensor, state: LoopState,
                      world: World, boundary: bool, accum: int) -> Tensor:
    """Loss and gradients of one micro-batch (gradients are synchronised across processes only on the
    last micro-batch of an optimizer step); its sums go into the epoch's and the log window's."""
    sync = contextlib.nullcontext() if boundary or not world.distributed else \
        skip_gradient_sync(parts.raw if is_sharded(parts.raw) else parts.model)
    with sync:
        loss, sums = task.train_step(parts.model, images, targets)
        parts.scaler.scale(loss / accum).backward()
    state.window_sums += sums
    state.epoch_sums += sums
    return loss.detach()


def _optimizer_step(parts: Trained, cfg: TrainConfig, lr: float, nonfinite: Tensor) -> Optional[Tensor]:
    """One optimizer step at learning rate ``lr`` (gradient clipping, scaler, EMA); returns the gradient
    norm before clipping when clipping is on."""
    set_lr(parts.optimizer, lr)
    grad_norm = None
    if cfg.optim.clip_grad:
        parts.scaler.unscale_(parts.optimizer)
        grad_norm = full_value(nn.utils.clip_grad_norm_(parts.raw.parameters(), cfg.optim.clip_grad))
        if not parts.scaler.is_enabled():  # with a scaler, overflowing steps are skipped, not fatal
            nonfinite += ~torch.isfinite(grad_norm)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.raw)
    return grad_norm


def _log_resident_memory(parts: Trained, world: World, log: RunLog, step: int) -> None:
    """Log (``kind: memory``) the bytes of parameters, gradients and optimizer state each process holds:
    a whole replica under DDP, ``1/world`` of it under FSDP."""
    per_rank = gather_objects(resident_bytes(parts.raw, parts.optimizer), world)
    log.log("memory", step, **{key: [r[key] for r in per_rank] for key in per_rank[0]})


def _window_metrics(task: Task, state: LoopState, world: World, lr: float, grad_norm: Optional[Tensor],
                    seconds: float) -> dict[str, float]:
    """The ``train`` line of a log window: the task's means over all processes, the learning rate, the
    throughput and (with clipping) the last gradient norm."""
    window = all_reduce_sum(state.window_sums.clone(), world)
    metrics = _means(task, window) | dict(lr=lr, img_per_s=float(window[-1]) / max(seconds, 1e-9))
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def _evaluate(task: Task, parts: Trained, state: LoopState, record: dict[str, Any]) -> bool:
    """Evaluate the model (and the EMA model, which then decides) into ``record``; update the best score
    and say whether this evaluation is the best so far."""
    record |= task.evaluate(parts.raw)
    score = record[task.best_metric]
    if parts.ema is not None:
        record |= {f"{key}_ema": value for key, value in task.evaluate(parts.ema.module).items()}
        score = record[f"{task.best_metric}_ema"]
    is_best = state.best is None or (score > state.best if task.higher_is_better else score < state.best)
    state.best = score if is_best else state.best
    record[f"best_{task.best_metric.removeprefix('val_')}"] = state.best
    return is_best


def _report_skipped(data: Data, reported: set[str], world: World, log: RunLog, step: int) -> int:
    """Print and log unreadable files left out (``skip_corrupt``) since the last report; their total."""
    skipped = data.skipped_files()
    new = [f for f in skipped if f not in reported]
    if new and world.is_main:
        reported.update(new)
        shown = ", ".join(new[:5]) + (f", ... ({len(new) - 5} more in metrics.jsonl)" if len(new) > 5 else "")
        # a warning, on stderr whatever the progress mode
        print(f"vitkit: skip_corrupt: left out {len(new)} unreadable file(s) ({len(skipped)} in all): {shown}",
              file=sys.stderr, flush=True)
        log.log("skipped", step, count=len(skipped), files=new)
    return len(skipped)


def _saving_on_corrupt(batches: Iterator[Any], save: Callable[[], None], world: World,
                       checkpoints: CheckpointWriter, run_dir: Path) -> Iterator[Any]:
    """``batches``, but an unreadable image (:class:`CorruptImageError`, raised by the data layer in
    this process) first saves the finished steps, then stops the run with one line naming the file."""
    with _saving_on_corrupt_in(save, world, checkpoints, run_dir):
        yield from batches


@contextlib.contextmanager
def _saving_on_corrupt_in(save: Callable[[], None], world: World, checkpoints: CheckpointWriter,
                          run_dir: Path) -> Iterator[None]:
    """The same around a block (the evaluation)."""
    try:
        yield
    except CorruptImageError as e:
        if world.distributed:  # the other processes are not here to join the checkpoint's collectives
            raise
        save()
        raise WorkStopped(f"{e.path}: {e.reason}; saved the finished steps to {checkpoints.last}: remove or fix the "
                          f"file (or set data.skip_corrupt), then "
                          f"`{vitkit_command('train', '--resume', str(run_dir))}`") from None


def _means(task: Task, sums: Tensor) -> dict[str, float]:
    """The task's summed statistics divided by the number of samples (the last entry)."""
    n = float(sums[-1])
    return {name: float(sums[i]) / n if n else math.nan for i, name in enumerate(task.stat_names)}


# ------------------------------------------------------------------------------------ set-up helpers
def _build_parts(model: nn.Module, cfg: TrainConfig, device: torch.device) -> Trained:
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    return Trained(model, model, build_optimizer(model, cfg.optim), grad_scaler(cfg.precision, device), ema)


def _restore(parts: Trained, saved: dict[str, Any], world: World) -> None:
    if "sharded" in saved:  # any number of processes wrote it; DCP reshards to this world
        restore_sharded(saved, parts.raw, parts.optimizer, world)
    else:
        load_weights(parts.raw, saved["model"], source="the checkpoint's model weights")
        parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scaler.load_state_dict(saved["scaler"])
    if parts.ema is not None:
        if saved.get("ema") is None:
            raise CheckpointError("ema_decay is set but the checkpoint has no EMA weights")
        parts.ema.load_state_dict(saved["ema"])


def _whole_model(task: Task, parts: Trained) -> nn.Module:
    """The model to export: the EMA model, the model itself, or under FSDP a whole copy gathered on rank 0
    (every process must call this)."""
    if parts.ema is not None:
        return parts.ema.module
    if not is_sharded(parts.raw):
        return parts.raw
    weights = full_state_dict(parts.raw)
    whole = task.build_model()
    if weights:  # rank 0
        whole.load_state_dict(weights)
    return whole


def _wrap(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> nn.Module:
    """The model as the loop calls it: DDP across processes (unless FSDP shards it), ``torch.compile`` if asked."""
    if world.distributed and not is_sharded(model):
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _announce(progress: Progress, cfg: TrainConfig, model: nn.Module, run_dir: Path, state: LoopState,
              schedule: Schedule, world: World, device: torch.device, *, resumed: bool) -> None:
    params = sum(p.numel() for p in model.parameters())
    name = cfg.model.get("name") if isinstance(cfg.model, dict) else getattr(cfg.model, "name", "?")
    progress.print(cfg.to_yaml().rstrip())
    progress.print(f"{'resuming' if resumed else 'starting'} {run_dir} | {name} ({params / 1e6:.2f}M "
                   f"params) on {cfg.data.dataset} | {world.size} process(es) on {device} | "
                   f"{schedule.steps_per_epoch} steps/epoch, global batch "
                   f"{cfg.data.batch_size * world.size * schedule.accum}")
    if resumed:
        progress.print(f"from epoch {state.epoch + 1}, batch {state.batch}, optimizer step {state.step}")


# ------------------------------------------------------------------------------ checkpoints, checks
def _check_finite(nonfinite: Tensor, state: LoopState, world: World, device: torch.device,
                  checkpoints: CheckpointWriter | ShardedCheckpointWriter) -> None:
    if any_process(bool(nonfinite.item()), world, device):
        saved = f"the last good checkpoint is {checkpoints.last}" if checkpoints.last.exists() else \
            "no checkpoint had been written yet"
        raise TrainingDiverged(
            f"non-finite loss or gradient norm by optimizer step {state.step} (epoch {state.epoch + 1}); training "
            f"stopped and nothing was saved after it; {saved}. Try a lower optim.lr, a longer "
            "optim.warmup_epochs, optim.clip_grad, or bf16 instead of fp16.")


def _save_checkpoint(checkpoints: CheckpointWriter | ShardedCheckpointWriter, parts: Trained, state: LoopState,
                     cfg: TrainConfig, world: World, elapsed: float, window_start: float, is_best: bool) -> None:
    """Write ``last`` (and ``best``) from rank 0, with every rank's RNG streams (dropout masks); sharded
    checkpoints from every rank, with the epoch's sums of all ranks (so any number of processes resumes them).
    Weights that are no longer finite are never saved: ``last`` stays the last good state."""
    broken = nonfinite_keys(parts.raw.state_dict())  # identical on every rank, so every rank stops
    if broken:
        good = f"the last good checkpoint is {checkpoints.last}" if checkpoints.last.exists() else \
            "no checkpoint had been written yet"
        raise TrainingDiverged(f"{describe_nonfinite(broken)} by optimizer step {state.step} (epoch "
                               f"{state.epoch + 1}); training stopped and nothing was saved; {good}. Try a lower "
                               "optim.lr, a longer optim.warmup_epochs, optim.clip_grad, or bf16 instead of fp16.")
    rngs = gather_objects(capture_rng(), world)
    window_seconds = time.perf_counter() - window_start if state.batch else 0.0
    if isinstance(checkpoints, ShardedCheckpointWriter):
        sums = {k: all_reduce_sum(getattr(state, k).clone(), world) for k in ("epoch_sums", "window_sums")}
        loop = LoopState(**{**state.__dict__, **sums, "elapsed": elapsed, "window_seconds": window_seconds})
        checkpoints.save(parts.raw, parts.optimizer, {
            "model_config": _config_dict(parts.raw), "scaler": parts.scaler.state_dict(), "ema": None,
            **loop.to_checkpoint(), "rng": rngs, "config": cfg.to_dict(), "world_size": world.size,
        }, is_best=is_best)
        return
    if not world.is_main:
        return
    loop = LoopState(**{**state.__dict__, "elapsed": elapsed, "window_seconds": window_seconds})
    checkpoints.save({
        "model": parts.raw.state_dict(), "model_config": _config_dict(parts.raw),
        "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema else None, **loop.to_checkpoint(),
        "rng": rngs, "config": cfg.to_dict(), "world_size": world.size,
    }, is_best=is_best)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    return {"architecture": architecture_of(model.config), **model.config.to_dict()}


def _summary_line(task: Task, record: dict[str, Any], epochs: int, eta: float, has_ema: bool) -> str:
    """``epoch 3/23 | train loss 1.2345 acc 55.10% | val loss ... acc ...% top5 ...% | ema acc ... | best ...``"""
    def group(prefix: str, suffix: str = "") -> str:
        keys = [k for k in record if k.startswith(prefix) and k.endswith(suffix)
                and (suffix or not k.endswith("_ema"))]
        return " ".join(format_metric(k.removeprefix(prefix).removesuffix(suffix), record[k]) for k in keys)

    parts = [f"epoch {record['epoch']}/{epochs}", f"train {group('train_')}"]
    best_key = f"best_{task.best_metric.removeprefix('val_')}"
    if best_key in record:
        parts.append(f"val {group('val_')}")
        if has_ema:
            ema_key = f"{task.best_metric}_ema"
            parts.append("ema " + format_metric(ema_key.removesuffix("_ema"), record[ema_key],
                                                task.best_metric.removeprefix("val_")))
        parts.append(format_metric(task.best_metric, record[best_key], "best"))
    parts.append(f"{format_duration(record['epoch_time'])}/epoch, ETA {format_duration(eta)}")
    return " | ".join(parts)
