"""The module an export traces: the model itself, or, for ``--dynamic-size``, the model with its position
embeddings resampled inside the graph to whatever patch grid the input gives.

The eager ViT resamples only when the grid differs from its own (a Python branch on the input's shape,
which a tracer would freeze at the example's size). The wrapper resamples unconditionally: resampling a
grid to its own size is the identity (bicubic and bilinear weights are exactly 1 and 0 at the sample
points), so at the trained size it computes exactly what the model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.models.layers import PatchEmbed
from vitkit.models.vit import VisionTransformer


class DynamicSizeViT(nn.Module):
    """A :class:`VisionTransformer` that takes any input size divisible by its patch stride."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        m = self.model
        tokens, grid = m.patch_embed(images)
        prefix = m.num_prefix_tokens
        old_h, old_w = m.grid_size
        table = m.pos_embed[:, prefix:].reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode=m.config.pos_embed_interpolation, align_corners=False,
                              antialias=True)
        pos_embed = torch.cat([m.pos_embed[:, :prefix], table.flatten(2).transpose(1, 2)], dim=1)
        if m.cls_token is not None:
            tokens = torch.cat([m.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return m.forward_head(m.norm(m.blocks(m.pos_drop(tokens + pos_embed))))


def supports_dynamic_size(model: nn.Module) -> bool:
    """Plain-patch ViTs (the hybrid stems, T2T and MAE have their own token grids; not supported)."""
    return type(model) is VisionTransformer and isinstance(model.patch_embed, PatchEmbed)


def export_module(model: nn.Module, *, dynamic_size: bool = False) -> nn.Module:
    """The module to trace for ``model`` (in eval mode)."""
    model = model.eval()
    if not dynamic_size:
        return model
    if not supports_dynamic_size(model):
        raise ValueError(f"--dynamic-size: supported for plain-patch ViTs only, not {type(model).__name__}"
                         + (" with a CNN stem" if type(model) is VisionTransformer else ""))
    return DynamicSizeViT(model).eval()


def trace(model: nn.Module, example: Tensor, *, dynamic_size: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` the model with a dynamic batch axis (and dynamic height/width, in multiples of the
    patch stride, with ``dynamic_size``). The oneDNN fast linear path steps aside while exporting, so the
    graph holds ``aten.linear``/``matmul`` only."""
    module = export_module(model, dynamic_size=dynamic_size)
    axes: dict[int, object] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size:
        stride = model.patch_embed.stride
        axes[2] = stride * torch.export.Dim("grid_h", min=1, max=1024)
        axes[3] = stride * torch.export.Dim("grid_w", min=1, max=1024)
    # the batch of the example must not be 1: torch.export specialises size-1 dimensions
    example = example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={"images": axes})
