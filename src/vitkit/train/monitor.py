"""What a run shows and records: a tqdm bar (or plain lines off a terminal), one summary line per epoch,
``metrics.jsonl`` and TensorBoard events. Only the main process writes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from vitkit.fileio import atomic_path, atomic_write_text, describe_os_error
from vitkit.train.rundir import RunDirectoryError

METRICS_NAME = "metrics.jsonl"


class RunLog:
    """Appends one JSON line per event to ``metrics.jsonl`` and mirrors the numbers to TensorBoard.

    On resume from optimizer step ``S``, lines and events logged after ``S`` by the interrupted process are
    dropped first, so the log reads as if the run had never stopped.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: Optional[int] = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self._writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            atomic_write_text("".join(f"{line}\n" for line in kept), self.path)
        # Imported here, not at the top: tensorboard's import takes seconds and only logging runs need it.
        from torch.utils.tensorboard import SummaryWriter

        threading.excepthook = _quiet_tensorboard_thread
        purge = resume_step + 1 if resume_step is not None else None
        tensorboard = Path(run_dir) / "tensorboard"
        try:
            self._writer = SummaryWriter(log_dir=str(tensorboard), purge_step=purge)
        except OSError as e:  # a full disk: TensorBoard's first write names no file
            raise RunDirectoryError(f"cannot write the run's logs in {run_dir} "
                                    f"({describe_os_error(_named(e, tensorboard))})") from None
        self._file = open(self.path, "a", buffering=1)

    def log(self, kind: str, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        self._check_run_dir()
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self._writing():
            self._file.write(json.dumps(record) + "\n")
        with self._writing(self.path.parent / "tensorboard"):
            for name, value in record.items():
                if name not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def figures(self, figures: dict[str, Any], step: int, epoch: int) -> None:
        """Save each matplotlib figure as ``NAME.png`` (the latest) and ``figures/NAME-epochNNN.png`` in the
        run directory, and as an image in TensorBoard; then close it."""
        if not figures:
            return
        import matplotlib.pyplot as plt

        run_dir = self.path.parent
        for name, fig in figures.items():
            for path in (run_dir / f"{name}.png", run_dir / "figures" / f"{name}-epoch{epoch:03d}.png"):
                with atomic_path(path) as tmp:
                    fig.savefig(tmp, dpi=120, format="png")
            if self.enabled:
                self._writer.add_figure(name, fig, step, close=False)
            plt.close(fig)

    def flush(self) -> None:
        if self.enabled:
            self._check_run_dir()
            with self._writing():
                self._file.flush()
            with self._writing(self.path.parent / "tensorboard"):
                self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.enabled = False
            self._file.close()
            with contextlib.suppress(OSError):  # the run's outcome is already decided; keep its message
                self._writer.close()

    def _check_run_dir(self) -> None:
        """Stop with one clear line when the run directory was deleted (or moved) under a running job."""
        if os.fstat(self._file.fileno()).st_nlink == 0 or not self.path.parent.is_dir():
            raise RunDirectoryError(f"the run directory {self.path.parent} was deleted or moved during the run; "
                                    "training stopped, as nothing more could be saved")

    @contextlib.contextmanager
    def _writing(self, target: Optional[Path] = None) -> Iterator[None]:
        """Turn a failed write into one line naming ``target`` (default: ``metrics.jsonl``)."""
        try:
            yield
        except RunDirectoryError:
            raise
        except OSError as e:
            self._check_run_dir()  # the directory itself vanished (TensorBoard's thread may notice first): say so
            raise RunDirectoryError(f"cannot write the run's logs in {self.path.parent} "
                                    f"({describe_os_error(_named(e, target or self.path))})") from None


def _named(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` when it names no file (a write to an open file says neither which nor where)."""
    if error.filename is not None:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))


def _quiet_tensorboard_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread hands its I/O errors to the next write in the main thread, which reports
    them in one line; printing the thread's own traceback first would only bury that line."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _default_thread_hook(args)


_default_thread_hook = threading.excepthook


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (half-written) line goes


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.7g}")  # 7 significant digits: all a float32 metric holds
    return value


# ------------------------------------------------------------------------------------ display
class Progress:
    """A tqdm bar per epoch on a terminal; otherwise (output to a file or a pipe) a plain line every
    ``log_every`` steps and, for long windows, at least every :attr:`HEARTBEAT_SECONDS`, so logs stay
    clean but never silent for long. The bar shows the running numbers from an epoch's first step (refreshed
    every :attr:`BAR_SECONDS`), and the run's time left beside tqdm's time left in the epoch."""

    HEARTBEAT_SECONDS = 60.0
    BAR_SECONDS = 1.0

    def __init__(self, mode: str, *, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self._bar = None
        self._epoch_label = ""
        self._last_line = time.perf_counter()
        self._bar_shown: float | None = None

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self._epoch_label = f"epoch {epoch + 1}/{epochs}"
        self._total = total_steps
        if self.mode == "bar":
            self._bar = tqdm(total=total_steps, initial=done_steps, desc=self._epoch_label, unit="step",
                             dynamic_ncols=True, leave=True, file=sys.stderr)
            self._bar_shown = None

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def due(self) -> bool:
        """True when the running numbers should be shown between log lines: on a bar that has none yet (or
        older than :attr:`BAR_SECONDS`), in plain mode when no line was printed for :attr:`HEARTBEAT_SECONDS`."""
        now = time.perf_counter()
        if self._bar is not None:
            return self._bar_shown is None or now - self._bar_shown >= self.BAR_SECONDS
        return self.mode == "plain" and now - self._last_line >= self.HEARTBEAT_SECONDS

    def show(self, step_in_epoch: int, metrics: dict[str, float], eta: float | None = None) -> None:
        """The running metrics (``loss``, ``acc``, ``lr``, ``img_per_s`` ... whichever are given) and the
        run's time left ``eta`` (seconds), when known."""
        parts = []
        for name, value in metrics.items():
            if name == "lr":
                parts.append(f"lr {value:.2e}")
            elif name == "img_per_s":
                parts.append(f"{value:,.0f} img/s")
            elif name.endswith(("acc", "top5")):
                parts.append(f"{name} {100 * value:.2f}%")
            elif name != "grad_norm":
                parts.append(f"{name} {value:.4f}")
        if eta is not None:
            parts.append(f"run ETA {format_duration(eta)}")
        if self._bar is not None:
            self._bar.set_postfix_str(" ".join(parts))
            self._bar_shown = time.perf_counter()
        elif self.mode == "plain":
            print(f"{self._epoch_label} step {step_in_epoch}/{self._total} | " + " | ".join(parts), flush=True)
        self._last_line = time.perf_counter()

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print(self, line: str) -> None:
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self._last_line = time.perf_counter()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Stopwatch:
    """Wall-clock time of the run, carried across resumptions."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self._start = time.perf_counter() - elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start
