"""Input pipeline: real data sets, subsets, determinism and exact resume, sharding, mixing, folder trees."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import CorruptImageError, DataConfig, DatasetNotFoundError, build_data
from vitkit.data.augment import BatchAugmenter
from vitkit.data.folder import FolderImages, find_split_dir, list_classes, scan_split
from vitkit.data.sampling import epoch_order, stratified_subset
from vitkit.preprocessing import Preprocessing

DATA = Path(os.environ.get("VITKIT_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
IMAGENETTE = DATA / "imagenette_subset"


def meta(name: str) -> dict:
    return json.loads((DATA / name / "meta.json").read_text())


def cfg(dataset: str = "mnist", **kw) -> DataConfig:
    return DataConfig(dataset=dataset, data_dir=str(DATA) if not dataset.startswith("folder:") else None, **kw)


def train_batches(data, epoch: int, start: int = 0, stop: int | None = None) -> list:
    out = []
    for step, batch in enumerate(data.train.batches(epoch, start), start):
        if stop is not None and step >= stop:
            break
        out.append(batch)
    return out


# ------------------------------------------------------------------------------ named sets
@pytest.mark.parametrize("name,chans,size", [("cifar10", 3, 32), ("mnist", 1, 28), ("fashion_mnist", 1, 28)])
def test_named_set_loads_with_its_shape_and_classes(name, chans, size):
    data = build_data(cfg(name, batch_size=64, crop="none", hflip=False), device="cpu")
    info = meta(name)
    assert data.class_names == info["classes"] and data.num_classes == 10
    assert (data.in_chans, data.img_size) == (chans, size)
    assert data.train.num_samples == info["counts"]["train"]["total"]
    assert data.val.num_samples == info["counts"]["test"]["total"]
    assert len(data.train) == data.train.num_samples // 64
    images, labels = next(iter(data.train.batches(0)))
    assert images.shape == (64, chans, size, size) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (64,)
    # normalised with the data set's constants: roughly zero mean, unit std over a batch
    assert abs(images.mean().item()) < 0.3 and 0.7 < images.std().item() < 1.3
    val_images, val_labels = next(iter(data.val.batches()))
    assert val_images.shape[1:] == (chans, size, size) and val_labels.dtype == torch.int64


def test_img_size_resizes_in_memory_sets():
    data = build_data(cfg("mnist", img_size=32, samples_per_class=10, batch_size=20), device="cpu")
    assert next(iter(data.train.batches(0)))[0].shape == (20, 1, 32, 32)
    assert next(iter(data.val.batches()))[0].shape[1:] == (1, 32, 32)


def test_missing_set_error_names_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(DataConfig("cifar100", data_dir=str(tmp_path)), device="cpu")
    message = str(err.value)
    assert str(tmp_path / "cifar100" / "train.npz") in message and "vitkit data download cifar100" in message
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(DataConfig("cifar100"), device="cpu")
    message = str(err.value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(DataConfig("cifar100"), device="cpu")
    message = str(err.value)
    for place in (tmp_path / "env", tmp_path / "cache" / "vitkit" / "data"):  # VITKIT_DATA, then the user cache
        assert str(place / "cifar100" / "train.npz") in message


def test_unknown_set_and_bad_config_name_the_culprit():
    with pytest.raises(DatasetNotFoundError, match="data set 'imagenet21k' not found: not a named set"):
        build_data(DataConfig("imagenet21k"), device="cpu")  # the resolution every command uses
    with pytest.raises(ValueError,
                       match=r"data\.crop must be one of random_crop, random_resized_crop, none; got 'center'"):
        DataConfig(crop="center")
    with pytest.raises(ValueError, match=r"unknown config key datset \(did you mean dataset\?\)"):
        DataConfig.from_dict({"datset": "mnist"})


def test_config_round_trips_plain_types():
    config = DataConfig("cifar10", rrc_scale=(0.3, 1.0), mixup_alpha=0.8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    plain = config.to_dict()
    assert json.loads(json.dumps(plain)) == plain
    assert DataConfig.from_dict(plain) == config


# ------------------------------------------------------------------------------ subsets
def test_stratified_subset_counts_per_class():
    labels = np.load(DATA / "mnist" / "train.npz")["labels"]
    per_class = np.asarray(meta("mnist")["counts"]["train"]["per_class"])
    keep = stratified_subset(labels, per_class=7, seed=0)
    assert np.bincount(labels[keep], minlength=10).tolist() == [7] * 10
    keep = stratified_subset(labels, fraction=0.01, seed=3)
    assert np.bincount(labels[keep], minlength=10).tolist() == np.round(per_class * 0.01).astype(int).tolist()
    # seeded: same seed same subset, another seed another; growing per_class nests the subsets
    assert np.array_equal(stratified_subset(labels, per_class=5, seed=1),
                          stratified_subset(labels, per_class=5, seed=1))
    assert not np.array_equal(stratified_subset(labels, per_class=5, seed=1),
                              stratified_subset(labels, per_class=5, seed=2))
    assert set(stratified_subset(labels, per_class=5, seed=1)) <= set(stratified_subset(labels, per_class=9, seed=1))


def test_subset_reaches_the_training_stream():
    data = build_data(cfg("fashion_mnist", samples_per_class=12, batch_size=8), device="cpu")
    assert data.train.num_samples == 120 and len(data.train) == 15
    labels = torch.cat([y for _, y in data.train.batches(0)])
    assert torch.bincount(labels, minlength=10).tolist() == [12] * 10
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_data(cfg("mnist", samples_per_class=1, batch_size=64), device="cpu")


# ------------------------------------------------------------------------------ determinism and resume
AUGMENTED = dict(samples_per_class=8, batch_size=8, crop="random_resized_crop", auto_augment="randaugment",
                 random_erasing=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_seed_same_batches_other_epoch_other_order():
    one = build_data(cfg("cifar10", **AUGMENTED), device="cpu", seed=5)
    two = build_data(cfg("cifar10", **AUGMENTED), device="cpu", seed=5)
    assert_same_batches(train_batches(one, 0, stop=3), train_batches(two, 0, stop=3))
    assert not np.array_equal(one.train.indices(0, 0), one.train.indices(1, 0))
    assert not np.array_equal(epoch_order(100, 5, 0), epoch_order(100, 6, 0))
    other_seed = build_data(cfg("cifar10", **AUGMENTED), device="cpu", seed=6)
    assert not torch.equal(train_batches(one, 0, stop=1)[0][0], train_batches(other_seed, 0, stop=1)[0][0])


@pytest.mark.parametrize("augment", [{}, AUGMENTED | {"auto_augment": "trivialaugment"}])
def test_resume_mid_epoch_sees_exactly_the_uninterrupted_batches(augment):
    data = build_data(cfg("cifar10", **({"samples_per_class": 8, "batch_size": 8} | augment)), device="cpu", seed=1)
    full = train_batches(data, 2)
    assert len(full) == 10
    assert_same_batches(train_batches(data, 2, start=7), full[7:])
    # a fresh pipeline (a new process after a kill) too, without any saved RNG state
    torch.manual_seed(1234)
    np.random.seed(99)
    again = build_data(cfg("cifar10", **({"samples_per_class": 8, "batch_size": 8} | augment)), device="cpu", seed=1)
    assert_same_batches(train_batches(again, 2, start=4), full[4:])


@pytest.mark.parametrize("crop", ["random_crop", "random_resized_crop"])
def test_two_ranks_cover_each_index_once_and_match_one_process_with_the_global_batch(crop):
    base = dict(samples_per_class=10, crop=crop, auto_augment="randaugment", random_erasing=0.5, erase_mode="const")
    single = build_data(cfg("mnist", batch_size=10, **base), device="cpu", seed=3)
    ranks = [build_data(cfg("mnist", batch_size=5, **base), device="cpu", seed=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0].train) == len(ranks[1].train) == len(single.train) == 10
    seen = np.concatenate([r.train.indices(0, s) for s in range(10) for r in ranks])
    assert sorted(seen.tolist()) == list(range(100))
    # the augmented batch of rank r is rows [5r, 5r+5) of the single-process batch
    for (x, y), (x0, y0), (x1, y1) in zip(single.train.batches(0), *(r.train.batches(0) for r in ranks)):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # validation shards: disjoint, complete, nothing dropped
    counts = [sum(len(y) for _, y in r.val.batches()) for r in ranks]
    assert sum(counts) == 10000 and abs(counts[0] - counts[1]) <= 1
    labels = torch.cat([y for r in ranks for _, y in r.val.batches()])
    assert torch.equal(labels, torch.cat([y for _, y in single.val.batches()]))


# ------------------------------------------------------------------------------ mixing and targets
def constant_batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.arange(n, dtype=torch.uint8) * 30
    return values.view(n, 1, 1, 1).expand(n, 1, size, size).contiguous(), torch.arange(n) % 4


def augmenter(**kw) -> BatchAugmenter:
    config = DataConfig(crop="none", hflip=False, **kw)
    return BatchAugmenter(config, img_size=16, num_classes=4, mean=(0.0,), std=(1.0,), device=torch.device("cpu"),
                          seed=0)


def test_mixup_targets_sum_to_one_and_match_the_image_mixing():
    x, labels = constant_batch()
    aug = augmenter(mixup_alpha=0.4)
    for step in range(5):
        images, targets = aug.train(x, labels, epoch=0, step=step, rows=np.arange(8), global_size=8)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        lam = targets[0, labels[0]].item()  # label 0 and its partner (label 3) differ
        expected = lam * x.float() / 255 + (1 - lam) * x.flip(0).float() / 255
        assert torch.allclose(images, expected, atol=1e-5)


def test_cutmix_targets_match_the_pasted_area():
    x, labels = constant_batch()
    aug = augmenter(cutmix_alpha=1.0, label_smoothing=0.1)
    for step in range(5):
        images, targets = aug.train(x, labels, epoch=0, step=step, rows=np.arange(8), global_size=8)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        own = x[0].float() / 255
        kept = (images[0] == own).float().mean().item()  # share of pixels still from image 0
        # label smoothing: weight on the own label = lam * (0.9 + 0.1/4) + (1 - lam) * 0.1/4
        assert targets[0, labels[0]].item() == pytest.approx(kept * 0.9 + 0.025, abs=1e-6)


def test_label_smoothing_alone_gives_soft_targets():
    x, labels = constant_batch()
    _, targets = augmenter(label_smoothing=0.2).train(x, labels, epoch=0, step=0, rows=np.arange(8), global_size=8)
    assert targets.shape == (8, 4) and torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(targets.gather(1, labels[:, None]).squeeze(1), torch.full((8,), 0.85))
    assert torch.allclose(targets.max(1).values, torch.full((8,), 0.85))


def test_random_erasing_erases_some_images_and_keeps_others():
    x = torch.full((64, 1, 16, 16), 200, dtype=torch.uint8)
    images, _ = augmenter(random_erasing=0.5, erase_mode="const").train(
        x, torch.zeros(64, dtype=torch.int64), epoch=0, step=0, rows=np.arange(64), global_size=64)
    erased = (images == 0).flatten(1).float().mean(1)
    assert 10 < int((erased > 0).sum()) < 54  # about half
    assert erased.max() <= 1 / 3 + 0.05


# ------------------------------------------------------------------------------ folder data sets
def test_imagenette_folder_with_grayscale_files():
    data = build_data(DataConfig(f"folder:{IMAGENETTE}", img_size=64, batch_size=50, num_workers=0),
                      device="cpu")
    wnids = sorted(p.name for p in (IMAGENETTE / "train").iterdir())
    assert data.class_names == wnids and data.num_classes == 10 and data.in_chans == 3
    assert (data.train.num_samples, data.val.num_samples) == (1000, 500)
    images, labels = next(iter(data.train.batches(0)))
    assert images.shape == (50, 3, 64, 64) and labels.dtype == torch.int64
    # a grayscale JPEG comes out as RGB with three equal channels
    split = scan_split(find_split_dir(IMAGENETTE, "train"), wnids)
    gray = next(i for i, f in enumerate(split.files) if Image.open(f).mode == "L")
    image, _, error, _ = FolderImages(split, 64, "resize_center")[gray]
    assert not error and image.shape == (3, 64, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    # resume works through the DataLoader workers too
    full = train_batches(data, 1)
    assert_same_batches(train_batches(data, 1, start=15), full[15:])


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def odd_tree(tmp_path: Path) -> Path:
    """train/ with palette, RGBA, CMYK, grayscale and 16-bit images; val/ with plain ones."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    files = {
        "train/cat/palette.png": png_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
        "train/cat/rgba.png": png_bytes(rgb.convert("RGBA")),
        "train/cat/cmyk.jpg": png_bytes(rgb.convert("CMYK"), "JPEG"),
        "train/dog/gray.png": png_bytes(rgb.convert("L")),
        "train/dog/deep.png": png_bytes(Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16))),
        "train/dog/plain.JPEG": png_bytes(rgb, "JPEG"),
        "val/cat/a.png": png_bytes(rgb),
        "val/dog/b.jpg": png_bytes(rgb, "JPEG"),
    }
    for name, blob in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, ignored")
    return tmp_path


def test_folder_converts_every_mode_to_rgb(odd_tree):
    data = build_data(DataConfig(f"folder:{odd_tree}", img_size=24, batch_size=6, num_workers=0, crop="none",
                                 hflip=False), device="cpu")
    assert data.class_names == ["cat", "dog"] and data.train.num_samples == 6
    images, labels = next(iter(data.train.batches(0)))
    assert images.shape == (6, 3, 24, 24)
    split = scan_split(odd_tree / "train", ["cat", "dog"])
    deep = FolderImages(split, 8, "resize_center")[[f.name for f in split.files].index("deep.png")][0]
    assert deep.unique().tolist() == [round(40000 / 65535 * 255)]  # 16-bit scaled, not clipped


def test_corrupt_file_is_named_or_skipped_and_counted(odd_tree):
    garbage = odd_tree / "train" / "cat" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    truncated = odd_tree / "train" / "dog" / "truncated.jpg"
    jpeg = (odd_tree / "train" / "dog" / "plain.JPEG").read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) * 2 // 3])
    with pytest.raises(CorruptImageError, match="garbage.png"):
        build_data(DataConfig(f"folder:{odd_tree}", batch_size=2, num_workers=0), device="cpu")
    garbage.unlink()
    # issue 16 item 6: a truncated JPEG has a valid header; the up-front scan finds it by its missing end marker
    with pytest.raises(CorruptImageError, match=r"truncated\.jpg: truncated JPEG") as err:
        build_data(DataConfig(f"folder:{odd_tree}", img_size=16, batch_size=7, num_workers=0), device="cpu")
    assert err.value.path == truncated

    garbage.write_bytes(b"this is not a png")
    data = build_data(DataConfig(f"folder:{odd_tree}", img_size=16, batch_size=6, num_workers=0, skip_corrupt=True),
                      device="cpu")
    assert data.scan_skipped == [str(garbage), str(truncated)]
    assert data.skipped_files() == [str(garbage), str(truncated)]


