"""The training configuration: a small tree of dataclasses, read from YAML, overridden from the
command line (``--epochs 50``, ``--optim.lr 1e-3``), validated key by key, written back as YAML.

Every key has a default; a config file changes what it names. With no file, ``load_config`` reads the
bundled ``cifar10_convstem`` recipe, the README's main job: a small ViT (with a convolutional stem) on
CIFAR-10.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vitkit.config_engine import (
    ConfigError,
    check_fields,
    checked_fields,
    coerce,
    describe_yaml_error,
    field_types,
    from_mapping,
    to_plain,
)
from vitkit.data import DataConfig
from vitkit.models.mae import MAEConfig
from vitkit.models.registry import get_model_entry
from vitkit.models.transfer import PosEmbedInit
from vitkit.resolver import source_config
from vitkit.runtime import DEFAULT_DEVICE, Precision
from vitkit.train.budget import parse_duration

OptimizerName = Literal["adamw", "sgd", "muon"]
Progress = Literal["auto", "bar", "plain", "none"]
TaskName = Literal["classification", "mae"]
Strategy = Literal["ddp", "fsdp"]
"""What a run trains for; each name has a :class:`vitkit.train.task.Task` in ``vitkit.train.task.TASKS``."""

GRAD_CHECKPOINTING = "grad_checkpointing"
"""``model.grad_checkpointing: true``: recompute each transformer block's activations in the backward pass
(:mod:`vitkit.train.grad_checkpointing`); not a field of the model's config, so never exported."""

DEFAULT_CONFIG = "cifar10_convstem"
"""The bundled config that ``vitkit train`` runs when given none: the README's main job."""
FINETUNE_RECIPE = "finetune"
"""The bundled config under every ``vitkit finetune``: the paper's fine-tuning recipe."""


@dataclass
class OptimConfig:
    """AdamW (or SGD with momentum, or Muon) with linear warmup then cosine decay, per optimizer step."""

    name: OptimizerName = "adamw"
    """``adamw``; ``sgd`` with ``momentum`` (the paper's fine-tuning optimizer); or ``muon``: Muon with
    Nesterov ``momentum`` (0.95 is its usual value) for the encoder blocks' weight matrices and AdamW for
    every other parameter, at one learning rate (:class:`vitkit.train.optim.MuonAdamW`)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup (not scaled by the batch size)."""
    blr: Optional[float] = None
    """Base learning rate per 256 images (MAE's rule): when set, the peak is ``blr * global batch / 256``
    and ``lr`` is ignored."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.05
    """Decoupled weight decay; never applied to norms, biases, position embeddings or the class token."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    clip_grad: Optional[float] = 1.0
    """Clip the global gradient norm to this value; null turns clipping off."""
    accum_steps: int = 1
    """Gradient accumulation: one optimizer step every ``accum_steps`` batches."""
    momentum: float = 0.9
    """SGD's momentum, and Muon's (Nesterov)."""
    layer_decay: Optional[float] = None
    """Layer-wise learning-rate decay: block i of L trains at ``lr * layer_decay ** (L - i)``; null: off."""

    def __post_init__(self) -> None:
        check_fields(self, prefix="optim.")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.blr is not None and self.blr <= 0:
            raise ValueError(f"optim.blr must be positive or null, got {self.blr}")
        if not 0 <= self.min_lr <= (self.lr if self.blr is None else float("inf")):
            raise ValueError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optim.clip_grad must be positive or null, got {self.clip_grad}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")


@dataclass
class DistributedConfig:
    """How a run under ``torchrun`` spreads over its processes (a single process is unaffected)."""

    strategy: Strategy = "ddp"
    """``ddp``: a whole replica per process; ``fsdp``: parameters, gradients and optimizer state sharded per
    transformer block (FSDP2), checkpoints written sharded (Distributed Checkpoint) and resumable on any
    number of processes."""
    cpu_offload: bool = False
    """With ``fsdp``: keep parameters, gradients and optimizer state in CPU memory between uses."""

    def __post_init__(self) -> None:
        check_fields(self, prefix="distributed.")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("distributed.cpu_offload needs distributed.strategy fsdp")


