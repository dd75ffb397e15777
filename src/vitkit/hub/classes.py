"""Class names bundled with vitkit, so that pretrained classifiers name what they see.

``imagenet-1k``: the 1000 ILSVRC-2012 classes in their standard order, each named by its WordNet lemmas
("tabby, tabby cat"), as timm and Hugging Face label them. ``imagenet-21k``: the 21,843 classes of the
fall-2011 release in the order of Google's ViT checkpoints.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

CLASS_SETS = {"imagenet-1k": ("data/imagenet-1k.json", 1000), "imagenet-21k": ("data/imagenet-21k.json.gz", 21843)}


@functools.cache
def class_names(class_set: str) -> tuple[str, ...]:
    """The names of ``class_set`` ('imagenet-1k' or 'imagenet-21k'), index = class id."""
    return tuple(_read(class_set)["names"])


@functools.cache
def synsets(class_set: str) -> tuple[str, ...]:
    """The WordNet ids (``n02123045``) of ``class_set``, index = class id."""
    return tuple(_read(class_set)["synsets"])


def _read(class_set: str) -> dict:
    if class_set not in CLASS_SETS:
        raise ValueError(f"unknown class set {class_set!r}; known: {', '.join(CLASS_SETS)}")
    path, count = CLASS_SETS[class_set]
    raw = resources.files("vitkit.hub").joinpath(path).read_bytes()
    data = json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)
    if len(data["names"]) != count or len(data["synsets"]) != count:
        raise ValueError(f"vitkit.hub/{path}: expected {count} classes, found {len(data['names'])}")
    return data
