"""A run that fits the clock: the measured pace of a run (seconds per optimizer step and per evaluation), its
time left, and the number of optimizer steps that fit a time budget (``time_budget: 60m``).

The budget fixes the schedule once, early: the first steps (still in warmup, where the learning rate does not
depend on the run's length) are timed, and the total number of steps is chosen so that the remaining steps,
every evaluation on the way and the last one end inside the budget. After each evaluation and at every tenth
of the run's steps the plan is checked against the pace since the previous check; a host that slowed down (or
sped up) gets its remaining cosine decay compressed (or stretched) to the new total, the learning rate
continuing from where it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh])")

MEASURE_STEPS = 20
"""Step intervals timed before the plan (after the first step, which pays one-off start-up costs)."""
RESERVE = 0.01
"""Fraction of the budget left for the end of the run (export, figures) and rounding."""
REPLAN_CHECKS = 10
"""Besides after each evaluation, the plan is checked at every ``1 / REPLAN_CHECKS`` of the run's steps (a run
on a slow host may have no evaluation before its last)."""
REPLAN_TOLERANCE = 0.02
"""A re-plan changes the schedule only when the steps that fit differ from the plan's by more than this
fraction of the budget in time (so the noise of a loaded host does not move it at every check)."""
EVAL_COST = 1 / 3
"""Before the first evaluation is timed: an evaluated image costs this fraction of a trained one (a forward
pass without the backward, which costs about two forwards)."""


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``60m``, ``1h30m``, ``1.5h``, ``90s`` or a plain number of seconds; ``ValueError`` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spec = str(text).strip().lower()
        try:
            seconds = float(spec)
        except ValueError:
            parts = _DURATION.findall(spec)
            if not parts or _DURATION.sub("", spec).strip():
                raise ValueError(f"time_budget: {text!r} is not a duration (e.g. 60m, 1h30m, 1.5h, 90s)") from None
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"time_budget: {text!r} must be a positive, finite duration")
    return seconds


class Pace:
    """Seconds per optimizer step and per evaluation, measured by this process on ``clock``.

    A step's time runs from the previous step's end (or the start of the epoch) to its own end, so data
    loading, logging and checkpoints are in it; evaluations are timed on their own. The first step of the
    process is not counted: it pays for start-up (allocations, worker processes, caches)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.step_seconds = 0.0
        self.steps = 0
        self.window_seconds = 0.0
        self.window_steps = 0
        """The same since :meth:`new_window` (the previous re-plan check): the pace a re-plan trusts."""
        self.eval_seconds: list[float] = []
        self._last: float | None = None
        self._first = True
        self._first_seconds: float | None = None

    def start(self) -> None:
        """Time the next step from now (at the start of an epoch)."""
        self._last = self.clock()

    def step(self) -> None:
        now = self.clock()
        if self._last is not None and self._first:
            self._first_seconds = now - self._last
        if self._last is not None and not self._first:
            self.step_seconds += now - self._last
            self.steps += 1
            self.window_seconds += now - self._last
            self.window_steps += 1
        self._first = False
        self._last = now

    def evaluation(self, seconds: float) -> None:
        self.eval_seconds.append(seconds)

    def new_window(self) -> None:
        self.window_seconds, self.window_steps = 0.0, 0

    def seconds_per_step(self, recent: bool = False) -> float | None:
        """The mean over the process (``recent``: over the current window when it has steps); the first step's
        time, an overestimate, while it is the only one."""
        if recent and self.window_steps:
            return self.window_seconds / self.window_steps
        return self.step_seconds / self.steps if self.steps else self._first_seconds

    def seconds_per_evaluation(self, estimate: float) -> float:
        """The last evaluation's time, or ``estimate`` before the first."""
        return self.eval_seconds[-1] if self.eval_seconds else estimate

    def eta(self, steps_left: int, evaluations_left: int, eval_estimate: float) -> float | None:
        """Seconds to the end of the run at this pace; None before a step was timed."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        return steps_left * per_step + evaluations_left * self.seconds_per_evaluation(eval_estimate)


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates: at the end of every ``eval_every``-th epoch of ``steps_per_epoch`` steps, and
    after its last step."""

    steps_per_epoch: int
    eval_every: int

    def evaluations(self, total_steps: int, first_epoch: int) -> int:
        """Evaluations at the ends of epochs ``first_epoch`` (0-based) onwards, for a run of ``total_steps``."""
        last_epoch = math.ceil(total_steps / self.steps_per_epoch) - 1
        if last_epoch < first_epoch:
            return 0
        # epochs j in [first_epoch, last_epoch) with (j + 1) % eval_every == 0, then the last one
        periodic = (last_epoch // self.eval_every) - (first_epoch // self.eval_every)
        return periodic + 1


def steps_that_fit(seconds_left: float, *, step: int, seconds_per_step: float, seconds_per_evaluation: float,
                   cadence: Cadence, first_epoch: int) -> int:
    """The largest total number of optimizer steps ``N`` whose remaining ``N - step`` steps and evaluations
    (at the ends of epochs ``first_epoch`` onwards) take at most ``seconds_left``; ``step`` (stop now) if not
    even one more step fits."""
    def cost(total: int) -> float:
        return ((total - step) * seconds_per_step
                + cadence.evaluations(total, first_epoch) * seconds_per_evaluation)

    low, high = step + 1, step + 1 + max(0, int(seconds_left / max(seconds_per_step, 1e-12)))
    if cost(low) > seconds_left:
        return step
    while low < high:  # cost grows with the total: the last total that fits
        mid = (low + high + 1) // 2
        if cost(mid) <= seconds_left:
            low = mid
        else:
            high = mid - 1
    return low


def format_budget(seconds: float) -> str:
    """``60m``, ``1h30m``, ``90s``: a budget as a user writes it."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"
