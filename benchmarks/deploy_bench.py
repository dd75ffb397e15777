"""What deployment costs and buys on CPU: one trained model as eager fp32, onnxruntime fp32 and onnxruntime
int8 (dynamic, Linear layers), exported and validated by ``vitkit export``; top-1 of each on the test split,
agreement with the eager model, and images/s at batch 1 and 32 (timed round robin, so all three see the same
machine state). Prints markdown tables with the load average and the host's matmul peak::

    PYTHONPATH=src python benchmarks/deploy_bench.py RUN_OR_MODEL [--test-images 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from vitkit.bench.peak import MatmulPeak
from vitkit.bench.timing import Stats, time_round_robin
from vitkit.data import eval_transform, load_split
from vitkit.deploy import OnnxModel, export_model, validation_images
from vitkit.deploy.validate import logits_of
from vitkit.resolver import load_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a trained model SOURCE (run directory, model directory, checkpoint)")
    parser.add_argument("--dataset", default=None, help="test data (default: the model's data set)")
    parser.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--out-dir", default=None, help="keep the ONNX files here (default: a temporary folder)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    resolved = load_source(args.source)
    eager = resolved.model.eval()
    config = eager.config
    dataset = args.dataset or config.preprocessing().dataset or (resolved.training_config or {})["data"]["dataset"]
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="vitkit-deploy-"))
    out.mkdir(parents=True, exist_ok=True)
    validation = validation_images(config, dataset, 256)
    paths = {"fp32": out / "model.onnx", "int8": out / "model.int8.onnx"}
    for name, path in paths.items():
        report = export_model(eager, path, format="onnx", validation=validation, int8=name == "int8")
        for result, _ in report.checks:
            print(f"# export check: {result.format()}")
    runtimes = {"eager fp32": eager, "onnxruntime fp32": OnnxModel(paths["fp32"], threads=args.threads),
                "onnxruntime int8": OnnxModel(paths["int8"], threads=args.threads)}

    split = load_split(dataset, "test")
    count = min(args.test_images or len(split), len(split))
    split = split.subset(np.arange(count), f"first{count}")
    transform = eval_transform(config)
    images = torch.cat(list(split.batches(transform, 256)))
    labels = torch.as_tensor(split.labels)
    logits = {name: logits_of(model, images, 256) for name, model in runtimes.items()}
    reference = logits["eager fp32"]
    print(f"\n## {resolved.description}\n")
    print(f"accuracy on the first {count} images of {dataset}'s test split ({split.location}):\n")
    print("| runtime | top-1 | top-1 agreement with eager | max abs logit diff | mean abs logit diff | file MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in logits.items():
        top1 = float((values.argmax(-1) == labels).float().mean())
        agree = float((values.argmax(-1) == reference.argmax(-1)).float().mean())
        diff = (values - reference).abs()
        size = "-" if name == "eager fp32" else f"{paths[name.split()[-1]].stat().st_size / 2 ** 20:.2f}"
        print(f"| {name} | {100 * top1:.2f}% | {100 * agree:.2f}% | {float(diff.max()):.2e} | "
              f"{float(diff.mean()):.2e} | {size} |")

    load_before = os.getloadavg()[0]
    peak = MatmulPeak(torch.device("cpu"), torch.float32)
    rates: dict[tuple[str, int], list[float]] = {}
    for batch, calls in ((1, 64), (32, 4)):
        x = images[:batch].contiguous()
        candidates = {name: (lambda m=model, x=x: _infer(m, x)) for name, model in runtimes.items()}
        peak.sample()
        seconds = time_round_robin(candidates, warmup=3, repeats=args.repeats, calls_per_repeat=calls)
        for name in runtimes:
            rates[(name, batch)] = [batch / s for s in seconds[name]]
    load_after = os.getloadavg()[0]
    peak.sample()
    peak_gflops = Stats.of(peak.samples).median / 1e9
    print(f"\nimages/s (median of {args.repeats} rounds, min-max), {args.threads} thread(s), "
          f"{platform.processor() or ''} {os.cpu_count()} CPUs; load average {load_before:.2f} -> {load_after:.2f}; "
          f"matmul peak {peak_gflops:.0f} GFLOP/s (2048^3 fp32 torch.mm, {len(peak.samples)} samples around the "
          "timing):\n")
    print("| runtime | batch 1 | batch 32 |")
    print("| --- | --- | --- |")
    for name in runtimes:
        cells = []
        for batch in (1, 32):
            s = Stats.of(rates[(name, batch)])
            cells.append(f"{s.median:.0f} ({s.min:.0f}-{s.max:.0f})")
        print(f"| {name} | {' | '.join(cells)} |")


@torch.inference_mode()
def _infer(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x)


if __name__ == "__main__":
    main()