def _break_after_scan(odd_tree: Path, skip_corrupt: bool, num_workers: int):
    """A data set whose file passes the scan (a valid header and end marker) but cannot be decoded."""
    data = build_data(DataConfig(f"folder:{odd_tree}", img_size=16, batch_size=6, num_workers=num_workers,
                                 skip_corrupt=skip_corrupt), device="cpu")
    bad = odd_tree / "train" / "dog" / "plain.JPEG"
    blob = bytearray(bad.read_bytes())
    start = blob.index(b"\xff\xda")  # start of scan: wreck the entropy-coded data, keep header and end marker
    blob[start + 20:len(blob) - 2] = bytes(len(blob) - 2 - start - 20)
    blob[start + 2:start + 4] = b"\x00\x01"  # an impossible scan header length
    bad.write_bytes(bytes(blob))
    return data, bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_file_is_one_clean_error_from_the_workers_or_skipped(odd_tree, num_workers):
    data, bad = _break_after_scan(odd_tree, skip_corrupt=False, num_workers=num_workers)
    with pytest.raises(CorruptImageError) as err:
        list(data.train.batches(0))
    assert err.value.path == bad and "\n" not in str(err.value) and "Traceback" not in str(err.value)
    data, bad = _break_after_scan(odd_tree, skip_corrupt=True, num_workers=num_workers)
    batches = list(data.train.batches(0))
    assert data.train.skipped == [str(bad)] and sum(len(b[1]) for b in batches) == 5
    assert data.skipped_files() == [str(bad)]


