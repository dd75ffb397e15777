"""What test-time augmentation beyond flips buys: one trained model, the test split, several view sets.

Each test image is seen as itself, mirrored, and shifted by one pixel up-left and down-right (reflect
padding), mirrored or not: six forward passes. The script prints the top-1 of: one view, flip (what
``eval_hflip_tta`` does: 2 passes), airbench's flip + translate weighting (the unshifted pair 0.5, each
shifted pair 0.25) and all six views equally weighted (6 passes each)::

    PYTHONPATH=src python benchmarks/tta_views.py runs/RUN/model [--dataset cifar10]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from vitkit.data import DataConfig, build_data
from vitkit.resolver import load_source
from vitkit.train.evaluate import shift

VIEWS = {
    "id": lambda x: x,
    "flip": lambda x: x.flip(-1),
    "up_left": lambda x: shift(x, -1, -1),
    "down_right": lambda x: shift(x, 1, 1),
    "up_left_flip": lambda x: shift(x.flip(-1), -1, -1),
    "down_right_flip": lambda x: shift(x.flip(-1), 1, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="any model SOURCE vitkit eval takes (a run, a checkpoint, a model directory)")
    parser.add_argument("--dataset", default="cifar10")
    args = parser.parse_args()
    model = load_source(args.source).model.eval()
    pre = model.config.preprocessing()
    size = model.config.image_hw[0]
    data = build_data(DataConfig(dataset=args.dataset, img_size=size, batch_size=1, eval_batch_size=500,
                                 mean=pre.mean, std=pre.std, eval_crop_pct=pre.crop_pct,
                                 eval_interpolation=pre.interpolation, in_chans=model.config.in_chans))
    logits: dict[str, list[Tensor]] = {name: [] for name in VIEWS}
    labels = []
    with torch.inference_mode():
        for images, targets in data.val.batches():
            labels.append(targets)
            for name, view in VIEWS.items():
                logits[name].append(model(view(images)))
    target = torch.cat(labels)
    out = {name: torch.cat(chunks) for name, chunks in logits.items()}

    def top1(scores: Tensor) -> float:
        return 100 * (scores.argmax(1) == target).float().mean().item()

    shifted = out["up_left"] + out["up_left_flip"] + out["down_right"] + out["down_right_flip"]
    rows = {
        "one view (no TTA)": out["id"],
        "flip (2 passes)": out["id"] + out["flip"],
        "flip + translate, airbench weights (6)": 0.5 * (out["id"] + out["flip"]) + 0.25 * shifted,
        "flip + translate, equal weights (6)": sum(out.values()),
    }
    print(f"{args.source} on {args.dataset} ({len(target)} images), top-1 %:")
    for name, scores in rows.items():
        print(f"  {name:<42} {top1(scores):.2f}")


if __name__ == "__main__":
    main()
