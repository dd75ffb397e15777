"""``fetch_source``: turn a pretrained name, a Hub repo id or a URL into a local file plus what the
publisher says about it (preprocessing, class names, catalog entry). The model-source resolver calls it
for any source that is not a local path; it returns None for strings that name nothing on a hub.

Accepted forms:

- a catalog name ``arch.tag`` or alias (``vit_base_patch16_224.augreg2_in21k_ft_in1k``,
  ``torchvision:vit_b_16.IMAGENET1K_V1``), or a bare architecture with catalog weights (its default tag);
- a Hugging Face repo id, with or without ``hf-hub:``, optionally ``@revision``: a transformers ViT repo
  (``google/vit-base-patch16-224``) or a timm repo (``timm/vit_small_patch16_224.augreg_in21k``);
- an ``https://`` (or ``http://``) URL of a file in any format vitkit reads, optionally ending in
  ``#sha256=<hex>`` to have it verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitkit.errors import DownloadError, OfflineError
from vitkit.fileio import read_json_object
from vitkit.hf_processor import ProcessorError, preprocessing_from_processor
from vitkit.hub.catalog import CatalogEntry, find_entry, load_catalog
from vitkit.hub.classes import class_names as bundled_class_names
from vitkit.hub.download import download_hub_file, download_hub_repo, download_url
from vitkit.preprocessing import Preprocessing

HF_PREFIXES = ("hf-hub:", "hf_hub:", "hf:")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass
class HubSource:
    """A source fetched to this machine, with the facts its publisher gives about it."""

    source: str
    """What the user wrote."""
    path: Path
    """A local file or directory that :func:`vitkit.convert.read_checkpoint` reads."""
    format: str | None = None
    """The checkpoint format, when known (skips detection)."""
    entry: CatalogEntry | None = None
    architecture: str | None = None
    """The registered architecture the weights belong to, when known."""
    config: dict[str, Any] = field(default_factory=dict)
    """Model config fields the weights need beyond the architecture's."""
    num_classes: int | None = None
    """The size of the publisher's classifier (0: none), when the metadata states it."""
    preprocessing: Preprocessing | None = None
    class_names: tuple[str, ...] | None = None


def is_hub_source(source: str) -> bool:
    """Whether ``source`` has the form of a hub source (a Hub prefix or a URL); catalog names aside."""
    return source.startswith(HF_PREFIXES) or source.startswith(("https://", "http://"))


def fetch_source(source: str, *, progress: bool = True) -> HubSource | None:
    """Fetch (or find in the cache) what ``source`` names; None when it is no hub source.

    A local path that exists is never a hub source. Raises :class:`vitkit.hub.DownloadError` (or its
    :class:`~vitkit.hub.OfflineError`) with a one-line message when the source cannot be had.
    """
    text = str(source).strip()
    if text.startswith(HF_PREFIXES):
        return fetch_hub_repo(text.split(":", 1)[1], source=text)
    if text.startswith(("https://", "http://")):
        return fetch_url(text, progress=progress)
    if Path(text).exists():
        return None
    entry = find_entry(text)
    if entry is not None:
        return fetch_entry(entry, source=text, progress=progress)
    if _REPO_ID.fullmatch(text) and not Path(text).parent.is_dir():  # 'runs/x' with a local runs/: a path
        try:
            return fetch_hub_repo(text, source=text)
        except OfflineError as e:  # it may also be a mistyped local path: say both
            raise OfflineError(text, f"no such file or directory, nor a Hugging Face repo vitkit can use: {e.problem}",
                               e.advice) from None
        except DownloadError as e:
            detail = str(e).removeprefix(f"{text}: ")
            raise type(e)(f"{text}: no such file or directory, nor a Hugging Face repo vitkit can use: {detail}") \
                from None
    return None