@dataclass
class FinetuneConfig:
    """The ``finetune`` section of a training config. With ``init`` unset, training starts from scratch."""

    init: Optional[str] = None
    """SOURCE of the pre-trained weights: a vitkit model or run directory, or anything
    ``vitkit.from_pretrained`` reads."""
    pos_embed: PosEmbedInit = "interpolate"
    """At a new resolution: ``interpolate`` the pre-trained position embeddings in 2-D, or ``reinit`` them."""
    freeze_backbone: bool = False
    """Train the new head only (a linear probe)."""
    zero_init_head: bool = True
    keep_representation: bool = False
    """Keep the pre-training representation (pre-logits) layer; the paper removes it."""

    def __post_init__(self) -> None:
        check_fields(self, prefix="finetune.")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved as ``config.yaml`` in the run directory.

    The defaults here are neutral building blocks that config files override; the run ``vitkit train``
    makes without a config is the bundled ``cifar10_convstem`` recipe (:data:`DEFAULT_CONFIG`).
    """

    task: TaskName = "classification"
    """What the run trains for: ``classification`` (labels), or ``mae`` (masked-autoencoder pre-training of
    ``model.name``, an MAE or any plain-patch ViT; see ``vitkit pretrain``)."""
    model: dict[str, Any] = field(default_factory=lambda: {"name": "vit_cifar_patch4_32"})
    """A registered model name plus overrides of its config, e.g. ``{name: ..., drop_path_rate: 0.1}``.
    ``num_classes``, ``in_chans`` and ``img_size`` default to the data set's. Giving ``model.name``
    replaces the whole section; other ``model.*`` keys are added to it."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Start from pre-trained weights (``finetune.init``) instead of a fresh ``model.name``."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    epochs: int = 30
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the learning-rate schedule spans them), even within an epoch;
    null: ``epochs`` full epochs."""
    time_budget: Optional[str] = None
    """Train for this long (``60m``, ``1h30m``, ``90s``), evaluations included: a run with a budget and no
    ``max_steps`` times its first steps, then fixes ``max_steps`` (and ``epochs``) so that warmup, decay and
    every evaluation end inside it, and writes them to its config.yaml; after each evaluation and every tenth of
    the run it re-plans the remaining decay if the host's pace changed (``budget_replans``). ``--epochs`` or
    ``--max_steps`` given over a config turns the budget off (a fixed length wins)."""
    budget_replans: list[tuple[int, int]] = field(default_factory=list)
    """Written by a run with a budget: ``[step, total_steps]`` for each re-plan, where the remaining cosine
    decay was compressed or stretched to end at the new total. A run of this config replays them."""
    whiten_stem: bool = False
    """Initialise the first convolution of a fresh model's patch embedding (a conv stem's first layer, or the
    patch projection) to whiten the patches of 5,000 training images (airbench's patch-whitening initialisation,
    Jordan 2024)."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights (e.g. 0.9998); it is evaluated and exported."""
    precision: Precision = "fp32"
    """fp32, bf16 autocast, or fp16 autocast (with a gradient scaler on CUDA)."""
    compile: bool = False
    """Run the model through ``torch.compile``."""
    device: str = DEFAULT_DEVICE
    """auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps."""
    seed: int = 0
    deterministic: bool = False
    """Use deterministic kernels only, so a run (and its resumption) is bit-for-bit repeatable."""
    log_every: int = 50
    """Log training metrics every this many optimizer steps."""
    eval_every: int = 1
    """Evaluate on the validation set every this many epochs (and always after the last)."""
    eval_hflip_tta: bool = False
    """Evaluate with test-time augmentation: the mean logits of each image and its mirror image."""
    eval_translate_tta: bool = False
    """Evaluate each view also shifted one pixel up-left and down-right (airbench's test-time translations):
    3 forward passes per view, 6 with ``eval_hflip_tta``."""
    ckpt_every_steps: int = 500
    """Write the ``last`` checkpoint every this many optimizer steps (and at every epoch end); 0: epoch ends only."""
    keep_last_k: int = 2
    """Also keep the k most recent checkpoints as ``step-NNNNNNNN.pt`` (0 keeps only last and best)."""
    out_dir: str = "runs"
    run_name: Optional[str] = None
    """Name of the run directory under ``out_dir``; default: ``<dataset>-<model>-<date>-<time>``."""
    progress: Progress = "auto"
    """auto: a tqdm bar on a terminal, plain log lines otherwise."""
    task: TaskName = "classification"
    """The training objective: what a batch's loss is and what an evaluation measures."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.model = check_model_section(self.model, fine_tuning=bool(self.finetune.init), task=self.task)
        for key in ("epochs", "log_every", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.budget_replans and self.max_steps is None:
            raise ValueError("budget_replans needs the max_steps they re-plan (both are written by a budgeted run)")
        if any(at < 1 or total < at for at, total in self.budget_replans):
            raise ValueError(f"budget_replans: each entry is [step, total_steps] with 0 < step <= total_steps, got "
                             f"{[list(r) for r in self.budget_replans]}")
        for key in ("ckpt_every_steps", "keep_last_k"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.whiten_stem and self.task != "classification":
            raise ValueError(f"whiten_stem initialises a classifier's patch embedding; task {self.task} has its own")
        if self.whiten_stem and self.finetune.init:
            raise ValueError("whiten_stem re-initialises a fresh model's stem; a fine-tuning run (finetune.init) "
                             "keeps its pre-trained one")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.ema_decay is not None and self.distributed.strategy == "fsdp":
            raise ValueError("ema_decay is not supported with distributed.strategy fsdp (the average would be a "
                             "whole replica per process); use ddp, or no EMA")
        if self.optim.name == "muon" and self.distributed.strategy == "fsdp":
            raise ValueError("optim.name muon is not supported with distributed.strategy fsdp (Muon orthogonalises "
                             "whole weight matrices, FSDP holds shards of them); use ddp, or adamw")

    # ------------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Keys given in ``data`` replace the defaults'; sections are merged key by key."""
        return from_mapping(cls, merge_configs(cls().to_dict(), data), source=source)


