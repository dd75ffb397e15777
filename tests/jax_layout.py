"""Google's ViT ``.npz`` layout (vit_jax), written independently of vitkit's converter so tests can
build checkpoints that timm's own reader, or vitkit's, must load."""

from __future__ import annotations

import numpy as np
import torch


def transformer_npz(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """The transformer part (everything but the patch or hybrid stem) of a timm-keyed state dict."""
    n = {k: v.detach().numpy() for k, v in state.items()}
    dim = n["cls_token"].shape[-1]
    out = {"cls": n["cls_token"], "Transformer/posembed_input/pos_embedding": n["pos_embed"],
           "Transformer/encoder_norm/scale": n["norm.weight"], "Transformer/encoder_norm/bias": n["norm.bias"],
           "head/kernel": n["head.weight"].T, "head/bias": n["head.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in n if k.startswith("blocks."))
    for i in range(depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        q, k, v = np.split(n[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(n[b + "attn.qkv.bias"], 3)
        for part, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{p}MultiHeadDotProductAttention_1/{part}/kernel"] = w.T.reshape(dim, num_heads, -1)
            out[f"{p}MultiHeadDotProductAttention_1/{part}/bias"] = bias.reshape(num_heads, -1)
        out[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = n[b + "attn.proj.weight"].T.reshape(num_heads, -1, dim)
        out[f"{p}MultiHeadDotProductAttention_1/out/bias"] = n[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = n[f"{b}{norm}.weight"], n[f"{b}{norm}.bias"]
        for j in range(2):
            out[f"{p}MlpBlock_3/Dense_{j}/kernel"] = n[f"{b}mlp.fc{j + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{j}/bias"] = n[f"{b}mlp.fc{j + 1}.bias"]
    return out
