"""Hugging Face export and import predict what vitkit predicts: transformers' ``pipeline("image-classification")``,
``AutoModelForImageClassification`` + ``AutoImageProcessor`` and ``vitkit predict`` give the same top-5 and the same
probabilities (to 1e-5) on real photos of other sizes and aspect ratios, both for a directory vitkit wrote and for one
transformers wrote. The photos are imagenette JPEGs resized and cropped to sizes that exercise each difference
transformers and vitkit once had: aspect ratios (stretching vs resize + centre crop), a large JPEG (decoded at
reduced scale), a crop whose margin is 3 mod 4 (the crop offset's rounding), grayscale, and an EXIF orientation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    BitImageProcessor,
    CLIPImageProcessor,
    ConvNextImageProcessor,
    DeiTImageProcessor,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)
from transformers import ViTConfig as HFViTConfig
from transformers.image_utils import load_image

import vitkit
from vitkit.cli import main
from vitkit.convert import read_model, save_as
from vitkit.data.transforms import EvalTransform
from vitkit.hf_processor import ProcessorError, preprocessing_from_processor, processor_config
from vitkit.predict import predict_files
from vitkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

TOLERANCE = 1e-5
NUM_CLASSES = 20
NAMES = [f"class {i}" for i in range(NUM_CLASSES)]
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photos(tmp_path_factory, data_root) -> list[Path]:
    """(width, height) photos from imagenette's validation JPEGs, written to a temporary folder."""
    sources = sorted((data_root / "imagenette_subset" / "val").glob("*/*.JPEG"))
    out = tmp_path_factory.mktemp("photos")
    made = []

    def source(i: int) -> Image.Image:
        with Image.open(sources[i * 37]) as img:
            return img.convert("RGB")

    for i, (width, height) in enumerate([(512, 600), (700, 300), (487, 480), (1000, 900)]):
        # (487, 480): at 224 px the resized width is 227 (259 at crop 0.875), a 3-pixel margin to crop
        # (1000, 900): large enough to have been decoded at reduced scale
        path = out / f"photo_{width}x{height}.jpg"
        source(i).resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        made.append(path)
    gray = out / "gray_450x620.jpg"
    source(4).convert("L").crop((10, 0, 214, 224)).resize((450, 620), Image.Resampling.BILINEAR).save(gray)
    rotated = out / "exif_rotated_640x400.jpg"  # stored 640x400, shown (and classified) turned a quarter: 400x640
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    source(5).resize((640, 400), Image.Resampling.BICUBIC).save(rotated, quality=90, exif=exif)
    return [*made, gray, rotated]


def _sharpen(head: torch.nn.Linear) -> None:
    """Random weights give nearly uniform probabilities, where a top-5 order means little: spread the logits."""
    with torch.no_grad():
        head.weight.normal_(0, 5 / head.in_features ** 0.5)


