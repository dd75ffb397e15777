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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _l2(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _cmd_fewshot(args: argparse.Namespace) -> int:
    import json

    from vitkit.evaluation import FeatureCache, Preprocess, linear_evaluation
    from vitkit.sources import load_source

    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = load_source(args.source, random_init=args.random_init, **overrides).to(args.device)
    report = linear_evaluation(
        model, args.dataset, shots=args.shots, seeds=args.seeds, l2=args.l2, probe=args.probe,
        probe_weight_decay=args.probe_wd, cache=FeatureCache(args.cache_dir),
        preprocess=Preprocess.for_model(model, args.mean, args.std), batch_size=args.batch_size,
        max_train=args.max_train, max_test=args.max_test, data_root=args.data_dir, device=args.device)
    print(report.format_table())
    if args.json:
        from vitkit.checkpoint import atomic_write_text

        atomic_write_text(json.dumps({"source": str(args.source), **report.to_dict()}, indent=2) + "\n", args.json)
    return 0


def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="few-shot linear evaluation (and a full linear probe) of frozen features",
                       description="Frozen features -> closed-form ridge regression to {-1,+1} targets on "
                                   "K images per class, mean and std over seeds (paper Sec. 4.1).")
    p.add_argument("source", help="vitkit model or run directory, a file/name vitkit.from_pretrained reads, "
                                  "or a registry name with --random-init")
    p.add_argument("--dataset", required=True, help="data set name under the data folder (cifar10, mnist, "
                                                    "imagenette_subset, ...) or a path")
    p.add_argument("--data-dir", default=None, help="folder holding the data sets (default: $VITKIT_DATA or "
                                                    "../shared/data)")
    p.add_argument("--shots", type=_int_list, default=[1, 5, 10, 25], help="comma-separated (default 1,5,10,25)")
    p.add_argument("--seeds", type=int, default=3, help="random draws of the shots per count (default 3)")
    p.add_argument("--l2", type=_l2, default=2.0 ** 10,
                   help="ridge strength (default 1024), or 'auto' to choose it on held-out training images")
    p.add_argument("--probe", action="store_true", help="also fit a logistic-regression probe on all training features")
    p.add_argument("--probe-wd", type=_l2, default="auto",
                   help="probe weight decay, or 'auto' (default: chosen on 10%% of the training features)")
    p.add_argument("--random-init", action="store_true", help="SOURCE is a registry name; use random weights")
    p.add_argument("--img-size", type=int, default=None, help="run the model at this resolution "
                                                              "(position embeddings resampled)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean (default: the "
                                                                        "model's, else 0.5)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std (default: the "
                                                                       "model's, else 0.5)")
    p.add_argument("--max-train", type=int, default=None, help="use a random subset of this many training images")
    p.add_argument("--max-test", type=int, default=None, help="use a random subset of this many test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="keep features here across runs (keyed by model and data)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_fewshot)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from vitkit.finetune import finetune_config
    from vitkit.train import TrainingDiverged, TrainingInterrupted, train

    cfg = finetune_config(args.init, args.dataset, img_size=args.img_size, config=args.config,
                          overrides=args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        train(cfg)
    except TrainingInterrupted as e:
        print(f"vitkit finetune: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingDiverged as e:
        print(f"vitkit finetune: error: {e}", file=sys.stderr)
        return 3
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained model on a data set (also at a higher resolution)",
        description="Remove the pre-training head, attach a zero-initialised head for the data set's classes, "
                    "resample the position embeddings to --img-size, and train with the paper's fine-tuning "
                    "recipe (SGD momentum 0.9, no weight decay, clipping at 1, warmup + cosine). Any training "
                    "config key can follow as --key value, e.g. --optim.lr 0.003 --optim.layer_decay 0.75 "
                    "--finetune.freeze_backbone --epochs 20.")
    p.add_argument("--init", required=True, help="pre-trained SOURCE: vitkit model or run directory, or "
                                                 "anything vitkit.from_pretrained reads")
    p.add_argument("--dataset", required=True, help="named data set (cifar10, mnist, ...) or folder:PATH")
    p.add_argument("--img-size", type=int, default=None, help="fine-tuning resolution (default: the data set's)")
    p.add_argument("--config", default=None, help="YAML training config applied over the fine-tuning recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_finetune, accepts_overrides=True)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_fewshot, _add_finetune]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra  # config overrides such as --optim.lr 0.003, parsed by the command
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
