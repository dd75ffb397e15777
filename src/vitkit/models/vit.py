"""The Vision Transformer (Dosovitskiy et al., 2020, Sec. 3.1), read top to bottom:

    patches -> linear projection -> [class] token + position embeddings -> encoder -> norm -> head
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.fileio import write_model_dir
from vitkit.models.hybrid import build_stem
from vitkit.models.init import lecun_normal_
from vitkit.models.inputs import check_image_batch
from vitkit.models.layers import Block, PatchEmbed
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.registry import config_record


class VisionTransformer(nn.Module):
    """ViT built from a :class:`ViTConfig`. Keys match timm's ``VisionTransformer``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = build_patch_embed(config)
        self.grid_size = self.patch_embed_grid(config.image_hw)  # (H/P, W/P)
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        num_positions = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)

        # stochastic depth grows linearly with depth, from 0 to drop_path_rate
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[
            Block(dim, config.num_heads, config.mlp_dim, qkv_bias=config.qkv_bias, drop=config.drop_rate,
                  attn_drop=config.attn_drop_rate, drop_path=drop_path[i], norm_eps=config.norm_eps)
            for i in range(config.depth)
        ])
        self.norm = nn.Identity() if config.fc_norm else nn.LayerNorm(dim, eps=config.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.pre_logits = _representation_layer(dim, config.representation_size)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = self._new_head(config.num_classes, config.head_init)
        self.init_weights()

    # ----------------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """The public JAX release's initialisation (vit_jax ``models_vit.py``), which the paper's
        results were obtained with: Xavier-uniform Dense kernels, tiny-normal MLP biases, LeCun-normal
        patch projection, N(0, 0.02) position embeddings (truncated, like timm) and a near-zero class
        token. We chose it over timm's default trunc-normal(0.02) linears because it is what the paper
        used and trains deep stacks stably without tuning."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.patch_embed, PatchEmbed):
            lecun_normal_(self.patch_embed.proj.weight)
            nn.init.zeros_(self.patch_embed.proj.bias)
        for name, module in self.named_modules():
            if name.startswith(("head", "patch_embed")):
                continue
            if isinstance(module, nn.Linear):
                if name.startswith("pre_logits"):
                    lecun_normal_(module.weight)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if ".mlp." in f".{name}.":
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _new_head(self, num_classes: int, init: str) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        width = self.config.representation_size or self.config.embed_dim
        head = nn.Linear(width, num_classes)
        if init == "zeros":
            nn.init.zeros_(head.weight)
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
        if not keep_representation:
            self.pre_logits = nn.Identity()
            self.config = self.config.replace(representation_size=None)
        self.config = self.config.replace(num_classes=num_classes, class_names=None,
                                          head_init="zeros" if zero_init else "xavier")
        self.config = self.config.replace(class_names=list(class_names) if class_names is not None else None)
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = self._new_head(num_classes, self.config.head_init).to(device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay, besides norms and biases."""
        return {"pos_embed", "cls_token"}

    # ---------------------------------------------------------------------------------- embeddings
    def patch_embed_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid an image of ``image_hw`` pixels yields."""
        stride = self.patch_embed.stride
        return image_hw[0] // stride, image_hw[1] // stride

    def _check_input(self, images: Tensor) -> None:
        cfg = self.config
        check_image_batch(images, cfg.in_chans)
        hw = tuple(images.shape[-2:])
        if cfg.dynamic_img_size:
            stride = self.patch_embed.stride
            if hw[0] % stride or hw[1] % stride:
                raise ValueError(f"image size {hw} is not divisible by the patch stride {stride}")
        elif hw != cfg.image_hw:
            raise ValueError(f"expected images of size {cfg.image_hw}, got {hw}; build the model with "
                             f"img_size={hw[0] if hw[0] == hw[1] else hw} (position embeddings are resampled) "
                             "or dynamic_img_size=True")

    def _pos_embed(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        pos_embed = self.pos_embed
        if grid != self.grid_size:
            pos_embed = resample_pos_embed(pos_embed, grid, old_grid=self.grid_size,
                                           num_prefix_tokens=self.num_prefix_tokens,
                                           mode=self.config.pos_embed_interpolation)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + pos_embed)

    def embed(self, images: Tensor) -> Tensor:
        """Images -> the encoder's input sequence z_0 (Eq. 1)."""
        self._check_input(images)
        tokens, grid = self.patch_embed(images)
        return self._pos_embed(tokens, grid)

    # ------------------------------------------------------------------------------------- forward
    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the encoder and its final LayerNorm, shape (B, prefix + N, D)."""
        return self.norm(self.blocks(self.embed(images)))

    def pool(self, tokens: Tensor) -> Tensor:
        """The image representation y: the class token (Eq. 4), or the mean of the patch tokens."""
        if self.config.global_pool == "avg":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]

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

    def forward_intermediates(self, images: Tensor, indices: int | Iterable[int] | None = None, *,
                              norm: bool = False, output_fmt: Literal["NLC", "NCHW"] = "NLC",
                              return_prefix_tokens: bool = False, intermediates_only: bool = False,
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Tokens after chosen blocks (timm's API): ``indices`` is a count of final blocks or a list.

        Returns ``(final_tokens, intermediates)``, or only the intermediates. ``output_fmt='NCHW'``
        lays the patch tokens out as a feature map (prefix tokens are then returned apart when asked).
        """
        take = self._resolve_indices(indices)
        x = self.embed(images)
        grid = self.patch_embed_grid(tuple(images.shape[-2:]))
        intermediates = []
        last = max(take) if intermediates_only else len(self.blocks) - 1
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            prefixes = [t[:, : self.num_prefix_tokens] for t in intermediates]
            intermediates = [t[:, self.num_prefix_tokens:].reshape(t.shape[0], grid[0], grid[1], -1)
                             .permute(0, 3, 1, 2).contiguous() for t in intermediates]
            if return_prefix_tokens:
                intermediates = list(zip(intermediates, prefixes))
        elif output_fmt != "NLC":
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
    @property
    def num_features(self) -> int:
        return self.config.representation_size or self.config.embed_dim

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` to ``directory`` (atomically)."""
        return write_model_dir(directory, self.state_dict(), config_record(self.config))


def build_patch_embed(config: ViTConfig) -> nn.Module:
    """The module that turns images into the token sequence: patches, or a CNN's feature map."""
    if config.stem is None:
        return PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
    return build_stem(config)


def _representation_layer(dim: int, width: int | None) -> nn.Module:
    """The paper's pre-training "MLP with one hidden layer" before the head: Dense + tanh."""
    if width is None:
        return nn.Identity()
    return nn.Sequential(OrderedDict(fc=nn.Linear(dim, width), act=nn.Tanh()))

