"""The ``vitkit`` command line: it parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import json
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
    stem = {"stem": args.stem} if args.stem is not None else {}
    model = from_checkpoint(checkpoint, img_size=args.img_size, num_heads=args.num_heads,
                            num_classes=args.num_classes, interpolation=args.interpolation, **stem)
    out = save_as(model, args.dst, args.to)
    cfg = model.config
    print(f"{args.src} ({checkpoint.format}) -> {out} ({args.to}): ViT D={cfg.embed_dim} "
          f"depth={cfg.depth} heads={cfg.num_heads} patch={cfg.patch_size} img={cfg.img_size} "
          f"classes={cfg.num_classes}" + (f" stem={cfg.stem}" if cfg.stem else ""))
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
    p.add_argument("--stem", type=_json_object, default=None, metavar="JSON",
                   help="hybrid stem fields no tensor records, e.g. '{\"stem_stride\": 1, \"stem_pool\": false}'")
    p.set_defaults(func=_cmd_convert)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


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


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_convert, _add_analyze, _add_study]


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
