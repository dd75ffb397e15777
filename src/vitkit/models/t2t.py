"""Tokens-to-Token ViT (Yuan et al., ICCV 2021), read top to bottom:

    image -> soft split -> [re-structurise -> soft split] x 2 -> linear projection      (the T2T module)
          -> [class] token + fixed sinusoid positions -> pre-norm blocks -> norm -> head (deep-narrow backbone)

A plain ViT cuts the image into disjoint patches and projects each linearly, which misses the local
structure (edges, lines) inside and across patches. T2T instead tokenises progressively: a *soft split*
unfolds overlapping windows, so neighbouring tokens share pixels; a small transformer then mixes the
tokens ("re-structurisation", Eq. 1-2 of the paper), and they are folded back into an image-shaped
map for the next, coarser split (Eq. 3-4). The official models use a Performer (linear attention with
random features, ``T2T-ViT``) or a plain transformer (``T2T-ViT_t``) for re-structurisation.

Exact with the official release (github.com/yitu-opensource/T2T-ViT): same module and state-dict key
names (``tokens_to_token.attention1.kqv.weight``, ``blocks.0.attn.qkv.weight``, ...), same defaults and
the same quirks, each marked below where it happens. Official ``.pth.tar`` checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ModelConfig, Pooling
from vitkit.models.init import init_module_
from vitkit.models.layers import Mlp
from vitkit.models.linear import run_linear
from vitkit.models.registry import register_architecture, register_model
from vitkit.models.vit import VisionTransformer, check_image_size
from vitkit.preprocessing import Preprocessing

TokensType = Literal["performer", "transformer"]
T2THeadInit = Literal["trunc_normal", "xavier", "zeros"]


@dataclass
class T2TConfig(ModelConfig):
    """Hyper-parameters of a T2T-ViT; names follow the official ``T2T_ViT`` constructor."""

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    tokens_type: TokensType = "performer"
    """Re-structurisation by a ``performer`` (T2T-ViT) or a ``transformer`` (T2T-ViT_t)."""
    token_dim: int = 64
    """Width of the tokens inside the T2T module."""
    kernel_sizes: tuple[int, ...] = (7, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2)
    paddings: tuple[int, ...] = (2, 1, 1)
    """The three soft splits (``nn.Unfold``); 224 px -> 56 -> 28 -> 14 x 14 tokens with the defaults."""
    kernel_ratio: float = 0.5
    """Random features of the performer per token dimension (m = token_dim * kernel_ratio)."""
    token_drop_rate: float = 0.1
    """Dropout inside the performer (after its projection and its MLP): 0.1, hard-coded in the official code."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: Optional[float] = None
    """Attention scale of the backbone; None: head_dim ** -0.5. The official ``t2t_vit_*(pretrained=True)``
    uses embed_dim ** -0.5 (inherited from an early timm ViT), but its evaluation script builds the models
    with ``pretrained=False``, i.e. None, and that is how the released checkpoints reach their accuracy."""
    global_pool: Pooling = "token"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    """``nn.LayerNorm``'s default, which the official code uses everywhere."""
    preprocess: Optional[Preprocessing] = None
    """How images are prepared for these weights (see :mod:`vitkit.preprocessing`); None = not recorded."""
    head_init: T2THeadInit = "trunc_normal"
    """The official truncated normal (std 0.02), or ``zeros`` (uniform predictions at the start, for fine-tuning)."""
    dynamic_img_size: bool = False
    """Accept any input size, regenerating the sinusoid position table for its number of tokens."""
    class_names: Optional[list[str]] = None
    name: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate_common()
        for key in ("kernel_sizes", "strides", "paddings"):
            value = tuple(int(v) for v in getattr(self, key))
            if len(value) != 3:
                raise ValueError(f"{key} must have 3 entries (one per soft split), got {list(value)}")
            setattr(self, key, value)
        if self.tokens_type not in ("performer", "transformer"):
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {self.tokens_type!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_init not in ("trunc_normal", "xavier", "zeros"):
            raise ValueError(f"head_init must be 'trunc_normal', 'xavier' or 'zeros', got {self.head_init!r}")
        if min(self.token_grid) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for the soft splits "
                             f"(kernels {list(self.kernel_sizes)}, strides {list(self.strides)})")

    # The backbone is a ViT's: what its config says, in ViTConfig's names (read by VisionTransformer).
    class_token = True
    fc_norm = False
    representation_size = None
    head_batchnorm = False

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def token_grid(self) -> tuple[int, int]:
        """The (H, W) grid of tokens the three soft splits leave."""
        h, w = self.image_hw
        for k, s, p in zip(self.kernel_sizes, self.strides, self.paddings):
            h, w = unfold_size(h, k, s, p), unfold_size(w, k, s, p)
        return h, w


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Positions an ``nn.Unfold`` window takes along one side."""
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------- soft split
class SoftSplit(nn.Module):
    """Unfold overlapping k x k windows of a (B, C, H, W) map into tokens (B, N, C*k*k) (Eq. 3 of the paper).

    Each token concatenates its window channel-major (c, then row, then column), as ``nn.Unfold`` does.
    """

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = (unfold_size(x.shape[-2], self.kernel_size, self.stride, self.padding),
                unfold_size(x.shape[-1], self.kernel_size, self.stride, self.padding))
        tokens = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        return tokens.transpose(1, 2), grid

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Re-structurise (Eq. 2): tokens (B, H*W, C) back to an image-shaped map (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


# --------------------------------------------------------------------------- token transformer
class TokenAttention(nn.Module):
    """Single-head attention that also changes the width, from ``dim`` to ``out_dim``.

    Its residual is v, not x (the input has another width): y = v + proj(softmax(q k^T * scale) v).
    Official quirk: scale = dim ** -0.5 with dim the *input* width (147 or 576), not out_dim.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            qkv = self.qkv(x)
        else:
            qkv = run_linear(self.qkv, x)
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        if torch.jit.is_scripting():
            y = self.proj(y)
        else:
            y = run_linear(self.proj, y)
        return v + y

    def init_weights(self, mode: str) -> None:
        init_module_(self.qkv, mode)
        init_module_(self.proj, mode)


