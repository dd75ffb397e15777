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


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}")
    return parse


def _cmd_study(args: argparse.Namespace) -> int:
    from vitkit.study import study

    epochs = args.epochs or ([10] if args.kind == "data" else [1, 2, 4])
    study(args.kind, models=args.models, dataset=args.dataset, fractions=args.fractions, epochs=epochs,
          fraction=args.fraction, out_dir=args.out, workers=args.workers, config=args.config,
          overrides=getattr(args, "overrides", []))
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study", help="accuracy vs. training-set size or compute for several models (ViT, hybrid, ResNet)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every model on every cell of a grid with the same pipeline, evaluate on the full "
                    "test set, and write results.csv and a plot. Finished cells are never run again.",
        epilog="data: every run sees the same number of samples (epochs x 1/fraction).\n"
               "Any training config key can follow, e.g. --batch_size 256 --lr 1e-3 (see vitkit train).")
    p.add_argument("kind", choices=["data", "compute"])
    p.add_argument("--models", type=_csv(str), required=True, metavar="M1,M2,...")
    p.add_argument("--dataset", help="data set (default: the training config's)")
    p.add_argument("--fractions", type=_csv(float), default=[0.05, 0.1, 0.25, 0.5, 1.0], metavar="F1,F2,...",
                   help="data study: training-set fractions (stratified)")
    p.add_argument("--epochs", type=_csv(int), default=None, metavar="E[,E2,...]",
                   help="data: epochs of the full-data run (default 10); compute: epoch budgets (default 1,2,4)")
    p.add_argument("--fraction", type=float, default=1.0, help="compute study: training-set fraction")
    p.add_argument("--out", help="study directory (default: studies/<kind>-<dataset>)")
    p.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    p.add_argument("--config", metavar="YAML", help="base training config (file or bundled name)")
    p.set_defaults(func=_cmd_study, accepts_overrides=True)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_study]


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
