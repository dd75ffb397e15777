"""The building blocks of a Vision Transformer, one module per concept of the paper (Sec. 3.1).

Parameter names follow timm (``patch_embed.proj``, ``attn.qkv``, ``mlp.fc1``, ...) so that state
dicts move between the two libraries without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.models.init import init_linear_, init_module_, lecun_normal_
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

    def init_weights(self, mode: str) -> None:
        """LeCun-normal (JAX) or Xavier-uniform of the projection viewed as a linear layer (MAE), zero bias;
        ``timm`` keeps PyTorch's default, as timm does."""
        if mode == "timm":
            return
        weight = self.proj.weight
        if mode == "mae":
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        else:
            lecun_normal_(weight)
        nn.init.zeros_(self.proj.bias)


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
        if torch.jit.is_scripting():
            qkv = self.qkv(x)
        else:
            qkv = run_linear(self.qkv, x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        # Views, no copies: (B, heads, N, head_dim) strided into qkv. Unbinding dim 2 makes the
        # backward one stack straight into qkv's layout (unbinding a permuted dim 0 needs two copies).
        q, k, v = qkv.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        batch, _, tokens, _ = x.shape
        x = x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        if torch.jit.is_scripting():
            x = self.proj(x)
        else:
            x = run_linear(self.proj, x)
        return self.proj_drop(x)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split_heads(x)
        dropout = self.attn_drop if self.training else 0.0
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale))

    def init_weights(self, mode: str) -> None:
        init_linear_(self.qkv, mode)
        init_linear_(self.proj, mode)

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

    def init_weights(self, mode: str) -> None:
        """The JAX release draws the MLP biases from N(0, 1e-6); the other modes zero them."""
        bias_std = 1e-6 if mode == "jax" else 0.0
        init_linear_(self.fc1, mode, bias_std=bias_std)
        init_linear_(self.fc2, mode, bias_std=bias_std)


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

    def init_weights(self, mode: str) -> None:
        for module in (self.norm1, self.attn, self.norm2, self.mlp):
            init_module_(module, mode)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """As ``forward``, also returning this layer's attention probabilities (B, heads, N, N)."""
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn


def block_stack(dim: int, depth: int, num_heads: int, mlp_dim: int, *, qkv_bias: bool = True, drop: float = 0.0,
                attn_drop: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                qk_scale: float | None = None) -> nn.Sequential:
    """The encoder: ``depth`` blocks whose stochastic depth grows linearly from 0 to ``drop_path_rate``."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.Sequential(*[
        Block(dim, num_heads, mlp_dim, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=rates[i],
              norm_eps=norm_eps, qk_scale=qk_scale)
        for i in range(depth)
    ])


class AttentionPool(nn.Module):
    """Multihead attention pooling ("MAP", big_vision's and SigLIP's head; timm's ``global_pool='map'``): one
    learned query attends over the patch tokens, then a pre-norm MLP with a residual. Keys are timm's
    ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) tokens -> (B, D)."""
        batch, tokens, dim = x.shape
        q = self.q(self.latent.expand(batch, -1, -1)).reshape(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, 1, dim)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]

    def init_weights(self, mode: str) -> None:
        nn.init.trunc_normal_(self.latent, std=self.latent.shape[-1] ** -0.5)
        for module in (self.q, self.kv, self.proj, self.norm, self.mlp):
            init_module_(module, mode)
