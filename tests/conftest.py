"""Shared test fixtures. Real data comes from ``$VITKIT_DATA`` or ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The README runs the tests with VITKIT_DATA=../shared/data: made absolute here, before any test module reads
# it, so that links, subprocesses and tests that change directory see the same folder.
if os.environ.get("VITKIT_DATA"):
    os.environ["VITKIT_DATA"] = str(Path(os.environ["VITKIT_DATA"]).resolve())


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("VITKIT_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "cifar10").is_dir():
        pytest.fail(f"test data not found at {root}: set VITKIT_DATA to the folder holding cifar10/, mnist/, ...")
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models gain nothing from threads, and on a loaded 2-core
    machine thread contention makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Module fixtures that train a run (20-40 s under load): every test that uses one is slow. `pytest -m "not slow"`
# leaves them out; the README's command (plain pytest) runs everything, as CI does.
SLOW_FIXTURES = {"trained_run", "stopped_run", "pretrained_run"}
# Tests of 14 s and more under load in modules other branches are rewriting (marked here, not in their files).
SLOW_TESTS = {
    "test_the_loop_trains_the_default_recipe_and_resumes_as_it_did_before_its_rewrite",
    "test_a_budget_times_the_first_steps_fixes_the_length_and_a_rerun_of_that_length_is_the_same_run",
    "test_a_stopped_run_prints_a_resume_command_that_runs",
    "test_a_host_that_slows_down_mid_run_still_ends_near_its_budget",
    "test_a_run_on_class_folders_that_draws_from_the_global_rng_resumes_bit_for_bit",
    "test_the_default_recipes_conv_stem_model_exports",
    "test_int8_quantizes_linear_layers_and_agrees",
    "test_dynamic_size_resamples_position_embeddings_in_the_graph",
    "test_onnx_export_dynamic_batch_metadata_and_standard_ops",
    "test_a_disagreeing_export_is_not_written_and_exits_4",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", None) or item.name
        if name in SLOW_TESTS or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
