"""The benchmark: vitkit against timm's ViT of the same config, in one process, round-robin.

For each implementation and mode (``train`` = forward + backward + AdamW step, ``infer`` = forward
under ``inference_mode``) it reports images/s as min/median/max over repeats after warm-up, FLOPs per
image, achieved FLOP/s as a fraction of a matmul peak measured in the same rounds, and peak memory
per image. Optional input pipelines are timed next to the model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.bench.flops import count_flops
from vitkit.bench.memory import step_peak_memory
from vitkit.bench.peak import MatmulPeak
from vitkit.bench.profile import format_profile, top_operators
from vitkit.bench.reference import ReferenceUnavailable, reference_twin
from vitkit.bench.timing import Stats, time_round_robin
from vitkit.config_engine import check_fields
from vitkit.data import DataConfig
from vitkit.data.throughput import pipeline_throughput
from vitkit.deploy.runtime import OnnxModel
from vitkit.fileio import atomic_write_text
from vitkit.models.registry import build_model, list_models
from vitkit.resolver import load_source, source_config
from vitkit.runtime import DEFAULT_DEVICE, DTYPES, Precision, autocast, configure_cpu, physical_cores, resolve_device
from vitkit.version import __version__

Mode = Literal["train", "infer"]
PRECISIONS = {name: DTYPES[name] for name in typing.get_args(Precision)}
MODES: tuple[Mode, ...] = typing.get_args(Mode)
SCHEMA = "vitkit.bench/1"

PipelineFactory = Callable[[], Iterable[Any]]
"""Returns either a fresh iterable of batches (a tensor of images, or a tuple/list whose first item
is one), which the harness times, or a list of images/s figures that the pipeline measured itself
(e.g. ``lambda: vitkit.data.throughput.pipeline_throughput(cfg)``)."""


@dataclass
class BenchSettings:
    """What to measure. ``img_size=None`` keeps the model's own size."""

    model: str = "vit_cifar_patch4_32"
    batch_size: int = 128
    img_size: int | None = None
    precision: Precision = "fp32"
    compile: bool = False
    device: str = DEFAULT_DEVICE
    modes: tuple[Mode, ...] = MODES
    warmup: int = 2
    repeats: int = 5
    reference: bool = True
    threads: int | None = None
    tune_allocator: bool = True
    pipeline_batches: int = 20
    profile: bool = False
    """Also profile one vitkit call per mode with torch.profiler (top operators by self time)."""
    matmul_size: int | None = None
    """Side of the square matmul that measures the peak (default 2048 on CPU, 8192 on GPU)."""
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)  # precision and every mode: one of their Literal values
        if not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {', '.join(MODES)}")
        for name in ("batch_size", "repeats", "pipeline_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


# ----------------------------------------------------------------------------------- workloads
def _adamw(model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with the fused kernel where this build has it for the device, else the foreach one."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True), "AdamW(fused)"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05), "AdamW(foreach)"


class Workload:
    """One implementation's train step and inference call on fixed inputs."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, settings: BenchSettings,
                 device: torch.device) -> None:
        self.model = model
        self.images, self.labels = images, labels
        self.device = device
        self.precision = settings.precision
        self.runner = torch.compile(model) if settings.compile else model
        self.optimizer, self.optimizer_name = (None, None) if isinstance(model, OnnxModel) else _adamw(model)

    def _autocast(self):
        return autocast(self.precision, self.device)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.runner(self.images), self.labels)
        loss.backward()
        self.optimizer.step()

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.runner(self.images)

    def step(self, mode: str) -> Callable[[], None]:
        return self.train_step if mode == "train" else self.infer


def _count_model_flops(model: nn.Module, config, device: torch.device) -> dict[str, int]:
    """FLOPs per image, counted on a batch of two in fp32 eager mode (FLOPs do not depend on either)."""
    h, w = config.image_hw
    images = torch.randn(2, config.in_chans, h, w, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()  # no dropout / drop-path: the dense network's work
    forward = count_flops(model, images)
    train = count_flops(model, images, train=True, loss_fn=lambda out: F.cross_entropy(out, labels))
    model.train(was_training)
    return {"forward": forward // 2, "train": train // 2}


def _is_rates(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _time_pipeline(factory: PipelineFactory, batches: int, repeats: int) -> Stats:
    """Images/s of a pipeline: pulled through ``batches`` batches per pass, one warm-up pass first."""
    def images_in(batch: Any) -> int:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0])

    rates = []
    for _ in range(repeats + 1):  # the first pass warms caches and worker processes up
        source = factory()
        if _is_rates(source):  # the pipeline timed itself
            if any(r <= 0 for r in source):
                raise ValueError(f"pipeline reported non-positive images/s: {source}")
            return Stats.of([float(r) for r in source])
        start, count = time.perf_counter(), 0
        for _, batch in zip(range(batches), iter(source)):
            count += images_in(batch)
        elapsed = time.perf_counter() - start
        if count == 0:
            raise ValueError("the input pipeline yielded no batches")
        rates.append(count / elapsed)
    return Stats.of(rates[1:])


def data_pipelines(datasets: Iterable[str], settings: BenchSettings) -> dict[str, PipelineFactory]:
    """vitkit's own input pipelines (``vitkit.data``) for the named data sets, at the model's input size
    and the benchmark's batch size, with the default training augmentation."""
    img_size = settings.img_size or source_config(settings.model,
                                                  random_init=settings.model in list_models()).image_hw[0]
    pipelines: dict[str, PipelineFactory] = {}
    for name in datasets:
        cfg = DataConfig(dataset=name, img_size=img_size, batch_size=settings.batch_size)
        pipelines[f"{name} @{img_size}px"] = lambda cfg=cfg: pipeline_throughput(cfg)
    return pipelines


def load_pipelines(spec: str, settings: BenchSettings) -> Mapping[str, PipelineFactory]:
    """Resolve ``"package.module:function"`` and call it with the settings; it returns named factories."""

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--pipeline must look like 'package.module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--pipeline {spec!r}: {e}") from e
    pipelines = function(settings)
    if not isinstance(pipelines, Mapping) or not all(callable(f) for f in pipelines.values()):
        raise ValueError(f"--pipeline {spec!r} must return a mapping of names to callables")
    return pipelines


def machine_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": None, "processor": platform.processor()}

    info["cpus"] = physical_cores()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({info['processor']})"
    return info


# ------------------------------------------------------------------------------------ the run
def run_benchmark(settings: BenchSettings, pipelines: Mapping[str, PipelineFactory] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``settings.model`` (and timm's twin) and return the JSON-ready result."""

    say = log or (lambda message: None)
    load_before = _load_average()
    device = settings.resolved_device()
    runtime = configure_cpu(settings.threads, settings.tune_allocator) if device.type == "cpu" else {}
    overrides = dict(settings.overrides)
    if settings.img_size is not None:
        overrides["img_size"] = settings.img_size
    torch.manual_seed(0)
    if str(settings.model).lower().endswith(".onnx"):
        overrides["threads"] = settings.threads
    resolved = load_source(settings.model, random_init=settings.model in list_models(), **overrides)
    say(f"model: {resolved.description}")
    model = resolved.model.to(device)
    onnx = isinstance(model, OnnxModel)
    if onnx:  # an exported graph: inference only, float32 input, nothing to compare with
        if settings.compile or settings.precision != "fp32":
            raise ValueError(f"{settings.model}: an ONNX model is timed as exported (no --compile, --precision fp32)")
        if "train" in settings.modes:
            say("an ONNX model is timed for inference only")
        settings = dataclasses.replace(settings, modes=("infer",), reference=False)
    config = model.config
    h, w = config.image_hw
    images = torch.randn(settings.batch_size, config.in_chans, h, w, device=device)
    labels = torch.randint(0, max(config.num_classes, 1), (settings.batch_size,), device=device)

    impls: dict[str, nn.Module] = {"vitkit": model}
    reference_note, timm_version, parity = None, None, None
    if settings.reference:
        try:
            impls["timm"] = reference_twin(model).to(device)
            import timm  # the optional reference (the test extra); reference_twin has just imported it

            timm_version = timm.__version__
            parity = _parity(model, impls["timm"], images[:4])
        except ReferenceUnavailable as e:
            reference_note = str(e)
            say(f"reference skipped: {e}")

    say("counting FLOPs")
    twin = build_model(config) if onnx else model  # an ONNX graph's FLOPs and size: its eager architecture's
    flops = _count_model_flops(twin, config, device)
    reference_flops = _count_model_flops(impls["timm"], config, device) if "timm" in impls else None

    workloads = {name: Workload(m, images, labels, settings, device) for name, m in impls.items()}
    peak = MatmulPeak(device, PRECISIONS[settings.precision], n=settings.matmul_size)
    candidates: dict[str, Callable[[], object]] = {"matmul_peak": peak.sample}
    for mode in settings.modes:
        for name, workload in workloads.items():
            candidates[f"{name}/{mode}"] = workload.step(mode)
    say(f"timing {len(candidates) - 1} workloads x {settings.repeats} repeats on {device}"
        f" ({settings.warmup} warm-up calls each{', compiling' if settings.compile else ''})")
    seconds = time_round_robin(candidates, warmup=settings.warmup, repeats=settings.repeats, device=device)
    peak_rates = peak.samples[-settings.repeats:]

    runs: dict[str, dict[str, Any]] = {name: {} for name in impls}
    for mode in settings.modes:
        for name, workload in workloads.items():
            times = seconds[f"{name}/{mode}"]
            rates = [settings.batch_size / t for t in times]
            per_image = flops["train" if mode == "train" else "forward"]
            achieved = [r * per_image for r in rates]
            memory, memory_source = step_peak_memory(workload.step(mode), device)
            runs[name][mode] = {
                "images_per_s": Stats.of(rates).to_dict(),
                "step_seconds": Stats.of(times).to_dict(),
                "flops_per_s": Stats.of(achieved).to_dict(),
                "fraction_of_peak": Stats.of([a / p for a, p in zip(achieved, peak_rates)]).to_dict(),
                "peak_memory_bytes": memory,
                "memory_per_image_bytes": None if memory is None else memory / settings.batch_size,
                "memory_source": memory_source,
            }

    profiles = {}
    if settings.profile:
        for mode in settings.modes:
            say(f"profiling one vitkit {mode} call")
            profiles[mode] = top_operators(workloads["vitkit"].step(mode), device)

    ratios = {}
    if "timm" in impls:
        for mode in settings.modes:
            paired = [t / v for v, t in zip(seconds[f"vitkit/{mode}"], seconds[f"timm/{mode}"])]
            ratios[mode] = Stats.of(paired).to_dict()

    pipeline_results = {}
    train_rate = runs["vitkit"]["train"]["images_per_s"]["median"] if "train" in settings.modes else None
    for name, factory in (pipelines or {}).items():
        say(f"timing input pipeline {name!r}")
        stats = _time_pipeline(factory, settings.pipeline_batches, settings.repeats)
        pipeline_results[name] = {"images_per_s": stats.to_dict(),
                                  "vs_model_train": None if not train_rate else stats.median / train_rate}

    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"vitkit": _vitkit_version(), "torch": torch.__version__, "timm": timm_version},
        "machine": {**machine_description(device), **runtime,
                    "load_average_1min": {"start": load_before, "end": _load_average()}},
        "settings": {**dataclasses.asdict(settings), "device": str(device)},
        "model": {"name": settings.model, "params": sum(p.numel() for p in twin.parameters()),
                  "config": config.to_dict()},
        "optimizer": workloads["vitkit"].optimizer_name,
        "runtime": f"onnxruntime ({model.precision})" if onnx else "torch eager",
        "flops_per_image": flops,
        "reference_flops_per_image": reference_flops,
        "matmul_peak": {"n": peak.n, "dtype": settings.precision, "backend": peak.best_backend,
                        "flops_per_s": Stats.of(peak_rates).to_dict()},
        "runs": runs,
        "ratio_vitkit_over_timm": ratios,
        "parity_max_abs_diff": parity,
        "reference_note": reference_note,
        "pipelines": pipeline_results,
        "profile_vitkit": profiles,
    }


def _parity(model: nn.Module, reference: nn.Module, images: Tensor) -> float:
    """Largest |logit difference| between vitkit and the reference on the same images (eval mode)."""
    model.eval(), reference.eval()
    with torch.no_grad():
        return float((model(images).float() - reference(images).float()).abs().max())


def _load_average() -> float | None:
    """The 1-minute load average: on a shared machine, read every timing next to it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _vitkit_version() -> str:
    return __version__


# ---------------------------------------------------------------------------------- reporting
def format_table(result: dict[str, Any]) -> str:
    """The result as a terminal table."""
    s = result["settings"]
    peak = result["matmul_peak"]
    lines = [
        f"{result['model']['name']}  batch {s['batch_size']}  {s['precision']}  compile={s['compile']}  "
        f"on {result['machine']['device']}  ({result['machine'].get('threads', '-')} threads, "
        f"load {_fmt_load(result['machine']['load_average_1min'])})",
        f"FLOPs/image: forward {result['flops_per_image']['forward'] / 1e6:.1f} M, "
        f"train step {result['flops_per_image']['train'] / 1e6:.1f} M;  "
        f"matmul peak {peak['flops_per_s']['median'] / 1e9:.0f} GFLOP/s "
        f"({peak['n']}^3 {peak['dtype']}, {peak['backend']})",
        "",
        f"{'impl':8s} {'mode':6s} {'img/s min':>10s} {'median':>9s} {'max':>9s} {'GFLOP/s':>9s} "
        f"{'% peak':>7s} {'MiB/img':>8s}",
    ]
    for name, modes in result["runs"].items():
        for mode, r in modes.items():
            ips = r["images_per_s"]
            mem = r["memory_per_image_bytes"]
            lines.append(
                f"{name:8s} {mode:6s} {ips['min']:10.1f} {ips['median']:9.1f} {ips['max']:9.1f} "
                f"{r['flops_per_s']['median'] / 1e9:9.1f} {100 * r['fraction_of_peak']['median']:6.1f}% "
                f"{'-' if mem is None else f'{mem / 2**20:8.2f}':>8s}")
    for mode, ratio in result["ratio_vitkit_over_timm"].items():
        lines.append(f"vitkit/timm {mode}: {ratio['median']:.2f}x (paired rounds: min {ratio['min']:.2f}, "
                     f"max {ratio['max']:.2f})")
    if result["parity_max_abs_diff"] is not None:
        lines.append(f"parity with timm (same weights): max |logit diff| {result['parity_max_abs_diff']:.2e}")
    if result["reference_note"]:
        lines.append(f"reference: {result['reference_note']}")
    for name, p in result["pipelines"].items():
        vs = p["vs_model_train"]
        lines.append(f"pipeline {name}: {p['images_per_s']['median']:.0f} img/s"
                     + (f" ({vs:.1f}x the model's training throughput)" if vs else ""))
    for mode, table in result.get("profile_vitkit", {}).items():
        lines += ["", f"vitkit {mode}: top operators of one profiled call", format_profile(table)]
    return "\n".join(lines)


def _fmt_load(load: dict[str, float | None]) -> str:
    if load["start"] is None:
        return "n/a"
    return f"{load['start']:.1f}->{load['end']:.1f}"


def save_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write the result atomically (a crash never leaves half a file)."""

    atomic_write_text(json.dumps(result, indent=2) + "\n", path)
    return Path(path)
