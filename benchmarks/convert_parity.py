"""Logit parity of vitkit's converters at the paper's sizes (not a test: prints a table).

For timm, transformers and torchvision: build the library's own ViT (randomly initialised, every
parameter perturbed), save it in that library's file format, load it with ``vitkit.from_pretrained``
and compare float32 logits on the same random batch. For npz: export a vitkit model to the vit_jax
layout and compare with the same model read back. For hybrids: timm's R50+ViT/16 (3-stage BiT ResNet)
under the same encoder, read from a timm file, and vitkit's npz export of it read by timm's own loader.

    PYTHONPATH=src python benchmarks/convert_parity.py [--model base] [--img-size 224] [--batch 2]
        [--sources timm,hybrid-timm,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import vitkit
from vitkit.convert import to_npz
from vitkit.convert.export import save_state_dict_file
from vitkit.models.zoo import SIZES


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def timm_case(size: dict, img: int, num_classes: int, tmp: Path):
    from timm.models.vision_transformer import VisionTransformer

    ref = perturb(VisionTransformer(img_size=img, patch_size=16, embed_dim=size["embed_dim"], depth=size["depth"],
                                    num_heads=size["num_heads"], num_classes=num_classes))
    save_state_dict_file(ref.state_dict(), tmp / "timm.safetensors")
    return ref, vitkit.from_pretrained(tmp / "timm.safetensors"), lambda m, x: m(x)


def transformers_case(size: dict, img: int, num_classes: int, tmp: Path):
    from transformers import ViTConfig, ViTForImageClassification

    ref = perturb(ViTForImageClassification(ViTConfig(
        hidden_size=size["embed_dim"], num_hidden_layers=size["depth"], num_attention_heads=size["num_heads"],
        intermediate_size=size["mlp_dim"], image_size=img, patch_size=16, num_labels=num_classes)))
    ref.save_pretrained(tmp / "hf")
    return ref, vitkit.from_pretrained(tmp / "hf"), lambda m, x: m(pixel_values=x).logits


def torchvision_case(size: dict, img: int, num_classes: int, tmp: Path):
    from torchvision.models import VisionTransformer

    ref = perturb(VisionTransformer(image_size=img, patch_size=16, num_layers=size["depth"],
                                    num_heads=size["num_heads"], hidden_dim=size["embed_dim"],
                                    mlp_dim=size["mlp_dim"], num_classes=num_classes))
    torch.save(ref.state_dict(), tmp / "tv.pth")
    return ref, vitkit.from_pretrained(tmp / "tv.pth"), lambda m, x: m(x)


def npz_case(size: dict, img: int, num_classes: int, tmp: Path):
    ref = perturb(vitkit.build_model(vitkit.ViTConfig(img_size=img, patch_size=16, num_classes=num_classes,
                                                      representation_size=size["embed_dim"], **size)))
    to_npz(ref, tmp / "vit.npz")
    return ref, vitkit.from_pretrained(tmp / "vit.npz"), lambda m, x: m(x)


def _timm_r50_hybrid(size: dict, img: int, num_classes: int) -> torch.nn.Module:
    import timm

    return timm.create_model("vit_base_r50_s16_224", img_size=img, num_classes=num_classes,
                             embed_dim=size["embed_dim"], depth=size["depth"], num_heads=size["num_heads"],
                             mlp_ratio=size["mlp_dim"] / size["embed_dim"])


def hybrid_timm_case(size: dict, img: int, num_classes: int, tmp: Path):
    ref = perturb(_timm_r50_hybrid(size, img, num_classes))
    save_state_dict_file(ref.state_dict(), tmp / "hybrid.safetensors")
    return ref, vitkit.from_pretrained(tmp / "hybrid.safetensors"), lambda m, x: m(x)


def hybrid_npz_case(size: dict, img: int, num_classes: int, tmp: Path):
    ours = perturb(vitkit.create_model("vit_base_r50_s16_224", img_size=img, num_classes=num_classes, **size))
    to_npz(ours, tmp / "hybrid.npz")
    ref = _timm_r50_hybrid(size, img, num_classes).eval()
    ref.load_pretrained(str(tmp / "hybrid.npz"))  # timm's reader of our export
    return ref, ours, lambda m, x: m(x)


CASES = {"timm": timm_case, "transformers": transformers_case, "torchvision": torchvision_case,
         "npz-roundtrip": npz_case, "hybrid-timm": hybrid_timm_case, "hybrid-npz-to-timm": hybrid_npz_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", choices=list(SIZES))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--sources", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = SIZES[args.model]
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(f"ViT-{args.model}/16 at {args.img_size}px, {args.num_classes} classes, batch {args.batch}, float32")
    print(f"{'source':18s} {'max |logit diff|':>17s} {'max |logit|':>12s} {'load s':>7s}")
    for name in args.sources.split(","):
        case = CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            ref, ours, run = case(size, args.img_size, args.num_classes, Path(tmp))
            load_s = time.perf_counter() - start
            with torch.no_grad():
                expected, got = run(ref, x), ours.eval()(x)
        print(f"{name:18s} {(got - expected).abs().max().item():17.3g} {expected.abs().max().item():12.3g} "
              f"{load_s:7.1f}")


if __name__ == "__main__":
    main()
