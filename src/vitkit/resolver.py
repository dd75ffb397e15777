"""One road from "whatever the user named" to a model, for every command and for ``vitkit.load_model``.

A SOURCE is, in the order tried:

1. a local path:
   - a training run directory: its best checkpoint, else its last, else its exported ``model/``
     (another state with ``checkpoint="last"``, ``"step-N"`` or ``"model"``); a run stopped before
     its end works, it needs no ``model/``;
   - a training checkpoint file (``RUN/checkpoints/best.pt``, ``last.pt``, ``step-N.pt``, or any file
     with vitkit's training-checkpoint marker): its EMA weights when it has them, as a run exports;
   - a vitkit model directory (``config.json`` + ``model.safetensors``);
   - any other checkpoint :func:`vitkit.convert.read_checkpoint` recognises (timm, Hugging Face,
     torchvision, Google ``.npz``);
   - an ``.onnx`` file written by ``vitkit export --format onnx``: run through onnxruntime
     (:class:`vitkit.deploy.OnnxModel`, the optional extra ``vitkit[onnx]``);
2. whatever a registered :data:`SourceHook` maps to a local path or builds: :mod:`vitkit.hub`'s hook
   (registered at the end of this module) takes pretrained names (``vit_base_patch16_224.augreg2_in21k_ft_in1k``,
   or a bare architecture with catalog weights), Hugging Face repo ids and URLs;
3. a registry name, built with random weights when ``random_init=True`` is asked for.

Resolving (:func:`resolve_source`) reads no weights: it decides what to read and returns a
:class:`ModelSource`. Loading (:func:`load_source`) builds the model and returns a
:class:`ResolvedModel` that says which state was used, so that commands can print it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from vitkit.checkpoint import CheckpointError, read_config, torch_load_safely
from vitkit.convert.detect import Checkpoint, is_vitkit_directory, read_checkpoint
from vitkit.convert.pretrained import create_untrained, from_checkpoint, from_hub_source
from vitkit.deploy.runtime import load_onnx
from vitkit.fileio import CONFIG_NAME, WEIGHTS_NAME
from vitkit.hub import fetch_source
from vitkit.models.features import maybe_feature_extractor, split_feature_options
from vitkit.models.registry import build_registered, get_model_config, get_model_entry, list_models
from vitkit.runfiles import (
    CHECKPOINT_DIR,
    MODEL_DIR,
    SHARDED_SUFFIX,
    best_score,
    checkpoint_config,
    checkpoint_weights,
    default_state,
    describe_checkpoint,
    is_run_checkpoint_name,
    is_run_dir,
    is_sharded_checkpoint,
    is_training_checkpoint,
    load_checkpoint,
    read_run_config,
    run_of_checkpoint,
    state_path,
)

SourceKind = Literal["registry", "vitkit", "training", "foreign", "pretrained", "onnx"]
"""``registry``: a registered name, random weights. ``vitkit``: a vitkit model directory (maybe a run's
``model/``). ``training``: a training checkpoint (maybe a run's state). ``foreign``: another library's
checkpoint, read by :mod:`vitkit.convert`. ``pretrained``: published weights a :data:`SourceHook` fetched
and builds itself (its ``build``). ``onnx``: an exported ONNX file, run by onnxruntime."""

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_FORMAT_LABELS = {"vitkit": "vitkit", "timm": "timm", "huggingface": "Hugging Face", "torchvision": "torchvision",
                  "jax": "Google .npz"}


@dataclass(frozen=True)
class ModelSource:
    """What a SOURCE names, decided before any weights are read."""

    spec: str
    """What the user named, verbatim."""
    kind: SourceKind
    path: Optional[Path] = None
    """The local file or directory to read (None for a registry name)."""
    run_dir: Optional[Path] = None
    """The training run the weights belong to, if any."""
    state: Optional[str] = None
    """Which state of ``run_dir``: ``best``, ``last``, ``step-NNNNNNNN`` or ``model`` (the exported final model)."""
    format: Optional[str] = None
    """A foreign checkpoint's format, when detection is to be skipped (``vitkit convert --from``)."""
    origin: Optional[str] = None
    """What a :data:`SourceHook` resolved (e.g. ``hf-hub:org/repo``), shown before the local path."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Loading options a hook knows for this source (e.g. ``model=`` or ``num_heads=`` from a catalog);
    the caller's options win."""
    build: Optional[Callable[..., nn.Module]] = None
    """For a source a hook builds itself: called with the loading options (``img_size``, ``num_classes``,
    ``model``, ...) instead of reading ``path`` with :mod:`vitkit.convert`, e.g. to give fetched weights
    their publisher's class names and preprocessing."""

    @property
    def label(self) -> str:
        """The source in a few words, e.g. ``runs/x (best checkpoint)``."""
        where = str(self.run_dir if self.run_dir is not None and self.state else self.path or self.spec)
        what = {"registry": "registered model, random weights", "vitkit": "vitkit model directory",
                "training": "training checkpoint", "foreign": "checkpoint",
                "pretrained": "pretrained weights", "onnx": "ONNX model"}[self.kind]
        if self.run_dir is not None and self.state:
            what = "exported final model" if self.state == "model" else f"{self.state} checkpoint"
        prefix = f"{self.origin} -> " if self.origin else ""
        return f"{prefix}{where} ({what})"


@dataclass
class ResolvedModel:
    """A model and where it came from."""

    model: nn.Module
    source: ModelSource
    description: str
    """One line that says what was loaded, e.g. ``runs/x: best checkpoint (runs/x/checkpoints/best.pt: epoch
    5 of 23 done, step 120, best val acc 41.20%)``; commands print it."""
    training_config: Optional[dict[str, Any]] = None
    """The training config of the run (or checkpoint) the weights come from, if any."""
    progress: Optional[dict[str, Any]] = None
    """For a training checkpoint: where in its run it was taken (``epoch`` finished epochs, ``batch``,
    ``global_step``, ``best_acc``, ``ema``)."""

    @property
    def run_dir(self) -> Optional[Path]:
        return self.source.run_dir


# ----------------------------------------------------------------------------------------- hooks
SourceHook = Callable[[str], "ModelSource | Path | str | None"]
"""Maps a SOURCE that is not a local path to something local, or returns None when the string is not its
kind. It may download (and cache) files. It returns a local path (a file or directory of any kind this module
reads, resolved as if the user had named it) or a complete :class:`ModelSource` (to set ``format`` or
``defaults``, e.g. the head count a catalog knows). It raises ``ValueError`` (or ``CheckpointError``) with a
clear message for a string of its kind that it cannot serve (an unknown tag, no network)."""

_SOURCE_HOOKS: dict[str, SourceHook] = {}


def register_source_hook(name: str, hook: SourceHook) -> None:
    """Add (or, under the same ``name``, replace) a hook; hooks run in registration order, after local
    paths and before registry names (so a hook may give a bare registry name its default pretrained weights)."""
    _SOURCE_HOOKS[name] = hook


def unregister_source_hook(name: str) -> None:
    _SOURCE_HOOKS.pop(name, None)


# ------------------------------------------------------------------------------------- resolving
def resolve_source(spec: str | Path, *, checkpoint: str | None = None, random_init: bool = False,
                   format: str | None = None) -> ModelSource:
    """Decide what ``spec`` names, reading no weights (a torch file outside a run is peeked at, memory-mapped,
    to tell a training checkpoint from a foreign state dict).

    ``checkpoint`` picks a run's state (``best``, ``last``, ``step-N``, ``model``); ``random_init`` builds a
    registry name with random weights; ``format`` skips detection of a foreign checkpoint's format.
    """
    text = str(spec)
    if random_init:
        if checkpoint is not None:
            raise ValueError("random_init builds a registered model; it takes no checkpoint")
        get_model_entry(text)  # an unknown name: error with close matches
        return ModelSource(text, "registry")
    path = Path(text).expanduser()
    if path.exists():
        return resolve_path(path, spec=text, checkpoint=checkpoint, format=format)
    for hook in list(_SOURCE_HOOKS.values()):
        found = hook(text)
        if found is None:
            continue
        if isinstance(found, ModelSource):
            return found
        local = resolve_path(Path(found), spec=text, checkpoint=checkpoint, format=format)
        return dataclasses.replace(local, origin=text)
    if text in list_models():
        raise ValueError(f"{text!r} is a registered architecture, not trained weights: build it with random "
                         "weights with --random-init (random_init=True), or name a checkpoint, model or run directory")
    looks_like_path = "/" in text or "\\" in text or Path(text).suffix.lower() in (*_TORCH_SUFFIXES, ".safetensors",
                                                                                   ".npz")
    if looks_like_path:
        raise CheckpointError(f"{text}: no such file or directory")
    try:
        get_model_entry(text)
    except ValueError as e:  # carries the did-you-mean list
        raise ValueError(f"{text!r} is neither a file or directory nor a model name: {e}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def resolve_path(path: str | Path, *, spec: str | None = None, checkpoint: str | None = None,
                 format: str | None = None) -> ModelSource:
    """:func:`resolve_source` for a local file or directory (what a :data:`SourceHook` hands back)."""
    path = Path(path)
    spec = str(path) if spec is None else spec
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and is_run_dir(path) and not (path / CONFIG_NAME).is_file():
        state = checkpoint or default_state(path)
        chosen = state_path(path, state)
        state = _state_label(chosen)
        kind: SourceKind = "vitkit" if chosen.is_dir() and not is_sharded_checkpoint(chosen) else "training"
        return ModelSource(spec, kind, chosen, run_dir=path, state=state)
    if checkpoint is not None:
        raise ValueError(f"{path}: --checkpoint (a run's state: best, last, step-N, model) needs a run directory, "
                         f"and {path} is not one (no training checkpoint in {CHECKPOINT_DIR}/, no training "
                         "config.yaml)")
    if format is None and is_sharded_checkpoint(path):
        return ModelSource(spec, "training", path, run_dir=run_of_checkpoint(path), state=_state_label(path))
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and format is None and is_vitkit_directory(path):
            run_dir = path.parent if path.name == MODEL_DIR and is_run_dir(path.parent) else None
            return ModelSource(spec, "vitkit", path, run_dir=run_dir, state="model" if run_dir else None)
        if (path / CONFIG_NAME).is_file():
            return ModelSource(spec, "foreign", path, format=format)
        raise CheckpointError(
            f"{path}: not a model: a run directory has a training checkpoint in {CHECKPOINT_DIR}/ (or its "
            f"config.yaml), a vitkit model directory {CONFIG_NAME} + {WEIGHTS_NAME}, a Hugging Face or timm Hub "
            f"directory a {CONFIG_NAME}; for a bare "
            "weights file pass the file itself")
    if format is None and path.suffix.lower() == ".onnx":
        return ModelSource(spec, "onnx", path)
    run_dir = run_of_checkpoint(path)
    if format is None and run_dir is not None and is_run_checkpoint_name(path.name):
        return ModelSource(spec, "training", path, run_dir=run_dir, state=_state_label(path))
    if format is None and path.suffix.lower() in _TORCH_SUFFIXES and is_training_checkpoint(
            torch_load_safely(path, mmap=True)):
        return ModelSource(spec, "training", path, run_dir=run_dir)
    return ModelSource(spec, "foreign", path, format=format)


def _state_label(path: Path) -> str:
    if path.name == MODEL_DIR:
        return "model"
    return path.name.removesuffix(".pt").removesuffix(SHARDED_SUFFIX)


# --------------------------------------------------------------------------------------- loading
def load_source(spec: str | Path | ModelSource, *, checkpoint: str | None = None, random_init: bool = False,
                format: str | None = None, use_ema: bool = True, **options: Any) -> ResolvedModel:
    """Resolve ``spec`` and build its model.

    ``options`` are :func:`vitkit.convert.read_model`'s: ``img_size`` (position embeddings resampled),
    ``num_classes`` (a fresh zero head when it differs), ``num_heads``, ``model`` (a registry name or config
    to load into, checked field by field), ``interpolation``, and other config fields (``drop_path_rate``).
    A training checkpoint gives its EMA weights unless ``use_ema=False``.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_source(
        spec, checkpoint=checkpoint, random_init=random_init, format=format)
    options = {**source.defaults, **options}
    prefix = f"{source.origin} -> " if source.origin else ""
    if source.kind == "registry":
        given = {k: v for k, v in options.items() if v is not None}
        return ResolvedModel(build_registered(source.spec, **given), source,
                             f"{source.spec}: registered model with RANDOM weights (not trained)")
    if source.build is not None:
        where = f" ({source.path})" if source.path is not None else ""
        return ResolvedModel(source.build(**options), source,
                             f"{source.origin or source.spec}: {source.kind} weights{where}")
    assert source.path is not None
    if source.kind == "onnx":
        given = sorted(k for k, v in options.items() if v is not None and k != "threads")
        if given:
            raise ValueError(f"{source.path}: an ONNX model runs as exported; {', '.join(given)} cannot change it "
                             "(export again from the eager model)")
        model = load_onnx(source.path, threads=options.get("threads"))
        return ResolvedModel(model, source, f"{prefix}{source.path}: ONNX model ({model.precision}, onnxruntime)")
    if source.kind == "training":
        state = load_checkpoint(source.path, mmap=True)
        config = checkpoint_config(state, source=str(source.path))
        weights = checkpoint_weights(state, use_ema=use_ema)
        model = from_checkpoint(Checkpoint("vitkit", source.path, weights, config=config), **options)
        details = describe_checkpoint(state, use_ema=use_ema)
        if source.run_dir is not None and source.state:
            description = f"{source.run_dir}: {source.state} checkpoint ({source.path}: {details})"
        else:
            description = f"{source.path}: training checkpoint ({details})"
        training_config = state.get("config") or read_run_config(source.run_dir)
        progress = {"epoch": int(state.get("epoch", 0)), "batch": int(state.get("batch", 0)),
                    "global_step": int(state.get("global_step", 0)), "best_acc": best_score(state),
                    "ema": bool(use_ema and state.get("ema"))}
        return ResolvedModel(model, source, prefix + description, training_config, progress)
    read = read_checkpoint(source.path, source.format)
    model = from_checkpoint(read, **options)
    if source.kind == "vitkit" and source.run_dir is not None:
        description = f"{source.run_dir}: exported final model ({source.path})"
    elif source.kind == "vitkit":
        description = f"{source.path}: vitkit model directory"
    else:
        description = f"{source.path}: {_FORMAT_LABELS.get(read.format, read.format)} checkpoint"
    return ResolvedModel(model, source, prefix + description, read_run_config(source.run_dir))


def load_model(spec: str | Path, *, map_location: str | torch.device = "cpu", **options: Any) -> nn.Module:
    """The model ``spec`` names, on ``map_location``: a vitkit model directory (``save_pretrained``), a training
    run directory (its best checkpoint, else its last; ``checkpoint="last"``/``"step-N"``/``"model"`` picks
    another), a training checkpoint (``best.pt``, ``last.pt``, ``step-N.pt``), a timm, Hugging Face, torchvision
    or Google .npz checkpoint, and, fetched and cached by :mod:`vitkit.hub`, a pretrained name
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``), a Hugging Face repo id (``google/vit-base-patch16-224``,
    ``hf-hub:timm/...``) or a URL. ``img_size=`` resamples the position embeddings; the other keywords are
    :func:`load_source`'s. ``vitkit.from_pretrained`` is this same function under the name the Hugging Face and
    timm users know."""
    return load_source(spec, **options).model.to(map_location)


def create_model(name: str, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """A registered model by name (``create_model('vit_base_patch16_224', num_classes=10)``); with
    ``pretrained=True`` its weights fetched and loaded, timm-style: ``name`` is ``arch.tag``
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) or a bare architecture (its default weights);
    ``overrides`` (``num_classes``, ``img_size``, ...) adapt it as in :func:`load_model`. Without
    ``pretrained``, ``arch.tag`` builds the architecture shaped as those weights (classes, input size).
    ``features_only=True`` (with ``out_indices``, ``feature_norm``, ``output_fmt``) gives timm's feature extractor."""
    overrides, features = split_feature_options(overrides)
    model = load_model(name, **overrides) if pretrained else create_untrained(name, **overrides)
    return maybe_feature_extractor(model, features)


