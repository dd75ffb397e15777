"""The numbers of docs/scale.md: ViT-L/16 and ViT-H/14 pre-training on ImageNet-21k (21,843 classes, 224 px) on
1, 8 and 64 GPUs, from vitkit's own memory estimate and FLOP count.

Memory: :func:`vitkit.train.memory.estimate_step_memory` (the estimate ``vitkit train`` checks before its first
step), in bf16 autocast with AdamW, without and with activation checkpointing, FSDP over N processes. Every term
of the estimate is linear in the depth for a stack of identical blocks, so it is probed on the same model with 1
and 2 blocks (real tensors, on the CPU) and extended to the full depth: what a full-depth probe would measure,
without a 2.5 GB model on a laptop. FLOPs: :func:`vitkit.bench.flops.count_flops` of one forward + backward of the
full model on the meta device (no memory, no compute). Step time: FLOPs / (GPUs x peak x MFU), an assumption
printed with the table, not a measurement.

    PYTHONPATH=src python benchmarks/scale_plan.py [--peak-tflops 989 --mfu 0.4 --gpu-gib 80]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

from vitkit import create_model
from vitkit.bench.flops import count_flops
from vitkit.train.memory import StepMemory, estimate_step_memory
from vitkit.train.optim import param_groups

MODELS = {"ViT-L/16": "vit_large_patch16_224", "ViT-H/14": "vit_huge_patch14_224"}
CLASSES, IMAGE, GLOBAL_BATCH = 21843, 224, 4096


@functools.cache
def _estimate(name: str, depth: int, ckpt: bool, shards: int) -> StepMemory:
    torch.manual_seed(0)
    model = create_model(name, depth=depth, num_classes=CLASSES)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, None))
    return estimate_step_memory(model, optimizer, (3, IMAGE, IMAGE), device=torch.device("cpu"), precision="bf16",
                                grad_checkpointing=ckpt, shards=shards,
                                loss_fn=lambda m, x: m(x).float().logsumexp(-1).mean())


def full_depth_estimate(name: str, ckpt: bool, shards: int) -> StepMemory:
    """The estimate of the full-depth model, from the same model with 1 and 2 blocks (linear in the depth)."""
    depth = _depth(name)
    one, two = _estimate(name, 1, ckpt, shards), _estimate(name, 2, ckpt, shards)
    fields = {}
    for f in dataclasses.fields(StepMemory):
        a, b = getattr(one, f.name), getattr(two, f.name)
        fields[f.name] = a if f.name == "gathered" else a + (depth - 1) * (b - a)  # gathered: the largest block
    return StepMemory(**fields)


def _depth(name: str) -> int:
    with torch.device("meta"):
        return create_model(name, num_classes=CLASSES).config.depth


def train_flops_per_image(name: str) -> int:
    with torch.device("meta"):
        model = create_model(name, num_classes=CLASSES)
        images = torch.empty(1, 3, IMAGE, IMAGE)
    return count_flops(model, images, train=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (GiB); 10%% is left free")
    args = parser.parse_args()
    gib = 1024 ** 3
    print(f"assumed: {args.peak_tflops:g} TFLOP/s bf16 peak per GPU, MFU {args.mfu:g}, {args.gpu_gib:g} GiB per GPU; "
          f"global batch {GLOBAL_BATCH}, {IMAGE} px, {CLASSES} classes, bf16 autocast, AdamW")
    print("| model | GPUs | strategy | grad ckpt | weights+grads+AdamW per GPU | activations per image | "
          "micro-batch x accum | memory per GPU | step time (4096 images) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name in MODELS.items():
        flops = train_flops_per_image(name)
        params = sum(p.numel() for p in create_model(name, depth=1, num_classes=CLASSES).parameters())
        print(f"<!-- {label}: {flops / 1e9:.1f} GFLOP per image forward+backward; depth-1 params {params} -->")
        for gpus in (1, 8, 64):
            strategy = "ddp" if gpus == 1 else "fsdp"
            for ckpt in (False, True):
                est = full_depth_estimate(name, ckpt, 1 if gpus == 1 else gpus)
                state = est.weights + est.gradients + est.optimizer_state + est.gathered
                budget = 0.9 * args.gpu_gib * gib
                per_gpu = GLOBAL_BATCH // gpus
                micro = per_gpu
                while micro > 1 and est.per_process(micro) > budget:
                    micro //= 2
                fits = est.per_process(micro) <= budget
                seconds = GLOBAL_BATCH * flops * (4 / 3 if ckpt else 1) / (gpus * args.peak_tflops * 1e12 * args.mfu)
                print(f"| {label} | {gpus} | {strategy} | {'on' if ckpt else 'off'} | {state / gib:.1f} GiB | "
                      f"{est.per_image / 1024 ** 2:.0f} MiB | "
                      f"{f'{micro} x {per_gpu // micro}' if fits else 'does not fit'} | "
                      f"{est.per_process(micro) / gib:.1f} GiB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
