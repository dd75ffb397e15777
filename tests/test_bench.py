"""The benchmark harness: FLOP counts against hand-derived formulas, and a smoke run of the harness
and of ``vitkit bench`` whose JSON must be complete and self-consistent."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

import vitkit
from flop_formulas import vit_forward_flops
from vitkit.bench import BenchSettings, count_flops, format_table, run_benchmark
from vitkit.cli import main

TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64)


def test_attention_flops_are_counted_on_cpu():
    b, h, n, d = 2, 3, 7, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    class SDPA(torch.nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, k, v)

    forward = 2 * 2 * b * h * n * n * d
    assert count_flops(SDPA(), q) == forward
    # backward: dQ, dK, dV need two matmuls' worth each of the forward's two
    assert count_flops(SDPA(), q, train=True) == 3 * forward


def test_vit_flops_equal_the_formula():
    model = vitkit.VisionTransformer(vitkit.ViTConfig(**TINY)).eval()
    images = torch.randn(3, 3, 16, 16)
    expected = vit_forward_flops(**TINY)
    assert count_flops(model, images) == 3 * expected["forward"]
    # backward costs two forwards, except the patch projection: images need no gradient
    train = count_flops(model, images, train=True, loss_fn=lambda out: out.sum())
    assert train == 3 * (3 * expected["forward"] - expected["patch"])
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def _check_stats(stats):
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_harness_result_is_complete_and_consistent(tmp_path):
    seen = []

    def pipeline():  # 4 batches of 6 images: the harness must count 24 images per pass
        for _ in range(4):
            seen.append(1)
            yield torch.zeros(6, 3, 16, 16), torch.zeros(6)

    settings = BenchSettings(model="vit_tiny_patch4_32", batch_size=4, img_size=16, warmup=1, repeats=3,
                             overrides=dict(depth=2, embed_dim=32, num_heads=4, mlp_dim=64, num_classes=5),
                             pipeline_batches=4, matmul_size=256)
    result = run_benchmark(settings, pipelines={"synthetic": pipeline, "self-timed": lambda: [300.0, 100.0, 200.0]})

    expected = vit_forward_flops(**TINY)
    assert result["flops_per_image"]["forward"] == expected["forward"]
    assert result["flops_per_image"]["train"] == 3 * expected["forward"] - expected["patch"]
    assert result["reference_flops_per_image"] == result["flops_per_image"]
    assert result["parity_max_abs_diff"] < 1e-5  # timm built from the same config, same weights
    assert result["optimizer"].startswith("AdamW")
    assert result["machine"]["load_average_1min"]["start"] >= 0
    _check_stats(result["matmul_peak"]["flops_per_s"])

    for impl in ("vitkit", "timm"):
        for mode in ("train", "infer"):
            run = result["runs"][impl][mode]
            for key in ("images_per_s", "step_seconds", "flops_per_s", "fraction_of_peak"):
                _check_stats(run[key])
            per_image = result["flops_per_image"]["train" if mode == "train" else "forward"]
            assert run["images_per_s"]["median"] == pytest.approx(4 / run["step_seconds"]["median"])
            assert run["flops_per_s"]["median"] == pytest.approx(run["images_per_s"]["median"] * per_image)
            assert run["memory_source"] in ("cpu_rss", "cuda_max_allocated")
            assert run["peak_memory_bytes"] >= 0
            assert run["memory_per_image_bytes"] == pytest.approx(run["peak_memory_bytes"] / 4)
    for mode in ("train", "infer"):
        _check_stats(result["ratio_vitkit_over_timm"][mode])

    assert len(seen) == 4 * (3 + 1)  # one warm-up pass and three timed passes of four batches
    pipe = result["pipelines"]["synthetic"]
    _check_stats(pipe["images_per_s"])
    train_rate = result["runs"]["vitkit"]["train"]["images_per_s"]["median"]
    assert pipe["vs_model_train"] == pytest.approx(pipe["images_per_s"]["median"] / train_rate)

    assert result["pipelines"]["self-timed"]["images_per_s"] == {"min": 100.0, "median": 200.0, "max": 300.0}

    json.dumps(result)  # JSON-ready as it is
    table = format_table(result)
    assert "vitkit/timm train" in table and "synthetic" in table


@pytest.mark.parametrize("name", ["vit_convstem_cifar_32", "vit_hybrid_cifar_32"])
def test_reference_of_a_hybrid_is_timms_hybrid_embed_around_the_same_cnn(name):
    from vitkit.bench.reference import reference_twin

    model = vitkit.create_model(name, depth=2).eval()
    reference = reference_twin(model).eval()  # loads vitkit's state dict strictly: same weights
    assert type(reference).__module__.startswith("timm.")
    assert type(reference.patch_embed).__module__.startswith("timm.")  # timm's HybridEmbed, not vitkit's
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(images), model(images), rtol=0, atol=1e-5)
        model.patch_embed.proj.weight.mul_(2.0)  # the reference holds copies: a change to vitkit shows
        assert not torch.allclose(reference(images), model(images), atol=1e-3)


def test_cli_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "vit_tiny_patch4_32", "--batch-size", "2", "--img-size", "16", "--modes", "infer",
                 "--warmup", "1", "--repeats", "2", "--no-reference", "--matmul-size", "256", "--profile",
                 "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["settings"]["modes"] == ["infer"] and result["runs"].keys() == {"vitkit"}
    assert result["ratio_vitkit_over_timm"] == {}
    run = result["runs"]["vitkit"]["infer"]
    # the rates are the timed steps' (2 images each): the fastest step gives the highest rate, and so on
    for fast, slow in (("max", "min"), ("min", "max")):  # (a median of an even count averages two: not exact)
        assert run["images_per_s"][fast] == pytest.approx(2 / run["step_seconds"][slow], rel=1e-9)
        assert run["flops_per_s"][fast] == pytest.approx(run["images_per_s"][fast] * result["flops_per_image"][
            "forward"], rel=1e-9)
    assert 0 < run["step_seconds"]["min"] <= run["step_seconds"]["median"] <= run["step_seconds"]["max"] < 60
    assert run["images_per_s"]["min"] <= run["images_per_s"]["median"] <= run["images_per_s"]["max"]
    cfg = vitkit.get_model_config("vit_tiny_patch4_32")
    expected = vit_forward_flops(16, cfg.patch_size, cfg.in_chans, cfg.num_classes, cfg.embed_dim, cfg.depth,
                                 cfg.mlp_dim)["forward"]
    assert result["flops_per_image"]["forward"] == pytest.approx(expected, rel=0.02)  # matmuls; norms, softmax add
    assert run["memory_per_image_bytes"] == pytest.approx(run["peak_memory_bytes"] / 2)
    ops = result["profile_vitkit"]["infer"]
    assert ops and sum(r["share"] for r in ops) <= 1 + 1e-9
    assert any("linear" in r["op"] or "addmm" in r["op"] for r in ops)  # the GEMMs show up
    assert "vit_tiny_patch4_32" in capsys.readouterr().out


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16; got 'fp8'"):
        BenchSettings(precision="fp8")
    with pytest.raises(ValueError, match=r"modes\[0\] must be one of train, infer; got 'fit'"):
        BenchSettings(modes=("fit",))
    with pytest.raises(ValueError, match="modes must be a non-empty subset of train, infer"):
        BenchSettings(modes=())
    assert main(["bench", "--batch-size", "2", "--pipeline", "nonsense"]) == 2


def test_configure_cpu_sets_threads_and_allocator():
    from vitkit.runtime import configure_cpu, physical_cores

    before = torch.get_num_threads()
    try:
        applied = configure_cpu(threads=1)
        assert applied["threads"] == 1 and torch.get_num_threads() == 1
        assert isinstance(applied["allocator_tuned"], bool)
        assert configure_cpu()["threads"] == physical_cores() >= 1
    finally:
        torch.set_num_threads(before)


def test_ratio_is_reference_time_over_vitkit_time_so_above_one_means_vitkit_is_faster(monkeypatch):
    """Known step times in, known ratios out: each paired round's ratio is timm's seconds over vitkit's."""
    import vitkit.bench.harness as harness

    known = {"vitkit/train": [0.1, 0.2, 0.4], "timm/train": [0.3, 0.4, 0.4],   # rounds: 3x, 2x, 1x
             "vitkit/infer": [0.2, 0.2, 0.2], "timm/infer": [0.1, 0.1, 0.1]}   # vitkit slower: 0.5x

    def timed(candidates, *, warmup, repeats, device=None, calls_per_repeat=1):
        for step in candidates.values():  # run each once per repeat, so the matmul peak has its samples
            for _ in range(repeats):
                step()
        return {name: known.get(name, [1.0] * repeats) for name in candidates}

    monkeypatch.setattr(harness, "time_round_robin", timed)
    settings = BenchSettings(model="vit_tiny_patch4_32", batch_size=2, img_size=16, warmup=1, repeats=3,
                             overrides=dict(depth=1, embed_dim=32, num_heads=4, mlp_dim=64, num_classes=5),
                             matmul_size=128)
    result = run_benchmark(settings)
    assert result["ratio_vitkit_over_timm"]["train"] == pytest.approx({"min": 1.0, "median": 2.0, "max": 3.0})
    assert result["ratio_vitkit_over_timm"]["infer"] == pytest.approx({"min": 0.5, "median": 0.5, "max": 0.5})
    assert result["runs"]["vitkit"]["train"]["images_per_s"]["median"] == pytest.approx(2 / 0.2)
    assert "vitkit/timm train: 2.00x" in format_table(result)


def test_step_memory_sees_a_known_allocation():
    from vitkit.bench.memory import step_peak_memory

    size = 256 * 2**20

    def step():
        block = torch.ones(size // 4, dtype=torch.float32)  # touched: resident, not just reserved
        time.sleep(0.05)  # the sampler runs every 0.5 ms
        return block.sum()

    peak, source = step_peak_memory(step, torch.device("cpu"))
    assert source == "cpu_rss"
    assert 0.9 * size <= peak <= 1.5 * size, peak / 2**20
    small, _ = step_peak_memory(lambda: torch.ones(1024).sum(), torch.device("cpu"))
    assert small < 0.1 * size
