"""Transfer evidence (paper Sec. 3.2 / 4.1 on a CPU scale): pre-train a small ViT on CIFAR-10 at 32x32,
fine-tune it on the Imagenette subset at two resolutions, against the same model trained on Imagenette
from scratch and against fine-tuning with re-initialised (not interpolated) position embeddings; then
few-shot linear accuracy (1/5/10/25 shots) of the pre-trained features next to a random network's.

Not a test: it prints one table with accuracy, time and the exact `vitkit` command of every row, and
writes it to OUT/evidence.md (and .json). Every row runs through the CLI entry point in-process.

    python benchmarks/transfer_evidence.py --out runs/transfer            # the protocol (GPU: minutes)
    python benchmarks/transfer_evidence.py --profile cpu --pretrained RUN --out runs/transfer-cpu
    python benchmarks/transfer_evidence.py --profile quick --out runs/transfer-q  # a cheap smoke version

``--pretrained RUN`` reuses a finished CIFAR-10 run (e.g. ``benchmarks/train_recipes.py cifar10``'s)
instead of pre-training again; the ``cpu`` profile is sized for that run's conv-stem ViT on 2 cores.

Data: $VITKIT_DATA, else ../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

PROFILES: dict[str, dict[str, Any]] = {
    # ViT for CIFAR-10 (D 192, depth 9, patch 4): 64 and 128 px give 256 and 1024 patches.
    "full": dict(model="{name: vit_cifar_patch4_32}", pretrain_epochs=30, pretrain_per_class=None,
                 finetune_epochs=20, scratch_epochs=20, resolutions=(64, 128), batch_size=64, warmup=2.0,
                 fewshot_max_train=None, fewshot_max_test=None, seeds=5, num_workers=4),
    # The CIFAR-10 recipe's conv-stem ViT (stride 4: 256 / 576 tokens at 64 / 96 px), short schedules.
    "cpu": dict(model="{name: vit_convstem_cifar_32}", pretrain_epochs=16, pretrain_per_class=None,
                finetune_epochs=6, scratch_epochs=6, resolutions=(64, 96), batch_size=64, warmup=0.5,
                fewshot_max_train=10000, fewshot_max_test=2000, seeds=3, num_workers=2),
    # A 4-layer, D 128 ViT with 8x8 patches (16 / 64 / 256 tokens at 32 / 64 / 128 px), short schedules.
    "quick": dict(model="{name: vit_cifar_patch4_32, patch_size: 8, depth: 4, embed_dim: 128, num_heads: 4, "
                        "mlp_dim: 256}",
                  pretrain_epochs=4, pretrain_per_class=1000, finetune_epochs=4, scratch_epochs=4,
                  resolutions=(64, 128), batch_size=50, warmup=0.5, fewshot_max_train=5000,
                  fewshot_max_test=1000, seeds=3, num_workers=0),
}


@dataclass
class Row:
    group: str
    name: str
    command: str
    accuracy: str = "-"
    seconds: float = 0.0
    note: str = ""


def shell_command(argv: list[str]) -> str:
    return "vitkit " + " ".join(a if " " not in a and "{" not in a else f"'{a}'" for a in argv)


def run_cli(argv: list[str]) -> float:
    """Run one ``vitkit`` command in-process; its wall time in seconds."""
    from vitkit.cli import main

    print(f"\n$ {shell_command(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"exit code {code}")
    return time.perf_counter() - start


def last_val_acc(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "epoch" and "val_acc" in r][-1]["val_acc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/transfer-evidence", help="where runs and the table go")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--pretrained", type=Path, help="a finished CIFAR-10 run to use instead of pre-training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "finetune", "scratch", "reinit",
                                                                   "fewshot"], help="leave out row groups")
    parser.add_argument("--resolutions", type=int, nargs="+", help="fine-tuning resolutions (profile default)")
    parser.add_argument("--epochs", type=int, help="fine-tuning and from-scratch epochs (profile default)")
    args = parser.parse_args()
    profile = dict(PROFILES[args.profile])
    if args.resolutions:
        profile["resolutions"] = tuple(args.resolutions)
    if args.epochs:
        profile["finetune_epochs"] = profile["scratch_epochs"] = args.epochs
    data_root = Path(os.environ.setdefault("VITKIT_DATA", str(REPO.parent / "shared" / "data")))
    imagenette = f"folder:{data_root / 'imagenette_subset'}"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device, "--progress", "plain", "--out_dir", str(out),
              "--data.num_workers", str(profile["num_workers"]), "--data.batch_size", str(profile["batch_size"]),
              "--optim.warmup_epochs", str(profile["warmup"])]
    rows: list[Row] = []

    def attempt(row: Row, argv: list[str], accuracy) -> None:
        row.command = shell_command(argv)
        try:
            row.seconds = run_cli(argv)
            row.accuracy = accuracy()
        except Exception as e:  # one failed row must not lose the others
            row.note = f"failed: {type(e).__name__}: {e}"
            print(row.note, file=sys.stderr)
        rows.append(row)

    # 1. Pre-training on CIFAR-10 at 32x32 (the training issue's recipe: AdamW, warmup, cosine).
    pre = args.pretrained.resolve() if args.pretrained else out / "pretrain-cifar10"
    if args.pretrained and not (pre / "model").is_dir():
        print(f"--pretrained {pre}: no finished run there (no model/ directory)", file=sys.stderr)
        return 1
    if "pretrain" not in args.skip and not (pre / "model").is_dir():
        argv = ["train", "--model", profile["model"], "--dataset", "cifar10", "--epochs",
                str(profile["pretrain_epochs"]), "--run_name", pre.name, *common]
        if profile["pretrain_per_class"]:
            argv += ["--data.samples_per_class", str(profile["pretrain_per_class"])]
        attempt(Row("pre-train", "CIFAR-10 32px (val = CIFAR-10 test)", ""), argv,
                lambda: f"{100 * last_val_acc(pre):.2f}")
    elif (pre / "model").is_dir():
        rows.append(Row("pre-train", "CIFAR-10 32px (val = CIFAR-10 test)", f"(existing run {pre})",
                        f"{100 * last_val_acc(pre):.2f}", note="reused"))

    if not (pre / "model").is_dir():
        print(f"no pre-trained model in {pre}; stopping", file=sys.stderr)
        print("\n" + format_table(rows))
        return 1

    # 2. Imagenette at each resolution: fine-tuned, from scratch, fine-tuned with fresh position embeddings.
    for res in profile["resolutions"]:
        ft_common = ["--dataset", imagenette, "--img-size", str(res), "--epochs", str(profile["finetune_epochs"]),
                     *common]
        variants = [("finetune", f"fine-tune {res}px, pos-embed interpolated", []),
                    ("reinit", f"fine-tune {res}px, pos-embed re-initialised", ["--finetune.pos_embed", "reinit"])]
        for key, name, extra in variants:
            if key in args.skip:
                continue
            run = out / f"{key}-{res}"
            attempt(Row("Imagenette", name, ""),
                    ["finetune", "--init", str(pre), *ft_common, "--run_name", run.name, *extra],
                    lambda run=run: f"{100 * last_val_acc(run):.2f}")
        if "scratch" not in args.skip:
            run = out / f"scratch-{res}"
            attempt(Row("Imagenette", f"from scratch {res}px (AdamW recipe)", ""),
                    ["train", "--model", profile["model"], "--dataset", imagenette, "--data.img_size", str(res),
                     "--epochs", str(profile["scratch_epochs"]), "--run_name", run.name, *common],
                    lambda run=run: f"{100 * last_val_acc(run):.2f}")

    # 3. Few-shot linear evaluation of the frozen pre-trained features against a random network's.
    if "fewshot" not in args.skip:
        import vitkit

        random_dir = out / "random-init"
        if not random_dir.is_dir():
            config = vitkit.load_model(pre / "model").config
            vitkit.build_model(config).save_pretrained(random_dir)  # same architecture, fresh weights
        for dataset, limits in (("imagenette_subset", []),
                                ("cifar10", _limits(profile))):
            for label, source in (("pre-trained", pre), ("random init", random_dir)):
                report = out / f"fewshot-{dataset}-{source.name}.json"
                argv = ["fewshot", str(source), "--dataset", dataset, "--shots", "1,5,10,25", "--seeds",
                        str(profile["seeds"]), "--probe", "--cache-dir", str(out / "feature-cache"),
                        "--json", str(report), *limits]
                attempt(Row(f"few-shot {dataset}", label, ""), argv, lambda report=report: _fewshot_cell(report))

    table = format_table(rows)
    print("\n" + table)
    (out / "evidence.md").write_text(table + "\n")
    (out / "evidence.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0 if not any(r.note.startswith("failed") for r in rows) else 1


def _limits(profile: dict[str, Any]) -> list[str]:
    limits = []
    if profile["fewshot_max_train"]:
        limits += ["--max-train", str(profile["fewshot_max_train"])]
    if profile["fewshot_max_test"]:
        limits += ["--max-test", str(profile["fewshot_max_test"])]
    return limits


def _fewshot_cell(report: Path) -> str:
    data = json.loads(report.read_text())
    cells = [f"{r['shots']}: {100 * r['mean']:.1f}±{100 * r['std']:.1f}" for r in data["fewshot"]]
    if data.get("probe"):
        cells.append(f"probe: {100 * data['probe']['test_accuracy']:.1f}")
    return ", ".join(cells)


def format_table(rows: list[Row]) -> str:
    lines = ["| group | row | accuracy % | time | command |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = r.accuracy if not r.note.startswith("failed") else r.note
        lines.append(f"| {r.group} | {r.name} | {acc} | {r.seconds:.0f}s | `{r.command}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
