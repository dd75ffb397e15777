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


@pytest.mark.slow  # three fresh processes
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


def test_models_build_counts_parameters_on_the_meta_device_row_by_row(capsys):
    """Before: ``vitkit models 'vit_*patch16*' --build`` built ViT-H and friends for real (181 s, no output until
    the end). Now each count is the meta device's (exact, no memory) and each row is printed when counted."""
    import resource

    from vitkit.models.registry import build_registered, count_parameters

    tiny = build_registered("vit_mini_patch4_32")
    assert count_parameters("vit_mini_patch4_32") == sum(p.numel() for p in tiny.parameters())
    assert count_parameters("vit_base_patch16_224") == 86_567_656  # the paper's ViT-B/16 (timm's count)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert count_parameters("vit_huge_patch14_224") == 632_045_800  # 2.5 GB of float32 if built for real
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"the count allocated {grown_mib:.0f} MiB"
    assert cli.main(["models", "vit_*patch16_224", "--build"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert rows and all(len(row.split()) >= 4 for row in rows)
    base = next(row for row in rows if row.startswith("vit_base_patch16_224 "))
    assert "86,567,656" in base


@pytest.mark.parametrize("name, refused", [("vit_convstem_mnist_28", "hf"), ("vit_hybrid_cifar_32", "torchvision")])
def test_a_refused_export_names_only_formats_that_work_for_that_model(name, refused, tmp_path, capsys, one_thread):
    """Before: ``vitkit convert runs/mnist_short x --to hf`` said "export this hybrid to 'timm', 'npz' or
    'vitkit'", and --to timm and --to npz refused the model too. Each format the advice names is tried here."""
    import vitkit
    from vitkit.convert import save_as

    model = vitkit.create_model(name, depth=1)
    model.save_pretrained(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", refused]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "formats that can hold this model: " in err, err
    named = err.rsplit("formats that can hold this model: ", 1)[1].split(", ")
    assert "vitkit" in named and refused not in named
    suffix = {"timm": ".safetensors", "torchvision": ".pth", "npz": ".npz", "t2t": ".pth.tar"}
    for fmt in named:
        save_as(model, tmp_path / f"as_{fmt}{suffix.get(fmt, '')}", fmt)  # each one really holds it


def test_readme_gives_a_cpu_only_install_beside_the_default_one():
    """Before: the README's only install line pulled the CUDA build of torch on CPU-only machines."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = {name: re.search(rf"<!-- {name} -->\n```\n(.*?)\n```\n<!-- /{name} -->", readme, re.S)
              for name in ("main-command", "cpu-command")}
    assert all(blocks.values()), "the main and CPU-only install commands are both marked in the README"
    main, cpu = (blocks[n].group(1) for n in ("main-command", "cpu-command"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu and "--index-url" not in main
    # the same versions and the same steps, only the index differs
    assert cpu.replace(" --index-url https://download.pytorch.org/whl/cpu", "") == main


def test_one_public_loading_entry_per_meaning():
    """Before: vitkit.load_model and vitkit.from_pretrained had identical bodies, vitkit.convert.from_pretrained
    shared the name and read local files only, checkpoint.load_model bypassed the resolver, and
    vitkit.create_model and models.create_model shared a name and differed. Now one name per meaning."""
    import re

    import vitkit
    import vitkit.checkpoint
    import vitkit.convert
    import vitkit.models
    from vitkit import resolver

    assert vitkit.from_pretrained is vitkit.load_model is resolver.load_model  # an alias, not a copy
    assert vitkit.create_model is resolver.create_model
    for module, gone in ((vitkit.convert, "from_pretrained"), (vitkit.checkpoint, "load_model"),
                         (vitkit.models, "create_model")):
        assert not hasattr(module, gone), f"{module.__name__}.{gone} is back"
    assert callable(vitkit.convert.read_model) and callable(vitkit.models.build_registered)
    readme = (ROOT / "README.md").read_text()
    table = readme.split("One public entry per meaning:", 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| `(vitkit(?:\.\w+)+)\(", table, flags=re.MULTILINE)
    assert documented == ["vitkit.load_model", "vitkit.from_pretrained", "vitkit.create_model", "vitkit.build_model",
                          "vitkit.convert.read_model"]


def test_the_readme_test_command_runs_the_slow_tests_too():
    """`pytest -m "not slow"` is the quick loop; the README's command (and CI) must not leave the slow ones out."""
    import re

    import tomllib

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\n```\n(.*?)\n```", readme, re.S).group(1)
    after = command.split("pytest", 1)[1]
    assert " -m " not in after and "not slow" not in after
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m" not in ini.get("addopts", "").split() and any(m.startswith("slow:") for m in ini["markers"])
    assert 'pytest -m "not slow"' in readme  # and the quick loop is documented