class TokenTransformer(nn.Module):
    """The T2T-ViT_t re-structurisation layer: T' = attention(LN(T)) (residual on v), then T' + MLP(LN(T'))."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim, eps=norm_eps)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def init_weights(self, mode: str) -> None:
        for module in (self.norm1, self.attn, self.norm2, self.mlp):
            init_module_(module, mode)


# ---------------------------------------------------------------------------- token performer
class TokenPerformer(nn.Module):
    """The T2T-ViT re-structurisation layer: a single-head Performer (Choromanski et al., 2021).

    Softmax attention's kernel exp(q.k) is replaced by phi(q).phi(k) with the positive random features
    phi(x) = exp(w_i.x - |x|^2 / 2) / sqrt(m), i = 1..m, so attention costs O(N m) instead of O(N^2):

        y = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1 + eps)

    As in the official code the features w (m = out_dim * kernel_ratio rows, orthogonal, scaled by
    sqrt(m)) are drawn once and stored with the weights (``w``, not trained); the scores are not scaled
    by 1/sqrt(d); the residual is v; the kqv projection splits in the order k, q, v.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.emb = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(out_dim, eps=norm_eps)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(drop))
        self.m = int(out_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(self.m, out_dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x: Tensor) -> Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): (B, N, d) -> (B, N, m), in float32 (``prm_exp``)."""
        x = x.float()
        norm = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.float().t() - norm) / math.sqrt(self.m)

    def attention(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            kqv = self.kqv(x)
        else:
            kqv = run_linear(self.kqv, x)
        k, q, v = torch.split(kqv, self.emb, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)  # (B, N, m)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, 1): phi(q_t) . sum_s phi(k_s)
        context = kp.transpose(1, 2) @ v.float()  # (B, m, d): sum_s phi(k_s) v_s^T
        y = (qp @ context) / (normaliser + self.epsilon)
        y = y.to(v.dtype)
        if torch.jit.is_scripting():
            y = self.proj(y)
        else:
            y = run_linear(self.proj, y)
        return v + self.dp(y)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def init_weights(self, mode: str) -> None:
        """Every layer by ``mode``; the random features ``w`` keep their orthogonal draw."""
        for module in (self.kqv, self.proj, self.norm1, self.norm2, self.mlp[0], self.mlp[2]):
            init_module_(module, mode)


# ---------------------------------------------------------------------------------- T2T module
class T2TModule(nn.Module):
    """Soft split, then twice (re-structurise, soft split), then project to the backbone's width."""

    def __init__(self, config: T2TConfig) -> None:
        super().__init__()
        (k0, k1, k2), (s0, s1, s2), (p0, p1, p2) = config.kernel_sizes, config.strides, config.paddings
        token_dim = config.token_dim
        self.soft_split0 = SoftSplit(k0, s0, p0)
        self.soft_split1 = SoftSplit(k1, s1, p1)
        self.soft_split2 = SoftSplit(k2, s2, p2)
        dims = (config.in_chans * k0 * k0, token_dim * k1 * k1)
        if config.tokens_type == "transformer":
            self.attention1 = TokenTransformer(dims[0], token_dim, mlp_ratio=1.0)
            self.attention2 = TokenTransformer(dims[1], token_dim, mlp_ratio=1.0)
        else:
            self.attention1 = TokenPerformer(dims[0], token_dim, config.kernel_ratio, config.token_drop_rate)
            self.attention2 = TokenPerformer(dims[1], token_dim, config.kernel_ratio, config.token_drop_rate)
        self.project = nn.Linear(token_dim * k2 * k2, config.embed_dim)

    @property
    def stride(self) -> int:
        """Pixels per token along each side (the product of the soft splits' strides)."""
        return self.soft_split0.stride * self.soft_split1.stride * self.soft_split2.stride

    def init_weights(self, mode: str) -> None:
        for module in (self.attention1, self.attention2, self.project):
            init_module_(module, mode)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, N, D) and their grid."""
        tokens, grid = self.soft_split0(images)
        tokens, grid = self.soft_split1(tokens_to_map(self.attention1(tokens), grid))
        tokens, grid = self.soft_split2(tokens_to_map(self.attention2(tokens), grid))
        if torch.jit.is_scripting():
            tokens = self.project(tokens)
        else:
            tokens = run_linear(self.project, tokens)
        return tokens, grid


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """The fixed 1-D sinusoid position table of "Attention is all you need", (1, num_positions, dim):
    entry (p, j) is sin(p / 10000^(2i/dim)) for j = 2i and cos(...) for j = 2i + 1."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


