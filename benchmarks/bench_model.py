"""Speed of vitkit's ViT against timm's VisionTransformer on the same config, in one run.

Forward (inference) and forward + backward (a full AdamW training step) for each model and batch
size given, timed round-robin in the same process, printed as throughput and the ratio vitkit/timm.
The full record of each run (FLOPs, % of matmul peak, memory) is written as JSON next to the table.

    PYTHONPATH=src python benchmarks/bench_model.py                       # the CIFAR model, batch 128
    PYTHONPATH=src python benchmarks/bench_model.py --models vit_tiny_patch16_224 --batch-sizes 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitkit.bench import BenchSettings, format_table, run_benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_cifar_patch4_32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench_model.json", help="JSON file with every run's full record")
    parser.add_argument("--verbose", action="store_true", help="print each run's full table")
    args = parser.parse_args()

    rows, records = [], []
    for model in args.models:
        for batch_size in args.batch_sizes:
            settings = BenchSettings(model=model, batch_size=batch_size, precision=args.precision,
                                     compile=args.compile, device=args.device, threads=args.threads,
                                     warmup=args.warmup, repeats=args.repeats)
            tag = f"[{model} b{batch_size}]"
            result = run_benchmark(settings, log=lambda m, tag=tag: print(f"{tag} {m}", file=sys.stderr))
            records.append(result)
            if args.verbose:
                print(format_table(result), "\n")
            runs, ratio = result["runs"], result["ratio_vitkit_over_timm"]
            rows.append((model, batch_size, *(runs[impl][mode]["images_per_s"]["median"]
                                              for mode in ("infer", "train") for impl in ("vitkit", "timm")),
                         ratio["infer"]["median"], ratio["train"]["median"],
                         runs["vitkit"]["train"]["fraction_of_peak"]["median"]))

    machine = records[0]["machine"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{machine['device']}, {machine.get('threads', '-')} threads, {args.precision}, compile={args.compile}, "
          f"load average {load:.1f} at the end (images/s, medians of {args.repeats})")
    print(f"{'model':24s} {'batch':>5s} {'fwd vitkit':>10s} {'fwd timm':>9s} {'train vitkit':>12s} "
          f"{'train timm':>10s} {'fwd ratio':>9s} {'train ratio':>11s} {'train %peak':>11s}")
    for model, bs, fv, ft, tv, tt, rf, rt, frac in rows:
        print(f"{model:24s} {bs:5d} {fv:10.1f} {ft:9.1f} {tv:12.1f} {tt:10.1f} {rf:8.2f}x {rt:10.2f}x "
              f"{100 * frac:10.1f}%")
    Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
    print(f"full records: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
