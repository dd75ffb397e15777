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


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "download":
        from vitkit.data.download import DownloadError, download

        try:
            directory = download(args.name, args.data_dir, keep_raw=args.keep_raw, force=args.force)
            print(f"{args.name} is in {directory}")
        except DownloadError as e:
            print(f"vitkit data download: error: {e}", file=sys.stderr)
            return 1
        return 0
    from vitkit.data.summary import dataset_summary, format_summary

    print(format_summary(dataset_summary(args.name, args.data_dir)))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download or inspect data sets")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dl = actions.add_parser("download", help="fetch a named data set with torchvision into the .npz layout")
    dl.add_argument("name", help="cifar10, cifar100, mnist or fashion_mnist")
    dl.add_argument("--data-dir", default=None, help="root to write NAME/ into (default: $VITKIT_DATA or "
                    "~/.cache/vitkit/data)")
    dl.add_argument("--keep-raw", action="store_true", help="keep torchvision's raw download files")
    dl.add_argument("--force", action="store_true", help="download again even if a complete copy is there")
    info = actions.add_parser("info", help="show where a data set is, its classes and split sizes")
    info.add_argument("name", help="a named data set or folder:PATH")
    info.add_argument("--data-dir", default=None, help="root holding NAME/ (default: search $VITKIT_DATA, ./data, "
                      "~/.cache/vitkit/data, <repo>/../shared/data)")
    for parser in (p, dl, info):
        parser.set_defaults(func=_cmd_data)


def _cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import TrainingDiverged, TrainingInterrupted, load_config, resume, train

    try:
        if args.resume:
            if args.config:
                raise ValueError("--resume continues a run with its own config; give overrides, not --config")
            resume(args.resume, args.overrides)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        train(cfg)
    except TrainingInterrupted as e:
        print(f"vitkit train: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingDiverged as e:
        print(f"vitkit train: error: {e}", file=sys.stderr)
        return 3
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (default: a small ViT on CIFAR-10)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model from a YAML config, with any config key overridden on the command line.",
        epilog="overrides: --KEY VALUE or --SECTION.KEY VALUE for any config key, e.g.\n"
               "  --epochs 50 --optim.lr 1e-3 --data.batch_size 256 --model.drop_path_rate 0.1\n"
               "data and optim keys also work without their section (--dataset mnist --lr 3e-3\n"
               "--data-dir DIR --samples-per-class 100), --model NAME picks the model.\n"
               "See all keys and defaults with --print-config.\n"
               "bundled configs: cifar10_vit (the default), mnist_vit, smoke\n"
               "distributed: torchrun --nproc-per-node N -m vitkit train ...")
    p.add_argument("--config", metavar="YAML", help="a config file, or the name of a bundled config")
    p.add_argument("--resume", metavar="RUN", help="continue a run directory (or checkpoint file) exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vitkit.train.evaluate import evaluate_trained

    report = evaluate_trained(args.source, dataset=args.dataset, data_dir=args.data_dir,
                              batch_size=args.batch_size, device=args.device, precision=args.precision,
                              out_dir=args.out)
    print(report.format())
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a trained model")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory, a training checkpoint (.pt) or a vitkit model directory")
    p.add_argument("--dataset", help="data set to evaluate on (default: the one the model was trained on): "
                                     "a named set or folder:PATH")
    p.add_argument("--data-dir", help="where named data sets live (default: VITKIT_DATA, ../shared/data, ...)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion.png "
                                                "(default: RUN/eval-DATASET, or ./eval-DATASET)")
    p.set_defaults(func=_cmd_eval)


def _cmd_predict(args: argparse.Namespace) -> int:
    from vitkit.predict import format_predictions, predict_files

    results = predict_files(args.checkpoint, args.images, top_k=args.top_k, device=args.device)
    print(format_predictions(results, as_json=args.json))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k labels with probabilities for image files")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a vitkit model directory, a run directory or a training checkpoint (.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models, _add_data, _add_train, _add_eval, _add_predict,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
