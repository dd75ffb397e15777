"""Input-pipeline throughput next to the model's training throughput (issue 3 section 2, issue 7).

Measures images/s of
- the in-memory CIFAR-10 path (uint8 on the device, batched augmentation) with the default
  augmentation, with RandAugment, with TrivialAugment, and with a full DeiT-style recipe;
- the folder path (DataLoader workers decode JPEGs) on ``imagenette_subset`` at 64, 128 and 224 px;
- one training step (forward, backward, AdamW) of ``vit_cifar_patch4_32`` in the same run,
and prints each pipeline's ratio to the model (target: >= 5x). Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_data.py [--device cuda] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import vitkit
from vitkit.data import DataConfig
from vitkit.data.throughput import pipeline_throughput

DATA = Path(os.environ.get("VITKIT_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")

MEMORY_CASES = {
    "cifar10 default (crop+flip)": {},
    "cifar10 + randaugment": {"auto_augment": "randaugment"},
    "cifar10 + trivialaugment": {"auto_augment": "trivialaugment"},
    "cifar10 DeiT recipe": {"crop": "random_resized_crop", "auto_augment": "randaugment", "mixup_alpha": 0.8,
                            "cutmix_alpha": 1.0, "random_erasing": 0.25, "label_smoothing": 0.1},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(name: str, batch_size: int, device: torch.device, steps: int, repeats: int) -> list[float]:
    """Training images/s of ``name``: forward, cross-entropy, backward, AdamW step (fp32)."""
    model = vitkit.create_model(name).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = model.cfg if hasattr(model, "cfg") else vitkit.get_model_config(name)
    images = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed batches per repeat (in-memory path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="vit_cifar_patch4_32")
    parser.add_argument("--model-steps", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224], help="folder path image sizes")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (folder path)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = time_model(args.model, args.batch_size, device, args.model_steps, args.repeats)
    model_rate = statistics.median(model)
    rows = [(f"model {args.model} train step", model)]
    for label, overrides in MEMORY_CASES.items():
        config = DataConfig("cifar10", data_dir=str(DATA), batch_size=args.batch_size, **overrides)
        rows.append((label, pipeline_throughput(config, device, steps=args.steps, repeats=args.repeats)))
    for size in args.sizes:
        config = DataConfig(f"folder:{DATA / 'imagenette_subset'}", img_size=size, batch_size=min(args.batch_size, 100),
                            crop="random_resized_crop", num_workers=args.workers)
        rows.append((f"imagenette folder {size}px rrc+flip, {args.workers} workers",
                     pipeline_throughput(config, device, repeats=args.repeats)))

    machine = f"{platform.node()} {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                               f" ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})")
    print(f"input pipeline vs model training throughput on {machine}, batch {args.batch_size}")
    print(f"{'path':52s} {'img/s min':>10s} {'median':>10s} {'max':>10s} {'x model':>8s}")
    results = []
    for label, rates in rows:
        median = statistics.median(rates)
        print(f"{label:52s} {min(rates):10.0f} {median:10.0f} {max(rates):10.0f} {median / model_rate:8.1f}")
        results.append({"path": label, "images_per_s": rates, "median": median, "ratio_to_model": median / model_rate})
    print("target: every pipeline row >= 5.0x the model")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "batch_size": args.batch_size, "results": results},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
