"""One road for evaluation data (issue 25): every command resolves a data set name the same way (a named set,
folder:PATH, or a bare data-set directory), and ``vitkit eval`` reads its split through the reader and the eval
transform of fewshot, analyze and predict: only the evaluation split, any channel count, any model shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.predict import predict_files
from vitkit.resolver import load_source

CLASSES = ("ant", "bee", "cat")


def _gray_folder_set(root: Path, train: int = 2, val: int = 3) -> Path:
    """Class folders of 1-channel PNGs of odd, non-square sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (19 + 5 * i + c, 33 - 3 * i), dtype=np.uint8), "L").save(
                    folder / f"{i}.png")
    return root


@pytest.fixture
def gray_set(tmp_path) -> Path:
    return _gray_folder_set(tmp_path / "grayset")


@pytest.fixture
def wide_model(tmp_path) -> Path:
    """A 1-channel, non-square (16x24) model that knows the set's classes."""
    model = vitkit.create_model("vit_mini_patch4_32", depth=1, img_size=(16, 24), in_chans=1, num_classes=3,
                                class_names=list(CLASSES))
    model.save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def test_eval_reads_a_gray_folder_set_for_a_non_square_model_as_predict_does(gray_set, wide_model, tmp_path, capsys,
                                                                             one_thread):
    """Before: eval refused non-square models and 1-channel folder sets (its own road, the training pipeline).
    Now each image's prediction in eval's confusion matrix is the one ``vitkit predict`` gives that file."""
    assert main(["eval", str(wide_model), "--dataset", f"folder:{gray_set}", "--out", str(tmp_path / "e"),
                 "--batch-size", "4"]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    files = sorted((gray_set / "val").glob("*/*.png"))
    assert report["num_samples"] == len(files) == 9
    predicted = predict_files(load_source(str(wide_model)), files, top_k=1, device="cpu")
    expected = np.zeros((3, 3), dtype=np.int64)
    for path, prediction in zip(files, predicted):
        expected[CLASSES.index(path.parent.name), CLASSES.index(prediction.labels[0])] += 1
    assert np.array_equal(np.asarray(report["confusion"], dtype=np.int64), expected)


def test_eval_does_not_read_the_training_split(gray_set, wide_model, tmp_path, one_thread):
    """Before: eval built the training pipeline, which scans (and here trips on) every training image."""
    (gray_set / "train" / "ant" / "broken.png").write_bytes(b"not a png")
    assert main(["eval", str(wide_model), "--dataset", f"folder:{gray_set}", "--out", str(tmp_path / "e")]) == 0


def test_a_bare_data_set_directory_works_for_eval_train_and_data_info(gray_set, wide_model, tmp_path, capsys,
                                                                       one_thread):
    """Before: fewshot and analyze took a bare directory (exit 0), eval, train and `data info` said "unknown data
    set" (exit 2)."""
    bare = str(gray_set)  # no folder: prefix
    assert main(["data", "info", bare]) == 0
    assert "ant" in capsys.readouterr().out
    assert main(["eval", str(wide_model), "--dataset", bare, "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["num_samples"] == 9
    assert main(["fewshot", str(wide_model), "--dataset", bare, "--shots", "1", "--seeds", "1"]) == 0
    assert main(["train", "--config", "smoke", "--dataset", bare, "--data.img_size", "16", "--model.patch_size", "8",
                 "--data.samples_per_class", "null", "--data.batch_size", "3", "--data.crop", "none",
                 "--max_steps", "2", "--out_dir", str(tmp_path / "runs"), "--run_name", "bare",
                 "--progress", "none", "--ckpt_every_steps", "0"]) == 0
    assert (tmp_path / "runs" / "bare" / "model" / "config.json").is_file()


def test_a_bare_npz_directory_trains_with_its_recorded_classes_and_statistics(tmp_path, one_thread):
    """An .npz data-set directory that is not a named set (train.npz, test.npz, meta.json): its classes and
    normalisation come from its meta.json, for training as for evaluation."""
    from vitkit.data import DataConfig, build_data, load_split

    rng = np.random.default_rng(0)
    root = tmp_path / "tiny_npz"
    root.mkdir()
    for split, n in (("train", 12), ("test", 6)):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                 labels=np.arange(n) % 3)
    (root / "meta.json").write_text(json.dumps({"classes": list(CLASSES), "train_pixel_mean_0_1": [0.25],
                                                "train_pixel_std_0_1": [0.5]}))
    data = build_data(DataConfig(str(root), batch_size=4, crop="none", hflip=False), device="cpu")
    assert (data.num_classes, list(data.class_names), data.mean, data.std) == (3, list(CLASSES), (0.25,), (0.5,))
    assert list(load_split(str(root), "test").class_names) == list(CLASSES)
    images, labels = next(iter(data.val.batches()))
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 1, 2, 0, 1, 2]  # eval_batch_size covers it
    torch.testing.assert_close(images[0, 0], (torch.from_numpy(np.load(root / "test.npz")["images"][0, ..., 0])
                                              .float() / 255 - 0.25) / 0.5)
