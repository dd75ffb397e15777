"""Evidence for `vitkit analyze`: train a small ViT on CIFAR-10 briefly, on all of the training set and
on a small subset (same number of steps), then analyse both and an untrained control.

A plain PyTorch loop on purpose (the training module lives elsewhere); CPU-friendly: a few minutes per
model. Prints one table and writes each report under ``--out``:

    PYTHONPATH=src python benchmarks/analysis_evidence.py --seconds 270 --fraction 0.05
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitkit import ViTConfig, build_model
from vitkit.analysis import analyze
from vitkit.data.sources import locate_named

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CONFIG = ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=6, num_heads=8, mlp_dim=128,
                   extra={"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(data_dir / "cifar10" / f"{split}.npz", allow_pickle=False) as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data["labels"])
    return images, labels


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        count = max(1, round(fraction * len(members)))
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(keep)


def normalise(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    return (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel padding and horizontal flip, on a uint8 batch."""
    batch = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, batch), generator=generator)
    crops = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(batch)])
    flip = torch.rand(batch, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def train(images: torch.Tensor, labels: torch.Tensor, steps: int, *, batch_size: int, lr: float, seed: int,
          seconds: float | None = None) -> tuple[torch.nn.Module, int, float]:
    """AdamW with linear warm-up and cosine decay over ``steps``; stops early after ``seconds`` if given."""
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in model.no_weight_decay()]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.999))
    warmup = max(1, steps // 20)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    while step < steps and (seconds is None or time.perf_counter() - start < seconds):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(order) - batch_size + 1, batch_size):
            if step >= steps or (seconds is not None and time.perf_counter() - start >= seconds):
                break
            cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
            scale = (step + 1) / warmup if step < warmup else cosine
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            index = order[first:first + batch_size]
            x = normalise(augment(images[index], generator))
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"  step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval(), step, time.perf_counter() - start


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for first in range(0, len(images), 500):
        logits = model(normalise(images[first:first + 500]))
        correct += (logits.argmax(-1) == labels[first:first + 500]).sum().item()
    return correct / len(images)


def summarise(report_dir: Path) -> dict[str, float]:
    summary = json.loads((report_dir / "summary.json").read_text())
    layers = summary["mean_attention_distance_by_layer"]
    by_distance = {d["distance_patches"]: d["mean_similarity"] for d in summary["position_similarity_by_distance"]}
    far = [s for d, s in by_distance.items() if d >= 4]
    return {
        "layer1_min": layers[0]["min_px"], "layer1_max": layers[0]["max_px"],
        "first_median": layers[0]["median_px"], "last_median": layers[-1]["median_px"],
        "pos_sim_d1": by_distance[1], "pos_sim_far": float(np.mean(far)),
        "pca_top28": float(sum(summary["filters_explained_variance_ratio"])),
        "uniform": summary["uniform_attention_distance_px"],
        "analyze_s": sum(summary["seconds"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=270.0, help="training time budget per model")
    parser.add_argument("--steps", type=int, default=None, help="steps per model (default: as many as fit --seconds)")
    parser.add_argument("--fraction", type=float, default=0.05, help="training-set fraction of the little-data model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--images", type=int, default=128, help="images per analysis")
    parser.add_argument("--out", default="runs/analysis_evidence")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on an oversubscribed shared machine more threads only contend)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = locate_named("cifar10", args.data_dir).parent  # the data roots every command uses
    out = Path(args.out)
    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "test")
    test_x, test_y = test_x[:args.eval_images], test_y[:args.eval_images]

    steps = args.steps
    if steps is None:  # calibrate: how many steps fit the budget on this (shared) machine
        _, probe_steps, probe_seconds = train(train_x, train_y, 10**9, batch_size=args.batch_size, lr=args.lr,
                                              seed=0, seconds=10.0)
        steps = max(50, int(probe_steps / probe_seconds * args.seconds))
        print(f"calibration: {probe_steps / probe_seconds:.2f} steps/s -> {steps} steps per model", flush=True)

    subset = stratified_subset(train_y, args.fraction, seed=0)
    plans = {"untrained": (None, 0), "full": (torch.arange(len(train_x)), 1),
             f"subset{round(100 * args.fraction)}pct": (subset, 1)}
    runs = {}
    for name, (index, seed) in plans.items():
        directory = out / name / "model"
        if (directory / "model.safetensors").is_file():  # finished earlier: resume with the next one
            meta = json.loads((out / name / "train.json").read_text())
            runs[name] = meta
            print(f"{name}: already trained ({directory})", flush=True)
            continue
        if index is None:
            torch.manual_seed(seed)
            model, done, seconds = build_model(CONFIG).eval(), 0, 0.0
        else:
            print(f"{name}: training on {len(index)} images for {steps} steps", flush=True)
            model, done, seconds = train(train_x[index], train_y[index], steps, batch_size=args.batch_size,
                                         lr=args.lr, seed=seed)
        model.save_pretrained(directory)
        meta = {"train_images": 0 if index is None else len(index), "steps": done, "seconds": seconds,
                "test_accuracy": accuracy(model, test_x, test_y)}
        (out / name / "train.json").write_text(json.dumps(meta, indent=1) + "\n")
        runs[name] = meta

    rows = []
    for name, meta in runs.items():
        analyze(str(out / name / "model"), "cifar10", out / name / "report", num_images=args.images,
                data_dir=data_dir)
        rows.append((name, meta["train_images"], meta["steps"], meta["seconds"], meta["test_accuracy"],
                     summarise(out / name / "report")))

    print("\nloaded shared CPU machine; model: ViT D64, depth 6, 8 heads, patch 4, 32px; distances in pixels "
          f"(uniform attention = {rows[0][5]['uniform']:.1f} px)")
    header = (f"{'model':14s} {'train imgs':>10s} {'steps':>6s} {'train s':>7s} {'test acc':>8s} {'L1 min':>7s} "
              f"{'L1 max':>7s} {'L1 med':>7s} {'L6 med':>7s} {'pos d=1':>7s} {'pos d>=4':>8s} {'PCA28':>6s} "
              f"{'analyze s':>9s}")
    print(header)
    for name, train_images, done, seconds, acc, s in rows:
        print(f"{name:14s} {train_images:10d} {done:6d} {seconds:7.0f} {acc:8.3f} {s['layer1_min']:7.2f} "
              f"{s['layer1_max']:7.2f} {s['first_median']:7.2f} {s['last_median']:7.2f} {s['pos_sim_d1']:7.3f} "
              f"{s['pos_sim_far']:8.3f} {s['pca_top28']:6.3f} {s['analyze_s']:9.1f}")


if __name__ == "__main__":
    main()
