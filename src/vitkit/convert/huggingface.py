"""Hugging Face transformers' ``ViTModel`` / ``ViTForImageClassification`` directories.

A directory holds ``config.json`` (``model_type: "vit"``) and ``model.safetensors`` (possibly
sharded, or ``pytorch_model.bin``). Hugging Face splits the attention input projection into
``query``/``key``/``value``; vitkit's ``qkv`` is their row-wise concatenation. ``ViTModel``'s pooler
(Dense + tanh on the class token) is the paper's representation layer, and is how Hugging Face
stores Google's ImageNet-21k models. Files keep the 4.x key names (``encoder.layer.0...``), which
transformers 5 renames on load; the 5.x in-memory names (``layers.0.attention.q_proj``) are read too.

``model_type: "vit_mae"`` (``ViTMAEForPreTraining``, e.g. ``facebook/vit-mae-base``) is read as its encoder, a
plain ViT with the fixed sin-cos position embeddings it stores; the ``decoder.*`` tensors, used only for
pixel reconstruction in pre-training, are left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from vitkit.checkpoint import CheckpointError, load_state_dict
from vitkit.config import ViTConfig
from vitkit.convert.keymap import KeyMap
from vitkit.fileio import atomic_files, read_json_object
from vitkit.hf_processor import PROCESSOR_CONFIG, ProcessorError, preprocessing_from_processor, processor_config
from vitkit.preprocessing import KNOWN_SOURCES, Preprocessing

FORMAT = "huggingface"

KEYS = KeyMap([
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    ("blocks.{i}.norm1", "encoder.layer.{i}.layernorm_before"),
    ("blocks.{i}.attn.proj", "encoder.layer.{i}.attention.output.dense"),
    ("blocks.{i}.norm2", "encoder.layer.{i}.layernorm_after"),
    ("blocks.{i}.mlp.fc1", "encoder.layer.{i}.intermediate.dense"),
    ("blocks.{i}.mlp.fc2", "encoder.layer.{i}.output.dense"),
    ("norm", "layernorm"),
    ("pre_logits.fc", "pooler.dense"),
    ("head", "classifier"),
])
V5_NAMES = KeyMap([  # transformers 5 module names -> the file names above
    ("encoder.layer.{i}.attention.attention.query", "layers.{i}.attention.q_proj"),
    ("encoder.layer.{i}.attention.attention.key", "layers.{i}.attention.k_proj"),
    ("encoder.layer.{i}.attention.attention.value", "layers.{i}.attention.v_proj"),
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.attention.o_proj"),
    ("encoder.layer.{i}.intermediate.dense", "layers.{i}.mlp.fc1"),
    ("encoder.layer.{i}.output.dense", "layers.{i}.mlp.fc2"),
    ("encoder.layer.{i}", "layers.{i}"),
])
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_IGNORED = ("embeddings.mask_token",)  # masked-image-modelling input, unused for classification
_IGNORED_PREFIXES = ("decoder.",)  # ViTMAEForPreTraining's reconstruction decoder
MODEL_TYPES = ("vit", "vit_mae")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_NORM_EPS = 1e-12  # transformers' ViTConfig.layer_norm_eps


def matches(keys: set[str]) -> bool:
    return any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in keys)


# ------------------------------------------------------------------------------------- weights
def to_vitkit(state_dict: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    # ViTForImageClassification classifies the class token directly; a pooler stored beside a classifier
    # (some exports keep ViTModel's) is unused by transformers, so it must not become a representation layer.
    has_classifier = any(k.startswith("classifier.") for k in state_dict)
    for key, tensor in state_dict.items():
        key = key.removeprefix("vit.")
        key = V5_NAMES.to_ours(key) or key
        if key in _IGNORED or key.startswith(_IGNORED_PREFIXES) or (has_classifier and key.startswith("pooler.")):
            continue
        if match := _QKV.fullmatch(key):
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = tensor
            continue
        ours = KEYS.to_ours(key)
        if ours is None:
            raise CheckpointError(f"{source}: key {key!r} has no counterpart in vitkit's ViT")
        out[ours] = tensor
    for (block, kind), parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise CheckpointError(f"{source}: block {block} has no attention {'/'.join(missing)} {kind}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def from_vitkit(state_dict: dict[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """Hugging Face keys (4.x file names, with the ``vit.`` prefix when there is a classifier)."""
    check_exportable(config)
    prefix = "vit." if config.num_classes > 0 else ""
    out = {}
    for key, tensor in state_dict.items():
        if match := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            block, kind = match.groups()
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3)):
                out[f"{prefix}encoder.layer.{block}.attention.attention.{part}.{kind}"] = chunk.clone()
            continue
        theirs = KEYS.to_theirs(key)
        out[theirs if theirs.startswith("classifier.") else prefix + theirs] = tensor
    return out


def check_exportable(config: ViTConfig) -> None:
    if config.stem is not None:
        raise ValueError("Hugging Face transformers has no hybrid ViT (its ViTHybrid is gone in 5.x, and a ViT "
                         "directory cannot hold a ResNet stem)")
    problems = []
    if not config.class_token or config.global_pool != "token" or config.fc_norm:
        problems.append("pooling other than the class token")
    if config.representation_size is not None and config.num_classes > 0:
        problems.append("a representation layer followed by a classifier (Hugging Face keeps the representation "
                        "layer only as ViTModel's pooler: export with num_classes=0, or reset_head)")
    if problems:
        raise ValueError(f"Hugging Face's ViT cannot represent {'; '.join(problems)}")


# -------------------------------------------------------------------------------------- config
def hints_from_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """ViTConfig fields stated by a Hugging Face ``config.json``."""
    if data.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not supported "
                              f"(vitkit reads Hugging Face model_type {' and '.join(map(repr, MODEL_TYPES))})")
    act = data.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: hidden_act {act!r} differs from the exact (erf) GELU of vitkit's ViT")
    hints: dict[str, Any] = {"num_heads": data.get("num_attention_heads", 12),
                             "norm_eps": data.get("layer_norm_eps", DEFAULT_NORM_EPS),
                             "qkv_bias": data.get("qkv_bias", True)}
    if "image_size" in data:
        size = data["image_size"]
        hints["img_size"] = tuple(size) if isinstance(size, (list, tuple)) else int(size)
    id2label = data.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    # transformers' placeholders (LABEL_0, ...) and the indices vitkit writes for a model without names are no names
    unnamed = all(str(x) in (f"LABEL_{i}", str(i)) for i, x in enumerate(labels))
    if labels and None not in labels and not unnamed:
        hints["class_names"] = [str(x) for x in labels]
    return hints


def preprocessing_of(directory: Path) -> Preprocessing:
    """The image processor of a Hugging Face directory (``preprocessor_config.json``, read by
    :func:`vitkit.hf_processor.preprocessing_from_processor`), else transformers' ViTImageProcessor defaults."""
    path = Path(directory) / PROCESSOR_CONFIG
    if not path.is_file():
        return KNOWN_SOURCES["huggingface"]
    data = read_json_object(path, what="an image processor (a JSON object)", error=CheckpointError)
    try:
        return preprocessing_from_processor(data)
    except ProcessorError as e:
        raise CheckpointError(f"{path}: {e}") from None


