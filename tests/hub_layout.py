"""huggingface_hub's cache layout, written by tests (and the docs' examples) so that Hub repos load offline.

A repo ``org/name`` lives in ``<cache>/models--org--name/`` as content-addressed ``blobs/``, a
``snapshots/<commit>/`` folder of relative symlinks to them, and ``refs/main`` naming the commit: exactly
what ``huggingface_hub.hf_hub_download`` leaves behind, so that ``HF_HUB_OFFLINE=1`` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(hf_home: str | Path | None = None) -> Path:
    """The Hub cache of ``hf_home`` (default: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    if hf_home is not None:
        return Path(hf_home) / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ["HF_HOME"]) / "hub"


def write_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Put ``files`` (name in the repo -> local file) into the Hub ``cache`` as a download of ``repo_id`` at
    :data:`COMMIT` leaves them; returns the snapshot folder."""
    repo_dir = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def timm_standin(cache: Path, name: str, *, num_classes: int = 1000, img_size: int = 224, crop_pct: float = 0.9,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **overrides) -> None:
    """A stand-in for the timm Hub repo ``timm/<name>`` (``arch.tag``): random weights of the architecture in
    timm's layout (``model.safetensors``) and the ``config.json`` timm writes (architecture, num_classes,
    pretrained_cfg)."""
    import vitkit
    from vitkit.convert import save_as

    arch, _, tag = name.partition(".")
    model = vitkit.create_model(arch, num_classes=num_classes, img_size=img_size, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_as(model, Path(tmp) / "model.safetensors", "timm")
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({
            "architecture": arch, "num_classes": num_classes, "num_features": model.config.embed_dim,
            "pretrained_cfg": {"tag": tag, "custom_load": False, "input_size": [3, img_size, img_size],
                               "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": crop_pct,
                               "crop_mode": "center", "mean": list(mean), "std": list(std),
                               "num_classes": num_classes, "pool_size": None, "first_conv": "patch_embed.proj",
                               "classifier": "head"}}))
        write_hf_cache(cache, f"timm/{name}", {"config.json": config, "model.safetensors": weights})


def transformers_standin(cache: Path, repo_id: str, arch: str, *, class_names: list[str] | None = None,
                         **overrides) -> None:
    """A stand-in for a transformers ViT repo: random weights of a vitkit architecture written as
    ``ViTForImageClassification`` would save them, with a ``preprocessor_config.json``."""
    import vitkit
    from vitkit.convert import to_huggingface

    model = vitkit.create_model(arch, **overrides)
    if class_names is not None:
        model.reset_head(len(class_names), class_names=class_names)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(to_huggingface(model, Path(tmp) / "repo"))
        size = model.config.image_hw[0]
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor", "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}))
        write_hf_cache(cache, repo_id, {p.name: p for p in directory.iterdir() if p.is_file()})


def vit_mae_standin(cache: Path, repo_id: str, arch: str, **overrides) -> None:
    """A stand-in for a ``ViTMAEForPreTraining`` repo (``facebook/vit-mae-base``): the encoder of a vitkit
    architecture under ``vit.``, a (random, partial) ``decoder.``, and ``model_type: "vit_mae"``."""
    import torch
    from safetensors.torch import load_file, save_file

    import vitkit
    from vitkit.convert import to_huggingface

    model = vitkit.create_model(arch, num_classes=0, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(to_huggingface(model, Path(tmp) / "repo"))
        tensors = {f"vit.{k}": v for k, v in load_file(directory / "model.safetensors").items()
                   if not k.startswith("pooler.")}
        tensors["decoder.decoder_embed.weight"] = torch.randn(512, model.config.embed_dim)
        tensors["decoder.mask_token"] = torch.zeros(1, 1, 512)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((directory / "config.json").read_text())
        config.update(model_type="vit_mae", architectures=["ViTMAEForPreTraining"], mask_ratio=0.75)
        (directory / "config.json").write_text(json.dumps(config))
        write_hf_cache(cache, repo_id, {p.name: p for p in directory.iterdir() if p.is_file()})


def url_standin(url: str, model, fmt: str) -> Path:
    """Put ``model``, written in format ``fmt``, where vitkit's cache keeps ``url``'s file (as after
    ``vitkit download URL``).

    vitkit compares a cached file with its publisher's checksum on every use; a stand-in cannot have the
    real file's digest, so for a catalog URL this also writes the record a verified download leaves, stating
    the publisher's digest (padded from the published prefix) for the stand-in's size and time.
    """
    from vitkit.convert import save_as
    from vitkit.hub import cache_dir, load_catalog, url_cache_path
    from vitkit.hub.integrity import remember

    path = url_cache_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_as(model, path, fmt)
    entry = next((e for e in load_catalog() if e.location.url == url), None)
    if entry is not None and entry.checksum is not None:
        width = {"sha256": 64, "md5": 32}[entry.checksum.algorithm]
        remember(cache_dir() / ".verified", path,
                 {entry.checksum.algorithm: entry.checksum.hexdigest.ljust(width, "0")})
    return path
