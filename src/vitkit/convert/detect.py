"""Recognise a checkpoint's format and read it into vitkit's keys, without running code from it.

- a directory with ``config.json`` written by vitkit (``vitkit_version``, ``embed_dim``, ...);
- a Hugging Face directory (``config.json`` with ``model_type: "vit"``, or ``"vit_mae"``: its encoder);
- a timm Hub directory (``config.json`` with ``architecture`` and ``pretrained_cfg``);
- a state-dict file (``.pth``/``.pt``/``.bin``/``.safetensors``), recognised by its key names as timm,
  torchvision or Hugging Face;
- a Google ``.npz`` (vit_jax or big_vision layout);
- masked autoencoders: the official ``{'model': ...}`` files with a decoder (timm's keys + ``decoder_*``),
  Hugging Face ``ViTMAEForPreTraining`` files and directories (``model_type: "vit_mae"``; a ``ViTMAEModel``
  directory holds the encoder alone and reads as a ViT). The official encoder-only ``mae_pretrain_vit_*.pth``
  files are timm ViTs without a head.
- an official T2T-ViT ``.pth.tar`` (``tokens_to_token.*`` keys; its EMA weights when it holds them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from vitkit.checkpoint import CheckpointError, load_state_dict, read_config
from vitkit.config import ViTConfig
from vitkit.convert import huggingface, jax, mae, t2t, timm, torchvision
from vitkit.fileio import CONFIG_NAME, WEIGHTS_NAME, read_json_object
from vitkit.models.mae import MAEConfig
from vitkit.preprocessing import KNOWN_SOURCES, Preprocessing

FORMATS = ("vitkit", "timm", "huggingface", "torchvision", "jax", "t2t")
ALIASES = {"hf": "huggingface", "transformers": "huggingface", "npz": "jax", "vit_jax": "jax", "big_vision": "jax"}
_SOURCES = {m.FORMAT: m for m in (t2t, huggingface, torchvision, jax, timm)}  # detection order: timm last


@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors under vitkit's (timm's) key names, and what its metadata says."""

    format: str
    path: Path
    state_dict: dict[str, Tensor]
    hints: dict[str, Any] = field(default_factory=dict)
    """ViTConfig fields stated by the file's metadata (heads, LayerNorm eps, class names, ...)."""
    config: ViTConfig | MAEConfig | None = None
    """The complete config, for vitkit's own directories (and Hugging Face ViTMAE ones)."""
    preprocess: Preprocessing | None = None
    """How the source prepares images for these weights, where its files or its format say so."""
    architecture: str = "vit"
    """``vit``, or ``mae`` for a masked autoencoder with its decoder."""


def normalise_format(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)} "
                         f"(aliases: {', '.join(sorted(ALIASES))})")
    return key


def format_of_keys(keys: set[str], source: str) -> str:
    for name, module in _SOURCES.items():
        if module.matches(keys):
            return name
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(f"{source}: not a ViT checkpoint vitkit recognises (timm, Hugging Face, torchvision, "
                          f"Google .npz or official T2T-ViT); first keys: {sample}")


def read_checkpoint(source: str | Path, format: str | None = None) -> Checkpoint:
    """Read ``source`` (file or directory) into a :class:`Checkpoint`; ``format`` skips detection."""
    path = Path(source)
    wanted = normalise_format(format) if format else None
    if path.is_dir():
        return _read_directory(path, wanted)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if wanted is None and path.name == WEIGHTS_NAME and is_vitkit_directory(path.parent):
        return _read_directory(path.parent, "vitkit")  # the weights of a vitkit directory: use its config
    raw = load_state_dict(path)
    fmt = wanted or format_of_keys(set(raw), str(path))
    if getattr(_SOURCES.get(fmt), "PREFERS_EMA", False):  # the official T2T-ViT evaluation reads the EMA
        raw = load_state_dict(path, prefer_ema=True)
    return checkpoint_from_tensors(raw, path, fmt)


def checkpoint_from_tensors(raw: dict[str, Tensor], path: Path, format: str | None = None) -> Checkpoint:
    """A :class:`Checkpoint` of tensors already read from the state-dict file ``path`` (format detected
    from their key names unless ``format`` is given)."""
    wanted = normalise_format(format) if format else None
    if wanted in (None, "huggingface") and mae.is_huggingface_mae(set(raw)):
        config = _sibling_mae_config(path)
        return Checkpoint("huggingface", path, mae.hf_to_vitkit(raw, str(path)), config=config, architecture="mae")
    if wanted in (None, "timm", "vitkit") and mae.is_official_mae(set(raw)):
        return Checkpoint("timm", path, raw, architecture="mae")  # the official release: timm keys + decoder_*
    fmt = wanted or format_of_keys(set(raw), str(path))
    if fmt == "vitkit":
        fmt = "timm"  # a bare vitkit state dict has timm's keys
    preprocess = huggingface.preprocessing_of(path.parent) if fmt == "huggingface" else None
    return _convert(fmt, raw, path, _sibling_hints(path, fmt), preprocess)