def test_empty_class_folder_is_an_error(odd_tree):
    (odd_tree / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"train/bird: empty class folder"):
        build_data(DataConfig(f"folder:{odd_tree}", num_workers=0), device="cpu")


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no train/ directory"):
        build_data(DataConfig(f"folder:{tmp_path}"), device="cpu")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no val split"):
        find_split_dir(tmp_path, "val")
    assert list_classes(tmp_path / "train") == ["a"]


# ------------------------------------------------------------------------------ download and info
class FakeMNIST:
    """Looks like torchvision.datasets.MNIST: tensor .data (N, 28, 28), tensor .targets, .classes."""

    classes = [f"{d} - {w}" for d, w in enumerate("zero one two three four five six seven eight nine".split())]
    calls: list = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        FakeMNIST.calls.append((root, train, download))
        n = 30 if train else 20
        gen = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
        self.targets = torch.arange(n) % 10


def test_download_converts_a_torchvision_dataset_into_the_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    from vitkit.data.download import download

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    directory = download("mnist", tmp_path)
    assert directory == tmp_path / "mnist" and not (directory / "raw").exists()
    assert {(train, dl) for _, train, dl in FakeMNIST.calls} == {(True, True), (False, True)}
    info = json.loads((directory / "meta.json").read_text())
    assert info["classes"] == [str(d) for d in range(10)] and info["counts"]["train"]["per_class"] == [3] * 10
    expected = FakeMNIST(str(tmp_path)).data
    assert info["train_pixel_mean_0_1"][0] == pytest.approx(expected.float().mean().item() / 255, abs=1e-4)
    data = build_data(DataConfig("mnist", data_dir=str(tmp_path), batch_size=10, crop="none", hflip=False),
                      device="cpu")
    assert (data.train.num_samples, data.val.num_samples, data.in_chans) == (30, 20, 1)
    with np.load(directory / "train.npz") as npz:
        assert npz["images"].shape == (30, 28, 28, 1) and np.array_equal(npz["images"][..., 0], expected.numpy())
    calls = len(FakeMNIST.calls)
    assert download("mnist", tmp_path) == directory and len(FakeMNIST.calls) == calls  # complete: kept
    download("mnist", tmp_path, force=True)
    assert len(FakeMNIST.calls) == calls + 2


