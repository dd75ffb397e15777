"""``read_model``: a model from a local checkpoint of any format vitkit reads (no network, no run directories:
those are :func:`vitkit.load_model`'s, which comes here for the files it finds); ``from_hub_source`` and
``hub_load_options`` for weights :mod:`vitkit.hub` fetched (the resolver's hub hook builds with them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from torch import nn

from vitkit.checkpoint import CheckpointError, load_weights
from vitkit.config import ViTConfig
from vitkit.convert import t2t
from vitkit.convert.detect import Checkpoint, read_checkpoint
from vitkit.convert.infer import STEM_ASSUMED, infer_config, stem_spec
from vitkit.convert.mae import infer_mae_config
from vitkit.hub import HubSource, find_entry
from vitkit.models.mae import ENCODER_PREFIXES, MAEConfig, MaskedAutoencoder
from vitkit.models.registry import build_model, build_registered, get_model_config, list_models
from vitkit.models.t2t import T2TConfig

# Fields the weights fix; a named model must agree with the checkpoint on them.
_STRUCTURE = ("patch_size", "in_chans", "embed_dim", "depth", "mlp_dim", "qkv_bias", "class_token", "fc_norm")


def read_model(source: str | Path, *, img_size: int | tuple[int, int] | None = None,
                    num_classes: int | None = None, num_heads: int | None = None,
                    model: str | ViTConfig | None = None, format: str | None = None,
                    interpolation: Literal["bicubic", "bilinear"] | None = None, **overrides: Any) -> nn.Module:
    """Build a model from any supported checkpoint, detecting its format.

    Args:
        source: a vitkit or Hugging Face (or timm Hub) directory, a timm / torchvision / Hugging Face
            state-dict file (.pth, .pt, .bin, .safetensors), a Google .npz, or an official T2T-ViT
            ``.pth.tar`` (its EMA weights when it holds them). (Run directories, training checkpoints,
            pretrained names, Hugging Face repo ids and URLs are the resolver's: :func:`vitkit.load_model`.)
        img_size: build for this resolution; position embeddings are resampled in 2-D.
        num_classes: replace the classifier by a zero-initialised one of this size (dropping the
            representation layer, as in the paper's fine-tuning) if it differs; 0 removes it.
        num_heads: the head count, for files that do not state it (timm, torchvision) at a
            non-standard width.
        model: a registry name or ViTConfig to load into, instead of the config inferred from the file.
        format: skip detection ('vitkit', 'timm', 'huggingface'/'hf', 'torchvision', 'jax'/'npz').
        interpolation: 'bicubic' (default) or 'bilinear' for resampling the position embeddings (a T2T-ViT's
            fixed sinusoid table is regenerated for the new token grid instead).
        overrides: other ViTConfig fields, e.g. ``drop_path_rate=0.1`` or ``global_pool='avg'``. For a
            hybrid, ``stem=`` gives the stem fields no tensor records (``stem_stride``, ``stem_pool``, ...;
            see :data:`vitkit.convert.infer.STEM_ASSUMED`), e.g. ``stem={"stem_stride": 1, "stem_pool": False}``.
    """
    return from_checkpoint(read_checkpoint(source, format), img_size=img_size, num_classes=num_classes,
                           num_heads=num_heads, model=model, interpolation=interpolation, **overrides)


def from_hub_source(fetched: HubSource, **options: Any) -> nn.Module:
    """:func:`read_model` for weights :func:`vitkit.hub.fetch_source` fetched, with the facts their
    publisher gives (:func:`hub_load_options`); ``options`` as for :func:`read_model` win over them."""
    checkpoint = read_checkpoint(fetched.path, options.pop("format", None) or fetched.format)
    given = {k: v for k, v in options.items() if v is not None}
    stated = hub_load_options(fetched)
    if (fetched.entry is None and "num_classes" not in given and "model" not in given
            and isinstance(stated.get("model"), ViTConfig)):
        # the publisher's metadata names the head size; weights with another head are a broken repo, not a
        # request for a new zero head (which would predict 1/N for every class)
        stated["num_classes"] = _checked_head(checkpoint, stated["model"], fetched)
    return from_checkpoint(checkpoint, **{**stated, **given})


def _checked_head(checkpoint: Checkpoint, target: ViTConfig, fetched: HubSource) -> int:
    """The head size of the weights, which must be the one the metadata states."""
    found = _config_for(checkpoint, target, None, None).num_classes
    if found != target.num_classes:
        where = fetched.path / "config.json" if fetched.path.is_dir() else fetched.source
        raise CheckpointError(f"{fetched.source}: {where} states num_classes={target.num_classes} but the weights' "
                              f"classifier has {found} outputs; the repo's files disagree (pass num_classes="
                              f"{target.num_classes}, --num-classes on the command line, to replace the head on "
                              "purpose)")
    return found


def hub_load_options(fetched: HubSource) -> dict[str, Any]:
    """:func:`from_checkpoint` options for fetched weights, read from their metadata, not their tensors: the
    registered architecture they belong to (at their native resolution, with their head, checked field by
    field against the file), their class names, their publisher's preprocessing (``config.preprocess``) and,
    for catalog entries, their provenance (``config.extra['pretrained']``: name, licence, location)."""
    pre = fetched.preprocessing
    options: dict[str, Any] = {}
    if fetched.architecture in list_models() and fetched.num_classes is not None:
        target = get_model_config(fetched.architecture).replace(**fetched.config, num_classes=fetched.num_classes)
        if pre is not None:
            height, width = pre.size
            target = target.replace(img_size=height if height == width else (height, width), preprocess=pre)
        if fetched.entry is not None and "extra" in {f.name for f in dataclasses.fields(target)}:
            entry = fetched.entry
            provenance = {"name": entry.name, "license": entry.license, "location": str(entry.location)}
            target = target.replace(extra={**target.extra, "pretrained": provenance})
        options["model"] = target
    elif pre is not None:
        options["preprocess"] = pre
    if fetched.class_names:
        options["class_names"] = list(fetched.class_names)
    return options


def create_untrained(name: str, **overrides: Any) -> nn.Module:
    """A registered model with random weights; ``arch.tag`` (a catalog name) is the architecture shaped as
    those weights are (their classes and input size), as ``timm.create_model(name)`` without weights is."""
    entry = find_entry(name) if "." in name else None
    if entry is None:
        return build_registered(name, **overrides)
    shape = {"num_classes": entry.num_classes, "img_size": entry.input_size, **entry.config}
    return build_registered(entry.architecture, **{**shape, **overrides})


def from_checkpoint(checkpoint: Checkpoint, *, img_size: int | tuple[int, int] | None = None,
                    num_classes: int | None = None, num_heads: int | None = None,
                    model: str | ViTConfig | T2TConfig | None = None,
                    interpolation: Literal["bicubic", "bilinear"] | None = None, **overrides: Any) -> nn.Module:
    """:func:`read_model` for a checkpoint already read with :func:`read_checkpoint`."""

    if checkpoint.architecture == "mae" or isinstance(checkpoint.config, MAEConfig):
        return _mae_from_checkpoint(checkpoint, img_size=img_size, num_classes=num_classes, num_heads=num_heads,
                                    **overrides)
    if checkpoint.format == "t2t":
        config = _t2t_config_for(checkpoint, model, num_heads)
    else:
        config = _config_for(checkpoint, model, num_heads, overrides.pop("stem", None))
    if model is not None and num_classes is None:
        num_classes = _as_config(model).num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    if interpolation is not None and hasattr(config, "pos_embed_interpolation"):  # T2T: a fixed table, regenerated
        overrides["pos_embed_interpolation"] = interpolation
    if overrides:
        config = config.replace(**overrides)
    net = build_model(config)
    load_weights(net, checkpoint.state_dict, source=str(checkpoint.path))
    if num_classes is not None and num_classes != config.num_classes:
        net.reset_head(num_classes)
    return net


def _mae_from_checkpoint(checkpoint: Checkpoint, *, img_size: int | tuple[int, int] | None,
                         num_classes: int | None, num_heads: int | None, **overrides: Any) -> nn.Module:
    """A masked autoencoder (or, with ``num_classes``, its encoder as a ViT with a fresh head). At another
    ``img_size`` the fixed sine-cosine tables are recomputed for the new grid rather than resampled."""
    config = checkpoint.config
    if config is None:  # the official release: shapes tell all but the head counts
        encoder_keys = {k: v for k, v in checkpoint.state_dict.items() if k.startswith(ENCODER_PREFIXES)}
        encoder = infer_config(encoder_keys, source=str(checkpoint.path),
                               **{**checkpoint.hints, **({"num_heads": num_heads} if num_heads else {})})
        config = infer_mae_config(checkpoint.state_dict, encoder, decoder_num_heads=overrides.pop("decoder_num_heads",
                                                                                                 None))
        config = config.replace(extra={"converted_from": "official MAE"})
    if img_size is not None:
        overrides["img_size"] = img_size
    if overrides:
        config = config.replace(**overrides)
    net = MaskedAutoencoder(config)
    state = dict(checkpoint.state_dict)
    own = net.state_dict()
    for table in ("pos_embed", "decoder_pos_embed"):
        if table in state and state[table].shape != own[table].shape:
            state[table] = own[table]
    load_weights(net, state, source=str(checkpoint.path))
    return net.export_encoder(num_classes) if num_classes is not None else net


def _t2t_config_for(checkpoint: Checkpoint, model: str | T2TConfig | None, num_heads: int | None) -> T2TConfig:
    """An official T2T-ViT file: its config from the shapes, completed by ``model`` when one is named."""
    reference = _as_config(model) if model is not None else None
    if reference is not None and not isinstance(reference, T2TConfig):
        raise CheckpointError(f"{checkpoint.path} is a T2T-ViT checkpoint; model={model!r} is not a T2T-ViT")
    found = t2t.infer_config(checkpoint.state_dict, source=str(checkpoint.path), num_heads=num_heads,
                             reference=reference)
    if reference is not None:
        fixed = ("in_chans", "tokens_type", "token_dim", "kernel_sizes", "embed_dim", "depth", "mlp_ratio", "qkv_bias")
        misfits = [f"{f}: checkpoint {getattr(found, f)!r}, model {getattr(reference, f)!r}"
                   for f in fixed if getattr(found, f) != getattr(reference, f)]
        if misfits:
            raise CheckpointError(f"{checkpoint.path} does not fit {reference.name or 'the given config'}: "
                                  + "; ".join(misfits))
    return found.replace(extra={**found.extra, "converted_from": "t2t"},
                         preprocess=checkpoint.preprocess or found.preprocess)


def _as_config(model: str | ViTConfig | T2TConfig) -> ViTConfig | T2TConfig:
    if not isinstance(model, str):
        return model
    return get_model_config(model)


def _config_for(checkpoint: Checkpoint, model: str | ViTConfig | None, num_heads: int | None,
                stem: dict[str, Any] | None) -> ViTConfig:
    source = str(checkpoint.path)
    known = dict(checkpoint.hints)
    if num_heads is not None:
        known["num_heads"] = num_heads
    if checkpoint.config is not None and model is None:
        config = checkpoint.config if num_heads is None else checkpoint.config.replace(num_heads=num_heads)
        return config if stem is None else config.replace(stem={**_stem_dict(config), **stem})
    if model is None:
        config = infer_config(checkpoint.state_dict, source=source, **known, stem=stem)
        return config.replace(extra={**config.extra, "converted_from": checkpoint.format},
                              preprocess=checkpoint.preprocess)
    target = _as_config(model)
    name = (target.name or "the given config") if isinstance(target, ViTConfig) else str(model)
    if not isinstance(target, ViTConfig):
        raise CheckpointError(f"{source} is a ViT checkpoint; {name} is a {type(target).__name__} model")
    if num_heads is not None:
        target = target.replace(num_heads=num_heads)
    if stem is not None:
        target = target.replace(stem={**_stem_dict(target), **stem})
    # The heads the file states (its metadata or vitkit config), compared like any other field; the
    # structure is read with one head, which fits any width, so that a misfit never hides behind a
    # "not divisible by num_heads" error.
    known.pop("num_heads", None)
    stated_heads = checkpoint.hints.get("num_heads") or getattr(checkpoint.config, "num_heads", None)
    # the named model fixes what the weights cannot tell: the head count and the stem's strides and norms
    unrecorded = {k: v for k, v in _stem_dict(target).items() if k in STEM_ASSUMED}
    found = infer_config(checkpoint.state_dict, source=source, **known, num_heads=stated_heads or 1,
                         stem=unrecorded)
    misfits = [f"{f}: checkpoint {getattr(found, f)!r}, model {getattr(target, f)!r}"
               for f in _STRUCTURE if getattr(found, f) != getattr(target, f)]
    if stated_heads is not None and stated_heads != target.num_heads:
        misfits.append(f"num_heads: checkpoint {stated_heads!r}, model {target.num_heads!r}")
    if stem_spec(found.stem) != stem_spec(target.stem):
        misfits.append(f"stem: checkpoint {_stem_dict(found) or None!r}, model {_stem_dict(target) or None!r}")
    if misfits:
        raise CheckpointError(f"{source} does not fit {name}: {'; '.join(misfits)}")
    # The checkpoint's head is loaded first; from_pretrained then resizes it to the model's.
    return target.replace(num_classes=found.num_classes, representation_size=found.representation_size,
                          class_names=found.class_names, norm_eps=found.norm_eps,
                          preprocess=checkpoint.preprocess or target.preprocess)


def _stem_dict(config: ViTConfig) -> dict[str, Any]:
    """A config's stem as its compact mapping (empty for a plain ViT)."""
    return config.stem.to_dict() if config.stem is not None else {}
