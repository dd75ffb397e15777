"""The one config engine under every config dataclass: type checks from the hints, Literal types as the
only list of allowed values, did-you-mean for unknown keys, the typed stem section (read from the old
dict form), and config.json values checked when a model is loaded, each error one line naming the file
and the field (issue 16, item 10)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from PIL import Image

import vitkit
from vitkit.cli import main as cli_main
from vitkit.config import StemConfig, ViTConfig
from vitkit.config_engine import ConfigError, allowed_values, field_types, from_mapping, to_plain
from vitkit.data import DataConfig
from vitkit.models.resnet import BiTSpec, ResNetConfig
from vitkit.train.config import FinetuneConfig, OptimConfig, TrainConfig

CONFIG_CLASSES = [ViTConfig, StemConfig, ResNetConfig, BiTSpec, DataConfig, OptimConfig, FinetuneConfig, TrainConfig]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=3, depth=1, embed_dim=48, num_heads=3,
                                mlp_dim=96)
    return model.save_pretrained(tmp_path / "model")


def _edit(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("field, value, message", [
    ("embed_dim", "abc", "embed_dim must be an integer, got 'abc' (a string)"),
    ("depth", -3, "depth must be >= 1, got -3"),
    ("num_heads", [3], "num_heads must be an integer, got [3] (a list)"),
    ("mlp_dim", 0, "mlp_dim must be >= 1, got 0"),
    ("img_size", [32, "x"], "img_size must be an integer or a list of 2 integers, got [32, 'x'] (a list)"),
    ("global_pool", "mean",
     "global_pool must be one of token, avg, max, avgmax, map, '' (none); got 'mean' (a string)"),
    ("drop_path_rate", 1.5, "drop_path_rate must be in [0, 1), got 1.5"),
    ("qkv_bias", "yes", "qkv_bias must be true or false, got 'yes' (a string)"),
    ("stem", {"layers": "3"}, "stem.layers must be a list of integers, got '3' (a string)"),
    ("stem", {"layres": [3]}, "unknown config key stem.layres (did you mean stem.layers?)"),
    ("embed_dimm", 48, "unknown config key embed_dimm (did you mean embed_dim?)"),
])
def test_config_json_values_are_checked_at_load_naming_file_and_field(model_dir, field, value, message):
    path = _edit(model_dir, **{field: value})
    with pytest.raises(vitkit.checkpoint.CheckpointError) as error:
        vitkit.load_model(model_dir)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_a_bad_config_json_is_one_line_from_the_cli(model_dir, tmp_path, capsys):
    _edit(model_dir, embed_dim="abc")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    assert cli_main(["predict", str(model_dir), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vitkit predict: error: {model_dir / 'config.json'}: embed_dim must be an integer, got 'abc' "
                   "(a string)")
    (model_dir / "config.json").write_text("[1, 2]")
    assert cli_main(["predict", str(model_dir), str(image)]) == 2
    assert "config.json: expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_every_literal_field_rejects_other_values_by_its_type_alone(cls):
    """No config class re-checks its Literal fields by hand: the type is the list, the engine checks it,
    for configs built in Python as for those read from files."""
    base = {"layers": [1]} if cls is BiTSpec else {}
    literals = {name: hint for name, hint in field_types(cls).items() if allowed_values(hint)}
    for name, hint in literals.items():
        shown = ", ".join("'' (none)" if v == "" else str(v) for v in allowed_values(hint))
        conv_only = cls is StemConfig and name in ("downsample", "act")
        kind = {"type": "conv", "channels": (8,)} if conv_only else {}
        with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {shown}")):
            cls(**base, **kind, **{name: "no-such-value"})
        for value in allowed_values(hint):
            if value is not None and not (cls is StemConfig and value == "conv"):
                assert getattr(cls(**base, **kind, **{name: value}), name) == value


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_unknown_keys_get_a_did_you_mean_in_every_config(cls):
    name = next(f.name for f in dataclasses.fields(cls) if len(f.name) > 4)
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    with pytest.raises(ConfigError, match=rf"f\.yaml: unknown config key {typo} \(did you mean {name}\?\)"):
        from_mapping(cls, {typo: 1}, source="f.yaml")


def test_train_config_model_section_is_checked_against_the_models_config():
    with pytest.raises(ConfigError, match=r"model\.depth must be an integer, got 'six'"):
        TrainConfig.from_dict({"model": {"name": "vit_tiny_patch4_32", "depth": "six"}})
    with pytest.raises(ConfigError, match=r"unknown config key model\.dept \(did you mean model\.depth\?\)"):
        TrainConfig.from_dict({"model": {"name": "vit_tiny_patch4_32", "dept": 6}})
    with pytest.raises(ConfigError, match=r"model\.name: unknown model 'vit_tiny_patch4_23'; did you mean"):
        TrainConfig.from_dict({"model": "vit_tiny_patch4_23"})
    with pytest.raises(ConfigError, match=r"model\.block must be one of basic, bottleneck"):
        TrainConfig.from_dict({"model": {"name": "resnet20_cifar", "block": "wide"}})
    cfg = TrainConfig.from_dict({"model": {"name": "vit_tiny_patch4_32", "drop_path_rate": "1e-1"}})
    assert cfg.model == {"name": "vit_tiny_patch4_32", "drop_path_rate": 0.1}  # YAML 1.1 reads 1e-1 as text


def test_stem_is_typed_and_keeps_the_compact_dict_form_in_config_json(tmp_path):
    model = vitkit.create_model("vit_convstem_cifar_32", depth=1)
    assert model.config.stem == StemConfig(type="conv", channels=(32, 64, 128), strides=(1, 2, 2))
    written = json.loads((model.save_pretrained(tmp_path / "m") / "config.json").read_text())
    assert written["stem"] == {"type": "conv", "channels": [32, 64, 128], "strides": [1, 2, 2]}
    assert vitkit.load_model(tmp_path / "m").config.stem == model.config.stem
    hybrid = ViTConfig(img_size=32, patch_size=1, num_classes=10, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                       stem={"layers": [1], "widths": [64], "stem_stride": 4})
    assert hybrid.stem.type == "bit" and hybrid.stem.layers == (1,) and hybrid.stem.stem_pool is None
    assert hybrid.to_dict()["stem"] == {"layers": [1], "widths": [64], "stem_stride": 4}
    assert ViTConfig.from_dict(hybrid.to_dict()) == hybrid


def test_configs_round_trip_through_plain_values():
    for config in (TrainConfig(), DataConfig(rrc_scale=(0.3, 1.0)), OptimConfig(betas=(0.9, 0.95)),
                   vitkit.get_model_config("vit_hybrid_cifar_32"), ResNetConfig(layers=[1, 1], widths=[8, 16])):
        plain = config.to_dict() if hasattr(config, "to_dict") else to_plain(config)
        assert json.loads(json.dumps(plain)) == plain
        assert from_mapping(type(config), plain) == config
