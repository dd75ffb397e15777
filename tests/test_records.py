"""Config records, one engine and one way (issue 25): one reader of JSON objects, one to_dict style."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitkit.checkpoint import CheckpointError, read_config
from vitkit.config import ViTConfig
from vitkit.data.sources import read_meta
from vitkit.fileio import read_json_object

SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"


def test_one_reader_of_json_objects():
    """Before: five copies of "read JSON, check it is an object", each with its own message."""
    copies = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "not valid JSON" in p.read_text()]
    assert copies == ["cli.py", "fileio.py"]  # cli.py: a flag's value (--stem '{...}'), not a file


@pytest.mark.parametrize("text, message", [("{oops", "not valid JSON"), ("[1, 2]", "expected .*, got list")])
def test_every_json_record_is_read_with_the_same_errors(tmp_path, text, message):
    directory = tmp_path / "d"
    directory.mkdir()
    for name in ("config.json", "meta.json", "record.json"):
        (directory / name).write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        read_config(directory)
    with pytest.raises(ValueError, match=rf"meta\.json: {message}"):
        read_meta(directory)
    with pytest.raises(ValueError, match=rf"record\.json: {message}"):
        ViTConfig.from_json(directory / "record.json")
    with pytest.raises(ValueError, match=rf"record\.json: {message}"):
        read_json_object(directory / "record.json")
    (directory / "record.json").write_text(json.dumps({"a": 1}))
    assert read_json_object(directory / "record.json") == {"a": 1}


def test_every_config_record_becomes_a_mapping_one_way():
    """Before: 6 to_dict styles over 12 dataclasses. Now each config record's to_dict is the engine's to_plain,
    and the compact sections (a hybrid's stem, preprocessing) read and write the mappings they always did."""
    import vitkit
    from vitkit.config import StemConfig
    from vitkit.config_engine import to_plain
    from vitkit.data import DataConfig
    from vitkit.preprocessing import Preprocessing
    from vitkit.train import TrainConfig

    records = [vitkit.get_model_config("vit_base_r50_s16_384"), vitkit.get_model_config("mae_vit_mini_patch4_32"),
               vitkit.get_model_config("t2t_vit_mini_32"), vitkit.get_model_config("resnet20_cifar"),
               StemConfig(type="conv", channels=(8, 16)), Preprocessing(size=32, dataset="cifar10"), DataConfig(),
               TrainConfig()]
    for record in records:
        assert record.to_dict() == to_plain(record), type(record).__name__
        assert json.loads(json.dumps(record.to_dict())) == record.to_dict()  # plain JSON values only
    assert StemConfig(layers=(3, 4, 9)).to_dict() == {"layers": [3, 4, 9]}
    assert StemConfig(type="conv", channels=(8,), strides=(1,)).to_dict() == {"type": "conv", "channels": [8],
                                                                           "strides": [1]}
    assert Preprocessing(size=32).to_dict() == {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                               "crop_pct": 1.0, "interpolation": "bilinear"}
    assert Preprocessing(size=32, crop_mode="squash").to_dict()["crop_mode"] == "squash"
    hybrid = vitkit.get_model_config("vit_base_r50_s16_384")
    assert type(hybrid).from_dict(hybrid.to_dict()) == hybrid


def test_the_model_section_is_typed_by_the_one_config_engine():
    """Before: TrainConfig.model had a second validator (its own unknown-key and did-you-mean code). Now its
    overrides are the model config's fields, checked by the engine's checked_fields, nested sections included."""
    from vitkit.config_engine import ConfigError
    from vitkit.train import TrainConfig

    assert [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "unknown config key" in p.read_text()] == [
        "config_engine.py"]
    with pytest.raises(ConfigError, match=r"^f\.yaml: unknown config key model\.stem\.layerz \(did you mean "
                                          r"model\.stem\.layers\?\)"):
        TrainConfig.from_dict({"model": {"name": "vit_hybrid_cifar_32", "stem": {"layerz": [1]}}}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"^f\.yaml: unknown config key model\.depht \(did you mean model\.depth\?\)"):
        TrainConfig.from_dict({"model": {"name": "mae_vit_mini_patch4_32", "depht": 2}}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"model\.mask_ratio must be a number, got 'x'"):
        TrainConfig.from_dict({"model": {"name": "mae_vit_mini_patch4_32", "mask_ratio": "x"}})
    cfg = TrainConfig.from_dict({"model": {"name": "vit_hybrid_cifar_32", "stem": {"layers": [2]}, "depth": 3}})
    assert cfg.model == {"name": "vit_hybrid_cifar_32", "stem": {"layers": [2]}, "depth": 3}


def test_the_data_configs_evaluation_fields_become_a_preprocessing_record_in_one_place(data_root):
    """Before: three hand conversions of DataConfig's evaluation fields into a Preprocessing record."""
    from vitkit.data import DataConfig, build_data
    from vitkit.preprocessing import Preprocessing

    src = (SRC / "data" / "pipeline.py").read_text()
    assert "Preprocessing(" not in src and src.count("cfg.eval_preprocessing(") >= 3
    cfg = DataConfig("cifar10", img_size=40, eval_crop_pct=0.5, eval_interpolation="bicubic", batch_size=8)
    assert cfg.eval_preprocessing(40, [0.1], [0.2]) == Preprocessing(size=40, mean=(0.1,), std=(0.2,), crop_pct=0.5,
                                                                     interpolation="bicubic", dataset="cifar10")
    data = build_data(cfg, device="cpu")  # an in-memory set: resized, not cropped, with the set's statistics
    assert data.preprocessing == cfg.eval_preprocessing(40, data.mean, data.std, crop_pct=1.0)