def _vitkit_model(record: Preprocessing | None, class_names: list[str] | None = NAMES,
                  img_size: int | tuple[int, int] = 224) -> torch.nn.Module:
    model = vitkit.create_model("vit_tiny_patch16_224", depth=2, num_classes=NUM_CLASSES, preprocess=record,
                                class_names=class_names, img_size=img_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and name.startswith("blocks"):
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    _sharpen(model.head)
    return model.eval()


def _compare(ours: list, theirs: list[list[dict]], photos: list[Path]) -> float:
    """Assert the same top-5 labels and probabilities; the largest |probability difference|."""
    worst = 0.0
    for path, mine, their in zip(photos, ours, theirs):
        assert [t["label"] for t in their] == mine.labels[:5], path.name
        diff = max(abs(t["score"] - p) for t, p in zip(their, mine.probabilities))
        assert diff < TOLERANCE, f"{path.name}: probabilities differ by {diff:.2e}"
        worst = max(worst, diff)
    return worst


RECORDS = {
    "default": None,  # no record: mean = std = 0.5, shorter side to 224, centre crop
    "imagenet_crop": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic"),
    "squash_crop": Preprocessing(crop_pct=0.9, crop_mode="squash", interpolation="bicubic"),
    "squash": Preprocessing(crop_mode="squash"),
    "nearest": Preprocessing(crop_pct=0.95, interpolation="nearest"),
    "wide_input": Preprocessing(crop_pct=0.875, interpolation="bicubic"),  # a 224x320 model: both sides resized
}
IMG_SIZE = {"wide_input": (224, 320)}


# ------------------------------------------------------------------- vitkit -> Hugging Face directory
@pytest.mark.parametrize("record", list(RECORDS))
def test_an_exported_directory_predicts_in_transformers_what_vitkit_predicts(tmp_path, photos, record, one_thread):
    model = _vitkit_model(RECORDS[record], img_size=IMG_SIZE.get(record, 224))
    vitkit_dir = model.save_pretrained(tmp_path / "vitkit")
    hf_dir = save_as(model, tmp_path / "hf", "hf")
    assert main(["convert", str(vitkit_dir), str(tmp_path / "cli"), "--to", "hf"]) == 0  # the command writes the same
    for name in ("config.json", "preprocessor_config.json"):
        assert (tmp_path / "cli" / name).read_text() == (hf_dir / name).read_text()
    ours = predict_files(vitkit_dir, photos, top_k=NUM_CLASSES)

    classify = pipeline("image-classification", model=str(hf_dir), top_k=5)
    _compare(ours, [classify(str(p)) for p in photos], photos)

    # the same through the Auto classes, on every class's probability
    hf_model = AutoModelForImageClassification.from_pretrained(hf_dir).eval()
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    assert hf_model.config.id2label == dict(enumerate(NAMES))
    assert hf_model.config.label2id == {name: i for i, name in enumerate(NAMES)}
    for path, mine in zip(photos, ours):
        inputs = processor(images=load_image(str(path)), return_tensors="pt")  # transformers' loader: EXIF applied
        with torch.no_grad():
            probs = hf_model(**inputs).logits.softmax(-1)[0]
        expected = torch.tensor([dict(zip(mine.labels, mine.probabilities))[name] for name in NAMES])
        torch.testing.assert_close(probs, expected, atol=TOLERANCE, rtol=0)

    # and vitkit reads its own export back to the same geometry (crop_pct 0.9 comes back as 224 / 248; a
    # non-square input is resized on both sides in either mode, and comes back as squash)
    back, record = read_model(hf_dir).config.preprocessing(), model.config.preprocessing()
    assert back.resize_size == record.resize_size
    assert dataclasses.replace(back, crop_pct=record.crop_pct, crop_mode=record.crop_mode) == record


def test_the_processor_gives_the_pixels_vitkit_gives(photos):
    """Before the model: transformers' processor and vitkit's eval transform agree to float rounding."""
    for record in [r for r in RECORDS.values() if r is not None]:
        written = processor_config(record)
        kind = {"BitImageProcessor": BitImageProcessor, "ViTImageProcessor": ViTImageProcessor}[
            written.pop("image_processor_type")]
        processor, transform = kind(**written), EvalTransform(record, 3)
        for path in photos:
            with Image.open(path) as img:
                theirs = processor(images=ImageOps.exif_transpose(img), return_tensors="pt")["pixel_values"][0]
            ours = transform.normalize(transform.load(path, orient=True))
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_labels_come_from_the_class_names(tmp_path):
    hf_dir = save_as(_vitkit_model(None), tmp_path / "named", "hf")
    written = json.loads((hf_dir / "config.json").read_text())
    assert written["id2label"]["7"] == "class 7" and written["label2id"]["class 7"] == 7
    # no names: the index, which `vitkit predict` shows too (transformers' default would be LABEL_7)
    unnamed = save_as(_vitkit_model(None, class_names=None), tmp_path / "unnamed", "hf")
    assert json.loads((unnamed / "config.json").read_text())["id2label"]["7"] == "7"
    assert read_model(unnamed).config.class_names is None  # read back as no names, as LABEL_7 is
    labels = json.loads((unnamed / "config.json").read_text())
    labels["id2label"] = {str(i): f"LABEL_{i}" for i in range(NUM_CLASSES)}
    (unnamed / "config.json").write_text(json.dumps(labels))
    assert read_model(unnamed).config.class_names is None


# ------------------------------------------------------------------- transformers -> vitkit predict
def _transformers_model() -> ViTForImageClassification:
    config = HFViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         image_size=224, patch_size=16, num_labels=NUM_CLASSES, id2label=dict(enumerate(NAMES)),
                         label2id={name: i for i, name in enumerate(NAMES)})
    model = ViTForImageClassification(config).eval()
    _sharpen(model.classifier)
    return model