def check_model_section(model: Mapping[str, Any], *, fine_tuning: bool = False,
                        task: str = "classification") -> dict[str, Any]:
    """The ``model`` section: a registered ``name`` and overrides of that model's config fields, each
    checked against the field's type (e.g. ``model.depth: "six"`` is an error naming ``model.depth``).
    When fine-tuning, the architecture comes from ``finetune.init``, so only the types are known later."""
    name = model.get("name")
    if not isinstance(name, str):
        raise ConfigError("model.name must name a registered model (see `vitkit models`)")
    try:
        entry = get_model_entry(name)
    except ValueError as e:
        if fine_tuning:  # the name is ignored when fine-tuning
            return dict(model)
        raise ConfigError(f"model.name: {e}") from None
    # the overrides are the model's own config fields, typed by the engine (the model is built later, with the
    # data set's classes, channels and size, so only the fields given are checked here)
    overrides = {k: v for k, v in model.items() if k not in ("name", GRAD_CHECKPOINTING)}
    config_class = type(entry.config)
    sections: list[tuple[type, dict[str, Any]]] = [(config_class, overrides)]
    if task == "mae" or isinstance(entry.config, MAEConfig):  # an MAE takes its own fields and its encoder's
        encoder = type(entry.config.encoder) if isinstance(entry.config, MAEConfig) else config_class
        own = {k for k in field_types(MAEConfig) if k != "encoder"}
        sections = [(MAEConfig, {k: v for k, v in overrides.items() if k in own}),
                    (encoder, {k: v for k, v in overrides.items() if k not in own})]
    checked: dict[str, Any] = {"name": name}
    for cls, given in sections:
        if fine_tuning:  # the architecture comes from finetune.init: keys it may not have are checked there
            checked.update({k: v for k, v in given.items() if k not in field_types(cls)})
            given = {k: v for k, v in given.items() if k in field_types(cls)}
        checked.update(to_plain(checked_fields(cls, given, source="", prefix="model.",
                                               known=f"{name} ({cls.__name__})")))
    if GRAD_CHECKPOINTING in model:  # a training switch, valid for any model with transformer blocks
        checked[GRAD_CHECKPOINTING] = coerce(model[GRAD_CHECKPOINTING], bool, f"model.{GRAD_CHECKPOINTING}")
    return {k: checked[k] for k in model if k in checked}