def config_to_hf(config: ViTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    check_exportable(config)
    num_labels = max(config.num_classes, 0)
    # without class names, the index: the label `vitkit predict` shows (transformers would show LABEL_i)
    names = config.class_names or [str(i) for i in range(num_labels)]
    height, width = config.image_hw
    return {
        "architectures": ["ViTForImageClassification" if num_labels else "ViTModel"],
        "model_type": "vit",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.drop_rate,
        "attention_probs_dropout_prob": config.attn_drop_rate,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "image_size": height if height == width else [height, width],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size,
        "pooler_output_size": config.representation_size or config.embed_dim,
        "pooler_act": "tanh",
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "dtype": str(dtype).removeprefix("torch."),
    }


# -------------------------------------------------------------------------------- directories
def read_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of a Hugging Face directory, following a sharding index if there is one."""
    for name in WEIGHT_FILES:
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid sharding index ({e})") from e
            state_dict: dict[str, Tensor] = {}
            for shard in shards:
                state_dict.update(load_state_dict(directory / shard))
            return state_dict
        if (directory / name).is_file():
            return load_state_dict(directory / name)
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)} and their "
                          ".index.json shards)")


def stale_files(directory: Path, writing: set[str]) -> list[str]:
    """The Hugging Face weight and processor files in ``directory`` that a new export of the files ``writing``
    would contradict: sharding indexes (read before ``model.safetensors``) and the shards they list,
    ``pytorch_model.bin``, and a ``preprocessor_config.json`` the new export does not write. Other files,
    such as a README or TensorFlow weights, are left alone."""
    names: list[str] = []
    for weights in WEIGHT_FILES:
        index = directory / f"{weights}.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                shards = set()
            names += [index.name] + sorted(str(s) for s in shards if "/" not in str(s) and str(s) not in writing)
    names += [n for n in ("pytorch_model.bin", PROCESSOR_CONFIG) if n not in writing]
    return [n for n in names if (directory / n).is_file()]


def write_directory(state_dict: dict[str, Tensor], config: ViTConfig, directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``ViTForImageClassification`` (or ``ViTModel``
    when there is no classifier) loads with ``from_pretrained``, and the ``preprocessor_config.json`` with which
    ``AutoImageProcessor`` prepares images exactly as vitkit does (:func:`vitkit.hf_processor.processor_config`).
    All files or none; the files of an older export that would contradict them are removed (:func:`stale_files`:
    a processor config is one when this model has none, not being 3-channel)."""
    directory = Path(directory)
    hf_config = config_to_hf(config, state_dict["pos_embed"].dtype)
    files: dict[str, dict[str, Tensor] | str] = {"model.safetensors": from_vitkit(state_dict, config),
                                                 "config.json": json.dumps(hf_config, indent=2) + "\n"}
    processor = processor_config(config.preprocessing())
    if processor is not None:  # None: not 3 channels, which transformers' processors cannot make
        files[PROCESSOR_CONFIG] = json.dumps(processor, indent=2) + "\n"
    return write_files(directory, files)


def write_files(directory: Path, files: dict[str, dict[str, Tensor] | str]) -> Path:
    """Write a Hugging Face directory's files (tensors as safetensors, text as is) as one, removing stale ones."""
    stale = stale_files(directory, set(files)) if directory.is_dir() else []
    with atomic_files(directory, stale=stale) as stage:
        for name, content in files.items():
            if isinstance(content, str):
                stage(name).write_text(content)
            else:
                tensors = {k: v.detach().contiguous().cpu() for k, v in content.items()}
                save_file(tensors, str(stage(name)), metadata={"format": "pt"})
    return directory
