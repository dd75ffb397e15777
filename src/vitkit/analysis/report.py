"""The analysis report: every figure as PNG, the numbers as JSON/CSV, and a self-contained
``index.html`` that shows them all (relative links only, so it opens from disk with no server).
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from vitkit.analysis.inputs import describe_labels, load_images, prepare_images
from vitkit.analysis.pipeline import ModelAnalysis, analyze_model
from vitkit.analysis.plots import (
    plot_attention_distance,
    plot_filters,
    plot_head_attention,
    plot_position_similarity,
    plot_rollout,
    save_png,
)
from vitkit.analysis.position import similarity_by_distance
from vitkit.fileio import atomic_write_text
from vitkit.resolver import ResolvedModel, load_source
from vitkit.runtime import DEFAULT_DEVICE, resolve_device

FILES = {
    "filters_png": "patch_embedding_pca.png",
    "filters_json": "patch_embedding_pca.json",
    "position_png": "position_embedding_similarity.png",
    "position_csv": "position_embedding_similarity.csv",
    "distance_png": "mean_attention_distance.png",
    "distance_csv": "mean_attention_distance.csv",
    "rollout_png": "attention_rollout.png",
    "heads_png": "attention_heads_last_layer.png",
    "maps_json": "attention_maps.json",
    "summary_json": "summary.json",
    "index": "index.html",
}


def analyze(source: str | ResolvedModel, dataset: str, out_dir: str | Path, *, num_images: int = 128,
            num_show: int = 8, num_head_rows: int = 4, batch_size: int = 32, data_dir: str | Path | None = None,
            device: str | torch.device | None = DEFAULT_DEVICE, seed: int = 0) -> Path:
    """Load ``source`` (any model SOURCE, see :func:`vitkit.resolver.load_source`, or a model already
    resolved), analyse it on ``num_images`` images of ``dataset`` and write the report to ``out_dir``.
    Returns the path of ``index.html``."""
    start = time.perf_counter()
    resolved = source if isinstance(source, ResolvedModel) else load_source(source)
    source, description = resolved.source.spec, resolved.description
    device = str(resolve_device(device))
    model = resolved.model.to(device)
    sample = load_images(dataset, num_images, data_dir=data_dir, seed=seed)
    inputs, display = prepare_images(sample, model)
    loaded = time.perf_counter() - start
    analysis = analyze_model(model, inputs, num_show=num_show, batch_size=batch_size)
    analysis.seconds["load"] = loaded
    config = model.config
    preprocessing = config.preprocessing()
    shown = min(num_show, len(display))
    info = {
        "source": source, "loaded": description, "model_name": getattr(config, "name", None),
        "config": {k: getattr(config, k, None) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                                    "num_classes", "class_token", "global_pool")},
        "dataset": dataset, "data_source": sample.source, "image_indices": sample.indices.tolist(),
        "normalisation": {"mean": list(preprocessing.mean), "std": list(preprocessing.std)},
        "preprocessing": preprocessing.to_dict(), "device": device,
    }
    titles = describe_labels(sample.labels[:shown], sample.class_names)
    paths = write_report(analysis, out_dir, display_images=display[:shown], titles=titles, info=info,
                         num_head_rows=num_head_rows, image_indices=sample.indices[:shown].tolist())
    return paths[-1]


def write_report(analysis: ModelAnalysis, out_dir: str | Path, *, display_images: np.ndarray,
                 titles: Optional[Sequence[str]] = None, info: Optional[dict[str, Any]] = None,
                 num_head_rows: int = 4, image_indices: Optional[Sequence[int]] = None) -> list[Path]:
    """Write figures, data files and ``index.html`` for ``analysis`` into ``out_dir``.

    ``display_images`` are the uint8 (N, H, W, C) inputs at model resolution matching
    ``analysis.rollout``. Returns every path written, ``index.html`` last.
    """
    start = time.perf_counter()
    report = _Report(Path(out_dir))
    info = dict(info or {})
    _filters_section(report, analysis)
    similarity_curve = _position_section(report, analysis)
    _distance_section(report, analysis, image_size=int(display_images.shape[1]))
    _attention_sections(report, analysis, display_images, titles, num_head_rows, image_indices)

    layer_stats = [{"layer": layer + 1, "min_px": float(row.min()), "median_px": float(np.median(row)),
                    "max_px": float(row.max())} for layer, row in enumerate(analysis.mean_distance)]
    summary = {
        **info,
        "num_images": analysis.num_images, "grid_size": list(analysis.grid_size),
        "patch_pixels": analysis.patch_pixels, "num_prefix_tokens": analysis.num_prefix_tokens,
        "uniform_attention_distance_px": analysis.uniform_distance,
        "mean_attention_distance_by_layer": layer_stats,
        "position_similarity_by_distance": similarity_curve,
        "filters_explained_variance_ratio": (
            None if analysis.filters is None else analysis.filters.explained_variance_ratio),
        "notes": analysis.notes, "seconds": dict(analysis.seconds, report=time.perf_counter() - start),
        "files": [p.name for p in report.written] + [FILES["summary_json"], FILES["index"]],
    }
    report.text(_json(summary), FILES["summary_json"])
    report.text(_html(info, analysis, report.sections), FILES["index"])
    return report.written


class _Report:
    """Collects the files written (made readable) and the HTML sections that present them."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.written: list[Path] = []
        self.sections: list[str] = []

    def text(self, content: str, name: str) -> None:
        atomic_write_text(content, self.out / name)
        self.written.append(_readable(self.out / name))

    def figure(self, figure, name: str) -> None:
        self.written.append(_readable(save_png(figure, self.out / name)))

    def section(self, title: str, image: str, data: Sequence[str], explanation: str) -> None:
        links = ", ".join(f'<a href="{html.escape(d)}">{html.escape(d)}</a>' for d in data)
        self.sections.append(f'<section>\n<h2>{html.escape(title)}</h2>\n<p>{explanation}</p>\n'
                             f'<img src="{html.escape(image)}" alt="{html.escape(title)}">\n'
                             f'<p class="data">Numbers: {links}</p>\n</section>')

    def skipped(self, title: str, note: str) -> None:
        self.sections.append(f'<section>\n<h2>{html.escape(title)}</h2>\n'
                             f'<p class="note">{html.escape(note)}</p>\n</section>')


