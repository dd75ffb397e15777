"""The training FLOPs of docs/study.md's data study, recounted without retraining.

A cell's training FLOPs are its FLOPs per training image (one forward + backward pass, counted by
``vitkit.study.training_flops_per_sample``, the bench counter) times the samples it saw (its optimizer
steps x batch size). Neither depends on the training run itself, only on the model and on the plan, so
the study's FLOP columns can be recomputed from the same plan the study made; its accuracies do not
change. Also prints what PyTorch's plain ``FlopCounterMode`` (the study's counter before) gave::

    PYTHONPATH=src python benchmarks/study_flops.py
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitkit
from vitkit.study import data_steps_per_epoch, plan_data_study, training_flops_per_sample
from vitkit.train.config import load_config

MODELS = ["vit_mini_patch4_32", "vit_convstem_cifar_32", "resnet20_cifar"]
FRACTIONS = [0.02, 0.1, 0.3, 1.0]
OVERRIDES = ["--data.dataset", "cifar10", "--batch_size", "128", "--optim.warmup_epochs", "0.1"]


def plain_counter_flops_per_sample(model: torch.nn.Module) -> float:
    """The study's count before: a plain FlopCounterMode with attention forced onto the math kernel."""
    h, w = model.config.image_hw
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, model.config.in_chans, h, w)).float().logsumexp(dim=-1).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def main() -> None:
    base = load_config("cifar10_convstem", OVERRIDES)
    steps = data_steps_per_epoch(base)
    cells = plan_data_study(MODELS, FRACTIONS, 1, steps)
    per_sample = {}
    print("| model | plain counter MFLOPs/image | bench counter MFLOPs/image | ratio |")
    print("|---|---|---|---|")
    for name in MODELS:
        model = vitkit.create_model(name)
        per_sample[name] = training_flops_per_sample(model)
        plain = plain_counter_flops_per_sample(model)
        print(f"| {name} | {plain / 1e6:.1f} | {per_sample[name] / 1e6:.1f} | {per_sample[name] / plain:.2f} |")
    print()
    print("| model | fraction | epochs | steps | samples seen | train TFLOPs |")
    print("|---|---|---|---|---|---|")
    for cell in cells:
        n_steps = cell.epochs * steps(cell.fraction)
        samples = n_steps * base.data.batch_size * base.optim.accum_steps
        print(f"| {cell.model} | {cell.fraction:g} | {cell.epochs} | {n_steps} | {samples:,} | "
              f"{per_sample[cell.model] * samples / 1e12:.2f} |")


if __name__ == "__main__":
    main()
