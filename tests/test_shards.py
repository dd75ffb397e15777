"""Streaming shards (issue 24, part 3): ``vitkit data shard`` writes the real Imagenette subset as webdataset tar
shards with a manifest and checksums; ``shards:DIR`` trains and evaluates through the same data layer, split over
ranks and workers, and a run killed mid-epoch resumes on exactly the samples and crops it would have read."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vitkit.cli import main as cli_main
from vitkit.data import DataConfig, build_data, load_split
from vitkit.data.shards import ShardError, locate_shards, parse_shard_size, read_samples, verify_shards
from vitkit.train.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VITKIT_DATA", REPO.parent / "shared" / "data"))
IMAGENETTE = DATA / "imagenette_subset"
SHARD_SIZE = 600_000
TINY = ["--model", "vit_mnist_patch4_28", "--model.patch_size", "8", "--model.embed_dim", "32", "--model.depth", "2",
        "--model.num_heads", "2", "--model.mlp_dim", "64", "--model.in_chans", "3", "--data.img_size", "32",
        "--eval_hflip_tta", "false",
        "--eval_translate_tta", "false", "--device", "cpu", "--data.crop", "random_resized_crop",
        "--data.shuffle_buffer", "50", "--log_every", "1", "--optim.warmup_epochs", "0"]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "imagenette"
    assert cli_main(["data", "shard", f"folder:{IMAGENETTE}", "--out", str(out), "--shard-size", "600KB"]) == 0
    return out


def test_every_image_is_written_once_as_it_was_with_its_class_and_checksums(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    train, val = load_split(f"folder:{IMAGENETTE}", "train"), load_split(f"folder:{IMAGENETTE}", "val")
    assert manifest["classes"] == train.class_names
    assert manifest["splits"]["train"]["samples"] == len(train) == 1000
    assert manifest["splits"]["val"]["samples"] == len(val) == 500
    tars = sorted(shard_dir.glob("*.tar"))
    assert len(tars) == len(manifest["splits"]["train"]["shards"]) + len(manifest["splits"]["val"]["shards"]) > 20
    assert all(p.stat().st_size <= SHARD_SIZE for p in tars)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=shard_dir, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(tars), check.stdout + check.stderr
    assert verify_shards(locate_shards(f"shards:{shard_dir}")) == []
    with tarfile.open(tars[0]) as tar:
        first = sorted(tar.getnames())[:3]
    assert first == ["000000000.cls", "000000000.jpg", "000000000.json"]
    for split, name in ((train, "train"), (val, "val")):
        files = {p.name: (p, label) for p, label in zip(split.files, split.labels)}
        seen = []
        for sample in read_samples(sorted(shard_dir.glob(f"{name}-*.tar"))):
            meta = json.loads(sample["json"])
            path, label = files[meta["source"]]
            assert sample["jpg"] == path.read_bytes()  # the file as it was, not re-encoded
            assert int(sample["cls"]) == meta["label"] == label and meta["class"] == split.class_names[label]
            seen.append(meta["source"])
        assert sorted(seen) == sorted(files), name  # each image once
    # the training images are written in a seeded random order: every shard mixes the classes
    first_shard = [int(s["cls"]) for s in read_samples([shard_dir / "train-000000.tar"])]
    assert len(set(first_shard)) >= 8
    assert manifest["splits"]["train"]["class_counts"] == [100] * 10
    assert parse_shard_size("500MB") == 500_000_000 and parse_shard_size("1GiB") == 1 << 30
    with pytest.raises(ValueError, match="--shard-size"):
        parse_shard_size("lots")


def test_an_in_memory_set_is_written_as_lossless_png_and_read_back_pixel_for_pixel(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "mini"
    root.mkdir()
    for split, n in (("train", 40), ("test", 12)):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                 labels=np.arange(n, dtype=np.int64) % 4)
    (root / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
    assert cli_main(["data", "shard", str(root), "--out", str(tmp_path / "out")]) == 0
    from PIL import Image

    train = load_split(str(root), "train")
    for sample in read_samples([tmp_path / "out" / "train-000000.tar"]):
        index = int(json.loads(sample["json"])["source"].rsplit("[", 1)[1].rstrip("]"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), train.images[index])
        assert int(sample["cls"]) == train.labels[index]
    assert load_split(f"shards:{tmp_path / 'out'}", "val").class_names == ["a", "b", "c", "d"]


def test_a_brace_pattern_names_some_training_shards_and_errors_name_what_is_wrong(shard_dir, capsys):
    some = locate_shards(f"shards:{shard_dir}/train-{{000000..000002}}.tar")
    assert [p.name for p in some.train] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert some.samples("train") == sum(s["samples"] for s in manifest["splits"]["train"]["shards"][:3])
    with pytest.raises(ShardError, match="train-000999.tar is not a training shard"):
        locate_shards(f"shards:{shard_dir}/train-000999.tar")
    assert cli_main(["train", *TINY, "--dataset", f"shards:{shard_dir}/nothing", "--epochs", "1"]) == 2
    assert "shard set" in capsys.readouterr().err
    assert cli_main(["data", "info", f"shards:{shard_dir}"]) == 0
    assert "train 1000  val 500" in capsys.readouterr().out


def _batches(shard_dir: Path, rank: int, world: int, start: int = 0, epoch: int = 0) -> list[torch.Tensor]:
    cfg = DataConfig(f"shards:{shard_dir}", img_size=32, batch_size=25, num_workers=2, shuffle_buffer=50,
                     crop="random_resized_crop")
    data = build_data(cfg, device="cpu", seed=3, rank=rank, world_size=world)
    return [images for images, _ in data.train.batches(epoch, start)]


def test_a_stream_resumed_mid_epoch_gives_the_same_samples_and_crops_and_ranks_read_their_own_shards(shard_dir):
    from vitkit.data.shards import _EpochSamples

    full = _batches(shard_dir, 0, 2)
    assert len(full) == 1000 // 50
    resumed = _batches(shard_dir, 0, 2, start=7)
    assert len(resumed) == len(full) - 7
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[7:]))  # same images, same crops, same flips
    assert not torch.equal(_batches(shard_dir, 0, 2, epoch=1)[0], full[0])  # another epoch, another order
    cfg = DataConfig(f"shards:{shard_dir}", img_size=32, batch_size=25, num_workers=2, shuffle_buffer=50)
    urls = []
    for rank in (0, 1):
        stream = build_data(cfg, device="cpu", seed=3, rank=rank, world_size=2).train
        names = [n for _, (_, _, _, batch) in zip(range(10), _EpochSamples(stream, 0, 0, 1)) for n in batch]
        urls.append({n.rsplit(":", 1)[0] for n in names})
    assert urls[0] and urls[1] and not urls[0] & urls[1]  # each rank reads its own shards


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_without_repeating_or_skipping_samples(shard_dir, tmp_path):
    """SIGTERM to the process group at step >= 12 of 20 (epoch 2 of 2), resume: every logged loss equals the
    uninterrupted run's, bit for bit (same process count and workers)."""
    args = [*TINY, "--dataset", f"shards:{shard_dir}", "--batch_size", "100", "--epochs", "2", "--progress", "none",
            "--data.num_workers", "2", "--out_dir", str(tmp_path), "--ckpt_every_steps", "1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    straight = subprocess.run([sys.executable, "-m", "vitkit", "train", *args, "--run_name", "straight"], env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "train", *args, "--run_name", "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and (
                not metrics.is_file() or metrics.read_text().count('"kind": "train"') < 12):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped = max(r["step"] for r in read_metrics(tmp_path / "killed") if r["kind"] == "train")
    assert 12 <= stopped < 20, stopped  # mid-epoch 2
    assert cli_main(["train", "--resume", str(tmp_path / "killed")]) == 0
    losses = {name: [(r["step"], r["loss"], r["acc"]) for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
              for name in ("straight", "killed")}
    assert len(losses["straight"]) == 20 and losses["killed"] == losses["straight"]
    # and the evaluation commands read the validation shards through the same data layer
    assert cli_main(["eval", str(tmp_path / "killed"), "--dataset", f"shards:{shard_dir}", "--device", "cpu",
                     "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_samples"] == 500


def test_load_split_reads_shards_for_the_evaluation_commands(shard_dir):
    from vitkit.data import EvalTransform
    from vitkit.preprocessing import Preprocessing

    split = load_split(f"shards:{shard_dir}", "val")
    folder = load_split(f"folder:{IMAGENETTE}", "val")
    assert len(split) == 500 and split.class_names == folder.class_names
    transform = EvalTransform(Preprocessing(size=32), 3)
    by_name = {p.name: i for i, p in enumerate(folder.files)}
    first = json.loads(next(iter(read_samples([shard_dir / "val-000000.tar"])))["json"])["source"]
    assert torch.equal(split.resized(transform, 0, 1)[0], folder.resized(transform, by_name[first],
                                                                         by_name[first] + 1)[0])