def _filters_section(report: _Report, analysis: ModelAnalysis) -> None:
    title = "Patch-embedding filters"
    pca = analysis.filters
    if pca is None:
        report.skipped(title, analysis.notes.get("filters", "skipped"))
        return
    report.figure(plot_filters(pca), FILES["filters_png"])
    report.text(_json({"explained_variance_ratio": pca.explained_variance_ratio,
                       "components_shape": list(pca.components.shape), "components": pca.components}, indent=None),
                FILES["filters_json"])
    share = 100 * float(pca.explained_variance_ratio.sum())
    report.section(
        title, FILES["filters_png"], [FILES["filters_json"]],
        "The patch embedding projects each flattened patch linearly; its rows are filters in pixel space. "
        f"Shown are the top {len(pca.components)} principal components of these filters ({share:.0f}% of their "
        "variance), each on its own colour scale, with its share of the variance. In the paper (Fig. 7, left) "
        "they resemble plausible basis functions for the fine structure within each patch: smooth colour "
        "blobs, then oriented edges and higher frequencies.")


def _position_section(report: _Report, analysis: ModelAnalysis) -> Optional[list[dict[str, float]]]:
    title = "Position-embedding similarity"
    similarity = analysis.position_similarity
    if similarity is None:
        report.skipped(title, analysis.notes.get("position", "skipped"))
        return None
    report.figure(plot_position_similarity(similarity), FILES["position_png"])
    report.text(_similarity_csv(similarity), FILES["position_csv"])
    distances, means = similarity_by_distance(similarity)
    report.section(
        title, FILES["position_png"], [FILES["position_csv"]],
        "Tile (r, c) shows the cosine similarity between the position embedding of the patch in row r, "
        "column c and those of all patches. The paper (Fig. 7, centre) finds that the model learns the 2-D "
        "image topology: closer patches have more similar embeddings, and patches in the same row or "
        "column are similar. Mean similarity by distance (in patches): "
        + ", ".join(f"{d}: {s:.2f}" for d, s in list(zip(distances, means))[:6]) + ".")
    return [{"distance_patches": int(d), "mean_similarity": float(s)} for d, s in zip(distances, means)]


def _distance_section(report: _Report, analysis: ModelAnalysis, image_size: int) -> None:
    report.figure(plot_attention_distance(analysis.mean_distance, analysis.uniform_distance, image_size),
                  FILES["distance_png"])
    report.text(_distance_csv(analysis), FILES["distance_csv"])
    report.section(
        "Mean attention distance", FILES["distance_png"], [FILES["distance_csv"]],
        f"Each dot is one head: the attention-weighted mean distance in pixels between a query patch and the "
        f"patches it attends to, averaged over query patches and {analysis.num_images} images (the "
        "transformer's analogue of a receptive-field size). The class token is left out on both sides: it is "
        "not a query, and the attention paid to it is dropped and the rest renormalised. Dashed line: uniform "
        f"attention over all patches ({analysis.uniform_distance:.1f} px). The paper (Fig. 7, right) finds some "
        "heads attending globally already in the lowest layers, others locally, with the distance growing "
        "with depth.")


