"""The ``vitkit`` command line: it parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _cmd_models(args: argparse.Namespace) -> int:
    from vitkit.models.registry import get_model_entry, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if args.build:
        from vitkit.models.registry import create_model

        print(f"{'model':34s} {'params':>13s} {'img':>5s} {'patch':>5s}  description")
    for name in names:
        entry = get_model_entry(name)
        if args.build:
            model = create_model(name)
            params = sum(p.numel() for p in model.parameters())
            cfg = entry.config
            print(f"{name:34s} {params:13,d} {str(cfg.img_size):>5s} {getattr(cfg, 'patch_size', '-')!s:>5s}  "
                  f"{entry.description}")
        else:
            print(f"{name:34s} {entry.description}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell wildcard, e.g. 'vit_base*'")
    p.add_argument("--build", action="store_true", help="build each model and print its parameter count")
    p.set_defaults(func=_cmd_models)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vitkit.bench import BenchSettings, format_table, run_benchmark, save_json
    from vitkit.bench.harness import load_pipelines

    settings = BenchSettings(
        model=args.model, batch_size=args.batch_size, img_size=args.img_size, precision=args.precision,
        compile=args.compile, device=args.device, modes=tuple(args.modes.split(",")), warmup=args.warmup,
        repeats=args.repeats, reference=not args.no_reference, threads=args.threads,
        tune_allocator=not args.no_tune_allocator, matmul_size=args.matmul_size, profile=args.profile)
    pipelines = load_pipelines(args.pipeline, settings) if args.pipeline else None
    result = run_benchmark(settings, pipelines, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    out = args.out or f"bench_{args.model}_b{args.batch_size}_{args.precision}{'_compiled' if args.compile else ''}.json"
    print(f"results written to {save_json(result, out)}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure speed, FLOP/s, memory against timm's ViT of the same config")
    p.add_argument("model", nargs="?", default="vit_cifar_patch4_32", help="registered model name")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16 run under autocast with fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both vitkit and the reference")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--modes", default="train,infer", help="comma-separated: train, infer")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per workload")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per workload (min/median/max)")
    p.add_argument("--no-reference", action="store_true", help="skip timm's VisionTransformer")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: available CPUs)")
    p.add_argument("--no-tune-allocator", action="store_true", help="leave glibc malloc's thresholds alone")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top operators of one vitkit call")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the peak-FLOP/s matmul")
    p.add_argument("--pipeline", default=None, metavar="MODULE:FUNCTION",
                   help="function(settings) -> {name: factory of batch iterables} to time next to the model")
    p.add_argument("--out", default=None, help="JSON file (default: bench_<model>_b<batch>_<precision>.json)")
    p.set_defaults(func=_cmd_bench)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
