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


def _cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.convert import from_checkpoint, read_checkpoint, save_as

    checkpoint = read_checkpoint(args.src, args.source_format)
    model = from_checkpoint(checkpoint, img_size=args.img_size, num_heads=args.num_heads,
                            num_classes=args.num_classes, interpolation=args.interpolation)
    out = save_as(model, args.dst, args.to)
    cfg = model.config
    print(f"{args.src} ({checkpoint.format}) -> {out} ({args.to}): ViT D={cfg.embed_dim} "
          f"depth={cfg.depth} heads={cfg.num_heads} patch={cfg.patch_size} img={cfg.img_size} "
          f"classes={cfg.num_classes}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from vitkit.convert.detect import ALIASES, FORMATS

    formats = sorted(set(FORMATS) | set(ALIASES))
    p = sub.add_parser("convert", help="convert a checkpoint between vitkit, timm, Hugging Face, torchvision and npz",
                       description="Read SRC (format detected: vitkit or Hugging Face directory, timm / torchvision "
                                   "state dict, Google .npz) and write DST in the format --to names.")
    p.add_argument("src", help="checkpoint file or directory to read")
    p.add_argument("dst", help="directory (vitkit, hf) or file (timm/torchvision: .safetensors/.pth; npz: .npz)")
    p.add_argument("--to", default="vitkit", choices=formats, metavar="FORMAT",
                   help="output format: vitkit (default), timm, hf, torchvision, npz")
    p.add_argument("--from", dest="source_format", default=None, choices=formats, metavar="FORMAT",
                   help="input format, if detection should be skipped")
    p.add_argument("--img-size", type=int, default=None, help="resample the position embeddings to this resolution")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (needed for timm/torchvision files of non-standard width)")
    p.add_argument("--num-classes", type=int, default=None, help="replace the head by a zero-initialised one")
    p.add_argument("--interpolation", choices=("bicubic", "bilinear"), default=None,
                   help="position-embedding resampling (default bicubic)")
    p.set_defaults(func=_cmd_convert)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from vitkit.analysis.report import analyze

    index = analyze(args.source, args.dataset, args.out, num_images=args.images, num_show=args.show,
                    batch_size=args.batch_size, data_dir=args.data_dir, device=args.device, seed=args.seed)
    print(f"report written: {index}")
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="inspect what a model learned: filters, position embeddings, attention",
                       description="Write the paper's Fig. 6/7 analyses of SOURCE as PNG figures, JSON/CSV numbers "
                                   "and an index.html report to DIR.")
    p.add_argument("source", metavar="SOURCE",
                   help="a checkpoint (any format vitkit.from_pretrained reads), or a registry name (random weights)")
    p.add_argument("--dataset", required=True, help="data set folder name under the data dir, e.g. cifar10")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    p.add_argument("--images", type=int, default=128, metavar="N",
                   help="images for the mean attention distance (default 128, as in the paper)")
    p.add_argument("--show", type=int, default=8, metavar="N", help="images shown in the attention maps (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--data-dir", default=None, metavar="D",
                   help="folder holding the data sets (default $VITKIT_DATA or ../shared/data)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample (default 0)")
    p.set_defaults(func=_cmd_analyze)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_convert, _add_analyze]


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