def _attention_sections(report: _Report, analysis: ModelAnalysis, display_images: np.ndarray,
                        titles: Optional[Sequence[str]], num_head_rows: int,
                        image_indices: Optional[Sequence[int]]) -> None:
    shown = len(analysis.rollout)
    depth = analysis.mean_distance.shape[0]
    rows = min(num_head_rows, shown)
    if analysis.num_prefix_tokens:
        query, query_note = "class token", "the class token's row"
    else:
        query, query_note = "mean patch query", "the mean of the patch rows (the model has no class token)"
    report.figure(plot_rollout(display_images[:shown], analysis.rollout, titles,
                               title=f"Attention rollout: what the {query} attends to, through all layers"),
                  FILES["rollout_png"])
    report.figure(plot_head_attention(display_images[:rows], analysis.last_layer_attention[:rows],
                                      titles[:rows] if titles is not None else None,
                                      title=f"Raw attention of the {query}, each head of layer {depth}"),
                  FILES["heads_png"])
    maps = [{"index": int(image_indices[i]) if image_indices is not None else i,
             "label": titles[i] if titles is not None else None,
             "rollout": analysis.rollout[i], "last_layer_heads": analysis.last_layer_attention[i]}
            for i in range(shown)]
    report.text(_json({"grid_size": list(analysis.grid_size), "num_prefix_tokens": analysis.num_prefix_tokens,
                       "images": maps}, indent=None), FILES["maps_json"])
    report.section(
        "Attention rollout", FILES["rollout_png"], [FILES["maps_json"]],
        "Attention rollout (Abnar &amp; Zuidema, 2020), the method behind the paper's Fig. 6: the attention of "
        "each layer is averaged over heads, the identity is added for the residual connection, rows are "
        "renormalised, and the matrices are multiplied through all layers; "
        f"{query_note}, laid out on the patch grid, shows which input regions reach the representation used "
        "for classification. Middle "
        "row: the map over the input; bottom row: the input multiplied by the map, as in the paper. Each map "
        "is scaled to its own maximum.")
    report.section(
        "Last-layer attention per head", FILES["heads_png"], [FILES["maps_json"]],
        f"The raw attention of the {query} in layer {depth}, one map per head, without rollout; each map "
        "on its own scale. Heads often specialise: some follow the object, others the background.")


# ---------------------------------------------------------------------------------------- formats
def _readable(path: Path) -> Path:
    """Atomic writes create private (0600) temporary files; a report is meant to be shared and served."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def _json(data: Any, indent: Optional[int] = 1) -> str:
    """JSON with numpy arrays as (rounded) lists; ``indent=None`` keeps large arrays compact."""
    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return np.round(value.astype(float), 6).tolist()
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, tuple):
            return list(value)
        raise TypeError(f"cannot write {type(value).__name__} as JSON")

    return json.dumps(data, indent=indent, default=plain) + "\n"


def _similarity_csv(similarity: np.ndarray) -> str:
    rows, cols = similarity.shape[:2]
    names = [f"r{r}c{c}" for r in range(rows) for c in range(cols)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["position", *names])
    for name, values in zip(names, similarity.reshape(rows * cols, rows * cols)):
        writer.writerow([name, *(f"{v:.5f}" for v in values)])
    return buffer.getvalue()


def _distance_csv(analysis: ModelAnalysis) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["layer", "head", "mean_distance_px", "std_across_images_px"])
    for layer, (means, stds) in enumerate(zip(analysis.mean_distance, analysis.mean_distance_std)):
        for head, (m, s) in enumerate(zip(means, stds)):
            writer.writerow([layer + 1, head + 1, f"{m:.4f}", f"{s:.4f}"])
    return buffer.getvalue()


def _format_normalisation(normalisation: Optional[dict[str, Sequence[float]]]) -> str:
    if not normalisation:
        return "unknown"
    mean, std = (", ".join(f"{v:g}" for v in normalisation[k]) for k in ("mean", "std"))
    return f"(x - [{mean}]) / [{std}] on [0, 1] pixels"


def _html(info: dict[str, Any], analysis: ModelAnalysis, sections: Sequence[str]) -> str:
    config = info.get("config", {})
    facts = [("Model", info.get("loaded") or info.get("source") or "model"),
             ("Architecture", ", ".join(f"{k} {v}" for k, v in config.items())),
             ("Images", f"{analysis.num_images} from {info.get('dataset', '?')} ({info.get('data_source', '')})"),
             ("Patch grid", f"{analysis.grid_size[0]} x {analysis.grid_size[1]}, {analysis.patch_pixels:g} px apart, "
                            f"{analysis.num_prefix_tokens} prefix token(s)"),
             ("Normalisation", _format_normalisation(info.get("normalisation"))),
             ("Time", ", ".join(f"{k} {v:.1f} s" for k, v in analysis.seconds.items()))]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    title = f"vitkit analysis: {info.get('model_name') or info.get('source') or 'model'}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em 0.2em 0; vertical-align: top; font-size: 0.92em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
section {{ margin-bottom: 2.5em; }}
.data, .note {{ font-size: 0.9em; color: #555; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>What this Vision Transformer learned, after the analyses of Dosovitskiy et al. (2020), Sec. 4.5
"Inspecting Vision Transformer".
Summary of all numbers: <a href="{FILES['summary_json']}">{FILES['summary_json']}</a>.</p>
<table>
{rows}
</table>
{chr(10).join(sections)}
</body>
</html>
"""
