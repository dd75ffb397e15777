"""Test accuracy against wall-clock training time, read from the step checkpoints of finished runs.

A run trained with ``--ckpt_every_steps N --keep_last_k K`` (K large enough to keep them all) leaves
``checkpoints/step-*.pt``, each holding ``elapsed``: the run's training seconds (evaluations included)
when it was written. For each minute mark this script takes the newest checkpoint written by then and
evaluates it on the data set's test split with flip test-time augmentation (``vitkit eval``'s road, so
the numbers are what a user gets; the run's final checkpoint also without it), then prints a table.
Evaluating afterwards keeps the runs' clocks free of extra evaluations; the checkpoints' weights are
exactly those the runs had at that time.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py recipe=runs/A plain=runs/B \
        --minutes 10,20,30,45,60 --json benchmarks/results/DATE/time_to_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from vitkit.train.evaluate import evaluate_trained


def checkpoint_times(run_dir: Path) -> list[tuple[float, int, Path]]:
    """(training seconds, optimizer step, path) of every step checkpoint of ``run_dir``, oldest first."""
    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        found.append((float(saved["elapsed"]), int(saved["global_step"]), path))
    if not found:
        raise SystemExit(f"{run_dir}: no checkpoints/step-*.pt (train with --ckpt_every_steps N --keep_last_k K)")
    return sorted(found)


def checkpoint_at(times: list[tuple[float, int, Path]], seconds: float) -> tuple[float, int, Path] | None:
    """The newest checkpoint written within ``seconds`` of training, or None if there is none yet."""
    taken = [entry for entry in times if entry[0] <= seconds]
    return taken[-1] if taken else None


def measure(label: str, run_dir: Path, minutes: list[float], batch_size: int) -> dict:
    times = checkpoint_times(run_dir)
    cache: dict[Path, dict] = {}
    rows = []
    for mark in minutes:
        entry = checkpoint_at(times, mark * 60)
        if entry is None:
            rows.append({"minutes": mark, "checkpoint": None})
            continue
        seconds, step, path = entry
        if path not in cache:
            accs = {}
            for tta in (True, False) if path == times[-1][2] else (True,):
                report = evaluate_trained(path, batch_size=batch_size, device="cpu", hflip_tta=tta,
                                          out_dir=run_dir / "eval-time-to-accuracy" / f"{path.stem}-tta{int(tta)}")
                accs["acc_hflip_tta" if tta else "acc"] = report.result.top1
            cache[path] = {"checkpoint": path.name, "step": step, "train_minutes": round(seconds / 60, 2), **accs}
            without = f", {100 * accs['acc']:.2f}% without" if "acc" in accs else ""
            print(f"{label}: {path.name} at {seconds / 60:.1f} min: {100 * accs['acc_hflip_tta']:.2f}% with flip "
                  f"TTA{without}", flush=True)
        rows.append({"minutes": mark, **cache[path]})
    return {"label": label, "run_dir": str(run_dir), "final_train_minutes": round(times[-1][0] / 60, 2),
            "marks": rows}


def markdown(results: list[dict], minutes: list[float]) -> str:
    head = "| model | " + " | ".join(f"{m:g} min" for m in minutes) + " |"
    lines = [head, "| --- |" + " --- |" * len(minutes)]
    for result in results:
        cells = []
        for row in result["marks"]:
            if row["checkpoint"] is None:
                cells.append("-")
            else:
                without = f" ({100 * row['acc']:.2f})" if "acc" in row else ""
                cells.append(f"{100 * row['acc_hflip_tta']:.2f}{without} @{row['train_minutes']:.1f}")
        lines.append(f"| {result['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--minutes", default="10,20,30,45,60")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    minutes = [float(m) for m in args.minutes.split(",")]
    results = []
    for spec in args.runs:
        label, sep, run = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: give runs as LABEL=RUN_DIR")
        results.append(measure(label, Path(run), minutes, args.batch_size))
    print("\ncells: test accuracy % with flip TTA (without, for the final checkpoint) @ training minutes of the "
          "checkpoint used\n")
    print(markdown(results, minutes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
