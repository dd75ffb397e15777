"""The building blocks of a Vision Transformer, one module per concept of the paper (Sec. 3.1).

Parameter names follow timm (``patch_embed.proj``, ``attn.qkv``, ``mlp.fc1``, ...) so that state
dicts move between the two libraries without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.models.linear import run_linear, run_linear_gelu


class PatchEmbed(nn.Module):
    """Split an image into PxP patches and project each linearly to D dimensions (Eq. 1).

    A Conv2d with kernel = stride = P computes exactly ``rearrange(x, 'b c (h p1) (w p2) ->
    b (h w) (p1 p2 c)') @ E`` with ``E`` the paper's patch-embedding matrix, in one fast kernel.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.stride = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, H/P * W/P, D) in row-major patch order, and the patch grid."""
        x = self.proj(images)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (Eq. 5-8 of the paper's appendix)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x) if torch.jit.is_scripting() else run_linear(self.qkv, x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        # Views, no copies: (B, heads, N, head_dim) strided into qkv. Unbinding dim 2 makes the
        # backward one stack straight into qkv's layout (unbinding a permuted dim 0 needs two copies).
        q, k, v = qkv.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        batch, _, tokens, _ = x.shape
        x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x) if torch.jit.is_scripting() else run_linear(self.proj, x))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split_heads(x)
        dropout = self.attn_drop if self.training else 0.0
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale))

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The same computation written out, also returning the attention probabilities (B, heads, N, N)."""
        q, k, v = self._split_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        weights = F.dropout(attn, self.attn_drop, self.training)
        return self._merge_heads(weights @ v), attn


class Mlp(nn.Module):
    """The transformer MLP: one hidden layer with exact (erf) GELU, dropout after each layer."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
        # fc1 + bias + GELU in one kernel, and the faster CPU GEMMs, where nothing wraps or hooks the layers
        x = self.drop1(run_linear_gelu(self.fc1, self.act, x))
        return self.drop2(run_linear(self.fc2, x))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scaling survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """A pre-norm transformer encoder layer (Eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 qk_scale: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, scale=qk_scale)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """As ``forward``, also returning this layer's attention probabilities (B, heads, N, N)."""
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn
