"""The Vision Transformer (Dosovitskiy et al., 2020, Sec. 3.1), read top to bottom:

    patches -> linear projection -> [class] token + position embeddings -> encoder -> norm -> head

Besides vitkit's own API the model has timm's, with timm's meanings (``num_classes``, ``num_features``,
``pretrained_cfg``, ``reset_classifier``, ``group_matcher``, ``forward_intermediates``, ...), so timm's data,
optimizer and feature-extraction helpers work on it; it scripts (``torch.jit.script``) and traces (FX).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.fileio import write_model_dir
from vitkit.models.features import FeatureInfo
from vitkit.models.hybrid import build_stem
from vitkit.models.init import check_mode, init_module_, init_token_, lecun_normal_
from vitkit.models.inputs import check_image_batch
from vitkit.models.layers import AttentionPool, PatchEmbed, block_stack
from vitkit.models.pos_embed import resample_grid, resample_pos_embed
from vitkit.models.registry import config_record

POOLS = ("", "token", "avg", "max", "avgmax", "map")
"""timm's ``global_pool`` values: none (all tokens), class token, mean / max / their average over the patch
tokens, multihead attention pooling."""


def check_image_size(images: Tensor, in_chans: int, image_hw: tuple[int, int], stride: int, dynamic: bool) -> Tensor:
    """``images`` if they are what the model takes (else a ``ValueError`` saying what it expected).

    Traced by FX as one call (``torch.fx.wrap`` below): a graph keeps the check and no Python branch sees
    a proxy."""
    check_image_batch(images, in_chans)
    hw = (images.shape[-2], images.shape[-1])
    if dynamic:
        if hw[0] % stride or hw[1] % stride:
            raise ValueError(f"image size {hw} is not divisible by the patch stride {stride}")
    elif hw != tuple(image_hw):
        raise ValueError(f"expected images of size {tuple(image_hw)}, got {hw}; build the model with "
                         f"img_size={hw[0] if hw[0] == hw[1] else hw} (position embeddings are resampled) "
                         "or dynamic_img_size=True")
    return images


def pos_embed_for_grid(pos_embed: Tensor, grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int,
                       mode: str) -> Tensor:
    """The position table resampled to ``grid`` (itself when the grid is the trained one); one FX call."""
    return resample_grid(pos_embed, grid, old_grid, num_prefix_tokens, mode)


torch.fx.wrap("check_image_size")
torch.fx.wrap("pos_embed_for_grid")


class VisionTransformer(nn.Module):
    """ViT built from a :class:`ViTConfig`. Keys match timm's ``VisionTransformer``.

    Subclasses (T2T-ViT) change how images become tokens (:meth:`_build_tokenizer`, :meth:`tokenize`) and
    the position table; the encoder, pooling, head and every API below are this class's.
    """

    weight_init = "jax"
    """The :mod:`~vitkit.models.init` mode this family starts from (the paper's JAX release)."""
    default_head_init = "xavier"
    """The head's init when :meth:`reset_head` is asked for a non-zero one."""
    first_conv = "patch_embed.proj"
    __jit_unused_properties__ = [
        "pretrained_cfg", "default_cfg", "feature_info", "patch_size", "embed_stride", "first_conv"]

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self._build_tokenizer()
        self.grid_size = self.patch_embed_grid(config.image_hw)  # (H/P, W/P)
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.has_class_token = config.class_token
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.pos_embed = self._new_pos_embed(self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1])
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.blocks = block_stack(dim, config.depth, config.num_heads, config.mlp_dim, qkv_bias=config.qkv_bias,
                                  drop=config.drop_rate, attn_drop=config.attn_drop_rate,
                                  drop_path_rate=config.drop_path_rate, norm_eps=config.norm_eps,
                                  qk_scale=config.qk_scale)
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn_pool = (AttentionPool(dim, config.num_heads, config.mlp_dim, norm_eps=config.norm_eps)
                          if config.global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.pre_logits = PreLogits(dim, config.representation_size) if config.representation_size else nn.Identity()
        self.head_drop = self._new_head_dropout()
        self.head = self._new_head(config.num_classes, config.head_init)
        self.grad_checkpointing = False
        self._sync_attributes()
        self.init_weights()

    # ------------------------------------------------------------------------ family-specific parts
    def _build_tokenizer(self) -> None:
        """Set the module that turns images into tokens: patches (``patch_embed``), or a CNN's feature map."""
        self.patch_embed = build_patch_embed(self.config)

    def _new_pos_embed(self, num_positions: int) -> nn.Parameter:
        """The learned position table, initialised by :meth:`init_weights`."""
        return nn.Parameter(torch.zeros(1, num_positions, self.config.embed_dim))

    def _new_head_dropout(self) -> nn.Module:
        return nn.Dropout(self.config.drop_rate)

    def tokenize(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images -> tokens (B, N, D) and their grid."""
        return self.patch_embed(images)

    def _sync_attributes(self) -> None:
        """Plain attributes mirroring the config: what ``forward`` reads (TorchScript cannot read a dataclass)
        and timm's names (``num_classes``, ``global_pool``, ``num_features``, ``head_hidden_size``)."""
        cfg = self.config
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.embed_dim = cfg.embed_dim
        self.num_features = cfg.embed_dim
        self.head_hidden_size = cfg.representation_size or cfg.embed_dim
        self.dynamic_img_size = cfg.dynamic_img_size
        self.in_chans = cfg.in_chans
        self.img_size = cfg.image_hw
        self.patch_stride = self.embed_stride
        # how a learned table is resampled (a T2T config has none: its fixed table is regenerated)
        self.pos_embed_mode = getattr(cfg, "pos_embed_interpolation", "bicubic")

    @property
    def embed_stride(self) -> int:
        """Pixels per token along each side."""
        return self.patch_embed.stride

    # ----------------------------------------------------------------------------------------- init
    def init_weights(self, mode: Optional[str] = None) -> None:
        """Initialise every weight by ``mode`` (see :mod:`vitkit.models.init`; default: the family's own):
        the position table N(0, 0.02) truncated at 2 std (learned tables only), the class token, then each
        module by its own ``init_weights``. The head keeps the init it was built with."""
        mode = mode or self.weight_init
        check_mode(mode)
        with torch.no_grad():
            if self.pos_embed.requires_grad:
                nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
            if self.cls_token is not None:
                init_token_(self.cls_token, mode)
            for module in (self.tokenizer_module(), *self.blocks, self.norm, self.fc_norm, self.pre_logits):
                init_module_(module, mode)
            if self.attn_pool is not None:
                init_module_(self.attn_pool, mode)

    def tokenizer_module(self) -> nn.Module:
        return self.patch_embed

    # ----------------------------------------------------------------------------------------- head
    def _new_head(self, num_classes: int, init: str) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        width = self.config.representation_size or self.config.embed_dim
        head = nn.Linear(width, num_classes)
        if init == "zeros":
            nn.init.zeros_(head.weight)
        elif init == "trunc_normal":
            nn.init.trunc_normal_(head.weight, std=0.02)
        else:
            nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)
        if self.config.head_batchnorm:
            return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), head)
        return head

    def reset_head(self, num_classes: int, *, class_names: Sequence[str] | None = None,
                   zero_init: bool = True, keep_representation: bool = False) -> None:
        """Replace the classifier by a fresh D x K layer, zero-initialised as in the paper's fine-tuning.

        The pre-training representation layer is removed too unless ``keep_representation``.
        """
        if not keep_representation and self.config.representation_size is not None:
            self.pre_logits = nn.Identity()
            self.config = self.config.replace(representation_size=None)
        self.config = self.config.replace(num_classes=num_classes, class_names=None,
                                          head_init="zeros" if zero_init else self.default_head_init)
        self.config = self.config.replace(class_names=list(class_names) if class_names is not None else None)
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = self._new_head(num_classes, self.config.head_init).to(device=device, dtype=dtype)
        self.head.train(self.training)
        self._sync_attributes()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's name: a fresh ``num_classes`` head (0: none), the representation layer kept; ``global_pool``
        switches the pooling (to or from ``'map'`` only by building the model with it)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        self.reset_head(num_classes, zero_init=False, keep_representation=True)

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {', '.join(map(repr, POOLS))}, got {global_pool!r}")
        if (global_pool == "map") != (self.attn_pool is not None):
            raise ValueError(f"global_pool={global_pool!r}: attention pooling ('map') is added or removed only by "
                             "building the model with it (create_model(..., global_pool='map'))")
        self.config = self.config.replace(global_pool=global_pool)
        self._sync_attributes()

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay, besides norms and biases."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (for ``create_optimizer_v2(..., layer_decay=...)``): the embedding, then one
        group per block, the final norm with the last."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (less memory)."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------------------------- timm's records
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's record of how images are prepared for the weights, from the model's own preprocessing
        record, so ``timm.data.resolve_data_config({}, model=m)`` and ``create_transform`` reproduce it."""
        cfg = self.config
        p = cfg.preprocessing()
        return {
            "architecture": cfg.name or type(self).__name__, "input_size": (cfg.in_chans, *p.size),
            "fixed_input_size": not self.dynamic_img_size, "interpolation": p.interpolation,
            "crop_pct": p.crop_pct, "crop_mode": p.crop_mode, "mean": tuple(p.mean), "std": tuple(p.std),
            "num_classes": cfg.num_classes, "label_names": list(cfg.class_names) if cfg.class_names else None,
            "first_conv": self.first_conv, "classifier": "head",
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def feature_info(self) -> FeatureInfo:
        """timm's list of the feature maps :meth:`forward_intermediates` gives: one per block."""
        return FeatureInfo(dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=self.patch_stride)
                           for i in range(len(self.blocks)))

    @property
    def patch_size(self) -> int:
        return self.patch_stride

    def set_input_size(self, img_size: Union[int, tuple[int, int], None] = None,
                       patch_size: Union[int, tuple[int, int], None] = None) -> None:
        """Rebuild for another input size (timm's name): the position table is resampled (regenerated for a
        fixed one). A new patch size is not supported (it would need a resampled patch projection)."""
        if patch_size is not None:
            wanted = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
            if wanted != (self.patch_stride, self.patch_stride):
                raise ValueError(f"set_input_size: changing the patch size ({self.patch_stride} -> {patch_size}) is "
                                 "not supported; build the model with the new patch size")
        if img_size is None:
            return
        config = self.config.replace(img_size=img_size)
        grid = self.patch_embed_grid(config.image_hw)
        if grid != self.grid_size:
            with torch.no_grad():
                table = self._pos_embed_table(grid)
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        self.config, self.grid_size = config, grid
        self._sync_attributes()

    def _pos_embed_table(self, grid: tuple[int, int]) -> Tensor:
        """The position table for ``grid``: the learned one resampled."""
        return resample_pos_embed(self.pos_embed.detach(), grid, old_grid=self.grid_size,
                                  num_prefix_tokens=self.num_prefix_tokens, mode=self.pos_embed_mode)

    # ---------------------------------------------------------------------------------- embeddings
    def patch_embed_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid an image of ``image_hw`` pixels yields."""
        stride = self.embed_stride
        return image_hw[0] // stride, image_hw[1] // stride

    def _check_input(self, images: Tensor) -> Tensor:
        return check_image_size(images, self.in_chans, self.img_size, self.patch_stride, self.dynamic_img_size)

    def _pos_embed(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = pos_embed_for_grid(pos_embed, grid, self.grid_size, self.num_prefix_tokens,
                                           self.pos_embed_mode)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + pos_embed)

    def embed(self, images: Tensor) -> Tensor:
        """Images -> the encoder's input sequence z_0 (Eq. 1)."""
        if not torch.jit.is_scripting():
            images = self._check_input(images)
        tokens, grid = self.tokenize(images)
        return self._pos_embed(tokens, grid)

    # ------------------------------------------------------------------------------------- forward
    def _blocks(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            x = self.blocks(x)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x

    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the encoder and its final LayerNorm, shape (B, prefix + N, D)."""
        return self.norm(self._blocks(self.embed(images)))

    def pool(self, tokens: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """The image representation y: the class token (Eq. 4), the mean, max or both of the patch tokens,
        attention pooling, or (``''``) all tokens."""
        if self.attn_pool is not None:
            return self.attn_pool(tokens[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "":
            return tokens
        if pool_type == "token":
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return patches.mean(dim=1)
        if pool_type == "max":
            return patches.amax(dim=1)
        return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens and classify; ``pre_logits=True`` returns the features the head sees."""
        x = self.pre_logits(self.fc_norm(self.pool(tokens)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    # ------------------------------------------------------------------------- inspection helpers
    def _resolve_indices(self, indices: int | Iterable[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: asks for the last {indices} blocks of {depth}")
            return list(range(depth - indices, depth))
        resolved = []
        for i in indices:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"block index {i} out of range for a model of depth {depth}")
            resolved.append(j)
        return sorted(set(resolved))

    def forward_intermediates(self, x: Tensor, indices: int | Iterable[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False) -> Any:
        """Tokens after chosen blocks, with timm's signature and defaults: ``indices`` is a count of final blocks,
        a list (negative counts from the end) or None (all).

        Intermediates are feature maps (B, D, H, W) (``output_fmt='NCHW'``) or patch tokens (B, N, D)
        (``'NLC'``), the prefix (class) tokens apart: with ``return_prefix_tokens`` each is a (patches, prefix)
        pair. Returns ``(final_tokens, intermediates)``; only the intermediates with ``intermediates_only``;
        with ``output_dict`` a dict (``image_intermediates``, ``image_intermediates_prefix``,
        ``image_features``). ``stop_early`` skips the blocks after the last one asked for.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self._resolve_indices(indices)
        height, width = x.shape[-2], x.shape[-1]
        x = self.embed(x)
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefixes = [t[:, :n] for t in intermediates] if n else None
        intermediates = [t[:, n:] for t in intermediates]
        if output_fmt == "NCHW":
            grid = self.patch_embed_grid((height, width))
            intermediates = [t.reshape(t.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for t in intermediates]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefixes is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefixes is not None:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | Iterable[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the head when asked), as timm:
        what a feature extractor of those blocks needs. Returns the kept indices."""
        take = self._resolve_indices(indices)
        self.blocks = self.blocks[: max(take) + 1]
        self.config = self.config.replace(depth=len(self.blocks))
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.attn_pool = None
            self.config = self.config.replace(global_pool="" if self.config.global_pool == "map"
                                              else self.config.global_pool)
            self.reset_classifier(0, "")
        return take

    def attention_maps(self, images: Tensor, indices: int | Iterable[int] | None = None) -> list[Tensor]:
        """Attention probabilities (B, heads, N, N) of the chosen blocks (all by default).

        Runs the explicit softmax(QK^T/sqrt(d)) path only in those blocks and stops after the last one.
        """
        take = self._resolve_indices(indices)
        x = self.embed(images)
        maps = []
        for i, block in enumerate(self.blocks[: max(take) + 1]):
            if i in take:
                x, attn = block.forward_with_attention(x)
                maps.append(attn)
            else:
                x = block(x)
        return maps

    # ------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory`` (atomically)."""
        return write_model_dir(directory, self.state_dict(), config_record(self.config))


def build_patch_embed(config: ViTConfig) -> nn.Module:
    """The module that turns images into the token sequence: patches, or a CNN's feature map."""
    if config.stem is None:
        return PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
    return build_stem(config)


class PreLogits(nn.Sequential):
    """The paper's pre-training "MLP with one hidden layer" before the head: Dense + tanh (keys ``fc``, ``act``)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__(OrderedDict(fc=nn.Linear(dim, width), act=nn.Tanh()))

    def init_weights(self, mode: str) -> None:
        """LeCun-normal in the JAX release, like its other Dense layers otherwise; zero bias."""
        if mode == "jax":
            lecun_normal_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        else:
            init_module_(self.fc, mode)