# ------------------------------------------------------------------------------------ backbone
class T2TViT(VisionTransformer):
    """T2T-ViT built from a :class:`T2TConfig`. Keys match the official ``T2T_ViT``.

    The backbone after the tokens is a ViT's (vitkit's pre-norm :class:`Block`, no qkv bias), so everything
    but the tokenizer and the position table is :class:`VisionTransformer`'s (``forward_features``,
    ``forward_head``, ``forward_intermediates``, ``attention_maps``, timm's API).

    The position table is a fixed sinusoid (stored, as officially, as a parameter that is not trained),
    so at another resolution it is *regenerated* for the new number of tokens, exactly what the official
    model built at that size holds (its 384 px checkpoint contains that table), rather than resampled.
    """

    weight_init = "timm"  # the official init: truncated normal (std 0.02) linears and class token, zero biases
    default_head_init = "trunc_normal"
    pos_embed_is_fixed = True
    no_patch_filters_note = ("skipped: T2T-ViT has no linear patch projection: its tokens come from overlapping soft "
                             "splits re-structurised by small transformers, so no weight is a filter in pixel space")

    def _build_tokenizer(self) -> None:
        self.tokens_to_token = T2TModule(self.config)

    def _new_pos_embed(self, num_positions: int) -> nn.Parameter:
        return nn.Parameter(sinusoid_table(num_positions, self.config.embed_dim), requires_grad=False)

    def _new_head_dropout(self) -> nn.Module:
        return nn.Identity()  # the official head has no dropout

    def tokenizer_module(self) -> nn.Module:
        return self.tokens_to_token

    def tokenize(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        return self.tokens_to_token(images)

    @property
    def embed_stride(self) -> int:
        return self.tokens_to_token.stride

    @property
    def first_conv(self) -> str:
        """The first layer that sees the image's channels (timm's ``first_conv``)."""
        performer = self.config.tokens_type == "performer"
        return "tokens_to_token.attention1." + ("kqv" if performer else "attn.qkv")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    # ---------------------------------------------------------------------------------- embeddings
    def patch_embed_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return self.config.replace(img_size=tuple(image_hw)).token_grid

    def _check_input(self, images: Tensor) -> Tensor:
        # any size the soft splits take is fine when dynamic (no patch size to divide by)
        return check_image_size(images, self.in_chans, self.img_size, 1, self.dynamic_img_size)

    def _pos_embed_table(self, grid: tuple[int, int]) -> Tensor:
        return sinusoid_table(1 + grid[0] * grid[1], self.config.embed_dim).to(self.pos_embed.device)

    def _pos_embed(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            pos_embed = sinusoid_for_tokens(pos_embed, tokens.shape[1] + 1)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + pos_embed)


def sinusoid_for_tokens(table: Tensor, num_positions: int) -> Tensor:
    """``table`` if it has ``num_positions`` rows, else the sinusoid table of that length; one FX call."""
    if table.shape[1] == num_positions:
        return table
    return sinusoid_table(num_positions, table.shape[-1]).to(device=table.device, dtype=table.dtype)


torch.fx.wrap("sinusoid_for_tokens")
torch.fx.wrap("check_image_size")


register_architecture("t2t", T2TConfig, T2TViT)

# ----------------------------------------------------------------------------------- registry
# The official models (README: parameters 4.3M, 5.9M, 6.9M, 21.5M, 39.2M, 64.1M; counted, as the
# official main.py does, over all parameters, including the fixed position table and random features).
_OFFICIAL = {
    # name: (tokens_type, embed_dim, depth, num_heads, mlp_ratio)
    "t2t_vit_7": ("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": ("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": ("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": ("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": ("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": ("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": ("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": ("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": ("transformer", 512, 24, 8, 3.0),
}
for _name, (_tokens, _dim, _depth, _heads, _ratio) in _OFFICIAL.items():
    _kind = "Performer" if _tokens == "performer" else "Transformer"
    _paper = f"T2T-ViT{'_t' if _tokens == 'transformer' else ''}-{_depth}"
    register_model(_name, T2TConfig(tokens_type=_tokens, embed_dim=_dim, depth=_depth, num_heads=_heads,
                                    mlp_ratio=_ratio), architecture="t2t",
                   description=f"{_paper} ({_kind} in the T2T module), 224px, 1000 classes")

# Small images: 32 px. The official splits (stride 4, 2, 2) would leave a 2x2 grid; strides 2, 2, 1 with
# 3x3 windows leave 8x8 tokens (32 -> 16 -> 8 -> 8), like a ViT with 4x4 patches. The "mini" backbone is
# vit_mini_patch4_32's (D 128, depth 6, 2 heads, MLP 256), with 32-wide T2T tokens so that the whole model
# stays near its size (0.87M against 0.81M): the data-regime study's T2T entry.
_SMALL_SPLITS = dict(kernel_sizes=(3, 3, 3), strides=(2, 2, 1), paddings=(1, 1, 1))
for _tokens, _infix in (("performer", ""), ("transformer", "_t")):
    register_model(
        f"t2t_vit{_infix}_mini_32",
        T2TConfig(img_size=32, num_classes=10, tokens_type=_tokens, token_dim=32, embed_dim=128, depth=6,
                  num_heads=2, mlp_ratio=2.0, **_SMALL_SPLITS),
        architecture="t2t",
        description=f"T2T-ViT{_infix} for 32x32 images (CIFAR): 8x8 tokens, vit_mini_patch4_32's backbone",
    )
register_model(
    "t2t_vit_7_32",
    T2TConfig(img_size=32, num_classes=10, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, **_SMALL_SPLITS),
    architecture="t2t",
    description="T2T-ViT-7 for 32x32 images (CIFAR): 8x8 tokens",
)
