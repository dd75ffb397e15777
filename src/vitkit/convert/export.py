"""Write a vitkit model in another library's format. Every export is lossless: the tensors are the
model's own, renamed, split or transposed, never recomputed."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from vitkit.convert import huggingface, jax, mae, t2t, timm, torchvision
from vitkit.convert.detect import normalise_format
from vitkit.fileio import atomic_torch_save, save_state_dict
from vitkit.models.mae import MaskedAutoencoder

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def to_timm(model: nn.Module) -> dict[str, Tensor]:
    """A state dict that ``timm.create_model(<same config>).load_state_dict`` accepts."""
    return timm.from_vitkit(_weights(model), model.config)


def to_torchvision(model: nn.Module) -> dict[str, Tensor]:
    """A state dict for ``torchvision.models.VisionTransformer`` (e.g. ``vit_b_16``)."""
    return torchvision.from_vitkit(_weights(model), model.config)


def to_huggingface(model: nn.Module, directory: str | Path) -> Path:
    """A directory ``transformers.ViTForImageClassification.from_pretrained`` loads (``ViTModel`` if the model
    has no classifier)."""
    return huggingface.write_directory(_weights(model), model.config, directory)


def mae_to_huggingface(model: MaskedAutoencoder, directory: str | Path) -> Path:
    """A directory ``transformers.ViTMAEForPreTraining.from_pretrained`` loads (decoder included)."""
    tensors = mae.vitkit_to_hf(_weights(model), model.config)
    config = json.dumps(mae.vitkit_config_to_hf(model.config), indent=2) + "\n"
    return huggingface.write_files(Path(directory), {"model.safetensors": tensors, "config.json": config})


def to_npz(model: nn.Module, path: str | Path) -> Path:
    """A ``.npz`` in Google's vit_jax layout."""
    return jax.write_npz(jax.from_vitkit(_weights(model), model.config), path)


def save_state_dict_file(state_dict: dict[str, Tensor], path: str | Path) -> Path:
    """Write a state dict as safetensors or a (weights-only) torch pickle, chosen by the file suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"{path}: choose a state-dict file suffix: {', '.join(STATE_DICT_SUFFIXES)}")
    if suffix == ".safetensors":
        save_state_dict(state_dict, path, metadata={"format": "pt"})
    else:
        atomic_torch_save({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


_IN_MEMORY = {  # each format's conversion of the weights, without writing anything: it refuses what it cannot hold
    "timm": timm.from_vitkit,
    "huggingface": lambda weights, config: (huggingface.check_exportable(config),
                                            huggingface.from_vitkit(weights, config)),
    "torchvision": torchvision.from_vitkit,
    "jax": jax.from_vitkit,
    "t2t": t2t.from_vitkit,
}
CLI_NAMES = {"huggingface": "hf", "jax": "npz"}
"""What ``vitkit convert --to`` calls a format, where that differs from its name here."""


def exportable_formats(model: nn.Module) -> list[str]:
    """The formats (as ``--to`` names them) that can hold ``model``, found by converting its weights in memory:
    the advice a refused export gives names these, never a format that would refuse the model too."""
    found = ["vitkit"]
    for fmt, convert in _IN_MEMORY.items():
        candidate = model
        if isinstance(model, MaskedAutoencoder):
            if fmt == "huggingface":
                found.append(CLI_NAMES[fmt])
                continue
            candidate = model.export_encoder()
        try:
            convert(_weights(candidate), candidate.config)
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
        found.append(CLI_NAMES.get(fmt, fmt))
    return found


def save_as(model: nn.Module, destination: str | Path, format: str = "vitkit") -> Path:
    """Save ``model`` as ``format``: a directory for vitkit and Hugging Face, a file for the others. A format that
    cannot hold the model is a ``ValueError`` that says why and names the formats that can."""
    fmt = normalise_format(format)
    destination = Path(destination)
    if fmt == "vitkit":
        return model.save_pretrained(destination)
    try:
        return _save_foreign(model, destination, fmt)
    except ValueError as e:
        working = exportable_formats(model)
        if CLI_NAMES.get(fmt, fmt) in working:  # the model fits the format: the problem is elsewhere (a file name)
            raise
        raise ValueError(f"{e}; formats that can hold this model: {', '.join(working)}") from None


def _save_foreign(model: nn.Module, destination: Path, fmt: str) -> Path:
    if isinstance(model, MaskedAutoencoder):
        if fmt == "huggingface":
            return mae_to_huggingface(model, destination)
        model = model.export_encoder()  # timm, torchvision and Google have no MAE: the encoder, as a plain ViT
    if fmt == "huggingface":
        return to_huggingface(model, destination)
    if fmt == "jax":
        if destination.suffix.lower() != ".npz":
            raise ValueError(f"{destination}: an npz export needs a .npz file name")
        return to_npz(model, destination)
    if fmt == "t2t":  # the official release's layout: a torch file holding {'state_dict': ...}
        weights = t2t.from_vitkit(_weights(model), model.config)
        atomic_torch_save({"state_dict": {k: v.contiguous() for k, v in weights.items()}}, destination)
        return destination
    state_dict = to_timm(model) if fmt == "timm" else to_torchvision(model)
    return save_state_dict_file(state_dict, destination)
