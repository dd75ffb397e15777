"""benchmarks/time_to_accuracy.py picks, for each minute mark, the newest checkpoint written by then."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_accuracy.py"


@pytest.fixture(scope="module")
def tta():
    spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_are_read_in_time_order_and_picked_by_mark(tta, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step, seconds in ((300, 1250.0), (100, 410.5), (200, 830.0)):
        torch.save({"elapsed": seconds, "global_step": step}, checkpoints / f"step-{step:08d}.pt")
    times = tta.checkpoint_times(tmp_path)
    assert [(s, step) for s, step, _ in times] == [(410.5, 100), (830.0, 200), (1250.0, 300)]
    assert tta.checkpoint_at(times, 400.0) is None
    assert tta.checkpoint_at(times, 410.5)[1] == 100
    assert tta.checkpoint_at(times, 20 * 60)[1] == 200
    assert tta.checkpoint_at(times, 60 * 60)[1] == 300


def test_a_run_without_step_checkpoints_is_a_clear_error(tta, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="no checkpoints/step-"):
        tta.checkpoint_times(tmp_path)
