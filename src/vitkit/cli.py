"""The ``vitkit`` command line: it parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vitkit.errors import DownloadError, ExportMismatch, OfflineError, WorkStopped, exit_code
from vitkit.version import __version__

# A command's modules are imported when it runs (inside its _cmd_ function), not here: ``vitkit --help`` and a
# mistyped flag then cost a parse, not an import of torch and every subsystem.

def _cmd_models(args: argparse.Namespace) -> int:
    from vitkit.models import list_models
    from vitkit.models.registry import count_parameters, get_model_entry

    if args.pretrained:
        return _list_pretrained(args.pattern)
    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    if args.build:
        print(f"{'model':34s} {'params':>13s} {'img':>5s} {'patch':>5s}  description", flush=True)
    for name in names:
        entry = get_model_entry(name)
        if args.build:
            params = count_parameters(name)  # on the meta device: no memory, no initialisation
            cfg = entry.config
            print(f"{name:34s} {params:13,d} {str(cfg.img_size):>5s} {getattr(cfg, 'patch_size', '-')!s:>5s}  "
                  f"{entry.description}", flush=True)  # a row as soon as it is counted
        else:
            print(f"{name:34s} {entry.description}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell wildcard, e.g. 'vit_base*'")
    p.add_argument("--build", action="store_true",
                   help="print each model's parameter count (built on the meta device: no weights allocated)")
    p.add_argument("--pretrained", action="store_true",
                   help="list the catalog of released weights (arch.tag names) with their preprocessing, classes, "
                        "reported top-1, licence, location and checksum; PATTERN filters them ('augreg', 'vit_b*')")
    p.set_defaults(func=_cmd_models)


def _list_pretrained(pattern: str | None) -> int:
    from vitkit.hub import list_entries

    entries = list_entries(pattern)
    if not entries:
        print(f"no pretrained weights match {pattern!r}", file=sys.stderr)
        return 1
    header = f"{'name':54s} {'size':>4s} {'crop':>5s} {'interp':8s} {'mean/std':9s} {'classes':12s} {'top-1':>6s}"
    print(f"{header}  licence")
    for e in entries:
        pre = e.preprocessing
        norm = {((0.5,) * 3, (0.5,) * 3): "0.5/0.5", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): "imagenet"}.get(
            (pre.mean, pre.std), "custom")
        classes = e.classes or (f"{e.num_classes}" if e.num_classes else "features")
        top1 = f"{e.top1:.2f}" if e.top1 is not None else "-"
        default = " (default)" if e.default else ""
        print(f"{e.name + default:54s} {e.input_size:4d} {pre.crop_pct:5.3f} {pre.interpolation:8s} {norm:9s} "
              f"{classes:12s} {top1:>6s}  {e.license or '-'}")
        checksum = f"  [{e.checksum}]" if e.checksum else ""
        aliases = f"  aka {', '.join(e.aliases)}" if e.aliases else ""
        print(f"    {e.location}{checksum}{aliases}")
    print(f"{len(entries)} entries; mean/std 0.5/0.5 = (x - 0.5) / 0.5, imagenet = (0.485, 0.456, 0.406) / "
          "(0.229, 0.224, 0.225); top-1 as its publisher reports it ('vitkit download NAME' fetches ahead of time)")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from vitkit.hub import fetch_source

    codes = []  # each name's exit code, as any other command would give it for the same cause
    for name in args.names:
        try:
            fetched = fetch_source(name, progress=not args.quiet)
        except OfflineError as e:  # its advice is to run this very command elsewhere: say what this one needs
            print(f"vitkit download: error: {e.what}: {e.problem}: this command needs the network (unset "
                  "HF_HUB_OFFLINE/VITKIT_OFFLINE if set, or set HTTPS_PROXY), or copy the caches of a machine that "
                  "has it (vitkit models --pretrained shows where each name comes from)", file=sys.stderr)
            codes.append(exit_code(e))
            continue
        except DownloadError as e:
            print(f"vitkit download: error: {e}", file=sys.stderr)
            codes.append(exit_code(e))
            continue
        if fetched is None:
            print(f"vitkit download: error: {name!r} is not a pretrained name, Hugging Face repo id or URL "
                  "(see 'vitkit models --pretrained')", file=sys.stderr)
            codes.append(2)
            continue
        print(f"{name}: {fetched.path}")
    return max(codes, default=0)


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch pretrained weights ahead of time (for machines without internet)",
                       description="Download and verify each NAME into the cache (Hugging Face repos: the Hugging Face "
                                   "cache; URLs: $VITKIT_CACHE or the user cache directory), so that a later "
                                   "run, or a machine the caches are copied to, loads it offline.")
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="a pretrained name (see 'vitkit models --pretrained'), a Hugging Face repo id or a URL")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)


def _cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.convert import save_as
    from vitkit.resolver import load_source

    stem = {"stem": args.stem} if args.stem is not None else {}
    resolved = load_source(args.src, format=args.source_format, checkpoint=args.checkpoint, img_size=args.img_size,
                           num_heads=args.num_heads, num_classes=args.num_classes,
                           interpolation=args.interpolation, **stem)
    out = save_as(resolved.model, args.dst, args.to)
    cfg = resolved.model.config
    print(f"{resolved.description} -> {out} ({args.to}): {_describe_config(cfg)}")
    return 0


def _describe_config(cfg) -> str:
    if not hasattr(cfg, "embed_dim"):
        return f"{type(cfg).__name__} img={cfg.img_size} classes={cfg.num_classes}"
    tokens = f"patch={cfg.patch_size}" if hasattr(cfg, "patch_size") else f"T2T tokens={cfg.tokens_type}"
    stem = getattr(cfg, "stem", None)
    return (f"ViT D={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} {tokens} "
            f"img={cfg.img_size} classes={cfg.num_classes}" + (f" stem={stem.to_dict()}" if stem else ""))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    formats = ("big_vision", "hf", "huggingface", "jax", "npz", "t2t", "timm", "torchvision", "transformers",
               "vit_jax", "vitkit")  # vitkit.convert.detect's FORMATS and ALIASES, checked by tests/test_cli.py
    p = sub.add_parser("convert", help="convert a checkpoint between vitkit, timm, Hugging Face, torchvision and npz",
                       description="Read SRC (format detected: vitkit or Hugging Face directory, timm / torchvision "
                                   "state dict, Google .npz, official T2T-ViT .pth.tar) and write DST in the format "
                                   "--to names.")
    p.add_argument("src", help="checkpoint file or directory to read: any format, a vitkit model directory, a "
                               "training run (its best state) or one of its checkpoints (best.pt, last.pt, step-N.pt), "
                               "or a pretrained name, Hugging Face repo id or URL")
    p.add_argument("dst", help="directory (vitkit, hf) or file (timm/torchvision: .safetensors/.pth; npz: .npz)")
    p.add_argument("--to", default="vitkit", choices=formats, metavar="FORMAT",
                   help="output format: vitkit (default), timm, hf, torchvision, npz, t2t (official T2T-ViT)")
    p.add_argument("--from", dest="source_format", default=None, choices=formats, metavar="FORMAT",
                   help="input format, if detection should be skipped")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="for a run directory: best (default), last, step-N or model")
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
    from vitkit.resolver import load_source
    from vitkit.runtime import resolve_device

    device = resolve_device(args.device)  # a bad --device is found before any work
    resolved = load_source(args.source, checkpoint=args.checkpoint, random_init=args.random_init)
    print(f"loaded: {resolved.description}", file=sys.stderr)
    index = analyze(resolved, args.dataset, args.out, num_images=args.images, num_show=args.show,
                    batch_size=args.batch_size, data_dir=args.data_dir, device=device, seed=args.seed)
    print(f"report written: {index}")
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="inspect what a model learned: filters, position embeddings, attention",
                       description="Write the paper's Fig. 6/7 analyses of SOURCE as PNG figures, JSON/CSV numbers "
                                   "and an index.html report to DIR.")
    p.add_argument("source", metavar="SOURCE",
                   help="a run directory (its best state), a training checkpoint, a vitkit model directory, any "
                        "checkpoint vitkit.from_pretrained reads, or a registry name with --random-init")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="for a run directory: best (default), last, step-N or model")
    p.add_argument("--random-init", action="store_true", help="SOURCE is a registry name; use random weights")
    p.add_argument("--dataset", required=True, help="a named set (cifar10, ...), folder:PATH, or a data set "
                                                    "directory under the data roots")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the report")
    p.add_argument("--images", type=int, default=128, metavar="N",
                   help="images for the mean attention distance (default 128, as in the paper)")
    p.add_argument("--show", type=int, default=8, metavar="N", help="images shown in the attention maps (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--data-dir", default=None, metavar="D",
                   help="folder holding the data sets (default: $VITKIT_DATA, the user cache "
                        "~/.cache/vitkit/data, ../shared/data)")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the image sample (default 0)")
    p.set_defaults(func=_cmd_analyze)


def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None
    return parse


def _cmd_study(args: argparse.Namespace) -> int:
    from vitkit.study import study

    epochs = args.epochs or ([10] if args.kind == "data" else [1, 2, 4])
    study(args.kind, models=args.models, dataset=args.dataset, fractions=args.fractions, epochs=epochs,
          fraction=args.fraction, out_dir=args.out, workers=args.workers, config=args.config,
          overrides=getattr(args, "overrides", []), budget_seconds=args.budget_seconds)
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study", help="accuracy vs. training-set size or compute for several models (ViT, hybrid, T2T, ResNet)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every model on every cell of a grid with the same pipeline, evaluate on the full "
                    "test set, and write results.csv and a plot. Finished cells are never run again.",
        epilog="data: every run sees the same number of samples (epochs x 1/fraction), or with --budget-seconds\n"
               "the same training time (per-model step counts from step times measured back to back).\n"
               "Any training config key can follow, e.g. --batch_size 256 --lr 1e-3 (see vitkit train).")
    p.add_argument("kind", choices=["data", "compute"])
    p.add_argument("--models", type=_csv(str), required=True, metavar="M1,M2,...")
    p.add_argument("--dataset", help="data set (default: the training config's)")
    p.add_argument("--fractions", type=_csv(float), default=[0.05, 0.1, 0.25, 0.5, 1.0], metavar="F1,F2,...",
                   help="data study: training-set fractions (stratified)")
    p.add_argument("--epochs", type=_csv(int), default=None, metavar="E[,E2,...]",
                   help="data: epochs of the full-data run (default 10); compute: epoch budgets (default 1,2,4)")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help="data study at equal wall-clock budget: every cell trains for S seconds' worth of its "
                        "model's steps (timed back to back first) instead of a fixed number of samples")
    p.add_argument("--fraction", type=float, default=1.0, help="compute study: training-set fraction")
    p.add_argument("--out", help="study directory (default: studies/<kind>-<dataset>)")
    p.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    p.add_argument("--config", metavar="YAML", help="base training config (file or bundled name)")
    p.set_defaults(func=_cmd_study, accepts_overrides=True)


def _cmd_data(args: argparse.Namespace) -> int:
    from vitkit.data.download import download
    from vitkit.data.shard_writer import write_shards
    from vitkit.data.shards import parse_shard_size
    from vitkit.data.summary import dataset_summary, format_summary

    if args.data_command == "download":
        directory = download(args.name, args.data_dir, keep_raw=args.keep_raw, force=args.force)
        print(f"{args.name} is in {directory}")
        return 0
    if args.data_command == "shard":
        manifest = write_shards(args.name, args.out, shard_size=parse_shard_size(args.shard_size),
                                data_dir=args.data_dir, seed=args.seed, progress=sys.stderr.isatty())
        for split, info in manifest["splits"].items():
            size = sum(s["bytes"] for s in info["shards"])
            print(f"{split}: {info['samples']} images in {len(info['shards'])} shard(s), {size / 1e6:.1f} MB")
        print(f"wrote {args.out} ({len(manifest['classes'])} classes); train with --dataset shards:{args.out}")
        return 0

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
    info.add_argument("name", help="a named data set, folder:PATH, or a data set directory")
    info.add_argument("--data-dir", default=None, help="root holding NAME/ (default: search $VITKIT_DATA, "
                      "~/.cache/vitkit/data, <repo>/../shared/data)")
    shard = actions.add_parser("shard", help="write a data set as webdataset tar shards (read back as shards:DIR)")
    shard.add_argument("name", metavar="SOURCE", help="a named data set, folder:PATH or a data set directory")
    shard.add_argument("--out", required=True, metavar="DIR", help="an empty directory for the shards")
    shard.add_argument("--shard-size", default="500MB", help="the largest shard, e.g. 500MB (default), 1GiB")
    shard.add_argument("--data-dir", default=None, help="root holding named data sets")
    shard.add_argument("--seed", type=int, default=0, help="seed of the training samples' order in the shards")
    for parser in (p, dl, info, shard):
        parser.set_defaults(func=_cmd_data)


def _cmd_train(args: argparse.Namespace) -> int:
    from vitkit.train import load_config, resume, train

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own config; give overrides, not --config")
        return _run_training("train", lambda: resume(args.resume, args.overrides))
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    return _run_training("train", lambda: train(cfg))


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vitkit.train import resume, train
    from vitkit.train.mae import pretrain_config

    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own config; give overrides, not --config")
        return _run_training("pretrain", lambda: resume(args.resume, args.overrides))
    cfg = pretrain_config(args.config, args.overrides, method=args.method)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    return _run_training("pretrain", lambda: train(cfg))


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="self-supervised pre-training (masked autoencoder) of a ViT on images alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MAE pre-training (He et al. 2022) with the training loop of `vitkit train` (progress, "
                    "metrics.jsonl, TensorBoard, checkpoints, --resume, torchrun). Starts from the official "
                    "recipe: AdamW (0.9, 0.95), weight decay 0.05, lr = blr 1.5e-4 x batch / 256, warmup + "
                    "cosine, random resized crop (0.2, 1) + flip, 75% masking. Each evaluation writes "
                    "reconstruction.png; the run exports the MAE to RUN/model and its encoder to RUN/encoder.",
        epilog="examples:\n"
               "  vitkit pretrain --config mae_cifar10\n"
               "  vitkit pretrain --method mae --model vit_tiny_patch4_32 --dataset cifar10 --epochs 100 "
               "--model.mask_ratio 0.75\n"
               "then: vitkit finetune --init RUN --dataset cifar10   (MAE's fine-tuning recipe)")
    p.add_argument("--config", metavar="YAML", help="a config file, or a bundled name (mae_cifar10)")
    p.add_argument("--method", default="mae", choices=["mae"], help="pre-training method (default mae)")
    p.add_argument("--resume", metavar="RUN", help="continue a run directory (or checkpoint file) exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_pretrain, accepts_overrides=True)


def _run_training(command: str, run: Callable[[], object]) -> int:
    """Run a training job; a signal or a diverged loss becomes a message and an exit code."""
    from vitkit.train import TrainingDiverged, TrainingInterrupted

    try:
        run()
    except TrainingInterrupted as e:
        print(f"vitkit {command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except TrainingDiverged as e:
        print(f"vitkit {command}: error: {e}", file=sys.stderr)
        return 3
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


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
    from vitkit.data import EvalTransform
    from vitkit.evaluation import FeatureCache, linear_evaluation
    from vitkit.fileio import atomic_write_text
    from vitkit.resolver import load_source
    from vitkit.runtime import resolve_device

    device = resolve_device(args.device)
    resolved = load_source(args.source, checkpoint=args.checkpoint, random_init=args.random_init,
                           img_size=args.img_size)
    print(f"loaded: {resolved.description}", file=sys.stderr)
    model = resolved.model.to(device)
    preprocessing = model.config.preprocessing()
    if args.mean is not None or args.std is not None:
        if args.mean is None or args.std is None:
            raise ValueError("--mean and --std go together")
        preprocessing = dataclasses.replace(preprocessing, mean=tuple(args.mean), std=tuple(args.std))
    report = linear_evaluation(
        model, args.dataset, shots=args.shots, seeds=args.seeds, l2=args.l2, probe=args.probe,
        probe_weight_decay=args.probe_wd, cache=FeatureCache(args.cache_dir),
        transform=EvalTransform(preprocessing, model.config.in_chans), batch_size=args.batch_size,
        max_train=args.max_train, max_test=args.max_test, data_dir=args.data_dir, device=device)
    print(report.format_table())
    if args.json:
        atomic_write_text(json.dumps({"source": str(args.source), "loaded": resolved.description,
                                      **report.to_dict()}, indent=2) + "\n", args.json)
    return 0


def _add_fewshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="few-shot linear evaluation (and a full linear probe) of frozen features",
                       description="Frozen features -> closed-form ridge regression to {-1,+1} targets on "
                                   "K images per class, mean and std over seeds (paper Sec. 4.1).")
    p.add_argument("source", help="a run directory (its best state), a training checkpoint, a vitkit model "
                                  "directory, a file vitkit.from_pretrained reads, or a registry name with "
                                  "--random-init")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="for a run directory: best (default), last, step-N or model")
    p.add_argument("--dataset", required=True, help="a named set (cifar10, mnist, ...), folder:PATH, or a data "
                                                    "set directory under the data roots (imagenette_subset)")
    p.add_argument("--data-dir", default=None, help="folder holding the data sets (default: $VITKIT_DATA, the "
                                                    "user cache ~/.cache/vitkit/data, ../shared/data)")
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
                                                                        "model's preprocessing record)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std (default: the "
                                                                       "model's preprocessing record)")
    p.add_argument("--max-train", type=int, default=None, help="use a random subset of this many training images")
    p.add_argument("--max-test", type=int, default=None, help="use a random subset of this many test images")
    p.add_argument("--batch-size", type=int, default=256)
    _add_device(p)
    p.add_argument("--cache-dir", default=None, help="keep features here across runs (keyed by model and data)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_fewshot)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from vitkit.resolver import resolve_source
    from vitkit.train import train
    from vitkit.train.config import finetune_config

    print(f"initial weights: {resolve_source(args.init).label}", file=sys.stderr)
    cfg = finetune_config(args.init, args.dataset, img_size=args.img_size, config=args.config,
                          overrides=args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    return _run_training("finetune", lambda: train(cfg))


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
               "bundled configs: cifar10_convstem (the default), cifar10_vit, mnist_convstem, mnist_vit, smoke\n"
               "distributed: torchrun --nproc-per-node N -m vitkit train ...")
    p.add_argument("--config", metavar="YAML", help="a config file, or the name of a bundled config")
    p.add_argument("--resume", metavar="RUN", help="continue a run directory (or checkpoint file) exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train, accepts_overrides=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vitkit.train.evaluate import evaluate_trained

    report = evaluate_trained(args.source, dataset=args.dataset, data_dir=args.data_dir,
                              batch_size=args.batch_size, device=args.device, precision=args.precision,
                              out_dir=args.out, hflip_tta=args.hflip_tta,
                              translate_tta=args.translate_tta, checkpoint=args.checkpoint,
                              allow_class_mismatch=args.allow_class_mismatch)
    print(report.format())
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1/top-5, per-class accuracy and a confusion matrix of a trained model")
    p.add_argument("source", metavar="SOURCE",
                   help="a run directory (its best state), a training checkpoint (.pt), a vitkit model directory or "
                        "any checkpoint vitkit.from_pretrained reads")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="for a run directory: best (default), last, step-N or model")
    p.add_argument("--dataset", help="data set to evaluate on (default: the one the model was trained on): "
                                     "a named set, folder:PATH, or a data set directory")
    p.add_argument("--data-dir", help="where named data sets live (default: VITKIT_DATA, ../shared/data, ...)")
    p.add_argument("--batch-size", type=int, default=256)
    _add_device(p)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--hflip-tta", action="store_true",
                   help="test-time augmentation: average the logits of each image and its mirror image")
    p.add_argument("--translate-tta", action="store_true",
                   help="test-time augmentation: also each view shifted one pixel up-left and down-right")
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion.png "
                                                "(default: RUN/eval-DATASET, or ./eval-DATASET)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate even when the data set's class names differ from the model's, pairing the "
                        "classes by sorted position (by default classes are matched by name)")
    p.set_defaults(func=_cmd_eval)


def _cmd_predict(args: argparse.Namespace) -> int:
    from vitkit.predict import format_predictions, predict_files
    from vitkit.resolver import load_source
    from vitkit.runtime import resolve_device

    device = resolve_device(args.device)
    resolved = load_source(args.source, checkpoint=args.checkpoint)
    print(f"loaded: {resolved.description}", file=sys.stderr)
    results = predict_files(resolved, args.images, top_k=args.top_k, device=device)
    print(format_predictions(results, as_json=args.json))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k labels with probabilities for image files")
    p.add_argument("source", metavar="SOURCE",
                   help="a run directory (its best state), a training checkpoint (.pt), a vitkit model directory or "
                        "any checkpoint vitkit.from_pretrained reads")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="for a run directory: best (default), last, step-N or model")
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels shown per image (default 5)")
    _add_device(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "vitkit":
        from vitkit.train.rundir import export_run

        if args.int8 or args.dynamic_size:
            raise ValueError("--int8 and --dynamic-size apply to --format onnx (--dynamic-size also to "
                             "exported-program)")
        out, resolved = export_run(args.run, checkpoint=args.checkpoint, out_dir=args.out)
        print(f"{resolved.description} -> {out}")
        return 0
    from vitkit.deploy import export_model, validation_images
    from vitkit.resolver import load_source

    resolved = load_source(args.run, checkpoint=args.checkpoint)
    print(f"loaded: {resolved.description}", file=sys.stderr)
    out = Path(args.out) if args.out else _default_export_path(resolved, args.format, args.int8)
    config = resolved.model.config
    dataset = args.validate_data or config.preprocessing().dataset or (
        (resolved.training_config or {}).get("data", {}).get("dataset"))
    if not dataset:
        raise ValueError(f"{args.run}: the model records no data set to validate the export on; pass --validate-data "
                         "(e.g. cifar10 or folder:../shared/data/imagenette_subset)")
    try:
        validation = validation_images(config, dataset, args.validate_images, data_dir=args.data_dir)
    except FileNotFoundError as e:
        if args.validate_data:
            raise
        raise ValueError(f"{e}; name local images to validate the export on with --validate-data "
                         "(e.g. folder:../shared/data/imagenette_subset)") from None
    report = export_model(resolved.model, out, format=args.format, validation=validation, int8=args.int8,
                          dynamic_size=args.dynamic_size, atol=args.atol, min_agreement=args.min_agreement,
                          log=lambda m: print(m, file=sys.stderr))
    for result, tolerance in report.checks:
        print(f"{result.format()}  [tolerance: {tolerance.describe()}: ok]")
    print(f"{resolved.description} -> {report.path} ({args.format}{', int8' if args.int8 else ''})")
    return 0


def _default_export_path(resolved, fmt: str, int8: bool) -> Path:
    run_dir, state = resolved.source.run_dir, resolved.source.state
    if run_dir is None:
        raise ValueError("--out is needed when SOURCE is not a training run (e.g. --out model.onnx)")
    suffix = ".pt2" if fmt == "exported-program" else (".int8.onnx" if int8 else ".onnx")
    return Path(run_dir) / f"export-{state or 'checkpoint'}{suffix}"


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model for deployment: a vitkit directory, ONNX (fp32/int8) or "
                                      "a torch.export program, validated against the eager model",
                       description="--format vitkit (default): write RUN's best checkpoint (or another state) as a "
                                   "vitkit model directory (model.safetensors + config.json), whether or not the run "
                                   "has finished. --format onnx / exported-program: trace any model SOURCE with "
                                   "torch.export (dynamic batch axis) and write an ONNX file (preprocessing and class "
                                   "names in its metadata) or a .pt2; the result is compared with the eager model on "
                                   "real images first (max |logit diff| and top-1 agreement printed) and not "
                                   "written, exit status 4, if it disagrees beyond the tolerance.")
    p.add_argument("run", metavar="SOURCE", help="a training run directory (or one of its checkpoint files); for "
                                                 "onnx/exported-program any model SOURCE (model directory, "
                                                 "checkpoint, pretrained name)")
    p.add_argument("--format", choices=("vitkit", "onnx", "exported-program"), default="vitkit",
                   help="vitkit (model directory, default), onnx, exported-program (torch.export .pt2)")
    p.add_argument("--checkpoint", default=None, metavar="STATE",
                   help="best (default), last, step-N (a kept step checkpoint) or model (the final export)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output directory or file (default: RUN/export-STATE, .onnx, .int8.onnx or .pt2)")
    p.add_argument("--int8", action="store_true", help="onnx: quantize the Linear layers to int8 (dynamic, "
                                                       "onnxruntime's quantizer) for CPU inference")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic height and width (multiples of the patch size), position embeddings resampled in "
                        "the graph (plain-patch ViTs)")
    p.add_argument("--validate-data", default=None, metavar="DATASET",
                   help="images to validate on: a named set or folder:PATH (default: the model's data set)")
    p.add_argument("--validate-images", type=_positive_int, default=64, metavar="N",
                   help="images compared with the eager model (default 64)")
    p.add_argument("--data-dir", default=None, metavar="D", help="where named data sets live")
    p.add_argument("--atol", type=float, default=None,
                   help="float32: largest |logit difference| accepted (default 1e-3)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="smallest top-1 agreement with the eager model accepted (int8 default 0.97)")
    p.set_defaults(func=_cmd_export)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained model on a data set (also at a higher resolution)",
        description="Remove the pre-training head, attach a zero-initialised head for the data set's classes, "
                    "resample the position embeddings to --img-size, and train with the paper's fine-tuning "
                    "recipe (SGD momentum 0.9, no weight decay, clipping at 1, warmup + cosine). Any training "
                    "config key can follow as --key value, e.g. --optim.lr 0.003 --optim.layer_decay 0.75 "
                    "--finetune.freeze_backbone --epochs 20.")
    p.add_argument("--init", required=True, help="pre-trained SOURCE: a run directory (its best state), a training "
                                                 "checkpoint, a vitkit model directory, or anything "
                                                 "vitkit.from_pretrained reads")
    p.add_argument("--dataset", required=True,
                   help="named data set (cifar10, mnist, ...), folder:PATH, or a data set directory")
    p.add_argument("--img-size", type=int, default=None, help="fine-tuning resolution (default: the data set's)")
    p.add_argument("--config", default=None, help="YAML training config applied over the fine-tuning recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_finetune, accepts_overrides=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vitkit.bench import BenchSettings, format_table, run_benchmark, save_json
    from vitkit.bench.harness import data_pipelines, load_pipelines
    from vitkit.hub import find_entry

    model_name, img_size = args.model, args.img_size
    entry = find_entry(model_name) if "." in model_name and not Path(model_name).exists() else None
    if entry is not None:  # a pretrained name: speed depends on the architecture and input size, not the weights
        model_name, img_size = entry.architecture, img_size or entry.input_size
        print(f"benchmarking {model_name} at {img_size}px, the architecture of {entry.name} (weights not needed)",
              file=sys.stderr)
    settings = BenchSettings(
        model=model_name, batch_size=args.batch_size, img_size=img_size, precision=args.precision,
        compile=args.compile, **({"device": args.device} if args.device else {}),
        modes=tuple(args.modes.split(",")), warmup=args.warmup,
        repeats=args.repeats, reference=not args.no_reference, threads=args.threads,
        tune_allocator=not args.no_tune_allocator, matmul_size=args.matmul_size, profile=args.profile)
    pipelines = dict(load_pipelines(args.pipeline, settings)) if args.pipeline else {}
    if args.data:
        pipelines.update(data_pipelines(args.data.split(","), settings))
    result = run_benchmark(settings, pipelines or None, log=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    label = re.sub(r"[^\w.-]+", "_", model_name.strip("/"))  # a SOURCE path becomes one file name
    compiled = "_compiled" if args.compile else ""
    out = args.out or f"bench_{label}_b{args.batch_size}_{args.precision}{compiled}.json"
    print(f"results written to {save_json(result, out)}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure speed, FLOP/s, memory against timm's ViT of the same config")
    p.add_argument("model", nargs="?", default="vit_airstem_cifar_32",
                   help="registered model name (random weights; default: the CIFAR-10 recipe's), any model "
                        "SOURCE (a run directory, a training checkpoint, a model directory, a checkpoint file), or a "
                        "pretrained name arch.tag (its architecture at its input size, random weights: no download)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16/fp16 run under autocast with fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both vitkit and the reference")
    _add_device(p)
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
    p.add_argument("--data", default=None, metavar="NAME[,NAME]",
                   help="also time vitkit's input pipeline for these data sets, e.g. "
                        "cifar10,folder:../shared/data/imagenette_subset")
    p.add_argument("--out", default=None, help="JSON file (default: bench_<model>_b<batch>_<precision>.json)")
    p.set_defaults(func=_cmd_bench)


def _add_device(p: argparse.ArgumentParser) -> None:
    # None is vitkit.runtime.resolve_device's default, one for every command (auto)
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:1, mps (default auto: the GPU if there is one, else the CPU)")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from vitkit.serve import Engine, run_server
    except ImportError as e:
        raise ValueError(f"vitkit serve needs aiohttp ({e}): pip install 'vitkit[serve]'") from None
    from vitkit.resolver import load_source

    options = {"threads": args.threads} if str(args.source).lower().endswith(".onnx") else {}
    resolved = load_source(args.source, checkpoint=args.checkpoint, **options)
    print(f"loaded: {resolved.description}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vitkit serve: listening on {args.host}: reachable from other machines, without authentication",
              file=sys.stderr)
    run_server(Engine(resolved.model, resolved.description), host=args.host, port=args.port,
               max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k,
               max_body_bytes=int(args.max_body_mb * 1024 * 1024), threads=args.threads,
               announce=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="answer HTTP requests with a model (POST /predict, a page at /)",
                       description="Serve SOURCE over HTTP on localhost: POST /predict (an image, raw bytes with an "
                                   "image/* content type or a multipart file) -> top-k labels as JSON; POST /rollout; "
                                   "GET /health; GET /metadata; GET / a page where you drop an image and see the top-5 "
                                   "and the attention rollout. Requests are batched up to --max-batch within "
                                   "--max-wait-ms. Needs the extra vitkit[serve] (aiohttp).")
    p.add_argument("source", metavar="SOURCE", help="any model SOURCE: a run, a checkpoint, a model directory, a "
                                                    "pretrained name, or an exported .onnx file")
    p.add_argument("--checkpoint", default=None, metavar="STATE", help="for a run directory: best (default), last, ...")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free one, printed)")
    p.add_argument("--max-batch", type=_positive_int, default=32, help="images per forward pass at most (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels per answer unless ?top_k= (default 5)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body accepted (default 20 MB)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the model (default: torch's)")
    p.set_defaults(func=_cmd_serve)


_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models, _add_download, _add_convert, _add_data, _add_train, _add_pretrain, _add_finetune, _add_export,
    _add_eval,
    _add_predict, _add_serve, _add_fewshot, _add_study, _add_analyze, _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: build, convert, train, inspect.")
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
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
    # exit codes as docs/failures.md gives them; each error is one line, without a traceback
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, WorkStopped, ExportMismatch) as e:
        code = exit_code(e)
        assert code is not None
        if isinstance(e, OSError) and not isinstance(e, DownloadError):  # an unwritable, full or vanished directory
            from vitkit.fileio import describe_os_error

            message = describe_os_error(e)
        else:
            message = str(e)
        print(f"vitkit {command}: error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop, or a second one inside (the first saves)
        print(f"vitkit {command}: {str(e) or 'interrupted by Ctrl-C'}", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
