"""Does progressive tokenisation help a ViT from scratch on little data? (T2T-ViT paper, on a CPU scale)

Not a test: runs `vitkit study data` at equal wall-clock budget on CIFAR-10 for three tokenisers in front
of the same backbone (D 128, depth 6, 2 heads, MLP 256), about 0.8-0.9M parameters each:

- ``vit_mini_patch4_32``: 4x4 patches, one linear projection (the plain ViT);
- ``vit_convstem_cifar_32``: three 3x3 conv-BN-ReLU layers (the conv-stem "hybrid");
- ``t2t_vit_mini_32``: three overlapping soft splits with Performer re-structurisation (T2T-ViT).

Every cell gets the same training seconds: the models' seconds per step are first measured back to back
(taking turns, median of 3 rounds, one thread each as every worker), and the budget becomes a fixed step
count per model, so a change of machine load during the study does not favour anyone. The reference is
the plain ViT: the table gives each model's accuracy and its difference to the ViT's, per data fraction.

    python benchmarks/t2t_study.py --out studies/t2t --budget-seconds 90

Resumable (run it again after a kill). Data: $VITKIT_DATA, else ../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("VITKIT_DATA", str(REPO.parent / "shared" / "data"))

MODELS = ["vit_mini_patch4_32", "vit_convstem_cifar_32", "t2t_vit_mini_32"]
FRACTIONS = [0.02, 0.1, 0.3, 1.0]  # the data study of docs/study.md
# The study pipeline of docs/study.md (the conv-stem recipe's), warm-up shortened to fit the budget, and
# no flip test-time augmentation (it doubles the evaluation, which is not part of the training budget).
OVERRIDES = ["--batch_size", "128", "--optim.warmup_epochs", "0.02", "--eval_hflip_tta", "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="studies/t2t")
    parser.add_argument("--budget-seconds", type=float, default=90.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                        help="training-set fractions (default: the data study's)")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]

    from vitkit.study import study

    load_before = os.getloadavg()
    start = time.time()
    rows = study("data", models=MODELS, fractions=fractions, dataset="cifar10", out_dir=args.out,
                 workers=args.workers, config="cifar10_convstem", overrides=OVERRIDES,
                 budget_seconds=args.budget_seconds)
    wall = time.time() - start
    timed = json.loads((Path(args.out) / "step_seconds.json").read_text())
    by = {(r["model"], r["fraction"]): r for r in rows}
    lines = ["| training images | " + " | ".join(MODELS) + " | T2T - ViT | T2T - conv stem |",
             "|---" * (len(MODELS) + 3) + "|"]
    for fraction in fractions:
        cells = [by.get((m, fraction)) for m in MODELS]
        if None in cells:
            continue
        acc = [100 * c["test_acc"] for c in cells]
        lines.append(f"| {cells[0]['train_size']:,} ({fraction:g}) | "
                     + " | ".join(f"{a:.2f}% ({c['steps']} steps)" for a, c in zip(acc, cells))
                     + f" | {acc[2] - acc[0]:+.2f} | {acc[2] - acc[1]:+.2f} |")
    params = {r["model"]: r["params"] for r in rows}
    print("\n".join(lines))
    print("parameters: " + ", ".join(f"{m} {params.get(m, 0) / 1e6:.2f}M" for m in MODELS))
    print("seconds per step (batch 128, 1 thread, back to back): "
          + ", ".join(f"{m} {timed['seconds'][m]:.3f}" for m in MODELS))
    print("training seconds per cell (measured): "
          + ", ".join(f"{r['model']}@{r['fraction']:g} {r['train_seconds']:.0f}" for r in rows))
    print(f"wall {wall / 60:.1f} min; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
