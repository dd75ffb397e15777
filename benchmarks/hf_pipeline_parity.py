"""`vitkit predict` against transformers' `pipeline("image-classification")` on the same weights and photos.

Both directions: a vitkit model exported with `save_as(model, dir, "hf")` (one line per preprocessing
record), and a `ViTForImageClassification` saved by transformers with one of its image processors, read by
`vitkit predict`. The photos are imagenette validation JPEGs resized to other sizes and aspect ratios (a
grayscale one, one with an EXIF orientation). Prints, per photo, whether the top-5 labels agree and the
largest |probability difference| over them, and the same through transformers' PIL backend.

    PYTHONPATH=src VITKIT_DATA=../shared/data python benchmarks/hf_pipeline_parity.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessor,
    ConvNextImageProcessor,
    DeiTImageProcessor,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)
from transformers import ViTConfig as HFViTConfig

import vitkit
from vitkit.convert import save_as
from vitkit.predict import predict_files
from vitkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

NUM_CLASSES = 20
NAMES = [f"class {i}" for i in range(NUM_CLASSES)]
SIZES = [(512, 600), (700, 300), (487, 480), (1000, 900)]


def make_photos(data: Path, out: Path) -> list[Path]:
    sources = sorted((data / "imagenette_subset" / "val").glob("*/*.JPEG"))

    def source(i: int) -> Image.Image:
        with Image.open(sources[i * 37]) as img:
            return img.convert("RGB")

    made = []
    for i, (width, height) in enumerate(SIZES):
        made.append(out / f"photo_{width}x{height}.jpg")
        source(i).resize((width, height), Image.Resampling.BICUBIC).save(made[-1], quality=90)
    made.append(out / "gray_450x620.jpg")
    source(4).convert("L").crop((10, 0, 214, 224)).resize((450, 620), Image.Resampling.BILINEAR).save(made[-1])
    made.append(out / "exif_rotated_640x400.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    source(5).resize((640, 400), Image.Resampling.BICUBIC).save(made[-1], quality=90, exif=exif)
    return made


def sharpen(head: torch.nn.Linear) -> None:
    with torch.no_grad():
        head.weight.normal_(0, 5 / head.in_features ** 0.5)


def vitkit_model(record: Preprocessing | None) -> torch.nn.Module:
    model = vitkit.create_model("vit_tiny_patch16_224", depth=2, num_classes=NUM_CLASSES, preprocess=record,
                                class_names=NAMES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and name.startswith("blocks"):
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    sharpen(model.head)
    return model.eval()


def compare(directory: Path, ours: list, photos: list[Path]) -> list[dict]:
    rows = []
    for backend in ("torchvision", "pil"):
        processor = AutoImageProcessor.from_pretrained(directory, backend=backend)
        classify = pipeline("image-classification", model=str(directory), image_processor=processor, top_k=5)
        for path, mine in zip(photos, ours):
            theirs = classify(str(path))
            rows.append({"backend": backend, "photo": path.name,
                         "top5_agree": [t["label"] for t in theirs] == mine.labels[:5],
                         "max_abs_prob_diff": max(abs(t["score"] - p) for t, p in zip(theirs, mine.probabilities))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    records = {
        "no record (0.5/0.5, crop 1.0)": None,
        "ImageNet stats, crop 0.875, bicubic": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
                                                             interpolation="bicubic"),
        "squash, crop 0.9, bicubic": Preprocessing(crop_pct=0.9, crop_mode="squash", interpolation="bicubic"),
        "squash, crop 1.0": Preprocessing(crop_mode="squash"),
        "crop 0.95, nearest": Preprocessing(crop_pct=0.95, interpolation="nearest"),
    }
    processors = {
        "ViTImageProcessor()": ViTImageProcessor,
        "DeiTImageProcessor()": DeiTImageProcessor,
        "CLIPImageProcessor()": CLIPImageProcessor,
        "ConvNextImageProcessor(shortest_edge=224, crop_pct=0.9)":
            lambda: ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.9),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_photos(data, tmp)
        for i, (label, record) in enumerate(records.items()):
            directory = save_as(vitkit_model(record), tmp / f"export{i}", "hf")
            processor = json.loads((directory / "preprocessor_config.json").read_text())["image_processor_type"]
            ours = predict_files(directory, photos, top_k=NUM_CLASSES)
            results += [{"direction": "vitkit export -> transformers", "case": f"{label} ({processor})", **row}
                        for row in compare(directory, ours, photos)]
        for i, (label, make) in enumerate(processors.items()):
            directory = tmp / f"transformers{i}"
            config = HFViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 num_labels=NUM_CLASSES, id2label=dict(enumerate(NAMES)),
                                 label2id={name: i for i, name in enumerate(NAMES)})
            model = ViTForImageClassification(config).eval()
            sharpen(model.classifier)
            model.save_pretrained(directory)
            make().save_pretrained(directory)
            ours = predict_files(directory, photos, top_k=NUM_CLASSES)
            results += [{"direction": "transformers directory -> vitkit predict", "case": label, **row}
                        for row in compare(directory, ours, photos)]
    for direction in dict.fromkeys(r["direction"] for r in results):
        print(f"\n{direction}")
        for backend in ("torchvision", "pil"):
            rows = [r for r in results if r["direction"] == direction and r["backend"] == backend]
            print(f"  transformers backend {backend}:")
            for photo in dict.fromkeys(r["photo"] for r in rows):
                mine = [r for r in rows if r["photo"] == photo]
                agree = sum(r["top5_agree"] for r in mine)
                print(f"    {photo:28s} top-5 agree {agree}/{len(mine)}  max |prob diff| "
                      f"{max(r['max_abs_prob_diff'] for r in mine):.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
