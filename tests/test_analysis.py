"""Tests of vitkit.analysis with known answers, the report's links, and the CLI on real CIFAR-10 images."""

from __future__ import annotations

import itertools
import json
import math
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitkit import ViTConfig, build_model
from vitkit.analysis import (
    analyze_model,
    attention_rollout,
    class_attention,
    grid_mean_distance,
    mean_attention_distance,
    patch_embedding_pca,
    patch_projection_weight,
    position_embedding_similarity,
    rollout_matrix,
    similarity_by_distance,
    write_report,
)
from vitkit.analysis.inputs import load_images, prepare_images
from vitkit.cli import main

DATA_DIR = Path(os.environ.get("VITKIT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
TINY = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=4, mlp_dim=64)


def _with_class_token(patch_attention: np.ndarray) -> np.ndarray:
    """Embed a (M, M) patch-to-patch attention into (1, 1, 1 + M, 1 + M) with a class token that
    attends to itself."""
    m = patch_attention.shape[0]
    full = np.zeros((1 + m, 1 + m))
    full[0, 0] = 1.0
    full[1:, 1:] = patch_attention
    return full[None, None]


# ------------------------------------------------------------------------- mean attention distance
def test_self_attention_has_zero_distance():
    grid = (3, 5)
    attn = _with_class_token(np.eye(15))
    assert mean_attention_distance(attn, grid, patch_size=16).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_paid_to_class_token_is_left_out():
    # Half of each patch's attention goes to the class token, half to itself: still distance 0.
    attn = _with_class_token(0.5 * np.eye(4))
    attn[0, 0, 1:, 0] = 0.5
    assert mean_attention_distance(attn, (2, 2), patch_size=8).item() == pytest.approx(0.0, abs=1e-12)


def _brute_force_mean_distance(rows: int, cols: int, patch_size: float) -> float:
    cells = list(itertools.product(range(rows), range(cols)))
    return sum(patch_size * math.hypot(a[0] - b[0], a[1] - b[1]) for a in cells for b in cells) / len(cells) ** 2


@pytest.mark.parametrize("grid", [(2, 2), (3, 5), (7, 7), (14, 14)])
def test_uniform_attention_gives_the_grid_mean_distance(grid):
    n = 1 + grid[0] * grid[1]
    attn = np.full((2, 3, n, n), 1.0 / n)  # uniform over all tokens, class token included
    expected = _brute_force_mean_distance(*grid, patch_size=16)
    got = mean_attention_distance(attn, grid, patch_size=16)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert grid_mean_distance(grid, 16) == pytest.approx(expected, rel=1e-10)


def test_uniform_distance_of_a_2x2_grid_by_hand():
    # From any cell: distances 0, 1, 1, sqrt(2) patches.
    assert grid_mean_distance((2, 2), 10) == pytest.approx(10 * (2 + math.sqrt(2)) / 4)


def test_distance_follows_row_major_patch_order():
    # Grid of 2 rows x 3 columns: each top-row patch attends to the patch right below it (index + 3),
    # each bottom-row patch to itself. Half the queries are one patch away: mean = patch_size / 2.
    grid, p = (2, 3), 4.0
    patch_attn = np.zeros((6, 6))
    for q in range(6):
        patch_attn[q, q + 3 if q < 3 else q] = 1.0
    got = mean_attention_distance(_with_class_token(patch_attn), grid, patch_size=p, num_prefix_tokens=1)
    assert got.item() == pytest.approx(p / 2)
    # The same matrix read as a 3 x 2 grid would put index + 3 diagonally (sqrt(2) away): a different answer.
    wrong = mean_attention_distance(_with_class_token(patch_attn), (3, 2), patch_size=p)
    assert wrong.item() != pytest.approx(p / 2)


def test_distance_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="grid_size"):
        mean_attention_distance(np.full((1, 1, 10, 10), 0.1), (4, 4))


# -------------------------------------------------------------------------------- attention maps
def test_rollout_of_identity_attention_keeps_everything_on_the_class_token():
    n = 1 + 6
    identity = np.broadcast_to(np.eye(n), (2, 4, n, n)).copy()
    np.testing.assert_allclose(rollout_matrix([identity]).numpy(), np.broadcast_to(np.eye(n), (2, n, n)))
    maps = attention_rollout([identity], (2, 3))
    assert maps.shape == (2, 2, 3)
    np.testing.assert_allclose(maps, 0.0)  # the class token attends only to itself: no patch contributes


def test_rollout_concentrates_on_the_attended_patch():
    # One layer, every head's class token attends only to patch (1, 2) of a 2 x 3 grid (token 1 + 5).
    n = 7
    attn = np.broadcast_to(np.eye(n), (1, 2, n, n)).copy()
    attn[:, :, 0] = 0.0
    attn[:, :, 0, 6] = 1.0
    maps = attention_rollout([attn], (2, 3))
    expected = np.zeros((1, 2, 3))
    expected[0, 1, 2] = 0.5  # (A + I) / 2: half stays on the class token, half comes from the patch
    np.testing.assert_allclose(maps, expected)


def test_rollout_multiplies_layers_first_to_last_and_averages_heads():
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(5), size=(1, 3, 5)) for _ in range(3)]  # (1, heads, N, N), rows sum to 1
    expected = np.eye(5)
    for attn in layers:
        a = attn[0].mean(axis=0) + np.eye(5)
        expected = (a / a.sum(axis=1, keepdims=True)) @ expected
    np.testing.assert_allclose(rollout_matrix(layers).numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(attention_rollout(layers, (2, 2))[0].ravel(), expected[0, 1:], rtol=1e-6)


def test_class_attention_and_models_without_class_token():
    rng = np.random.default_rng(1)
    attn = rng.dirichlet(np.ones(5), size=(2, 3, 5))
    np.testing.assert_allclose(class_attention(attn, (2, 2)), attn[:, :, 0, 1:].reshape(2, 3, 2, 2), rtol=1e-6)
    no_prefix = rng.dirichlet(np.ones(4), size=(1, 2, 4))
    np.testing.assert_allclose(class_attention(no_prefix, (2, 2), num_prefix_tokens=0),
                               no_prefix.mean(axis=2).reshape(1, 2, 2, 2), rtol=1e-6)


# ---------------------------------------------------------------------------- position embeddings
def _sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
    """The 2-D sine-cosine table of MAE/"Simple ViT": half the channels encode the row, half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    parts = []
    for coord in (yy.ravel(), xx.ravel()):
        angles = coord[:, None] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1)


def _neighbours_beat_far_positions(similarity: np.ndarray) -> bool:
    rows, cols = similarity.shape[:2]
    for r, c in itertools.product(range(rows), range(cols)):
        near = [similarity[r, c, r + dr, c + dc] for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))
                if 0 <= r + dr < rows and 0 <= c + dc < cols]
        far = [similarity[r, c, i, j] for i, j in itertools.product(range(rows), range(cols))
               if math.hypot(i - r, j - c) >= 3]
        if min(near) <= max(far):
            return False
    return True


def test_sincos_position_table_shows_2d_structure():
    rows, cols = 7, 7
    table = np.concatenate([np.zeros((1, 64)), _sincos_2d(rows, cols, 64)])[None]  # with a class-token slot
    similarity = position_embedding_similarity(table, (rows, cols), num_prefix_tokens=1)
    assert similarity.shape == (rows, cols, rows, cols)
    np.testing.assert_allclose(np.einsum("ijij->ij", similarity), 1.0, rtol=1e-6)  # each tile peaks at itself
    assert _neighbours_beat_far_positions(similarity)
    _, by_distance = similarity_by_distance(similarity)
    assert np.all(np.diff(by_distance[:4]) < 0)  # similarity falls with distance
    # Row/column structure: positions sharing a row or column are more similar than those sharing neither.
    same_line, other = [], []
    for (r, c), (i, j) in itertools.product(itertools.product(range(rows), range(cols)), repeat=2):
        if (r, c) != (i, j):
            (same_line if r == i or c == j else other).append(similarity[r, c, i, j])
    assert np.mean(same_line) > np.mean(other) + 0.05


def test_random_position_table_has_no_2d_structure():
    table = np.random.default_rng(0).normal(size=(1, 1 + 49, 64))
    similarity = position_embedding_similarity(table, (7, 7))
    assert not _neighbours_beat_far_positions(similarity)


def test_position_similarity_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid_size"):
        position_embedding_similarity(np.zeros((1, 17, 8)), (3, 3))


# ------------------------------------------------------------------------------------- filters PCA
def test_pca_recovers_a_planted_low_rank_structure():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(48, 3)))[0].T  # 3 orthonormal directions in 3*4*4 pixel space
    scales = np.array([5.0, 3.0, 2.0])
    filters = (rng.normal(size=(200, 3)) * scales) @ basis + 0.01 * rng.normal(size=(200, 48)) + 0.7
    pca = patch_embedding_pca(filters.reshape(200, 3, 4, 4), num_components=28)
    assert pca.components.shape == (28, 3, 4, 4)
    top = pca.components[:3].reshape(3, 48)
    # The top 3 components span the planted subspace: projecting them onto it loses almost nothing.
    residual = top - (top @ basis.T) @ basis
    assert np.abs(residual).max() < 0.01
    assert pca.explained_variance_ratio[:3].sum() > 0.99
    assert np.all(np.diff(pca.explained_variance_ratio) <= 1e-7)
    flat = pca.components.reshape(28, 48)
    np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-5)


def test_pca_caps_components_at_the_rank_bound():
    pca = patch_embedding_pca(np.random.default_rng(0).normal(size=(10, 1, 2, 2)), num_components=28)
    assert pca.components.shape == (4, 1, 2, 2)


class _ConvStem(nn.Module):
    """A hybrid-like stem: a small CNN then a 1x1 projection, stride 8."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.stride = 8
        self.backbone = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        self.proj = nn.Conv2d(16, dim, kernel_size=1)

    def forward(self, images):
        x = self.proj(self.backbone(images))
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


def test_models_without_a_plain_patch_projection_skip_the_filters():
    model = build_model(TINY)
    assert patch_projection_weight(model) is model.patch_embed.proj.weight
    model.patch_embed = _ConvStem(TINY.embed_dim)
    assert patch_projection_weight(model) is None
    analysis = analyze_model(model, torch.randn(3, 3, 32, 32), num_show=2)
    assert analysis.filters is None and "not a plain" in analysis.notes["filters"]
    assert analysis.position_similarity is not None


# ------------------------------------------------------------------------------- model and report
def test_analyze_model_uses_the_models_attention():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    images = torch.randn(5, 3, 32, 32)
    analysis = analyze_model(model, images, num_show=3, batch_size=2)
    maps = model.attention_maps(images)
    expected = np.stack([mean_attention_distance(m, (4, 4), 8.0) for m in maps], axis=1).mean(axis=0)
    np.testing.assert_allclose(analysis.mean_distance, expected, rtol=1e-5)
    np.testing.assert_allclose(analysis.rollout, attention_rollout([m[:3] for m in maps], (4, 4)), rtol=1e-5, atol=1e-7)
    assert analysis.last_layer_attention.shape == (3, 4, 4, 4)
    assert analysis.filters.components.shape == (28, 3, 8, 8)
    assert analysis.uniform_distance == pytest.approx(_brute_force_mean_distance(4, 4, 8.0))


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_references_every_file_it_writes(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY)
    analysis = analyze_model(model, torch.randn(4, 3, 32, 32), num_show=3)
    display = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    written = write_report(analysis, tmp_path, display_images=display, titles=["a", "b", "c"])
    assert written[-1] == tmp_path / "index.html"
    links = _Links()
    links.feed((tmp_path / "index.html").read_text())
    assert links.targets, "index.html links nothing"
    for target in links.targets:
        assert "://" not in target and not target.startswith("/"), f"{target} would need a server or this machine"
        assert (tmp_path / target).is_file(), f"index.html references missing {target}"
    promised = {p.name for p in written} - {"index.html"}
    assert promised <= set(links.targets)
    assert {p for p in promised if p.endswith(".png")} == {
        "patch_embedding_pca.png", "position_embedding_similarity.png", "mean_attention_distance.png",
        "attention_rollout.png", "attention_heads_last_layer.png"}
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all((tmp_path / name).is_file() for name in summary["files"])
    assert len(summary["mean_attention_distance_by_layer"]) == TINY.depth


# ------------------------------------------------------------------------------------------- inputs
def _pets(root: Path, val_sizes=((40, 20), (16, 16))) -> Path:
    from PIL import Image

    for split, sizes in (("train", ((8, 8), (8, 8))), ("val", val_sizes)):
        for cls, size, colour in zip(("cat", "dog"), sizes, ((255, 0, 0), (0, 0, 255))):
            (root / "pets" / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(root / "pets" / split / cls / "a.png")
    return root / "pets"


def test_prepare_images_resizes_and_normalises(tmp_path):
    _pets(tmp_path, val_sizes=((32, 32), (32, 32)))
    sample = load_images("pets", 2, data_dir=tmp_path)
    model = build_model(TINY.replace(img_size=48, patch_size=8))
    inputs, display = prepare_images(sample, model)
    assert inputs.shape == (2, 3, 48, 48) and display.shape == (2, 48, 48, 3)
    np.testing.assert_allclose(inputs[0, 0], 1.0, atol=1e-6)  # red, default (x - 0.5) / 0.5
    np.testing.assert_allclose(inputs[0, 1:], -1.0)
    custom = build_model(TINY.replace(extra={"preprocess": {"mean": [0.25, 0.5, 0.75], "std": [0.5, 0.5, 0.5]}}))
    assert (custom.config.preprocessing().mean, custom.config.preprocessing().std) == ((0.25, 0.5, 0.75),
                                                                                       (0.5, 0.5, 0.5))
    inputs, _ = prepare_images(sample, custom)
    np.testing.assert_allclose(inputs[1, :, 0, 0], [-0.5, -1.0, 0.5])  # blue


def test_load_images_from_class_folders_resizes_and_crops(tmp_path):
    _pets(tmp_path)
    sample = load_images("pets", 5, data_dir=tmp_path)
    assert len(sample.split) == 2 and sample.class_names == ["cat", "dog"]
    assert sample.labels.tolist() == [0, 1]
    _, display = prepare_images(sample, build_model(TINY.replace(img_size=8, patch_size=4)))
    assert display.shape == (2, 8, 8, 3)
    assert tuple(display[0, 4, 4]) == (255, 0, 0) and tuple(display[1, 4, 4]) == (0, 0, 255)


def _cifar_classes() -> list[str]:
    return json.loads((DATA_DIR / "cifar10" / "meta.json").read_text())["classes"]


def _need_cifar() -> None:
    if not (DATA_DIR / "cifar10" / "test.npz").is_file():
        pytest.fail(f"CIFAR-10 not found under {DATA_DIR} (set VITKIT_DATA)")


def test_load_images_draws_a_seeded_sample_of_cifar():
    _need_cifar()
    a = load_images("cifar10", 10, data_dir=DATA_DIR, seed=3)
    b = load_images("cifar10", 10, data_dir=DATA_DIR, seed=3)
    assert a.split.images.shape == (10, 32, 32, 3) and a.split.images.dtype == np.uint8
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.class_names[:2] == ["airplane", "automobile"]
    with np.load(DATA_DIR / "cifar10" / "test.npz") as data:
        np.testing.assert_array_equal(a.split.images, data["images"][a.indices])
        np.testing.assert_array_equal(a.labels, data["labels"][a.indices])


@pytest.mark.slow
def test_cli_analyze_on_real_cifar_images(tmp_path, capsys):
    _need_cifar()
    torch.manual_seed(0)
    preprocess = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    model_dir = build_model(TINY.replace(extra={"preprocess": preprocess})).save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    rc = main(["analyze", str(model_dir), "--dataset", "cifar10", "--out", str(out), "--images", "12",
               "--show", "4", "--data-dir", str(DATA_DIR)])
    assert rc == 0
    assert str(out / "index.html") in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 12 and summary["data_source"].endswith("cifar10/test.npz")
    assert summary["normalisation"]["mean"] == [0.49, 0.48, 0.45]
    maps = json.loads((out / "attention_maps.json").read_text())
    assert len(maps["images"]) == 4 and maps["images"][0]["label"] in _cifar_classes()
    rows = (out / "mean_attention_distance.csv").read_text().splitlines()
    assert rows[0].startswith("layer,head") and len(rows) == 1 + TINY.depth * TINY.num_heads


def test_cli_names_the_bad_input(tmp_path, capsys):
    assert main(["analyze", "no_such_model", "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["analyze", "vit_mnist_patch4_28", "--random-init", "--dataset", "no_such_set", "--out",
                 str(tmp_path), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_set" in err and str(tmp_path) in err
