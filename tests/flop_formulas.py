"""FLOP counts derived by hand from a model's shapes, shared by the bench and study tests."""

from __future__ import annotations


def vit_forward_flops(img_size, patch_size, in_chans, num_classes, embed_dim, depth, mlp_dim, **_) -> dict:
    """Matmul FLOPs of a class-token ViT, derived from its shapes (2 FLOPs per multiply-add)."""
    patches = (img_size // patch_size) ** 2
    tokens, d = patches + 1, embed_dim
    patch = 2 * patches * (in_chans * patch_size ** 2) * d
    per_block = (2 * tokens * d * 3 * d      # qkv projection
                 + 2 * 2 * tokens * tokens * d  # Q K^T and (attention) V, summed over heads
                 + 2 * tokens * d * d        # output projection
                 + 2 * 2 * tokens * d * mlp_dim)  # fc1 and fc2
    head = 2 * d * num_classes
    return {"patch": patch, "forward": patch + depth * per_block + head}