PROCESSORS = {
    "vit": lambda: ViTImageProcessor(),  # both sides to 224: the photo is squashed
    "deit": lambda: DeiTImageProcessor(),  # 256x256, then the centre 224
    "clip": lambda: CLIPImageProcessor(),  # shorter side 224, centre 224, bicubic, CLIP's mean/std
    "bit": lambda: BitImageProcessor(size={"shortest_edge": 250}, resample=2),
    "convnext": lambda: ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.9),  # int(224/0.9) = 248
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_vitkit_predict_on_a_directory_transformers_wrote(tmp_path, photos, name, capsys, one_thread):
    directory = tmp_path / "hf"
    _transformers_model().save_pretrained(directory)
    PROCESSORS[name]().save_pretrained(directory)
    classify = pipeline("image-classification", model=str(directory), top_k=5)
    theirs = [classify(str(p)) for p in photos]

    assert main(["predict", str(directory), *map(str, photos), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    worst = 0.0
    for path, mine, their in zip(photos, printed, theirs):
        assert [t["label"] for t in mine["top_k"]] == [t["label"] for t in their], path.name
        diff = max(abs(a["probability"] - b["score"]) for a, b in zip(mine["top_k"], their))
        worst = max(worst, diff)
    assert worst < TOLERANCE  # the printed probabilities are rounded to 1e-6
    # the Python road, unrounded
    _compare(predict_files(directory, photos, top_k=5), theirs, photos)


# --------------------------------------------------------------------------- the processor mapping
def test_what_each_record_is_written_as():
    square = processor_config(Preprocessing(crop_pct=0.875))
    assert (square["image_processor_type"], square["size"], square["crop_size"]) == (
        "BitImageProcessor", {"shortest_edge": 256}, {"height": 224, "width": 224})
    squash = processor_config(Preprocessing(size=(224, 320), crop_mode="squash"))
    assert (squash["image_processor_type"], squash["size"], squash["do_center_crop"]) == (
        "ViTImageProcessor", {"height": 224, "width": 320}, False)
    wide = processor_config(Preprocessing(size=(224, 320), crop_pct=0.875))
    assert (wide["image_processor_type"], wide["size"], wide["crop_size"]) == (
        "BitImageProcessor", {"height": 256, "width": 365}, {"height": 224, "width": 320})
    assert processor_config(Preprocessing(mean=0.1307, std=0.3081)) is None  # one channel: transformers makes RGB


@pytest.mark.parametrize("processor", [
    {"image_processor_type": "ViTImageProcessor"},
    {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 320}, "crop_pct": 0.95},
    {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}},
    {"image_processor_type": "CLIPImageProcessorFast", "size": 288, "crop_size": 256},
    {"image_processor_type": "DeiTImageProcessor", "resample": 0},
])
def test_hand_written_processors_read_as_transformers_reads_them(processor):
    """Keys left out take the class's defaults, as ``from_pretrained`` gives them."""
    record = preprocessing_from_processor(processor)
    kind = {"ViT": ViTImageProcessor, "ConvNext": ConvNextImageProcessor, "CLIP": CLIPImageProcessor,
            "DeiT": DeiTImageProcessor}[processor["image_processor_type"].split("ImageProcessor")[0]]
    loaded = kind(**{k: v for k, v in processor.items() if k != "image_processor_type"})
    image = torch.randint(0, 256, (3, 300, 451), dtype=torch.uint8)
    theirs = loaded(images=image, return_tensors="pt")["pixel_values"][0]
    transform = EvalTransform(record, 3)
    torch.testing.assert_close(transform(image), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("processor", "message"), [
    ({"image_processor_type": "BitImageProcessor", "do_center_crop": False}, r"size=.*without a centre crop"),
    ({"size": {"shortest_edge": 224, "longest_edge": 400}, "do_center_crop": True, "crop_size": 224},
     r"size=.*capped size"),
    ({"resample": 1}, r"resample=1 is not one vitkit's eval transform reproduces"),
    ({"do_rescale": False}, r"do_rescale=False"),
    ({"image_processor_type": "PoolFormerImageProcessor", "crop_pct": 0.9},
     r"'PoolFormerImageProcessor': its crop_pct"),
    ({"do_center_crop": True, "size": {"height": 224, "width": 224}, "crop_size": {"height": 256, "width": 256}},
     r"crop_size=.* larger than the resized image"),
])
def test_a_processor_vitkit_cannot_reproduce_is_refused_naming_the_key(processor, message):
    with pytest.raises(ProcessorError, match=message):
        preprocessing_from_processor(processor)


def test_predict_refuses_such_a_directory_in_one_line(tmp_path, capsys):
    directory = save_as(_vitkit_model(None), tmp_path / "hf", "hf")
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor",
                                                                    "resample": 4}))
    assert main(["predict", str(directory), str(tmp_path / "any.jpg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit predict: error: ") and "preprocessor_config.json: resample=4" in err
    assert "\n" not in err


@pytest.mark.parametrize("crop_mode", ["squash", "center", None])
def test_a_timm_hub_directory_states_its_crop_mode(tmp_path, crop_mode):
    """timm's ``pretrained_cfg.crop_mode`` has the record's meaning (squash: both sides to size / crop_pct)."""
    directory = tmp_path / "timm_hub"
    directory.mkdir()
    save_as(_vitkit_model(None), directory / "model.safetensors", "timm")
    cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9, "interpolation": "bicubic", "crop_mode": crop_mode}
    (directory / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                       "num_classes": NUM_CLASSES, "pretrained_cfg": cfg}))
    record = read_model(directory).config.preprocessing()
    assert record.crop_mode == (crop_mode or "center")
    assert record.resize_size == ((248, 248) if crop_mode == "squash" else 248)
    cfg["crop_mode"] = "border"
    (directory / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                       "num_classes": NUM_CLASSES, "pretrained_cfg": cfg}))
    with pytest.raises(ValueError, match=r"config.json: pretrained_cfg crop_mode='border' is not one"):
        read_model(directory)