# ---------------------------------------------------------------------------------- loading
def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of a run: a YAML file (a path, or the name of a bundled config such as ``mnist_vit``;
    by default ``cifar10_convstem``) over the defaults, then ``--key value`` overrides. Unknown keys are errors
    naming the key."""
    path = find_config(DEFAULT_CONFIG if config is None else config)
    source = str(path)
    data = read_yaml(path)
    override_dict = expand_shortcuts(parse_overrides(overrides))
    merged = merge_configs(data, override_dict)
    return TrainConfig.from_dict(merged, source=source if not override_dict else f"{source} + overrides")


def finetune_config(init: str, dataset: str, *, img_size: int | None = None, config: str | None = None,
                    overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config of ``vitkit finetune``: the bundled fine-tuning recipe, then the ``config`` file,
    then ``init``/``dataset``/``img_size``, then ``--key value`` overrides (later ones win)."""
    recipe = find_config(FINETUNE_RECIPE)
    data = read_yaml(recipe)
    source = f"fine-tuning recipe {recipe.name}"
    init_config = source_config(init)
    if config is None and isinstance(init_config, MAEConfig):
        # An MAE fine-tunes (or linear-probes, with a frozen backbone) by MAE's own recipe.
        frozen = (expand_shortcuts(parse_overrides(overrides)).get("finetune") or {}).get("freeze_backbone")
        config = "mae_linprobe" if frozen else "mae_finetune"
    if config is not None:
        path = find_config(config)
        data = _merge(data, read_yaml(path))
        source = f"{source} + {path}"
    # The architecture comes from the SOURCE; the model section only names it and holds overrides
    # such as drop_path_rate (a from-scratch default section would describe another model).
    named: dict[str, Any] = {"finetune": {"init": str(init)}, "data": {"dataset": dataset},
                             "model": {"name": getattr(init_config, "name", None) or "pretrained"}}
    if img_size is not None:
        named["data"]["img_size"] = img_size
    data = _merge(_merge(data, named), expand_shortcuts(parse_overrides(overrides)))
    recorded = init_config.preprocessing() if init_config is not None else None
    if data["data"].get("mean") is None and data["data"].get("std") is None and recorded is not None:
        # Normalise the new images as the pre-training images were.
        data["data"]["mean"], data["data"]["std"] = list(recorded.mean), list(recorded.std)
    return TrainConfig.from_dict(data, source=f"{source}{' + overrides' if overrides else ''}")


def bundled_configs() -> list[str]:
    """Names of the configs shipped with vitkit (usable as ``--config NAME``)."""
    root = resources.files("vitkit") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def find_config(config: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled config (with or without ``.yaml``)."""
    path = Path(config)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    bundled = resources.files("vitkit") / "configs" / name
    if str(path.parent) in (".", "configs") and bundled.is_file():
        return Path(str(bundled))
    raise FileNotFoundError(f"config {str(config)!r}: no such file, and no bundled config of that name "
                            f"(bundled: {', '.join(bundled_configs())})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {describe_yaml_error(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``['--optim.lr', '1e-3', '--compile', '--data.dataset=mnist']`` -> a nested dict.

    Values are parsed as YAML (``null``, ``true``, ``[0.9, 0.95]``); a flag without a value means true.
    """
    result: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --key value or --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        i += 1
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--{key}: {describe_yaml_error(e)}") from None
        node = result
        parts = key.replace("-", "_").split(".")
        if parts == ["model"] and isinstance(parsed, str):  # --model NAME
            parts = ["model", "name"]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--{key}: {part} was given a value and sub-keys")
        node[parts[-1]] = parsed
    return result


def expand_shortcuts(overrides: dict[str, Any]) -> dict[str, Any]:
    """Let the command line say ``--dataset mnist --lr 3e-3 --model vit_tiny_patch4_32``: a top-level key
    that is not a TrainConfig key but names a ``data`` or ``optim`` key goes there."""
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    sections = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in (("data", DataConfig),
                                                                                   ("optim", OptimConfig))}
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        owners = [s for s, keys in sections.items() if key in keys]
        if key not in top and len(owners) == 1:
            out = _merge(out, {owners[0]: {key: value}})
        else:
            out = _merge(out, {key: value})
    return out


def merge_configs(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, section by section; a ``model`` that names its model replaces the base's
    model section (the overrides of one model mean nothing for another), and an ``epochs`` or ``max_steps``
    turns off the base's ``time_budget`` (unless the update sets one too)."""
    update = dict(update)
    if isinstance(update.get("model"), str):  # `model: vit_tiny_patch4_32` is short for {name: ...}
        update["model"] = {"name": update["model"]}
    if ("epochs" in update or "max_steps" in update) and "time_budget" not in update:
        update |= {"time_budget": None, "budget_replans": []}  # a length given over a budget wins over it
        if base.get("time_budget") and "max_steps" not in update:
            update["max_steps"] = None  # the budget wrote it: `--resume RUN --epochs 50` is 50 epochs
    merged = _merge(base, update)
    if isinstance(update.get("model"), Mapping) and "name" in update["model"]:
        merged["model"] = dict(update["model"])
    return merged


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out
