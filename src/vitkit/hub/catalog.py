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

import difflib
import fnmatch
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from vitkit.preprocessing import Preprocessing

ClassSet = Literal["imagenet-1k", "imagenet-21k"]
FORMATS = ("timm", "huggingface", "torchvision", "jax", "vitkit", "t2t")
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


_KEYS = {"name", "architecture", "default", "aliases", "location", "origin", "format", "checksum", "license",
         "input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "classes", "config", "top1",
         "top1_source", "publisher", "paper", "notes"}
_REQUIRED = ("name", "architecture", "location", "input_size", "mean", "std", "crop_pct", "interpolation",
             "num_classes")


def parse_entry(data: dict[str, Any], where: str = "catalog") -> CatalogEntry:
    """One JSON object -> a :class:`CatalogEntry`; a missing or unknown key is an error naming it."""
    name = data.get("name", "?")
    what = f"{where}: entry {name!r}"
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise CatalogError(f"{what}: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CatalogError(f"{what}: missing key(s) {', '.join(missing)}")
    arch, dot, tag = str(name).partition(".")
    if not dot or not tag or arch != data["architecture"]:
        raise CatalogError(f"{what}: a name is 'architecture.tag' with architecture {data['architecture']!r}")
    loc = data["location"]
    if not isinstance(loc, dict) or set(loc) - {"hf_hub", "file", "url"} or \
            not ((loc.get("hf_hub") and loc.get("file") and not loc.get("url")) or (loc.get("url") and len(loc) == 1)):
        raise CatalogError(f"{what}: location must be {{'hf_hub': repo, 'file': name}} or {{'url': URL}}, got {loc!r}")
    if loc.get("url") and not str(loc["url"]).startswith("https://"):
        raise CatalogError(f"{what}: location url must be https, got {loc['url']!r}")
    if data.get("format") is not None and data["format"] not in FORMATS:
        raise CatalogError(f"{what}: format {data['format']!r} is not one of {', '.join(FORMATS)}")
    checksum = None
    if data.get("checksum"):
        ((algorithm, digest),) = data["checksum"].items()
        if algorithm not in CHECKSUM_ALGORITHMS or not _is_hex(digest) or len(digest) < 6:
            raise CatalogError(f"{what}: checksum must be {{'sha256'|'md5': hex digest or published prefix}}")
        checksum = Checksum(algorithm, digest.lower())
    if data.get("classes") not in (None, "imagenet-1k", "imagenet-21k"):
        raise CatalogError(f"{what}: classes {data['classes']!r} is not imagenet-1k, imagenet-21k or null")
    try:
        preprocessing = Preprocessing(size=int(data["input_size"]), mean=data["mean"], std=data["std"],
                                      crop_pct=data["crop_pct"], interpolation=data["interpolation"])
    except (TypeError, ValueError) as e:
        raise CatalogError(f"{what}: {e}") from None
    return CatalogEntry(
        name=name, architecture=data["architecture"], location=Location(**loc), format=data.get("format"),
        license=data.get("license"), preprocessing=preprocessing, num_classes=int(data["num_classes"]),
        classes=data.get("classes"), checksum=checksum, default=bool(data.get("default", False)),
        aliases=tuple(data.get("aliases", ())), config=dict(data.get("config") or {}), top1=data.get("top1"),
        top1_source=data.get("top1_source"), publisher=data.get("publisher", ""), paper=data.get("paper"),
        origin=data.get("origin"), notes=data.get("notes", ""))


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