def fetch_entry(entry: CatalogEntry, *, source: str | None = None, progress: bool = True) -> HubSource:
    """The weights file of a catalog entry, verified against its checksum."""
    if entry.location.hf_hub:
        path = download_hub_file(entry.location.hf_hub, str(entry.location.file), name=entry.name)
    else:
        path = download_url(str(entry.location.url), checksum=entry.checksum, name=entry.name, progress=progress)
    assert path is not None
    names = bundled_class_names(entry.classes) if entry.classes else None
    return HubSource(source or entry.name, path, entry.format, entry, entry.architecture, dict(entry.config),
                     entry.num_classes, entry.preprocessing, names)


def fetch_url(url: str, *, progress: bool = True) -> HubSource:
    """A file at ``url``; a URL that is a catalog entry's location gets the entry's checksum and facts."""
    bare = url.split("#", 1)[0]
    for_entry = next((e for e in load_catalog() if e.location.url == bare), None)
    if for_entry is not None:
        return fetch_entry(for_entry, source=url, progress=progress)
    return HubSource(url, download_url(url, progress=progress))


def fetch_hub_repo(repo: str, *, source: str | None = None) -> HubSource:
    """A Hugging Face model repo (transformers or timm layout) as a local snapshot directory."""
    repo_id, _, revision = repo.partition("@")
    directory = download_hub_repo(repo_id, revision=revision or None, name=source or repo)
    fmt, arch, num_classes, preprocessing, names = _directory_facts(directory)
    return HubSource(source or repo, directory, fmt, None, arch, {}, num_classes, preprocessing, names)


# --------------------------------------------------------------------------- repo metadata
def _read_json(path: Path) -> dict[str, Any]:
    """Best effort: a Hub snapshot's metadata file, or nothing (its weights are read, and checked, anyway)."""
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return {}


def _directory_facts(directory: Path) -> tuple[str, str | None, int | None, Preprocessing | None,
                                               tuple[str, ...] | None]:
    """Format, architecture, classifier size, preprocessing and class names a Hub snapshot's metadata states."""
    config = _read_json(directory / "config.json")
    if "pretrained_cfg" in config or "architecture" in config:
        return ("timm", *_timm_facts(config))
    return "huggingface", None, None, _transformers_preprocessing(_read_json(directory / "preprocessor_config.json"),
                                                                  config), None


def _timm_facts(config: dict[str, Any]) -> tuple[str | None, int | None, Preprocessing | None,
                                                 tuple[str, ...] | None]:
    cfg = config.get("pretrained_cfg") or {}
    arch = str(config.get("architecture", "")).split(".")[0] or None
    preprocessing = None
    try:
        size = (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
        preprocessing = Preprocessing(size=size, mean=cfg["mean"], std=cfg["std"], crop_pct=cfg.get("crop_pct", 1.0),
                                      interpolation=cfg.get("interpolation", "bicubic"),
                                      crop_mode=cfg.get("crop_mode") or "center")
    except (KeyError, TypeError, ValueError, IndexError):
        pass
    num_classes = config.get("num_classes", cfg.get("num_classes"))
    num_classes = int(num_classes) if isinstance(num_classes, int) else None
    labels = config.get("label_names") or cfg.get("label_names")
    names = tuple(labels) if labels and len(labels) == num_classes else None
    tag = str(cfg.get("tag", ""))
    if names is None and num_classes == 1000 and "in1k" in tag:
        names = bundled_class_names("imagenet-1k")
    elif names is None and num_classes == 21843 and tag.endswith("in21k"):
        names = bundled_class_names("imagenet-21k")
    return arch, num_classes, preprocessing, names


def _transformers_preprocessing(processor: dict[str, Any], config: dict[str, Any]) -> Preprocessing | None:
    """What the repo's image processor does (:func:`vitkit.hf_processor.preprocessing_from_processor`); None
    when it has none, or one vitkit cannot reproduce (the directory reader then names the key at fault)."""
    if not processor:
        return None
    try:
        return preprocessing_from_processor(processor)
    except ProcessorError:
        return None
