"""The catalog of released ViT weights vitkit knows by name (``data/catalog.json``, package data).

Each entry is a timm-style name, ``architecture.tag`` (``vit_base_patch16_224.augreg2_in21k_ft_in1k``),
where ``architecture`` is a registered vitkit model, and records where the weights live (a Hugging Face
Hub repo and file, or a URL), the checksum its publisher gives (sha256, torchvision's sha256 prefix, or
MAE's md5 prefix), the licence, the preprocessing the weights expect, the classifier's size and class
names, and the ImageNet-1k top-1 its publisher reports. Preprocessing is
:class:`vitkit.preprocessing.Preprocessing`, the record a model config carries, so that it travels with
the weights. The facts come from timm's pretrained configs, torchvision's weight enums and the
publishers' READMEs; nothing here runs code from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional

from vitkit.config_engine import ConfigError, from_mapping
from vitkit.preprocessing import Interpolation, Preprocessing

ClassSet = Literal["imagenet-1k", "imagenet-21k"]
CatalogFormat = Literal["timm", "huggingface", "torchvision", "jax", "vitkit", "t2t"]
FORMATS = typing.get_args(CatalogFormat)
"""Checkpoint formats an entry may name (``null``: detected from the file, as for any local file)."""
CHECKSUM_ALGORITHMS = ("sha256", "md5")


class CatalogError(ValueError):
    """A catalog entry is malformed, or a name is not in the catalog."""


@dataclass(frozen=True)
class Location:
    """Where a file lives: a Hugging Face Hub repo and file, or a plain URL."""

    hf_hub: str | None = None
    file: str | None = None
    url: str | None = None

    def __str__(self) -> str:
        return f"hf-hub:{self.hf_hub}/{self.file}" if self.hf_hub else str(self.url)


@dataclass(frozen=True)
class Checksum:
    """A publisher's checksum: the full hex digest, or the prefix the publisher prints (torchvision, MAE)."""

    algorithm: Literal["sha256", "md5"]
    hexdigest: str

    def matches(self, digest: str) -> bool:
        return len(self.hexdigest) >= 6 and digest.lower().startswith(self.hexdigest.lower())

    def __str__(self) -> str:
        kind = "" if len(self.hexdigest) == {"sha256": 64, "md5": 32}[self.algorithm] else " prefix"
        return f"{self.algorithm}{kind} {self.hexdigest}"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    architecture: str
    location: Location
    format: str | None
    license: str | None
    preprocessing: Preprocessing
    num_classes: int
    classes: ClassSet | None = None
    checksum: Checksum | None = None
    default: bool = False
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    """Model config fields the weights need beyond the registered architecture (e.g. MAE's avg pool)."""
    top1: float | None = None
    top1_source: str | None = None
    publisher: str = ""
    paper: str | None = None
    origin: str | None = None
    """The publisher's own file, when ``location`` is a converted copy (timm's Hub mirrors of Google's npz)."""
    notes: str = ""

    @property
    def input_size(self) -> int:
        """The (square) input size the weights were made for."""
        return self.preprocessing.size[0]

    @property
    def tag(self) -> str:
        return self.name.partition(".")[2]

    @property
    def file_name(self) -> str:
        """The file's name (last path part of the URL or hub file)."""
        return (self.location.file or str(self.location.url)).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CatalogRecord:
    """One entry of ``catalog.json`` as written: the config engine checks its keys (unknown or missing ones are
    errors naming them, with the closest known key) and the type of each value; :func:`parse_entry` then checks
    what types cannot say and builds the :class:`CatalogEntry`."""

    name: str
    architecture: str
    location: Location
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: Interpolation
    num_classes: int
    format: Optional[CatalogFormat] = None
    checksum: Optional[dict[str, str]] = None
    license: Optional[str] = None
    classes: Optional[ClassSet] = None
    default: bool = False
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    top1: Optional[float] = None
    top1_source: Optional[str] = None
    publisher: str = ""
    paper: Optional[str] = None
    origin: Optional[str] = None
    notes: str = ""


