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
