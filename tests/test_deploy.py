"""Export to ONNX and torch.export, validated against the eager model on real CIFAR-10 images; int8; the
exported file run by predict, eval and bench. Tiny models, one thread."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vitkit.cli import main
from vitkit.data import load_split
from vitkit.deploy import OnnxModel
from vitkit.models.registry import build_registered
from vitkit.resolver import load_model, load_source

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_registered("vit_cifar_patch4_32", embed_dim=32, depth=2, num_heads=2, mlp_dim=64, head_init="xavier",
                         class_names=CIFAR10)
    model.config = model.config.replace(preprocess=model.config.preprocessing().__class__(
        size=(32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), dataset="cifar10"))
    return model.save_pretrained(tmp_path_factory.mktemp("deploy") / "tiny")


def _cifar(n: int, model) -> torch.Tensor:
    from vitkit.data import eval_transform

    split = load_split("cifar10", "test")
    t = eval_transform(model.config)
    return t(torch.from_numpy(np.array(split.images[:n])).permute(0, 3, 1, 2))


def _export(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv), "--validate-images", "16"])
    out, err = capsys.readouterr()
    return code, out, err


def test_onnx_export_dynamic_batch_metadata_and_standard_ops(model_dir, tmp_path, capsys, one_thread):
    path = tmp_path / "m.onnx"
    code, out, err = _export(capsys, model_dir, "--format", "onnx", "--out", path)
    assert code == 0, err
    assert "onnxruntime fp32: 16 images at 32x32: max |logit diff|" in out and "top-1 agreement 100.00%" in out
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {""}, "only standard ai.onnx ops"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == CIFAR10
    pre = json.loads(meta["preprocessing"])
    assert pre["mean"] == [0.49, 0.48, 0.45] and pre["std"] == [0.25, 0.24, 0.26] and pre["size"] == [32, 32]
    eager = load_model(model_dir).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = _cifar(batch, eager)
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - eager(x).numpy()).max() < 1e-4
    with pytest.raises(ValueError, match="m.onnx: .*dimensions"):  # height and width are not (no --dynamic-size)
        OnnxModel(path)(torch.zeros(1, 3, 40, 40))


def test_dynamic_size_resamples_position_embeddings_in_the_graph(model_dir, tmp_path, capsys, one_thread):
    path = tmp_path / "dyn.onnx"
    code, out, err = _export(capsys, model_dir, "--format", "onnx", "--dynamic-size", "--out", path)
    assert code == 0, err
    assert "at 40x40" in out  # validated at a second size too
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((48, 48), (24, 40), (16, 16)):  # larger, non-square, smaller (antialiased downsampling)
        eager = load_model(model_dir, img_size=size).eval()  # vitkit's own resampling of the table
        x = torch.nn.functional.interpolate(_cifar(3, eager), size=size, mode="bilinear")
        with torch.no_grad():
            ref = eager(x).numpy()
        assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - ref).max() < 1e-4, size


def test_int8_quantizes_linear_layers_and_agrees(model_dir, tmp_path, capsys, one_thread):
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert _export(capsys, model_dir, "--format", "onnx", "--out", fp32)[0] == 0
    code, out, err = _export(capsys, model_dir, "--format", "onnx", "--int8", "--out", int8)
    assert code == 0, err
    assert "onnxruntime int8: 16 images" in out and "top-1 agreement >= 97.0%: ok" in out
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("MatMulInteger") == 2 * 4, ops  # qkv, proj, fc1, fc2 in each of the 2 blocks
    assert ops.count("MatMul") == 2 * 2 + 1, ops  # float: Q K^T and A V in each block, and the head
    assert "Softmax" in ops and "Conv" in ops
    model = OnnxModel(int8)
    assert model.precision == "int8-dynamic" and model.config.class_names == CIFAR10
    eager = load_model(model_dir).eval()
    x = _cifar(64, eager)
    with torch.no_grad():
        ref = eager(x)
    got = model(x)
    assert 0 < (got - ref).abs().max() < 0.5  # quantized: close, not equal
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_a_disagreeing_export_is_not_written_and_exits_4(model_dir, tmp_path, capsys, one_thread):
    path = tmp_path / "m.onnx"
    code, out, err = _export(capsys, model_dir, "--format", "onnx", "--out", path, "--atol", "0")
    assert code == 4
    last = err.strip().splitlines()[-1]
    assert last.startswith("vitkit export: error:") and "max |logit diff|" in last and "nothing written" in last
    assert not path.exists() and not list(tmp_path.iterdir())  # no partial files either


def test_exported_program(model_dir, tmp_path, capsys, one_thread):
    path = tmp_path / "m.pt2"
    code, out, err = _export(capsys, model_dir, "--format", "exported-program", "--out", path)
    assert code == 0, err
    assert "exported program: 16 images" in out
    program = torch.export.load(str(path)).module()
    eager = load_model(model_dir).eval()
    x = _cifar(7, eager)
    with torch.no_grad():
        assert (program(x) - eager(x)).abs().max() < 1e-4
    targets = {str(n.target) for n in torch.export.load(str(path)).graph.nodes}
    assert not any("mkldnn" in t for t in targets)  # the oneDNN fast path steps aside under export


def test_export_errors_are_one_line(model_dir, tmp_path, capsys):
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert "a onnx export is written to a .onnx file" in capsys.readouterr().err
    assert main(["export", str(model_dir), "--format", "exported-program", "--int8", "--out",
                 str(tmp_path / "m.pt2")]) == 2
    assert "--int8" in capsys.readouterr().err
    assert main(["export", str(model_dir), "--format", "onnx"]) == 2
    assert "--out is needed" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_eval_and_bench_take_the_onnx_file(model_dir, tmp_path, capsys, data_root, one_thread):
    path = tmp_path / "m.onnx"
    assert _export(capsys, model_dir, "--format", "onnx", "--out", path)[0] == 0
    resolved = load_source(path)
    assert resolved.source.kind == "onnx" and "ONNX model (fp32, onnxruntime)" in resolved.description
    images = sorted((data_root / "imagenette_subset" / "val").glob("*/*.JPEG"))[:3]
    outputs = []
    for source in (model_dir, path):
        assert main(["predict", str(source), *map(str, images), "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    for eager, exported in zip(*outputs):
        assert [p["label"] for p in eager["top_k"]] == [p["label"] for p in exported["top_k"]]
        assert np.allclose([p["probability"] for p in eager["top_k"]],
                           [p["probability"] for p in exported["top_k"]], atol=1e-5)
    folder = f"folder:{data_root / 'imagenette_subset'}"
    tops = []
    for source in (model_dir, path):
        assert main(["eval", str(source), "--dataset", folder, "--allow-class-mismatch", "--device", "cpu",
                     "--out", str(tmp_path / f"eval-{source.name}")]) == 0
        tops.append(json.loads((tmp_path / f"eval-{source.name}" / "eval.json").read_text())["top1"])
        capsys.readouterr()
    assert tops[0] == tops[1]
    result = subprocess.run([sys.executable, "-m", "vitkit", "bench", str(path), "--batch-size", "4", "--repeats",
                             "2", "--warmup", "1", "--threads", "1", "--matmul-size", "64", "--out",
                             str(tmp_path / "b.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["runtime"] == "onnxruntime (fp32)" and bench["runs"]["vitkit"]["infer"]["images_per_s"]["median"] > 0


def test_the_default_recipes_conv_stem_model_exports(tmp_path, one_thread):
    """The CIFAR-10 recipe's model (a ViT with a conv-BN stem) exports and validates; --dynamic-size says no."""
    from vitkit.deploy import export_model, validation_images
    from vitkit.errors import ExportMismatch

    model = build_registered("vit_convstem_cifar_d4_32", head_init="xavier").eval()
    images = validation_images(model.config, "cifar10", 8)
    report = export_model(model, tmp_path / "c.onnx", format="onnx", validation=images)
    assert report.checks[0][0].max_abs_diff < 1e-4 and report.checks[0][0].top1_agreement == 1.0
    with pytest.raises(ValueError, match="--dynamic-size: supported for plain-patch ViTs only"):
        export_model(model, tmp_path / "d.onnx", format="onnx", validation=images, dynamic_size=True)
    with pytest.raises(ExportMismatch, match="nothing written"):
        export_model(model, tmp_path / "e.onnx", format="onnx", validation=images, atol=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx"]