def _convert(fmt: str, raw: dict[str, Tensor], path: Path, hints: dict[str, Any],
             preprocess: Preprocessing | None = None) -> Checkpoint:
    module = _SOURCES[fmt]
    if fmt == "jax":
        state_dict, found = module.to_vitkit(raw, str(path))
        hints = {**found, **hints}
    else:
        state_dict = module.to_vitkit(raw, str(path))
    return Checkpoint(fmt, path, state_dict, hints, preprocess=preprocess or KNOWN_SOURCES.get(fmt))


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, what="a JSON object of config fields", error=CheckpointError)


def _read_directory(directory: Path, wanted: str | None) -> Checkpoint:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: a model directory needs {CONFIG_NAME} (vitkit, Hugging Face or timm "
                              "Hub layout); for a bare weights file pass the file itself")
    data = _read_json(config_path)
    fmt = wanted or _directory_format(data, config_path)
    if fmt == "vitkit":
        config = read_config(directory)
        return Checkpoint("vitkit", directory, load_state_dict(directory / WEIGHTS_NAME), config=config)
    if fmt == "huggingface" and data.get("model_type") == "vit_mae":
        config = mae.hf_config_to_vitkit(data, str(config_path))
        raw = huggingface.read_weights(directory)
        state_dict = mae.hf_to_vitkit(raw, str(directory))
        if mae.is_huggingface_mae(set(raw)):
            return Checkpoint(fmt, directory, state_dict, config=config, architecture="mae")
        return Checkpoint(fmt, directory, state_dict, config=config.encoder)  # ViTMAEModel: the encoder alone
    if fmt == "huggingface":
        hints = huggingface.hints_from_config(data, str(config_path))
        return _convert(fmt, huggingface.read_weights(directory), directory, hints,
                        huggingface.preprocessing_of(directory))
    if fmt == "timm":
        return _convert(fmt, huggingface.read_weights(directory), directory, timm.hints_from_hub_config(data),
                        timm.preprocessing_from_hub_config(data, str(config_path)))
    raise CheckpointError(f"{directory}: a {fmt} checkpoint is a single file; pass the file itself")


def _is_vitkit_config(data: dict[str, Any]) -> bool:
    return "vitkit_version" in data or "embed_dim" in data


def is_vitkit_directory(directory: Path) -> bool:
    """Whether ``directory`` holds a model saved by vitkit (its ``config.json`` is vitkit's)."""
    config_path = directory / CONFIG_NAME
    return config_path.is_file() and _is_vitkit_config(_read_json(config_path))


def _directory_format(data: dict[str, Any], config_path: Path) -> str:
    if _is_vitkit_config(data):
        return "vitkit"
    if "model_type" in data:
        return "huggingface"
    if "pretrained_cfg" in data or "architecture" in data:
        return "timm"
    raise CheckpointError(f"{config_path}: neither a vitkit, Hugging Face nor timm Hub config")


def _sibling_mae_config(path: Path) -> MAEConfig | None:
    """The MAEConfig of the Hugging Face ``config.json`` beside a ViTMAE weights file, if there is one."""
    config_path = path.parent / CONFIG_NAME
    if config_path.is_file():
        data = _read_json(config_path)
        if data.get("model_type") == "vit_mae":
            return mae.hf_config_to_vitkit(data, str(config_path))
    return None


def _sibling_hints(path: Path, fmt: str) -> dict[str, Any]:
    """A weights file inside a Hugging Face directory takes its metadata from the ``config.json`` beside it;
    a lone Hugging Face weights file is assumed to use transformers' defaults (LayerNorm eps 1e-12)."""
    if fmt != "huggingface":
        return {}
    config_path = path.parent / CONFIG_NAME
    if config_path.is_file():
        data = _read_json(config_path)
        if data.get("model_type") in huggingface.MODEL_TYPES:
            return huggingface.hints_from_config(data, str(config_path))
    return {"norm_eps": huggingface.DEFAULT_NORM_EPS}
