"""One function that turns a model SOURCE named on the command line into a model.

A SOURCE is a vitkit model directory (``config.json`` + ``model.safetensors``), a vitkit training
run directory (its exported model is used), a registry name with ``random_init=True`` (random
weights: the floor of a transfer comparison), or anything :func:`vitkit.from_pretrained` reads
(timm, Hugging Face, torchvision, Google ``.npz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vitkit.checkpoint import load_model
from vitkit.convert import from_pretrained
from vitkit.fileio import CONFIG_NAME, WEIGHTS_NAME
from vitkit.models.registry import create_model

# Where a training run keeps a model in vitkit's format, best first.
RUN_MODEL_DIRS = ("model", "best", "export", "last")


def load_source(source: str | Path, *, random_init: bool = False, **overrides: Any) -> nn.Module:
    """Build the model ``source`` names; ``overrides`` (e.g. ``img_size``) change its config."""
    if random_init:
        return create_model(str(source), **overrides)
    model_dir = find_model_dir(source)
    if model_dir is not None:
        return load_model(model_dir, **overrides)
    return from_pretrained(str(source), **overrides)


def find_model_dir(source: str | Path) -> Path | None:
    """The vitkit model directory ``source`` is or holds (a training run's exported model), else None."""
    path = Path(source)
    if not path.is_dir():
        return None
    for candidate in (path, *(path / name for name in RUN_MODEL_DIRS)):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    return None
