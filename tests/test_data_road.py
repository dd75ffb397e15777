"""One data road and one preprocessing record (issue 12), and the data items of issue 16.

Every test here failed on main before this change: the private readers of ``fewshot`` and ``analyze``
ignored the user cache and labelled validation folders by their own class list, ``predict``
normalised an unrecorded model with ImageNet's statistics while ``fewshot``/``analyze`` used 0.5,
unreadable files were counted by ``data info``, and ``fewshot`` checked ``--shots`` after extracting
every feature.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.analysis.inputs import load_images, prepare_images
from vitkit.cli import main
from vitkit.config import ViTConfig
from vitkit.convert import read_model, save_as
from vitkit.data import ClassMismatchError, CorruptImageError, EvalTransform, load_split
from vitkit.data.download import write_named_dataset
from vitkit.data.sources import NAMED_DATASETS
from vitkit.evaluation import extract_features, linear_evaluation
from vitkit.evaluation.features import features_of
from vitkit.models.registry import build_model
from vitkit.predict import preprocess as predict_input
from vitkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

TINY = ViTConfig(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _folder_set(root: Path, classes=("ant", "bee", "cat"), train: int = 3, val: int = 2,
                val_classes=None) -> Path:
    """Class folders of random RGB images of different, non-square sizes (so resize and crop matter)."""
    rng = np.random.default_rng(0)
    for split, count, names in (("train", train, classes), ("val", val, val_classes or classes)):
        for c, name in enumerate(names):
            for i in range(count):
                h, w = 20 + 7 * i + c, 45 - 5 * i
                _save(root / split / name / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


# ------------------------------------------------------------------------------- data roots
def test_fewshot_finds_a_downloaded_set_in_the_user_cache_without_vitkit_data(tmp_path, monkeypatch, capsys):
    """Issue 12: after `vitkit data download cifar10` (which writes to the user cache), fewshot finds it."""
    cache = tmp_path / "cache"
    monkeypatch.delenv("VITKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.chdir(tmp_path)
    spec = NAMED_DATASETS["cifar10"]
    labels = np.repeat(np.arange(10), 2)  # 2 images per class, each class one random image: a known answer
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)[labels]
    classes = [f"c{i}" for i in range(10)]
    write_named_dataset(cache / "vitkit" / "data" / "cifar10", spec,
                        {"train": (images, labels), "test": (images[::2].copy(), labels[::2].copy())}, classes,
                        {"kind": "test"})  # exactly what `vitkit data download` writes there
    model_dir = build_model(TINY.replace(num_classes=10)).save_pretrained(tmp_path / "model")
    out = tmp_path / "fewshot.json"
    assert main(["fewshot", str(model_dir), "--dataset", "cifar10", "--shots", "1", "--seeds", "1", "--l2", "1e-6",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["num_train"], report["num_test"]) == (20, 10)  # the cached set, not any other copy
    assert report["fewshot"][0]["mean"] == 1.0  # test images repeat the shots, and the ridge interpolates them


# ---------------------------------------------------------------------- one preprocessing record
@pytest.mark.parametrize("record", [None, Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
                                                        interpolation="bicubic")])
def test_the_same_model_gives_the_same_features_in_predict_fewshot_and_analyze(tmp_path, record):
    root = _folder_set(tmp_path / "set")
    model = build_model(TINY.replace(preprocess=record)).eval()
    model = vitkit.load_model(model.save_pretrained(tmp_path / "model"))  # the record survives config.json
    test = load_split(f"folder:{root}", "test")
    fewshot = extract_features(model, test, batch_size=4)
    with torch.no_grad():
        predict = features_of(model, torch.stack([predict_input(f, model.config) for f in test.files]))
        sample = load_images(f"folder:{root}", 100, seed=0)
        inputs, display = prepare_images(sample, model)
        analyze = features_of(model, inputs)
    assert torch.equal(fewshot, predict) and torch.equal(fewshot, analyze)
    # and the numbers are the record's (or the documented default: mean = std = 0.5, no crop)
    expected = record or Preprocessing()
    first = torch.from_numpy(display[0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(expected.mean).view(3, 1, 1), torch.tensor(expected.std).view(3, 1, 1)
    torch.testing.assert_close(inputs[0], (first - mean) / std)


def test_predict_of_an_unrecorded_model_uses_the_default_not_imagenet(tmp_path):
    path = _save(tmp_path / "grey.png", np.full((40, 40, 3), 51, dtype=np.uint8))
    x = predict_input(path, build_model(TINY).config)
    torch.testing.assert_close(x, torch.full_like(x, (51 / 255 - 0.5) / 0.5))


def test_the_record_is_typed_written_in_config_json_and_old_files_still_read(tmp_path):
    record = Preprocessing(size=32, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.9, interpolation="bicubic")
    directory = build_model(TINY.replace(preprocess=record)).save_pretrained(tmp_path / "new")
    written = json.loads((directory / "config.json").read_text())["preprocess"]
    assert written == {"size": [32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "crop_pct": 0.9,
                       "interpolation": "bicubic"}
    assert vitkit.load_model(directory).config.preprocessing() == record
    # a config.json of an older vitkit: the untyped extra["preprocess"] dict, with img_size
    old = json.loads((directory / "config.json").read_text())
    old.pop("preprocess")
    old["extra"] = {"preprocess": {"img_size": 32, "mean": [0.1307], "std": [0.3081], "crop_pct": 1.0,
                                   "dataset": "mnist"}}
    (directory / "config.json").write_text(json.dumps(old))
    loaded = vitkit.load_model(directory).config.preprocessing()
    assert (loaded.mean, loaded.std, loaded.crop_pct, loaded.dataset) == ((0.1307,) * 3, (0.3081,) * 3, 1.0, "mnist")


def test_a_bad_record_names_the_field():
    typo = r"unknown config key preprocess\.crop_fraction \(did you mean preprocess\.crop_pct\?\)"
    with pytest.raises(ValueError, match=typo):
        Preprocessing.from_dict({"crop_fraction": 0.9})
    with pytest.raises(ValueError, match=r"preprocess\.crop_pct=1\.5"):
        Preprocessing.from_dict({"crop_pct": 1.5})
    with pytest.raises(ValueError,
                       match=r"preprocess\.interpolation must be one of bilinear, bicubic, nearest; got 'lanczos'"):
        Preprocessing.from_dict({"interpolation": "lanczos"})
    with pytest.raises(ValueError, match=r"preprocess\.std"):
        Preprocessing(mean=(0.5, 0.5), std=(0.5,))


def test_the_eval_transform_is_resize_then_centre_crop():
    # a 40x80 image, left half black, right half white, crop_pct 0.5 at size 8: resize to 16x32, keep the centre
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, 40:] = 255
    transform = EvalTransform(Preprocessing(size=8, crop_pct=0.5, interpolation="nearest"), 3)
    assert transform.preprocessing.resize_size == 16
    out = transform.resize(image)
    assert out.shape == (3, 8, 8)
    assert out[:, :, :4].max() == 0 and out[:, :, 4:].min() == 255  # the centre 8 of 32 columns


def test_converters_attach_their_source_preprocessing(tmp_path):
    model = build_model(TINY.replace(num_classes=4))
    tv = read_model(save_as(model, tmp_path / "tv.pth", "torchvision"), num_heads=2)
    assert tv.config.preprocess == Preprocessing(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
    assert tv.config.preprocess.resize_size == 36  # 224 -> 256, as torchvision's weights.transforms()
    jax = read_model(save_as(model, tmp_path / "g.npz", "npz"), num_heads=2).config.preprocess
    assert (jax.mean, jax.std, jax.crop_pct) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    hf_dir = save_as(model, tmp_path / "hf", "hf")
    assert read_model(hf_dir).config.preprocess.mean == (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1],
         "resample": 3, "size": {"height": 32, "width": 32}}))
    hf = read_model(hf_dir).config.preprocess
    assert (hf.mean, hf.std, hf.interpolation, hf.crop_pct) == ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bicubic", 1.0)
    again = save_as(read_model(hf_dir), tmp_path / "hf_again", "hf")  # exported with its image processor
    assert read_model(again).config.preprocess == hf
    timm_dir = tmp_path / "timm_hub"
    timm_dir.mkdir()
    save_as(model, timm_dir / "model.safetensors", "timm")
    (timm_dir / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "num_classes": 4, "pretrained_cfg": {
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9, "interpolation": "bicubic"}}))
    timm = read_model(timm_dir, num_heads=2).config.preprocess
    assert (timm.crop_pct, timm.interpolation) == (0.9, "bicubic")
    # `vitkit convert` writes the record into the new config.json
    assert main(["convert", str(tmp_path / "tv.pth"), str(tmp_path / "converted"), "--num-heads", "2"]) == 0
    written = json.loads((tmp_path / "converted" / "config.json").read_text())["preprocess"]
    assert written["mean"] == list(IMAGENET_MEAN) and written["crop_pct"] == 0.875


# -------------------------------------------------------------------------------- issue 16, item 1
@pytest.mark.parametrize("val_classes, culprit", [(("ant", "bee", "dog"), "dog"), (("ant", "cat"), "bee")])
def test_fewshot_labels_come_from_one_class_list_and_a_mismatch_names_the_classes(tmp_path, val_classes,
                                                                                 culprit, capsys):
    root = _folder_set(tmp_path / "set", val_classes=val_classes)
    model_dir = build_model(TINY).save_pretrained(tmp_path / "model")
    assert main(["fewshot", str(model_dir), "--dataset", f"folder:{root}", "--shots", "1", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err
    with pytest.raises(ClassMismatchError, match=culprit):
        load_split(f"folder:{root}", "test", classes=["ant", "bee", "cat"], require_all_classes=True)


def test_a_validation_split_is_labelled_by_the_training_class_list(tmp_path):
    root = _folder_set(tmp_path / "set", val_classes=("bee", "cat"))  # lacks "ant": labels must stay 1 and 2
    test = load_split(f"folder:{root}", "test")
    assert test.class_names == ["ant", "bee", "cat"] and sorted(set(test.labels.tolist())) == [1, 2]


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_images_are_scaled_not_white(tmp_path, suffix):
    root = _folder_set(tmp_path / "set")
    _save(root / "val" / "ant" / f"deep.{suffix}", np.full((16, 16), 40000, dtype=np.uint16))
    test = load_split(f"folder:{root}", "test")
    index = [f.name for f in test.files].index(f"deep.{suffix}")
    pixels = test.subset([index], "deep").resized(EvalTransform(Preprocessing(size=8), 3))
    assert pixels.unique().tolist() == [round(40000 / 65535 * 255)]


# -------------------------------------------------------------------------------- issue 16, item 4
def test_float_tiff_is_converted_from_unit_range_or_refused_by_name(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    _save(tmp_path / "unit.tif", ramp)
    pixels = vitkit.data.read_image(tmp_path / "unit.tif")
    assert pixels.shape == (1, 8, 8) and pixels.max() == 255 and pixels.min() == 0  # grayscale stays one channel
    np.testing.assert_array_equal(pixels[0].numpy(), np.round(ramp * 255).astype(np.uint8))
    _save(tmp_path / "hdr.tif", ramp * 1000 - 3)
    with pytest.raises(CorruptImageError, match=r"hdr\.tif: .*floating-point image with values in \[-3, 997\]"):
        vitkit.data.read_image(tmp_path / "hdr.tif")


# ------------------------------------------------------------------------------- issue 16, item 15
def test_fewshot_checks_shots_before_extracting_any_feature(tmp_path, monkeypatch):
    root = _folder_set(tmp_path / "set", train=3)
    calls = []
    monkeypatch.setattr("vitkit.evaluation.features.extract_features", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"--shots 5 needs 5 images per class.*3 class\(es\) have fewer: ant \(3\)"):
        linear_evaluation(build_model(TINY), f"folder:{root}", shots=(1, 5), seeds=1)
    assert calls == []


def test_feature_extraction_reports_an_estimate_and_progress(tmp_path, capsys):
    root = _folder_set(tmp_path / "set", train=4)
    report = linear_evaluation(build_model(TINY), f"folder:{root}", shots=(1,), seeds=1, batch_size=4)
    err = capsys.readouterr().err
    total = report.num_train + report.num_test
    assert f"features: {total} images to extract, about" in err and "images/s on the first batch" in err
    assert f"features: {total} images in" in err


# ------------------------------------------------------------------------ issue 16: data info, item 3
def test_data_info_does_not_count_unreadable_files_as_images(tmp_path, capsys):
    root = _folder_set(tmp_path / "set")
    (root / "train" / "ant" / "broken.png").write_bytes(b"not a png at all")
    assert main(["data", "info", f"folder:{root}"]) == 0
    out = capsys.readouterr().out
    assert "train 9  val 6" in out and "train: 1 unreadable file(s), not counted above" in out
    assert "broken.png" in out


def test_skip_corrupt_reports_which_files_were_skipped(tmp_path, capsys):
    root = _folder_set(tmp_path / "set", train=4)
    broken = root / "train" / "bee" / "broken.png"
    broken.write_bytes(b"not a png at all")
    args = ["train", "--config", "smoke", "--dataset", f"folder:{root}", "--data.skip_corrupt", "true",
            "--data.img_size", "16", "--data.samples_per_class", "null", "--data.batch_size", "4",
            "--data.num_workers", "0", "--data.crop", "none", "--model.patch_size", "8", "--epochs", "1",
            "--out_dir", str(tmp_path / "runs"), "--run_name", "skip", "--progress", "none"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "left out 1 unreadable file(s)" in err and str(broken) in err
    lines = [json.loads(line) for line in (tmp_path / "runs" / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "skipped", "step": 0, "count": 1, "files": [str(broken)]} in lines
    assert [r["skipped_files"] for r in lines if r["kind"] == "epoch"] == [1]
    summary = json.loads((tmp_path / "runs" / "skip" / "model" / "config.json").read_text())["extra"]["training"]
    assert summary["skipped_files"] == [str(broken)]


# -------------------------------------------------------------------------------- issue 16, item 6
def _wreck_jpeg_pixels(path: Path) -> None:
    """Keep the header and the end marker (the scan passes) but make the pixels undecodable."""
    blob = bytearray(path.read_bytes())
    start = blob.index(b"\xff\xda")  # start of scan
    blob[start + 2:start + 4] = b"\x00\x01"  # an impossible scan header length
    path.write_bytes(bytes(blob))


def test_an_image_that_fails_at_first_read_saves_the_finished_steps_then_stops_with_one_line(tmp_path, capsys):
    root = _folder_set(tmp_path / "set", train=4)
    bad = root / "val" / "bee" / "0.jpg"
    Image.fromarray(np.full((30, 30, 3), 128, dtype=np.uint8)).save(bad)
    _wreck_jpeg_pixels(bad)
    args = ["train", "--config", "smoke", "--dataset", f"folder:{root}", "--data.img_size", "16",
            "--data.samples_per_class", "null", "--data.batch_size", "4", "--data.num_workers", "2",
            "--data.crop", "none", "--model.patch_size", "8", "--epochs", "2", "--ckpt_every_steps", "0",
            "--out_dir", str(tmp_path / "runs"), "--run_name", "bad", "--progress", "none"]
    assert main(args) == 1  # found mid-run (the validation split is first read after a full epoch): not bad input
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "saved the finished steps" in err[0] and "--resume" in err[0]
    state = torch.load(tmp_path / "runs" / "bad" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 0, 3)  # the whole first epoch is kept
