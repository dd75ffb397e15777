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
            print(f"downloaded {args.name} to {download(args.name, args.data_dir, keep_raw=args.keep_raw)}")
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
    info = actions.add_parser("info", help="show where a data set is, its classes and split sizes")
    info.add_argument("name", help="a named data set or folder:PATH")
    info.add_argument("--data-dir", default=None, help="root holding NAME/ (default: search $VITKIT_DATA, ./data, "
                      "~/.cache/vitkit/data, <repo>/../shared/data)")
    for parser in (p, dl, info):
        parser.set_defaults(func=_cmd_data)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_data]


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
