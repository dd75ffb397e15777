"""The training loop, read top to bottom: set up, then for each epoch, for each batch, step; evaluate
and checkpoint at the end of every epoch.

``train(cfg)`` starts a run, ``resume(run_dir)`` continues one exactly where its last checkpoint left
it. Under ``torchrun`` every process runs this same code on its own shard of each global batch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitkit.checkpoint import CheckpointError, load_weights
from vitkit.data import CorruptImageError, build_data
from vitkit.models.registry import architecture_of
from vitkit.train.checkpoints import CheckpointWriter, capture_rng, load_checkpoint, resolve_checkpoint, restore_rng
from vitkit.train.config import TrainConfig, expand_shortcuts, merge_configs, parse_overrides
from vitkit.train.distributed import (
    World,
    all_reduce_sum,
    any_process,
    broadcast_object,
    gather_objects,
    init_world,
    shutdown,
)
from vitkit.train.ema import ModelEMA
from vitkit.train.evaluate import evaluate
from vitkit.train.monitor import Progress, RunLog, Stopwatch, format_duration
from vitkit.train.optim import build_optimizer, lr_at, set_lr
from vitkit.train.plots import plot_curves
from vitkit.train.rundir import build_run_model, create_run_dir, export_model, write_config
from vitkit.train.runtime import StopSignals, autocast, grad_scaler, resolve_device, seed_everything


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; nothing was saved after it."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving its ``last`` checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def train(cfg: TrainConfig) -> Path:
    """Train a model as ``cfg`` says, in a new run directory, and return that directory."""
    return _run(cfg)


def resume(run_or_checkpoint: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Continue a run from its ``last`` checkpoint (or the given checkpoint file), exactly: same weights,
    optimizer, schedule, EMA, RNG states and data order as if it had never stopped."""
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path)
    changes = expand_shortcuts(parse_overrides(overrides))
    cfg = TrainConfig.from_dict(merge_configs(state["config"], changes), source=f"{path} (its config)")
    return _run(cfg, run_dir=path.parent.parent, state=state)


def _run(cfg: TrainConfig, run_dir: Optional[Path] = None, state: Optional[dict[str, Any]] = None) -> Path:
    world = init_world(resolve_device(cfg.device).type)
    try:
        with StopSignals() as signals:
            return _train(cfg, world, run_dir, state, signals)
    finally:
        shutdown(world)


