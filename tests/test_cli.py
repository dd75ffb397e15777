"""The command line as a newcomer meets it (issue 25): it starts fast (it parses, then imports the command it
runs), it has --version, and --device means the same, with the same default, for every command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit import cli
from vitkit.version import __version__

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_vitkit_and_the_parser_import_neither_torch_nor_matplotlib():
    """Before: ``import vitkit`` imported every subsystem, matplotlib included, and ``vitkit --help`` took 7-22 s."""
    result = _python("import sys, vitkit, vitkit.cli\n"
                     "vitkit.cli.build_parser()\n"
                     "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'timm', "
                     "'transformers', 'huggingface_hub', 'numpy'})\n"
                     "print(','.join(heavy) or 'none')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_help_and_version_exit_without_importing_torch():
    code = ("import sys\nfrom vitkit.cli import main\n"
            "for argv in (['--help'], ['--version'], ['train', '--help'], ['predict', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
            "print('torch' in sys.modules)")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")
    assert f"vitkit {__version__}" in result.stdout


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vitkit {__version__}"


def test_lazy_package_names_are_the_real_objects():
    import vitkit
    from vitkit.resolver import create_model, load_model

    assert vitkit.load_model is load_model and vitkit.from_pretrained is load_model
    assert vitkit.create_model is create_model
    assert set(vitkit.__all__) <= set(dir(vitkit))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        vitkit.nonsense  # noqa: B018


def test_convert_format_choices_are_the_converters():
    from vitkit.convert.detect import ALIASES, FORMATS

    parser = cli.build_parser()
    convert = _subparsers(parser)["convert"]
    to = next(a for a in convert._actions if a.dest == "to")
    assert sorted(to.choices) == sorted(set(FORMATS) | set(ALIASES))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_device_flag_has_one_default_the_library_resolves():
    """Before: ``cpu`` for predict, analyze and fewshot, ``auto`` for eval and bench, ``auto`` in train's config."""
    import torch

    from vitkit.runtime import DEFAULT_DEVICE, resolve_device
    from vitkit.train import TrainConfig

    defaults = {}
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if action.dest == "device":
                defaults[name] = action.default
    assert set(defaults) == {"analyze", "bench", "eval", "fewshot", "predict"}
    assert set(defaults.values()) == {None}  # each leaves it to vitkit.runtime.resolve_device
    assert TrainConfig().device == DEFAULT_DEVICE == "auto"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device 'gpu'"):
        resolve_device("gpu")


@pytest.fixture
def tiny_model_dir(tmp_path):
    import vitkit

    model = vitkit.create_model("vit_mini_patch4_32", depth=1, num_classes=10)
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_device_auto_works_for_predict_fewshot_and_analyze(tiny_model_dir, tmp_path, data_root, capsys, one_thread):
    """Before: ``--device auto`` went to torch as a string: a raw traceback and exit 1 for these three."""
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    assert cli.main(["predict", str(tiny_model_dir), str(image), "--device", "auto", "--top-k", "1"]) == 0
    assert cli.main(["fewshot", str(tiny_model_dir), "--dataset", "cifar10", "--data-dir", str(data_root),
                     "--shots", "1", "--seeds", "1", "--max-train", "40", "--max-test", "20",
                     "--device", "auto"]) == 0
    assert cli.main(["analyze", str(tiny_model_dir), "--dataset", "cifar10", "--data-dir", str(data_root),
                     "--images", "4", "--show", "2", "--out", str(tmp_path / "report"), "--device", "auto"]) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(tiny_model_dir), str(image), "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vitkit predict: error: device 'gpu': not a device; use auto, cpu, cuda, cuda:N or mps"


def _closed_port() -> int:
    """A local TCP port nothing listens on: connecting to it is refused at once, as on a machine without network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_download_exits_1_fast_leaves_nothing_behind_and_predict_agrees(tmp_path):
    """Before: offline, predict printed ten "Retrying in 8s" lines of huggingface_hub and exited 2 after 24-48 s;
    ``vitkit download`` exited 1 and advised running ``vitkit download``; a failed ``vitkit data download
    cifar100`` left an empty cifar100/raw. Real commands, with the Hub and the data server unreachable."""
    import time

    port = _closed_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "VITKIT_CACHE": str(tmp_path / "vk"), "OMP_NUM_THREADS": "1",
           # torchvision's data server through a proxy that refuses: no byte leaves the machine
           "HTTPS_PROXY": f"http://127.0.0.1:{port}", "https_proxy": f"http://127.0.0.1:{port}",
           "HTTP_PROXY": f"http://127.0.0.1:{port}", "http_proxy": f"http://127.0.0.1:{port}",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for name in ("HF_HUB_OFFLINE", "VITKIT_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)

    def vitkit(*args: str) -> tuple[int, str, float]:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vitkit", *args], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        return proc.returncode, proc.stderr, time.perf_counter() - start

    code, err, seconds = vitkit("predict", "google/vit-base-patch16-224", str(image))
    assert code == 1, err
    assert "Retrying" not in err and err.strip().count("\n") == 0, err
    assert "google/vit-base-patch16-224" in err and "cannot be reached" in err and "vitkit download" in err
    assert seconds < 20, f"{seconds:.1f} s"  # a probe of 3 s at most, then the cache; startup is the rest

    code, err, _ = vitkit("download", "google/vit-base-patch16-224")
    assert code == 1, err
    assert "Retrying" not in err and err.strip().count("\n") == 0, err
    assert "vitkit download" not in err.removeprefix("vitkit download: error:"), err  # no circular advice

    code, err, _ = vitkit("data", "download", "cifar100", "--data-dir", str(tmp_path / "data"))
    assert code == 1, err
    assert err.startswith("vitkit data download: error: downloading cifar100") and "Traceback" not in err, err
    assert not (tmp_path / "data" / "cifar100").exists()  # before: an empty cifar100/raw stayed
