"""Masked autoencoders (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022), read
top to bottom:

    patches + fixed sin-cos positions -> keep a random 25% -> [class] token + ViT encoder -> norm
    -> linear to the decoder width -> mask tokens fill the gaps -> unshuffle -> + fixed sin-cos positions
    -> light transformer decoder -> norm -> linear to P*P*C pixels -> MSE on the masked patches only

The encoder is any vitkit ViT with plain patches; its parameters keep timm's and the official release's
names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N``, ``norm``) and the decoder's are the
official ones (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``), so ``{'model': state_dict}`` files of facebookresearch/mae load as they are.
``export_encoder()`` turns the encoder into a plain :class:`VisionTransformer` to fine-tune.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vitkit.config import ModelConfig, ViTConfig
from vitkit.config_engine import from_mapping, to_plain
from vitkit.fileio import write_model_dir
from vitkit.models.init import check_mode, init_module_, init_token_
from vitkit.models.layers import Block, PatchEmbed, block_stack
from vitkit.models.pos_embed import sincos_2d_pos_embed
from vitkit.models.registry import config_record, get_model_entry, register_architecture, register_model
from vitkit.models.vit import VisionTransformer
from vitkit.models.zoo import SIZES
from vitkit.preprocessing import Preprocessing

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
"""State-dict keys of the encoder inside an MAE (everything else belongs to the decoder)."""


@dataclass
class MAEConfig(ModelConfig):
    """An MAE: the encoder's :class:`ViTConfig`, the decoder's size and the pre-training task.

    ``replace`` routes fields it does not have to the encoder, so ``replace(img_size=32, in_chans=1)``
    and command-line overrides such as ``--model.depth 8`` work as on a plain ViT.
    """

    encoder: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0))
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_dim: int = 2048
    mask_ratio: float = 0.75
    """Fraction of the patches hidden from the encoder (the default of ``forward``)."""
    norm_pix_loss: bool = False
    """Regress each patch's pixels normalised by that patch's mean and std (the paper's better target)."""
    preprocess: Optional[Preprocessing] = None
    """How images are prepared for these weights (see :mod:`vitkit.preprocessing`); None = not recorded."""
    name: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = ViTConfig.from_dict(self.encoder, source="MAEConfig.encoder")
        self._validate_common()
        enc = self.encoder
        if enc.stem is not None:
            raise ValueError("an MAE needs a plain-patch encoder (stem=None): masking drops patches, which a "
                             "convolutional stem's overlapping features do not allow")
        if not enc.class_token or enc.fc_norm:
            raise ValueError("the MAE encoder is the official one: class token on (class_token=True), final norm "
                             "before pooling (fc_norm=False); fine-tuning layouts come from export_encoder()")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")
        for dim, what in ((enc.embed_dim, "embed_dim"), (self.decoder_embed_dim, "decoder_embed_dim")):
            if dim % 4:
                raise ValueError(f"{what} {dim} must be divisible by 4 (2-D sine-cosine position embeddings)")

    # The ModelConfig fields live in the encoder.
    @property
    def img_size(self) -> int | tuple[int, int]:  # type: ignore[override]
        return self.encoder.img_size

    @property
    def in_chans(self) -> int:  # type: ignore[override]
        return self.encoder.in_chans

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return 0

    @property
    def class_names(self) -> None:  # type: ignore[override]
        return None

    def replace(self, **changes: Any) -> MAEConfig:
        own = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in changes.items() if k in own}
        theirs = {k: v for k, v in changes.items() if k not in own}
        theirs.pop("num_classes", None)  # the pre-training model has no classifier
        theirs.pop("class_names", None)
        if theirs:
            mine["encoder"] = (mine.get("encoder") or self.encoder).replace(**theirs)
        return dataclasses.replace(self, **mine)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MAEConfig:
        return from_mapping(cls, dict(data), source=source)