def parse_entry(data: dict[str, Any], where: str = "catalog") -> CatalogEntry:
    """One JSON object -> a :class:`CatalogEntry`; a missing or unknown key, or a value of the wrong type, is an
    error naming it."""
    name = data.get("name", "?") if isinstance(data, dict) else "?"
    what = f"{where}: entry {name!r}"
    try:
        record = from_mapping(CatalogRecord, data, source=what)
    except ConfigError as e:
        raise CatalogError(str(e)) from None
    arch, dot, tag = record.name.partition(".")
    if not dot or not tag or arch != record.architecture:
        raise CatalogError(f"{what}: a name is 'architecture.tag' with architecture {record.architecture!r}")
    loc = record.location
    if not ((loc.hf_hub and loc.file and not loc.url) or (loc.url and not loc.hf_hub and not loc.file)):
        raise CatalogError(f"{what}: location must be {{'hf_hub': repo, 'file': name}} or {{'url': URL}}, got "
                           f"{data['location']!r}")
    if loc.url and not loc.url.startswith("https://"):
        raise CatalogError(f"{what}: location url must be https, got {loc.url!r}")
    checksum = None
    if record.checksum:
        ((algorithm, digest),) = record.checksum.items()
        if algorithm not in CHECKSUM_ALGORITHMS or not _is_hex(digest) or len(digest) < 6:
            raise CatalogError(f"{what}: checksum must be {{'sha256'|'md5': hex digest or published prefix}}")
        checksum = Checksum(algorithm, digest.lower())
    try:
        preprocessing = Preprocessing(size=record.input_size, mean=record.mean, std=record.std,
                                      crop_pct=record.crop_pct, interpolation=record.interpolation)
    except (TypeError, ValueError) as e:
        raise CatalogError(f"{what}: {e}") from None
    facts = {f.name: getattr(record, f.name) for f in dataclasses.fields(CatalogEntry)
             if f.name not in ("preprocessing", "checksum") and hasattr(record, f.name)}
    return CatalogEntry(**facts, preprocessing=preprocessing, checksum=checksum)


def _is_hex(text: Any) -> bool:
    return isinstance(text, str) and all(c in "0123456789abcdefABCDEF" for c in text)


@functools.lru_cache(maxsize=1)
def load_catalog() -> tuple[CatalogEntry, ...]:
    """Every entry of the bundled catalog, in name order."""
    source = resources.files("vitkit.hub").joinpath("data/catalog.json")
    data = json.loads(source.read_text())
    if data.get("format_version") != 1:
        raise CatalogError(f"{source}: unsupported format_version {data.get('format_version')!r}")
    entries = tuple(parse_entry(item, str(source)) for item in data["entries"])
    _check_unique(entries, str(source))
    return entries


def _check_unique(entries: tuple[CatalogEntry, ...], where: str) -> None:
    seen: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for entry in entries:
        for key in (entry.name, *entry.aliases):
            if key in seen:
                raise CatalogError(f"{where}: {key!r} names both {seen[key]} and {entry.name}")
            seen[key] = entry.name
        if entry.default:
            if entry.architecture in defaults:
                raise CatalogError(f"{where}: two defaults for {entry.architecture}: "
                                   f"{defaults[entry.architecture]} and {entry.name}")
            defaults[entry.architecture] = entry.name


def find_entry(name: str) -> CatalogEntry | None:
    """The entry ``name`` (or one of its aliases) names; a bare architecture gives its default tag."""
    for entry in load_catalog():
        if name == entry.name or name in entry.aliases:
            return entry
    if "." not in name:
        tagged = [e for e in load_catalog() if e.architecture == name]
        if tagged:
            return next((e for e in tagged if e.default), tagged[0])
    return None


def get_entry(name: str) -> CatalogEntry:
    """:func:`find_entry`, but an unknown name is an error that lists close names."""
    entry = find_entry(name)
    if entry is not None:
        return entry
    names = [e.name for e in load_catalog()]
    arch = name.partition(".")[0]
    close = [n for n in names if n.startswith(arch + ".")] or difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; known for {arch}: {', '.join(close)}" if close else "; see 'vitkit models --pretrained'"
    raise CatalogError(f"no pretrained weights named {name!r} in vitkit's catalog{hint}")


def list_entries(pattern: str | None = None) -> list[CatalogEntry]:
    """Entries whose name (or alias) matches the shell wildcard ``pattern`` (all if None)."""
    entries = load_catalog()
    if not pattern:
        return list(entries)
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [e for e in entries if any(fnmatch.fnmatch(n, pattern) for n in (e.name, *e.aliases))]