def _train(cfg: TrainConfig, world: World, run_dir: Optional[Path], state: Optional[dict[str, Any]],
           signals: StopSignals) -> Path:
    # ------------------------------------------------------------------------------------- setup
    device = resolve_device(cfg.device, world.local_rank)
    seed_everything(cfg.seed, cfg.deterministic)  # same seed on every rank: identical initial weights
    data = build_data(cfg.data, device=device, seed=cfg.seed, rank=world.rank, world_size=world.size)
    model = build_run_model(cfg, data).to(device)
    raw_model = model
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    optimizer = build_optimizer(model, cfg.optim)
    scaler = grad_scaler(cfg.precision, device)

    accum = cfg.optim.accum_steps
    steps_per_epoch = len(data.train) // accum  # optimizer steps; leftover batches of an epoch are skipped
    if steps_per_epoch == 0:
        raise ValueError(f"the training set gives {len(data.train)} batch(es) per epoch, fewer than "
                         f"optim.accum_steps={accum}; lower data.batch_size or optim.accum_steps")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    epoch, batch, global_step, best_acc, elapsed = 0, 0, 0, float("-inf"), 0.0
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, correct, n
    if state is not None:
        load_weights(raw_model, state["model"], source="the checkpoint's model weights")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is None:
                raise CheckpointError("ema_decay is set but the checkpoint has no EMA weights")
            ema.load_state_dict(state["ema"])
        epoch, batch, global_step = state["epoch"], state["batch"], state["global_step"]
        best_acc, elapsed = state["best_acc"], state["elapsed"]
        epoch_sums = state["epoch_sums"].to(device)

    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    run_dir = broadcast_object(run_dir or (create_run_dir(cfg) if world.is_main else None), world)
    log = RunLog(run_dir, resume_step=global_step if state else None, enabled=world.is_main)
    checkpoints = CheckpointWriter(run_dir, cfg.keep_last_k)
    progress = Progress(cfg.progress, enabled=world.is_main)
    if world.is_main:
        write_config(cfg, run_dir)
        params = sum(p.numel() for p in raw_model.parameters())
        progress.print(cfg.to_yaml().rstrip())
        progress.print(f"{'resuming' if state else 'starting'} {run_dir} | {cfg.model['name']} ({params / 1e6:.2f}M "
                       f"params) on {cfg.data.dataset} | {world.size} process(es) on {device} | "
                       f"{steps_per_epoch} steps/epoch, global batch {cfg.data.batch_size * world.size * accum}")
        if state:
            progress.print(f"from epoch {epoch + 1}, batch {batch}, optimizer step {global_step}")
    reported_skips: set[str] = set()

    def report_skipped() -> int:
        """Print and log unreadable files left out (``skip_corrupt``) since the last report; their total."""
        skipped = data.skipped_files()
        new = [f for f in skipped if f not in reported_skips]
        if new and world.is_main:
            reported_skips.update(new)
            shown = ", ".join(new[:5]) + (f", ... ({len(new) - 5} more in metrics.jsonl)" if len(new) > 5 else "")
            # a warning, on stderr whatever the progress mode
            print(f"vitkit: skip_corrupt: left out {len(new)} unreadable file(s) ({len(skipped)} in all): {shown}",
                  file=sys.stderr, flush=True)
            log.log("skipped", global_step, count=len(skipped), files=new)
        return len(skipped)

    report_skipped()

    if state is not None and len(state["rng"]) == world.size:
        restore_rng(state["rng"][world.rank])
    else:  # dropout and drop-path draw different masks on each rank
        seed_everything(cfg.seed + 1_000_003 * world.rank + global_step, cfg.deterministic)

    def checkpoint(next_epoch: int, next_batch: int, *, is_best: bool = False) -> None:
        check_finite()
        rngs = gather_objects(capture_rng(), world)  # every rank's dropout stream, saved by rank 0
        if world.is_main:
            checkpoints.save({
                "model": raw_model.state_dict(), "model_config": _config_dict(raw_model),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema else None, "epoch": next_epoch, "batch": next_batch,
                "global_step": global_step, "best_acc": best_acc, "elapsed": clock.elapsed,
                "epoch_sums": epoch_sums.cpu(), "rng": rngs, "config": cfg.to_dict(), "world_size": world.size,
            }, is_best=is_best)
            log.flush()

    nonfinite = torch.zeros((), device=device)

    def check_finite() -> None:
        if any_process(bool(nonfinite.item()), world, device):
            saved = f"the last good checkpoint is {checkpoints.last}" if checkpoints.last.is_file() else \
                "no checkpoint had been written yet"
            raise TrainingDiverged(
                f"non-finite loss or gradient norm by optimizer step {global_step} (epoch {epoch + 1}); training "
                f"stopped and nothing was saved after it; {saved}. Try a lower optim.lr, a longer "
                "optim.warmup_epochs, optim.clip_grad, or bf16 instead of fp16.")

    # -------------------------------------------------------------------------------------- loop
    clock = Stopwatch(elapsed)
    epoch_times: list[float] = []
    criterion = F.cross_entropy  # integer labels or soft (B, K) targets alike
    while epoch < cfg.epochs:
        model.train()
        progress.start_epoch(epoch, cfg.epochs, steps_per_epoch, batch // accum)
        lr = optimizer.param_groups[0]["lr"]
        epoch_start, epoch_cpu, window_start = time.perf_counter(), time.process_time(), time.perf_counter()
        window = torch.zeros(3, dtype=torch.float64, device=device)
        grad_norm = torch.zeros((), device=device)
        resume_batch = batch  # where a checkpoint would continue: after the last optimizer step of this epoch
        train_batches = _saving_on_corrupt(  # saves the position reached when the error comes: late binding
            enumerate(data.train.batches(epoch, batch), start=batch),
            lambda epoch=epoch: checkpoint(epoch, resume_batch), world, checkpoints, run_dir)  # noqa: B023
        for batch, (images, targets) in train_batches:
            if batch >= steps_per_epoch * accum:
                break
            boundary = (batch + 1) % accum == 0
            sync = contextlib.nullcontext() if boundary or not world.distributed else model.no_sync()
            with sync:
                with autocast(cfg.precision, device):
                    logits = model(images)
                loss = criterion(logits.float(), targets)
                scaler.scale(loss / accum).backward()
            with torch.no_grad():
                labels = targets if targets.ndim == 1 else targets.argmax(dim=1)
                n = labels.numel()
                stats = torch.stack([loss.detach().double() * n, (logits.argmax(dim=1) == labels).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=device)])
                window += stats
                epoch_sums += stats
                nonfinite += ~torch.isfinite(loss.detach())
            if not boundary:
                continue

            lr = lr_at(global_step, total_steps=total_steps, warmup_steps=warmup_steps, lr=cfg.optim.lr,
                       min_lr=cfg.optim.min_lr)
            set_lr(optimizer, lr)
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.clip_grad)
                if not scaler.is_enabled():  # with a scaler, overflowing steps are skipped, not fatal
                    nonfinite += ~torch.isfinite(grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(raw_model)
            global_step += 1
            resume_batch = batch + 1
            progress.step()

            if global_step % cfg.log_every == 0:
                check_finite()
                sums = all_reduce_sum(window.clone(), world)
                seconds = time.perf_counter() - window_start
                metrics = dict(loss=float(sums[0] / sums[2]), acc=float(sums[1] / sums[2]), lr=lr,
                               img_per_s=float(sums[2]) / max(seconds, 1e-9))
                if cfg.optim.clip_grad:
                    metrics["grad_norm"] = float(grad_norm)
                log.log("train", global_step, epoch=round(epoch + (batch + 1) / (steps_per_epoch * accum), 4),
                        **metrics)
                progress.show((batch + 1) // accum, metrics["loss"], metrics["acc"], lr, metrics["img_per_s"])
                window.zero_()
                window_start = time.perf_counter()
            stop = any_process(signals.received is not None, world, device)
            if stop or (cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0):
                checkpoint(epoch, batch + 1)
            if stop:
                progress.end_epoch()
                log.close()
                why = signals.name or "a signal on another process"
                raise TrainingInterrupted(
                    f"stopped by {why} at epoch {epoch + 1}, optimizer step {global_step}; saved {checkpoints.last}; "
                    f"continue with: vitkit train --resume {run_dir}", signals.received or 15)
        progress.end_epoch()

        # ----------------------------------------------------------------------------- epoch end
        check_finite()
        train_sums = all_reduce_sum(epoch_sums.clone(), world)
        record: dict[str, Any] = dict(epoch=epoch + 1, train_loss=float(train_sums[0] / train_sums[2]),
                                      train_acc=float(train_sums[1] / train_sums[2]), lr=lr)
        is_best = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            val_batches = _saving_on_corrupt(data.val.batches(), lambda epoch=epoch: checkpoint(epoch + 1, 0), world,
                                             checkpoints, run_dir)
            val = evaluate(raw_model, val_batches, data.num_classes, device=device,
                           precision=cfg.precision, world=world, hflip_tta=cfg.eval_hflip_tta)
            record.update(val_loss=val.loss, val_acc=val.top1, val_top5=val.top5)
            score = val.top1
            if ema is not None:
                val_ema = evaluate(ema.module, data.val.batches(), data.num_classes, device=device,
                                   precision=cfg.precision, world=world, hflip_tta=cfg.eval_hflip_tta)
                record.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.top1, val_top5_ema=val_ema.top5)
                score = val_ema.top1
            is_best = score > best_acc
            best_acc = max(best_acc, score)
            record["best_acc"] = best_acc
        epoch_times.append(time.perf_counter() - epoch_start)
        record["epoch_time"] = epoch_times[-1]
        record["epoch_cpu_time"] = time.process_time() - epoch_cpu  # this process, all threads
        if cfg.data.skip_corrupt:
            record["skipped_files"] = report_skipped()
        eta = sum(epoch_times) / len(epoch_times) * (cfg.epochs - epoch - 1)
        log.log("epoch", global_step, **record)
        if world.is_main and "val_acc" in record:
            plot_curves(run_dir)  # redrawn at each evaluation, so a stopped run has its curves too
        progress.print(_summary_line(record, cfg.epochs, eta, ema is not None))
        epoch, batch = epoch + 1, 0
        epoch_sums.zero_()
        checkpoint(epoch, 0, is_best=is_best)

    # ------------------------------------------------------------------------------------ finish
    if world.is_main:
        final = ema.module if ema is not None else raw_model
        export_model(final, run_dir, best_acc=best_acc, total_time=clock.elapsed, skipped_files=data.skipped_files())
        log.close()
        progress.print(f"done in {format_duration(clock.elapsed)}: best val acc {100 * best_acc:.2f}%; "
                       f"model in {run_dir / 'model'}")
    return run_dir


def _saving_on_corrupt(batches: Iterator[Any], save: Callable[[], None], world: World,
                       checkpoints: CheckpointWriter, run_dir: Path) -> Iterator[Any]:
    """``batches``, but an unreadable image (:class:`CorruptImageError`, raised by the data layer in
    this process) first saves the finished steps, then stops the run with one line naming the file."""
    try:
        yield from batches
    except CorruptImageError as e:
        if world.distributed:  # the other processes are not here to join the checkpoint's collectives
            raise
        save()
        raise CorruptImageError(e.path, f"{e.reason}; saved the finished steps to {checkpoints.last}: remove or "
                                        f"fix the file (or set data.skip_corrupt), then `vitkit train --resume "
                                        f"{run_dir}`") from None


def _summary_line(record: dict[str, Any], epochs: int, eta: float, has_ema: bool) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}",
             f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}%"]
    if "val_acc" in record:
        parts.append(f"val loss {record['val_loss']:.4f} acc {100 * record['val_acc']:.2f}% "
                     f"top5 {100 * record['val_top5']:.2f}%")
        if has_ema:
            parts.append(f"ema acc {100 * record['val_acc_ema']:.2f}%")
        parts.append(f"best {100 * record['best_acc']:.2f}%")
    parts.append(f"{format_duration(record['epoch_time'])}/epoch, ETA {format_duration(eta)}")
    return " | ".join(parts)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    return {"architecture": architecture_of(model.config), **model.config.to_dict()}
