"""Time `vitkit analyze` stage by stage, against the model's plain forward pass on the same images.

    PYTHONPATH=src python benchmarks/analysis_speed.py --model vit_cifar_patch4_32 --dataset cifar10 --images 128

The reference is what inference alone costs (``model(images)`` on the same batch sizes), so the ratio
says how much the attention-probability path, the reductions, the figures and the report add.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitkit import create_model
from vitkit.analysis import analyze
from vitkit.analysis.inputs import load_images, prepare_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_cifar_patch4_32")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="report the fastest of this many runs")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    best = None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            analyze(args.model, args.dataset, out, num_images=args.images, batch_size=args.batch_size,
                    data_dir=args.data_dir)
            total = time.perf_counter() - start
            seconds = json.loads((Path(out) / "summary.json").read_text())["seconds"]
        if best is None or total < best[0]:
            best = (total, seconds)
    total, seconds = best

    model = create_model(args.model).eval()
    sample = load_images(args.dataset, args.images, data_dir=args.data_dir)
    inputs, _ = prepare_images(sample, model)
    forward = float("inf")
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            for first in range(0, len(inputs), args.batch_size):
                model(inputs[first:first + args.batch_size])
            forward = min(forward, time.perf_counter() - start)

    print(f"{args.model} on {args.images} {args.dataset} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, loaded shared CPU machine (best of {args.repeats})")
    print(f"{'stage':28s} {'seconds':>8s}")
    for stage in ("load", "weights", "attention", "report"):
        print(f"{stage:28s} {seconds[stage]:8.2f}")
    print(f"{'total (wall, incl. imports)':28s} {total:8.2f}")
    print(f"{'reference: model forward':28s} {forward:8.2f}")
    print(f"{'attention stage / forward':28s} {seconds['attention'] / forward:8.2f}x")


if __name__ == "__main__":
    main()