def decoder_for(encoder: ViTConfig) -> dict[str, int]:
    """The decoder vitkit pairs with an encoder: the paper's (512 wide, 8 blocks, 16 heads) for encoders of
    ViT-B width and up; for small-image encoders a light one as wide as the encoder, 2 blocks, 32-dim heads."""
    if encoder.embed_dim >= 512:
        return dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_dim=2048)
    width = encoder.embed_dim
    return dict(decoder_embed_dim=width, decoder_depth=2, decoder_num_heads=max(1, width // 32),
                decoder_mlp_dim=4 * width)


def mae_config_for(encoder: ViTConfig, **changes: Any) -> MAEConfig:
    """Wrap any plain-patch ViT config as an MAE encoder (no classifier) with :func:`decoder_for`'s decoder."""
    encoder = encoder.replace(num_classes=0, class_names=None, representation_size=None, global_pool="token",
                              fc_norm=False, name=None)
    return MAEConfig(encoder=encoder, **{**decoder_for(encoder), **changes})


def random_masking(tokens: Tensor, mask_ratio: float, noise: Optional[Tensor] = None,
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``int(N * (1 - mask_ratio))`` tokens of lowest noise (uniform noise by default).

    Returns the kept tokens (B, keep, D) in ascending-noise order, the mask (B, N) with 0 = kept,
    1 = removed, and ``ids_restore`` (B, N), the permutation that undoes the sort. FX records it as one call.
    """
    batch, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, length, device=tokens.device)
    elif noise.shape[0] != batch or noise.shape[1] != length or noise.dim() != 2:
        raise ValueError(f"noise must have shape (batch, patches) = ({batch}, {length}), got {list(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


torch.fx.wrap("random_masking")


# -------------------------------------------------------------------------------------- the model
class MaskedAutoencoder(nn.Module):
    """An MAE built from an :class:`MAEConfig`: ``model(images, mask_ratio, noise) -> (loss, pred, mask)``."""

    weight_init = "mae"

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        # what forward reads, as plain attributes (TorchScript cannot read the config dataclass)
        self.patch_size = enc.patch_size
        self.mask_ratio = config.mask_ratio
        self.norm_pix_loss = config.norm_pix_loss
        self.num_features = enc.embed_dim
        # the encoder: a ViT's modules under timm's names at the top level, with a fixed sin-cos position table
        self.patch_embed = PatchEmbed(enc.patch_size, enc.in_chans, enc.embed_dim)
        self.grid_size = (enc.image_hw[0] // enc.patch_size, enc.image_hw[1] // enc.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(enc.embed_dim, self.grid_size), requires_grad=False)
        self.blocks = block_stack(enc.embed_dim, enc.depth, enc.num_heads, enc.mlp_dim, qkv_bias=enc.qkv_bias,
                                  drop=enc.drop_rate, attn_drop=enc.attn_drop_rate,
                                  drop_path_rate=enc.drop_path_rate, norm_eps=enc.norm_eps)
        self.norm = nn.LayerNorm(enc.embed_dim, eps=enc.norm_eps)

        dim, patch_pixels = config.decoder_embed_dim, enc.patch_size ** 2 * enc.in_chans
        self.decoder_embed = nn.Linear(enc.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(dim, self.grid_size), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(dim, config.decoder_num_heads, config.decoder_mlp_dim, qkv_bias=True, norm_eps=enc.norm_eps)
            for _ in range(config.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(dim, eps=enc.norm_eps)
        self.decoder_pred = nn.Linear(dim, patch_pixels)
        self.init_weights()

    def init_weights(self, mode: Optional[str] = None) -> None:
        """Initialise by ``mode`` (default ``"mae"``, the official initialisation: Xavier-uniform linears and patch
        projection viewed as a linear, zero biases, unit LayerNorms, N(0, 0.02) class and mask tokens); the
        sin-cos position tables are fixed."""
        mode = mode or self.weight_init
        check_mode(mode)
        with torch.no_grad():
            init_token_(self.cls_token, mode)
            init_token_(self.mask_token, mode)
            for module in (self.patch_embed, *self.blocks, self.norm, self.decoder_embed, *self.decoder_blocks,
                           self.decoder_norm, self.decoder_pred):
                init_module_(module, mode)

    def no_weight_decay(self) -> set[str]:
        """None by name, as the official pre-training (timm's ``add_weight_decay`` without a skip list): the
        class and mask tokens are decayed, biases and norms are not, the position tables are not trained."""
        return set()

    # ------------------------------------------------------------------------------------ patches
    def patchify(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H/P * W/P, P*P*C): each patch's pixels, row by row, channels last."""
        p, (b, c, h, w) = self.patch_size, images.shape
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: Tensor, grid: Optional[tuple[int, int]] = None) -> Tensor:
        """The inverse of :meth:`patchify`; ``grid`` defaults to the model's patch grid."""
        gh, gw = grid or self.grid_size
        p, b = self.patch_size, patches.shape[0]
        c = patches.shape[-1] // (p * p)
        x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, gh * p, gw * p)

    # ------------------------------------------------------------------------------------ masking
    @staticmethod
    def random_masking(tokens: Tensor, mask_ratio: float, noise: Optional[Tensor] = None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """See :func:`random_masking`."""
        return random_masking(tokens, mask_ratio, noise)

    # ------------------------------------------------------------------------------------ forward
    def forward_encoder(self, images: Tensor, mask_ratio: Optional[float] = None, noise: Optional[Tensor] = None,
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches: returns (latent (B, 1 + keep, D), mask (B, N), ids_restore (B, N))."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        tokens, _ = self.patch_embed(images)
        tokens = tokens + self.pos_embed[:, 1:]
        tokens, mask, ids_restore = random_masking(tokens, ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = self.blocks(torch.cat([cls, tokens], dim=1))
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch's pixels (B, N, P*P*C) from the visible tokens and mask tokens."""
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        masks = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)  # visible then masked, in shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images: Tensor) -> Tensor:
        """What the decoder regresses: the patches' pixels, per-patch normalised under ``norm_pix_loss``."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        per_patch = ((pred.float() - self.target(images).float()) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: Tensor, mask_ratio: Optional[float] = None, noise: Optional[Tensor] = None,
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, pred (B, N, P*P*C), mask (B, N))``; ``mask_ratio`` defaults to the config's (0.75), and
        ``noise`` (B, N) fixes which patches stay visible (the lowest), as in Hugging Face's ViTMAE."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, images: Tensor, mask_ratio: Optional[float] = None, noise: Optional[Tensor] = None,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images for people: the masked input (hidden patches zero), the reconstruction, the reconstruction
        with the visible patches pasted back, each (B, C, H, W) in the input's units (``norm_pix_loss``
        predictions de-normalised with each patch's own statistics, as the official demo does), and the
        hidden pixels (B, 1, H, W) as 1."""
        _, pred, mask = self(images, mask_ratio, noise)
        patches = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        hidden = mask[..., None].to(patches.dtype)
        masked = self.unpatchify(patches * (1 - hidden), grid)
        pasted = self.unpatchify(patches * (1 - hidden) + pred * hidden, grid)
        pixels = self.unpatchify(hidden.expand_as(patches), grid)[:, :1]
        return masked, self.unpatchify(pred.to(patches.dtype), grid), pasted, pixels

    # --------------------------------------------------------------------- features (no masking)
    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens of the unmasked image after the encoder and its norm, (B, 1 + N, D): the features
        the official linear probe reads (as a fine-tuned ViT's ``forward_features``)."""
        tokens, _ = self.patch_embed(images)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens + self.pos_embed[:, 1:]], dim=1)))

    def forward_head(self, tokens: Tensor, pre_logits: bool = True) -> Tensor:
        """The class token (MAE's linear-probe feature); an MAE has no classifier, so only ``pre_logits``."""
        if not pre_logits:
            raise ValueError("an MAE has no classification head; fine-tune it (vitkit finetune --init) or use "
                             "export_encoder(num_classes=K)")
        return tokens[:, 0]

    # ---------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under timm's ViT names (no decoder)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(ENCODER_PREFIXES)}

    def export_encoder(self, num_classes: int = 0, **changes: Any) -> VisionTransformer:
        """A plain :class:`VisionTransformer` holding this encoder (position embeddings become learnable),
        with a fresh ``num_classes`` head; ``changes`` set other config fields, e.g. ``global_pool='avg'``."""
        changes.setdefault("fc_norm", changes.get("global_pool") == "avg")
        changes.setdefault("preprocess", self.config.preprocess)
        config = self.config.encoder.replace(num_classes=num_classes, extra=dict(self.config.extra), **changes)
        vit = VisionTransformer(config).to(self.pos_embed.device)
        state = self.encoder_state_dict()
        if config.fc_norm:  # the official fine-tuning layout: the encoder's norm is dropped, fc_norm starts fresh
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        own = vit.state_dict()
        missing = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm.", "pre_logits."))]
        if missing:
            raise ValueError(f"the encoder lacks {missing} for the exported ViT")
        own.update(state)
        vit.load_state_dict(own)
        return vit

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (architecture ``mae``) to ``directory``."""
        return write_model_dir(directory, self.state_dict(), config_record(self.config))


register_architecture("mae", MAEConfig, MaskedAutoencoder)


# ------------------------------------------------------------------------------------ registry
def _official(size: str, patch: int) -> MAEConfig:
    """The official ``mae_vit_*`` models: 224 px, LayerNorm eps 1e-6, the 512-wide 8-block 16-head decoder."""
    return MAEConfig(encoder=ViTConfig(img_size=224, patch_size=patch, num_classes=0, **SIZES[size]),
                     decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_dim=2048)


register_model("mae_vit_base_patch16", _official("base", 16), architecture="mae",
               description="MAE ViT-B/16 with the official 512-d 8-block decoder (facebookresearch/mae)")
register_model("mae_vit_large_patch16", _official("large", 16), architecture="mae",
               description="MAE ViT-L/16 with the official 512-d 8-block decoder (facebookresearch/mae)")
register_model("mae_vit_huge_patch14", _official("huge", 14), architecture="mae",
               description="MAE ViT-H/14 with the official 512-d 8-block decoder (facebookresearch/mae)")

# Small-image MAEs: the CPU-budget CIFAR and MNIST ViTs with a decoder as wide as the encoder, 2 blocks.
register_model("mae_vit_mini_patch4_32", mae_config_for(get_model_entry("vit_mini_patch4_32").config),
               architecture="mae", description="MAE of vit_mini_patch4_32 (CIFAR-10 size), decoder 128-d x 2")
register_model("mae_vit_cifar_patch4_32", mae_config_for(get_model_entry("vit_cifar_patch4_32").config),
               architecture="mae", description="MAE of vit_cifar_patch4_32 (CIFAR-10 size), decoder 192-d x 2")
register_model("mae_vit_tiny_patch4_32", mae_config_for(get_model_entry("vit_tiny_patch4_32").config),
               architecture="mae", description="MAE of ViT-Ti/4 at 32 px (CIFAR-10 size), decoder 192-d x 2")
register_model("mae_vit_mnist_patch4_28", mae_config_for(get_model_entry("vit_mnist_patch4_28").config),
               architecture="mae", description="MAE of vit_mnist_patch4_28 (MNIST size, 1 channel), decoder 128-d x 2")
