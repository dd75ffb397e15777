"""MAE evidence on a CPU scale (issue 14): does masked-autoencoder pre-training help a small ViT on CIFAR-10?

1. Time one MAE pre-training step and one supervised step of the same ViT back to back (alternating, medians),
   so that a wall-clock budget becomes step counts that do not depend on the machine's load at the moment.
2. Pre-train ``mae_vit_mini_patch4_32`` (vit_mini_patch4_32 + a 128-d 2-block decoder, norm_pix_loss) with
   ``vitkit pretrain --config mae_cifar10`` on the 50,000 training images (no labels) for P steps.
3. For 1%, 10% and 100% of the labels: ``vitkit finetune --init PRETRAIN_RUN`` (MAE's recipe: average pool +
   fresh fc_norm, layer decay 0.75, drop path 0.1, AdamW blr 1e-3) for F steps, against ``vitkit train`` of
   the same ViT (same pooling, drop path and augmentation) from scratch for F + P x (MAE step / supervised
   step) steps: the same total time, pre-training included.
4. Few-shot (1/5/10/25 shots, ridge) and a full linear probe (logistic regression on standardised
   features, i.e. MAE's non-affine BatchNorm protocol) of the MAE encoder's class token, against the same
   ViT with random weights.

Both arms use light augmentation (random crop with 4-pixel padding, flips, label smoothing 0.1): MAE's full
fine-tuning augmentation (RandAugment, mixup, cutmix, erasing) is for 100-epoch schedules, not minutes.
Accuracy is on a fixed stratified 2,000-image subset of the CIFAR-10 test split (200 per class; the
standard error of an accuracy near 50% is 1.1 points), so that evaluations stay cheap.

Not a test: prints a table (and writes OUT/evidence.md, .json, reconstruction.png).

    nice -n 5 python benchmarks/mae_evidence.py --budget-minutes 20 --out runs/mae-evidence

Data: $VITKIT_DATA, else ../shared/data next to the repository (read only; the test subset is written to OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitkit.cli import main as vitkit  # noqa: E402
from vitkit.models.registry import build_registered  # noqa: E402

ENCODER = "vit_mini_patch4_32"
MAE = "mae_vit_mini_patch4_32"
BATCH = 64
FRACTIONS = (0.01, 0.1, 1.0)
LIGHT_AUG = ["--crop", "random_crop", "--crop_padding", "4", "--hflip", "true", "--auto_augment", "null",
             "--mixup_alpha", "0", "--cutmix_alpha", "0", "--random_erasing", "0", "--label_smoothing", "0.1"]
TRAIN_IMAGES = 50_000


def data_root(out: Path) -> Path:
    """OUT/data/cifar10: the full training split (linked) and a stratified 2,000-image test subset."""
    source = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data")) / "cifar10"
    target = out / "data" / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.npz", "meta.json"):
        if not (target / name).exists():
            (target / name).symlink_to((source / name).resolve())
    if not (target / "test.npz").exists():
        with np.load(source / "test.npz") as test:
            images, labels = test["images"], test["labels"]
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:200] for c in range(10)]))
        np.savez(target / "test.npz", images=images[keep], labels=labels[keep])
    return target.parent


def time_steps(pairs: int = 6) -> dict[str, float]:
    """Median seconds of one optimizer step (batch 64) of the MAE and of the supervised ViT, measured
    alternately so that both see the same load: wall-clock seconds (what the budget is spent in) and this
    process's CPU seconds (all threads), whose ratio other processes' load disturbs far less."""
    torch.manual_seed(0)
    mae = build_registered(MAE, norm_pix_loss=True)
    vit = build_registered(ENCODER, global_pool="avg", fc_norm=True, drop_path_rate=0.1)
    opt_mae, opt_vit = torch.optim.AdamW(mae.parameters()), torch.optim.AdamW(vit.parameters())
    images, labels = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def mae_step() -> None:
        loss, _, _ = mae(images)
        loss.backward()
        opt_mae.step()
        opt_mae.zero_grad()

    def vit_step() -> None:
        F.cross_entropy(vit(images), labels).backward()
        opt_vit.step()
        opt_vit.zero_grad()

    mae_step(), vit_step()  # warm-up
    times: dict[str, list[float]] = {"mae": [], "supervised": [], "mae_cpu": [], "supervised_cpu": []}
    for _ in range(pairs):
        for name, step in (("mae", mae_step), ("supervised", vit_step)):
            start, cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            times[f"{name}_cpu"].append(time.process_time() - cpu)
    return {name: statistics.median(values) for name, values in times.items()}


def run(args: list[str], log: list[dict[str, Any]], label: str) -> float:
    """Run one vitkit command in-process; record its wall time and the load average around it."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    code = vitkit(args)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"{label}: `vitkit {' '.join(args)}` exited {code}")
    log.append(dict(label=label, command="vitkit " + " ".join(args), seconds=round(seconds, 1),
                    load=[round(load_before, 1), round(os.getloadavg()[0], 1)]))
    print(f"[{label}] {seconds:.0f} s, load {load_before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return seconds


def final_record(run_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "epoch"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=20.0,
                        help="wall-clock minutes of training (all runs together) at the load of the timing")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "mae-evidence")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    root = data_root(out)
    common = ["--data_dir", str(root), "--out_dir", str(out), "--progress", "plain", "--ckpt_every_steps", "0",
              "--eval_batch_size", "500", "--batch_size", str(BATCH), "--eval_every", "100000"]  # evaluate at the end
    log: list[dict[str, Any]] = []
    started = time.perf_counter()

    # 1. back-to-back timing -> step counts
    step = time_steps()
    ratio = step["mae_cpu"] / step["supervised_cpu"]  # the cost of an MAE step in supervised steps
    sup_equivalents = args.budget_minutes * 60 / step["supervised"]
    # total = P*ratio (pre-train) + 3 F (fine-tunes) + 3 (F + P*ratio) (scratch) = 4 P ratio + 6 F, F = P ratio / 2
    pretrain_steps = max(10, round(sup_equivalents / 7 / ratio))
    finetune_steps = max(5, round(pretrain_steps * ratio / 2))
    scratch_steps = finetune_steps + round(pretrain_steps * ratio)
    print(f"step times (median of 6, batch {BATCH}): MAE {step['mae']:.3f} s wall / {step['mae_cpu']:.3f} s CPU, "
          f"supervised {step['supervised']:.3f} s / {step['supervised_cpu']:.3f} s (CPU ratio {ratio:.3f}); "
          f"budget {args.budget_minutes} min -> pre-train {pretrain_steps} steps, fine-tune {finetune_steps}, "
          f"scratch {scratch_steps} (load {os.getloadavg()[0]:.1f})", flush=True)

    # 2. pre-train
    pre_dir = out / "pretrain"
    warmup = 0.05 * pretrain_steps / (TRAIN_IMAGES // BATCH)  # 5% of the steps, as the official 40 of 800 epochs
    run(["pretrain", "--config", "mae_cifar10", "--run_name", "pretrain", "--max_steps", str(pretrain_steps),
         "--warmup_epochs", f"{warmup:.4f}", "--log_every", "10", *common], log, "pretrain")
    pre_record = final_record(pre_dir)

    # 3. fine-tune vs scratch, per label fraction
    rows = []
    for fraction in FRACTIONS:
        labelled = round(TRAIN_IMAGES * fraction)
        per_epoch = max(1, labelled // BATCH)
        tag = f"{fraction:g}"
        fraction_args = [] if fraction == 1.0 else ["--train_fraction", str(fraction)]
        ft_warmup = f"{0.1 * finetune_steps / per_epoch:.4f}"
        run(["finetune", "--init", str(pre_dir), "--dataset", "cifar10", "--run_name", f"finetune-{tag}",
             "--max_steps", str(finetune_steps), "--epochs", "100000", "--warmup_epochs", ft_warmup,
             "--log_every", "10", *fraction_args, *LIGHT_AUG, *common], log, f"finetune {tag}")
        run(["train", "--config", "cifar10_vit", "--model", ENCODER, "--model.global_pool", "avg",
             "--model.fc_norm", "true", "--model.drop_path_rate", "0.1", "--model.head_init", "zeros",
             "--dataset", "cifar10", "--run_name", f"scratch-{tag}",
             "--max_steps", str(scratch_steps), "--epochs", "100000", "--lr", "1e-3", "--weight_decay", "0.05",
             "--clip_grad", "1.0", "--warmup_epochs", f"{0.1 * scratch_steps / per_epoch:.4f}",
             "--log_every", "10", *fraction_args, *LIGHT_AUG, *common], log, f"scratch {tag}")
        rows.append(dict(fraction=fraction, labelled=labelled,
                         finetune_acc=final_record(out / f"finetune-{tag}")["val_acc"],
                         scratch_acc=final_record(out / f"scratch-{tag}")["val_acc"]))

    # 4. frozen features: MAE encoder vs random init
    probes = {}
    for name, source in (("mae", [str(pre_dir)]), ("random", [ENCODER, "--random-init"])):
        path = out / f"fewshot-{name}.json"
        run(["fewshot", *source, "--dataset", "cifar10", "--data-dir", str(root), "--probe", "--max-train", "5000",
             "--seeds", "3", "--json", str(path)], log, f"fewshot {name}")
        probes[name] = json.loads(path.read_text())

    shutil.copy(pre_dir / "reconstruction.png", out / "reconstruction.png")
    total = time.perf_counter() - started
    result = dict(step_seconds=step, ratio=ratio, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                  scratch_steps=scratch_steps, pretrain_val_loss=pre_record["val_loss"], rows=rows, probes=probes,
                  runs=log, total_seconds=round(total, 1), torch_threads=torch.get_num_threads())
    (out / "evidence.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    (out / "evidence.md").write_text(table + "\n")
    print(table)


def format_table(r: dict[str, Any]) -> str:
    lines = [f"MAE pre-training: {r['pretrain_steps']} steps x {BATCH} images (val loss {r['pretrain_val_loss']:.4f}); "
             f"fine-tune {r['finetune_steps']} steps; scratch {r['scratch_steps']} steps "
             f"(MAE step / supervised step = {r['ratio']:.3f} in CPU seconds, measured back to back; "
             f"{r['step_seconds']['supervised']:.2f} s wall per supervised step)", "",
             "| labels | MAE pre-train + fine-tune | scratch, same total time | difference |",
             "| --- | --- | --- | --- |"]
    for row in r["rows"]:
        diff = 100 * (row["finetune_acc"] - row["scratch_acc"])
        lines.append(f"| {100 * row['fraction']:g}% ({row['labelled']:,}) | {100 * row['finetune_acc']:.2f}% | "
                     f"{100 * row['scratch_acc']:.2f}% | {diff:+.2f} |")
    lines += ["", "| frozen features | " + " | ".join(f"{s['shots']}-shot" for s in r["probes"]["mae"]["fewshot"])
              + " | linear probe |", "| --- " * (len(r["probes"]["mae"]["fewshot"]) + 2) + "|"]
    for name, label in (("mae", "MAE encoder"), ("random", "random init")):
        p = r["probes"][name]
        shots = " | ".join(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" for s in p["fewshot"])
        lines.append(f"| {label} | {shots} | {100 * p['probe']['test_accuracy']:.2f}% |")
    lines += ["", "| run | seconds | load avg (before -> after) | command |", "| --- | --- | --- | --- |"]
    for run_ in r["runs"]:
        lines.append(f"| {run_['label']} | {run_['seconds']} | {run_['load'][0]} -> {run_['load'][1]} | "
                     f"`{run_['command']}` |")
    lines.append(f"\ntotal {r['total_seconds'] / 60:.1f} min; torch threads {r['torch_threads']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