def source_config(spec: str | Path | ModelSource, *, checkpoint: str | None = None,
                  random_init: bool = False) -> Any:
    """The config of the model ``spec`` names, reading as little as it can (a config file, or a
    memory-mapped training checkpoint; a foreign checkpoint is read in full to infer its config)."""
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec, checkpoint=checkpoint,
                                                                         random_init=random_init)
    if source.kind == "registry":
        return get_model_config(source.spec)
    if source.kind == "vitkit" and source.build is None and source.path is not None:
        return read_config(source.path)
    if source.kind == "training" and source.build is None and source.path is not None:
        return checkpoint_config(load_checkpoint(source.path, mmap=True, weights=False), source=str(source.path))
    return load_source(source).model.config


# ------------------------------------------------------------------------------- the hub hook
def hub_source(text: str) -> ModelSource | None:
    """:mod:`vitkit.hub`'s sources: a pretrained name (a bare architecture with catalog weights takes its
    default tag), a Hugging Face repo id (``hf-hub:`` optional) or a URL, fetched (or found in the cache),
    and built with what their publisher states (architecture, class names, preprocessing)."""
    fetched = fetch_source(text)
    if fetched is None:
        return None
    return ModelSource(text, "pretrained", fetched.path, origin=text, build=partial(from_hub_source, fetched))


register_source_hook("hub", hub_source)


__all__ = ["ModelSource", "ResolvedModel", "SourceHook", "SourceKind", "create_model", "hub_source", "load_model",
           "load_source",
           "register_source_hook", "resolve_path", "resolve_source", "source_config", "unregister_source_hook"]