def test_conversion_rejects_a_dataset_of_the_wrong_shape():
    from vitkit.data.download import convert_torchvision_dataset
    from vitkit.data.sources import named_spec

    class FakeCIFAR:
        data = np.zeros((4, 28, 28, 3), dtype=np.uint8)  # not 32x32
        targets = [0, 1, 2, 3]

    with pytest.raises(ValueError, match=r"FakeCIFAR: images are uint8 \(4, 28, 28, 3\)"):
        convert_torchvision_dataset(FakeCIFAR(), named_spec("cifar10"))
    FakeCIFAR.data = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    images, labels = convert_torchvision_dataset(FakeCIFAR(), named_spec("cifar10"))
    assert images.shape == (4, 32, 32, 3) and labels.dtype == np.int64


def test_cli_data_info_prints_counts(capsys):
    from vitkit.cli import main

    assert main(["data", "info", "fashion_mnist", "--data-dir", str(DATA)]) == 0
    out = capsys.readouterr().out
    assert "28x28x1" in out and "train 60000" in out and "test 10000" in out and "Ankle boot" in out
    assert main(["data", "info", "cifar100", "--data-dir", str(DATA)]) == 2
    assert "vitkit data download cifar100" in capsys.readouterr().err


# ------------------------------------------------------------------------------ auto-augmentation
def test_vectorised_autoaugment_ops_match_torchvision():
    """Each op, applied with a per-image magnitude, equals torchvision.transforms.v2.functional up to rounding."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from vitkit.data.autoaugment import _apply

    with np.load(DATA / "cifar10" / "test.npz") as npz:
        x = torch.from_numpy(npz["images"][:12]).permute(0, 3, 1, 2).contiguous()
    nearest = dict(interpolation=InterpolationMode.NEAREST)
    cases = [
        ("brightness", 0.6, lambda t: TF.adjust_brightness(t, 1.6)),
        ("color", -0.8, lambda t: TF.adjust_saturation(t, 0.2)),
        ("contrast", 0.7, lambda t: TF.adjust_contrast(t, 1.7)),
        ("sharpness", 0.9, lambda t: TF.adjust_sharpness(t, 1.9)),
        ("posterize", 3, lambda t: TF.posterize(t, 3)), ("solarize", 100, lambda t: TF.solarize(t, 100)),
        ("autocontrast", 0, TF.autocontrast), ("equalize", 0, TF.equalize),
    ]
    for op, m, reference in cases:
        ours = _apply(op, x.float(), torch.full((12,), float(m)), None, torch.zeros(1, 3, 1, 1))
        diff = (ours - reference(x).float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.6, op
    geometric = [(0, 0.3, dict(angle=0.0, translate=[0, 0], shear=[16.699244, 0.0])),
                 (1, -0.3, dict(angle=0.0, translate=[0, 0], shear=[0.0, -16.699244])),
                 (2, 5.0, dict(angle=0.0, translate=[5, 0], shear=[0.0, 0.0])),
                 (3, -7.0, dict(angle=0.0, translate=[0, -7], shear=[0.0, 0.0])),
                 (4, -30.0, dict(angle=30.0, translate=[0, 0], shear=[0.0, 0.0]))]  # TF's angle is clockwise
    fill = torch.tensor([100.0, 120.0, 140.0]).view(1, 3, 1, 1)
    for op, m, kw in geometric:
        ours = _apply("geometric", x.float(), torch.full((12,), m), torch.full((12,), op), fill)
        reference = TF.affine(x, scale=1.0, fill=[100.0, 120.0, 140.0], **nearest, **kw)
        assert torch.equal(ours, reference.float()), op


def test_autoaugment_changes_images_deterministically():
    from vitkit.data.autoaugment import AutoAugmenter
    from vitkit.data.sampling import rng

    with np.load(DATA / "cifar10" / "test.npz") as npz:
        x = torch.from_numpy(npz["images"][:64]).permute(0, 3, 1, 2).contiguous()
    for policy in ("randaugment", "trivialaugment"):
        aug = AutoAugmenter(policy, (32, 32), num_ops=2, magnitude=9)
        choices = aug.draw(rng(7), 64)
        out = aug.apply(x, choices)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(out, aug.apply(x, choices))
        changed = (out != x).flatten(1).any(1)
        identity = torch.from_numpy((choices[:, :, 0] == 0).all(0))  # every layer picked the identity
        assert not changed[identity].any() and changed.float().mean() > 0.75


def test_the_eval_transform_matches_the_validation_stream(odd_tree):
    from vitkit.data import EvalTransform

    data = build_data(DataConfig(f"folder:{odd_tree}", img_size=16, batch_size=2, num_workers=0), device="cpu")
    images, _ = next(iter(data.val.batches()))
    transform = EvalTransform(data.preprocessing, 3)
    single = transform.normalize(transform.load(odd_tree / "val" / "cat" / "a.png"))
    assert torch.equal(single, images[0])
    gray = EvalTransform(Preprocessing(size=12, mean=(0.5,), std=(0.5,)), 1)
    image = gray.normalize(gray.load(odd_tree / "train" / "cat" / "palette.png"))
    assert image.shape == (1, 12, 12) and -1.0 <= image.min() and image.max() <= 1.0


def test_pipeline_throughput_reports_one_rate_per_repeat():
    from vitkit.data.throughput import pipeline_throughput

    clock = iter(range(1000))  # a clock that advances 0.5 s per reading: each repeat is timed as 0.5 s
    rates = pipeline_throughput(cfg("mnist", samples_per_class=20, batch_size=16), steps=3, repeats=2,
                                clock=lambda: 0.5 * next(clock))
    assert rates == [96.0, 96.0]  # 3 batches of 16 images (after one warm-up batch) per 0.5 s, once per repeat


# ------------------------------------------------------------------------------ geometry with known answers
def test_crop_flip_and_crop_resize_known_answers():
    from vitkit.data.augment import crop_resize, pad_crop

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    centre = torch.tensor([[2, 2], [2, 2]])
    assert torch.equal(pad_crop(x, centre, 2), x)  # the centred window is the image
    flipped = pad_crop(x, centre, 2, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    shifted = pad_crop(x, torch.tensor([[0, 4], [4, 0]]), 2)  # 2 px down-right / up-left, zero fill
    assert torch.equal(shifted[0, :, 2:, :6], x[0, :, :6, 2:]) and shifted[0, :, :2].eq(0).all()
    assert torch.equal(shifted[1, :, :6, 2:], x[1, :, 2:, :6]) and shifted[1, :, :, :2].eq(0).all()
    whole = torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]])
    assert torch.equal(crop_resize(x, whole, 8), x)  # the full box at the same size is the identity
    quarter = crop_resize(x, torch.tensor([[4, 4, 4, 4], [0, 0, 4, 4]]), 4)
    assert torch.equal(quarter[0], x[0, :, 4:, 4:]) and torch.equal(quarter[1], x[1, :, :4, :4])


def test_folder_random_resized_crop_box_survives_reduced_jpeg_decoding(tmp_path):
    from vitkit.data.augment import sample_boxes
    from vitkit.data.sampling import SAMPLE, rng

    gen = np.random.default_rng(0)
    pixels = np.zeros((512, 512, 3), dtype=np.uint8)
    pixels[:, 256:] = 255
    pixels[::64] = gen.integers(0, 255, (8, 512, 3))  # some texture so that a shifted box would show
    path = tmp_path / "train" / "a" / "half.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path, quality=95)
    split = scan_split(tmp_path / "train", ["a"])
    for scale in ((1.0, 1.0), (0.2, 0.3)):
        ds = FolderImages(split, 32, "random_resized_crop", seed=4, scale=scale)
        ours = ds[(0, 2, 7)][0].float()
        top, left, h, w = sample_boxes(rng(SAMPLE, 4, 2, 7), 1, 512, 512, scale, (3 / 4, 4 / 3))[0]
        full = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR,
                                                      box=(left, top, left + w, top + h))
        reference = torch.from_numpy(np.asarray(full, dtype=np.float32).copy()).permute(2, 0, 1)
        assert (ours - reference).abs().mean() < 6  # same box; only the decoding scale differs


def test_in_chans_repeats_gray_or_makes_luma():
    rgb_model = build_data(cfg("mnist", in_chans=3, samples_per_class=5, batch_size=10, crop="none", hflip=False),
                           device="cpu")
    assert rgb_model.in_chans == 3 and rgb_model.mean == (0.1307,) * 3
    images, _ = next(iter(rgb_model.train.batches(0)))
    assert images.shape == (10, 3, 28, 28) and torch.equal(images[:, 0], images[:, 2])
    assert next(iter(rgb_model.val.batches()))[0].shape[1] == 3
    gray_model = build_data(cfg("cifar10", in_chans=1, samples_per_class=5, batch_size=10), device="cpu")
    images, _ = next(iter(gray_model.train.batches(0)))
    assert gray_model.in_chans == 1 and images.shape == (10, 1, 32, 32) and len(gray_model.mean) == 1
    assert 0.4 < gray_model.mean[0] < 0.55 and abs(images.mean().item()) < 0.5
